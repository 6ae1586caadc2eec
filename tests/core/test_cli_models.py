"""The command line on models: generate with tags, headless training (one process and data-parallel), the demo."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import hypernetwork_ext as hx
from hypernetwork_ext.standalone.cli import main
from hypernetwork_ext.standalone.tiny import TINY_WIDTHS, procedural_images
from tests.support.networks import visible

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def library(tmp_path):
    folder = tmp_path / "hypernetworks"
    hx.save(visible(hx.create(TINY_WIDTHS, activation="relu", seed=1, name="inky"), 1), folder / "inky.safetensors")
    hx.save(hx.create([768, 320, 640, 1280], seed=2, name="sd1net"), folder / "sd1net.pt")
    return folder


def test_generate_with_tags_writes_png_with_infotext(library, tmp_path, capsys):
    out = tmp_path / "out.png"
    code = main(
        [
            "generate",
            "a red circle <hypernet:inky:0.8>",
            "--hypernetwork-dir",
            str(library),
            "--steps",
            "3",
            "--width",
            "64",
            "--height",
            "64",
            "-o",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    parameters = Image.open(out).info["parameters"]
    assert parameters.startswith("a red circle <hypernet:inky:0.8>")
    assert f'Hypernet hashes: "inky: {hx.file_sha256(library / "inky.safetensors")[:10]}"' in parameters
    assert "Steps: 3" in parameters and "Seed: 0" in parameters
    plain = tmp_path / "plain.png"
    main(["generate", "a red circle", "--steps", "3", "--width", "64", "--height", "64", "-o", str(plain), "--quiet"])
    assert Image.open(out).tobytes() != Image.open(plain).tobytes()


def test_generate_records_the_size_it_rendered_when_none_was_given(tmp_path, capsys):
    """Without --width/--height the model's own size is used, and the PNG says which (not "autoxauto")."""
    out = tmp_path / "out.png"
    assert main(["generate", "a red circle", "--steps", "2", "-o", str(out), "--quiet"]) == 0
    image = Image.open(out)
    assert image.size == (64, 64)
    assert "Size: 64x64," in image.info["parameters"]


def test_generate_fold_limit_changes_memory_not_the_image(tmp_path, monkeypatch):
    from hypernetwork_ext.standalone import generate as generation

    limits = []

    class Recorded(generation.Attachment):
        def remove(self):
            limits.append((self.fold_limit, self.memory().kinds()["folds"]))
            super().remove()

    monkeypatch.setattr(generation, "Attachment", Recorded)
    folder = tmp_path / "hypernetworks"
    hx.save(visible(hx.create(TINY_WIDTHS, activation="linear", seed=3, name="flat"), 3), folder / "flat.pt")
    small = ["--hypernetwork-dir", str(folder), "--steps", "2", "--width", "64", "--height", "64", "--quiet"]
    images = {}
    for limit in ("-1", "0"):
        out = tmp_path / f"limit{limit}.png"
        assert (
            main(["generate", "a red circle <hypernet:flat:0.8>", *small, "--fold-limit", limit, "-o", str(out)]) == 0
        )
        images[limit] = np.asarray(Image.open(out), dtype=np.int16)
    assert np.abs(images["-1"] - images["0"]).max() <= 1  # the unfolded path: the same to float rounding
    assert limits[0][0] is None and limits[0][1] > 0 and limits[1] == (0, 0)
    main(["generate", "a red circle <hypernet:flat:0.8>", *small, "-o", str(tmp_path / "default.png")])
    assert limits[2][0] == 256 << 20 == hx.memory.DEFAULT_FOLD_LIMIT


def test_generate_reports_bad_tags_and_still_writes(library, tmp_path, capsys):
    out = tmp_path / "out.png"
    code = main(
        [
            "generate",
            "x <hypernet:nosuch:1> <hypernet:sd1net:1> <hypernet:inky:k=zz>",
            "--hypernetwork-dir",
            str(library),
            "--steps",
            "2",
            "--width",
            "64",
            "--height",
            "64",
            "-o",
            str(out),
            "--quiet",
        ]
    )
    err = capsys.readouterr().err
    assert code == 1 and out.exists()
    assert "nosuch" in err and "sd1net" in err and "k=zz" in err


def test_generate_grid(library, tmp_path, capsys):
    out = tmp_path / "grid.png"
    code = main(
        [
            "generate",
            "a blue square <hypernet:inky> <hypernet:nosuch>",
            "--hypernetwork-dir",
            str(library),
            "--grid=-1,0,1",
            "--steps",
            "2",
            "--width",
            "64",
            "--height",
            "64",
            "-o",
            str(out),
        ]
    )
    assert code == 1  # a tag was skipped; the grid is still written
    assert Image.open(out).size[0] >= 3 * 64
    err = capsys.readouterr().err
    assert err.count("no hypernetwork named 'nosuch'") == 1  # before sampling, not again for every multiplier


def _train_args(tmp_path, *extra):
    data = tmp_path / "data"
    if not data.exists():
        procedural_images(data, 4, seed=1, colour="blue")
    return [
        "train", "--data-root", str(data), "--output-dir", str(tmp_path / "nets"), "--log-directory", str(tmp_path / "logs"),
        "--steps", "3", "--learn-rate", "0.001", "--batch-size", "2", "--training-width", "64", "--training-height", "64",
        "--create-image-every", "0", "--save-hypernetwork-every", "2", "--template-filename", "filewords.txt", "--seed", "5", "--quiet", *extra,
    ]  # fmt: skip


def test_train_creates_and_trains(tmp_path, capsys):
    code = main(
        _train_args(
            tmp_path,
            "--create",
            "blue",
            "--activation",
            "relu",
            "--init-seed",
            "1",
            "--save-preset",
            str(tmp_path / "p.json"),
        )
    )
    assert code == 0
    assert (tmp_path / "nets" / "blue.safetensors").exists() and (tmp_path / "nets" / "blue-3.safetensors").exists()
    trained = hx.load(tmp_path / "nets" / "blue-3.safetensors")
    assert trained.step == 3 and trained.widths == [48, 32, 64] and trained.name == "blue-3"
    preset = json.loads((tmp_path / "p.json").read_text())
    assert preset["options"]["learn_rate"] == "0.001" and "data_root" not in preset["options"]
    code = main(
        _train_args(
            tmp_path,
            "--network",
            str(tmp_path / "nets" / "blue-3.safetensors"),
            "--preset",
            str(tmp_path / "p.json"),
            "--steps",
            "5",
        )
    )
    assert (
        code == 0 and hx.load(tmp_path / "nets" / "blue-5.safetensors").step == 5
    )  # named by its base name and true step


def test_train_defaults_follow_the_loaded_model(tmp_path, monkeypatch, capsys):
    """A1111's 512 px on the embedded 64 px model took 74 s a step and drew garbage: sizes the
    user leaves open follow the model (64 here, 512 for SD1.5, 1024 for SDXL); given ones win."""
    import types

    import hypernetwork_ext.training as training

    seen = []

    def record(network, backend, config, *args, **kwargs):
        seen.append(config)
        return types.SimpleNamespace(path=None, stopped="finished")

    monkeypatch.setattr(training, "train", record)
    procedural_images(tmp_path / "data", 2, seed=1, colour="blue")
    base = ["train", "--data-root", str(tmp_path / "data"), "--output-dir", str(tmp_path / "nets"), "--quiet"]
    assert main([*base, "--create", "a", "--steps", "1"]) == 0
    assert "training at 64x64, the model's own size" in capsys.readouterr().err
    assert main([*base, "--create", "b", "--training-width", "128"]) == 0
    (tmp_path / "p.json").write_text(json.dumps({"options": {"training_height": 96, "preview_width": 256}}))
    assert main([*base, "--create", "c", "--preset", str(tmp_path / "p.json")]) == 0
    sizes = [(c.training_width, c.training_height, c.preview_width, c.preview_height, c.bucket_step) for c in seen]
    assert sizes == [(64, 64, 64, 64, 8), (128, 64, 64, 64, 8), (64, 96, 256, 64, 8)]


@pytest.mark.parametrize("sample_size,vae_blocks,size", [(8, 4, 64), (64, 4, 512), (96, 4, 768), (128, 4, 1024)])
def test_a_models_own_size_comes_from_its_unet_and_vae(sample_size, vae_blocks, size):
    import types

    from hypernetwork_ext.standalone.pipelines import native_image_size

    pipe = types.SimpleNamespace(
        unet=types.SimpleNamespace(config=types.SimpleNamespace(sample_size=sample_size)),
        vae=types.SimpleNamespace(config=types.SimpleNamespace(block_out_channels=[1] * vae_blocks)),
    )
    assert native_image_size(pipe) == size


def test_train_explains_bad_options(tmp_path, capsys):
    code = main(_train_args(tmp_path, "--create", "x", "--learn-rate", "fast", "--batch-size", "0"))
    err = capsys.readouterr().err
    assert code == 2 and "learn_rate" in err and "batch_size" in err
    assert main(_train_args(tmp_path)) == 2  # neither --network nor --create


def _data_parallel_worker(rank, world, port, folder, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        from hypernetwork_ext.standalone.pipelines import load_model
        from hypernetwork_ext.standalone.workflows import new_network_for, training_backend
        from hypernetwork_ext.training import TrainingConfig, train

        source = load_model(None)
        network = new_network_for(source, "dp", activation="relu", seed=None)  # differs per process until broadcast
        config = TrainingConfig(
            hypernetwork_name="dp", data_root=str(folder / "data"), log_directory=str(folder / "logs"), learn_rate="0.001",
            batch_size=1, training_width=64, training_height=64, steps=3, create_image_every=0, save_hypernetwork_every=0,
            template_filename="filewords.txt", seed=9,
        )  # fmt: skip
        result = train(network, training_backend(source), config, output_dir=str(folder / "nets"), progress_bar=False)
        queue.put((rank, hx.content_hash(result.network), result.path))
    finally:
        torch.distributed.destroy_process_group()


def test_data_parallel_training_keeps_processes_in_step(tmp_path):
    import socket

    import torch.multiprocessing as mp

    procedural_images(tmp_path / "data", 4, seed=2, colour="green")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.get_context("spawn")
    queue = context.Queue()
    processes = [
        context.Process(target=_data_parallel_worker, args=(rank, 2, port, tmp_path, queue)) for rank in range(2)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=300)
        assert process.exitcode == 0
    results = dict((rank, (digest, path)) for rank, digest, path in (queue.get(timeout=5) for _ in range(2)))
    assert results[0][0] == results[1][0]  # identical weights after broadcast + averaged gradients
    assert results[0][1] and results[1][1] is None  # only the main process writes
    assert sorted(p.name for p in (tmp_path / "nets").iterdir()) == ["dp-3.pt"]


def test_train_under_accelerate_launch(tmp_path):
    procedural_images(tmp_path / "data", 4, seed=3)
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "hypernetwork_ext", "train", "--create", "acc",
        "--data-root", str(tmp_path / "data"), "--output-dir", str(tmp_path / "nets"), "--steps", "2", "--batch-size", "1",
        "--training-width", "64", "--training-height", "64", "--create-image-every", "0", "--save-hypernetwork-every", "0",
        "--log-directory", str(tmp_path / "logs"), "--template-filename", "filewords.txt", "--device", "cpu", "--quiet",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    finished = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "nets").iterdir()) == ["acc-2.safetensors", "acc.safetensors"]
    assert finished.stdout.count("wrote") == 1


def test_demo_runs_end_to_end_and_generate_finds_its_networks(tmp_path, monkeypatch, capsys):
    """In a process of its own, as users run it: its console shows progress and the results, and
    neither the untrained network's inspect block nor transformers' notices about torchvision."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "hypernetwork_ext", "demo", "--steps", "6"]
    finished = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-2000:]
    run = next((tmp_path / "hypernetwork-demo").glob("run-*"))
    assert (tmp_path / "hypernetwork-demo" / "latest").resolve() == run.resolve()
    # the README's next command, verbatim but smaller: the demo's network by name, suffix included
    monkeypatch.chdir(tmp_path)
    small = ["--steps", "2", "--width", "64", "--height", "64", "--quiet"]
    assert main(["generate", "a red circle <hypernet:demo-trained.safetensors:0.8>", *small, "-o", "a.png"]) == 0
    capsys.readouterr()
    assert main(["generate", "a red circle <hypernet:demo-trained>", *small, "-o", "b.png"]) == 0
    assert capsys.readouterr().err == ""  # one file answers to the name: no note on the README's first command
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["stopped"] == "finished"
    assert [step for step, _loss in summary["fixed_noise_loss"]] == [0, 1, 2, 3, 4, 5, 6]
    for name in ("multiplier-grid.png", "loss.png", "networks/demo-trained.safetensors", "a1111/demo-trained.pt"):
        assert (run / name).exists(), name
    networks = sorted(path.name for path in (run / "networks").iterdir() if path.suffix in (".pt", ".safetensors"))
    assert networks == ["demo-trained.safetensors", "demo.safetensors"]
    assert hx.load(run / "a1111" / "demo-trained.pt").step == 6
    rows = next(run.glob("logs/**/hypernetwork_loss.csv")).read_text().splitlines()
    assert len(rows) == 7  # a header and every step (the host's default of 500 wrote nothing in 120 steps)
    differences = summary["mean_pixel_difference_from_multiplier_0"]
    assert differences["0"] == 0 and differences["1"] > 0
    assert summary["style_share_of_dataset"] > 0.7 and set(summary["style_share_by_multiplier"]) == {
        "0", "0.25", "0.5", "0.75", "1"
    }  # fmt: skip
    printed, errors = finished.stdout, finished.stderr
    assert "multiplier grid:" in printed and run.name in printed and "night style" in printed
    assert "loss at fixed noise (training images): " in printed
    assert "layer structure:" not in printed  # the untrained network's inspect block
    assert "threads: 1 (OMP_NUM_THREADS=1; --threads N or HYPERNETWORK_THREADS=N to choose)" in printed
    assert summary["threads"] == 1 and "load_average_at_end" in summary
    # every bar says what it counts and estimates the time left (elapsed<remaining); no anonymous per-image bars
    bars = [part for part in re.split(r"[\r\n]+", errors) if re.search(r"\| *\d+/\d+ \[", part)]
    described = ("Encoding the dataset: ", "Training hypernetwork demo-trained: ", "Rendering the multiplier grid: ")
    assert bars and all(bar.startswith(described) for bar in bars)
    started = [bar for bar in bars if not re.search(r"\| *0/", bar)]  # at 0 a bar has nothing to estimate from
    assert all(re.search(r"\[\d\d:\d\d<\d\d:\d\d, +[\d.]+(it|s|step|image)", bar) for bar in started)
    assert {bar.split(":")[0] for bar in bars} == {name.rstrip(": ") for name in described}
    assert "[transformers]" not in errors and "torchvision" not in errors


@pytest.mark.parametrize("option", [["--steps", "-3"], ["--steps", "0"], ["--model", "no-such-model"], ["--seed", "x"]])
def test_a_bad_demo_option_leaves_nothing_behind(tmp_path, capsys, option):
    """Every option is checked before anything is written (``--steps -3`` used to leave a run folder)."""
    try:
        code = main(["demo", "--output", str(tmp_path / "demo"), *option])
    except SystemExit as exit_:  # argparse refuses what is not a number
        code = exit_.code
    assert code == 2
    assert not (tmp_path / "demo").exists()
    assert "error" in capsys.readouterr().err
