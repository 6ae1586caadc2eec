"""An output that cannot be written is refused before any work, with exit code 2 and a message that
names the folder and the problem, never a traceback about a temporary file: by every command that
writes (generate before the render, train before the model loads, convert, merge, bake, export-lora,
demo, the app), and by the atomic writes themselves when a folder turns read-only mid-run."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

import hypernetwork_ext as hx
import hypernetwork_ext.standalone.cli as cli
from hypernetwork_ext.atomic import atomic_write_bytes, check_writable_file
from hypernetwork_ext.errors import OutputNotWritableError
from hypernetwork_ext.standalone.cli import main
from hypernetwork_ext.standalone.tiny import TINY_WIDTHS, procedural_images


@pytest.fixture
def read_only(tmp_path):
    """A folder this process cannot write into: by its mode, or, for root (whom modes do not stop),
    by the immutable attribute."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    if not shutil.which("chattr") or subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode:
        pytest.skip("running as root where `chattr +i` is unavailable: no folder here refuses root's writes")
    try:
        yield folder
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


@pytest.fixture(params=["no permission", "a file in the path"])
def unwritable(request, tmp_path):
    """(a folder that cannot be written, what the message says about it)."""
    if request.param == "a file in the path":
        (tmp_path / "notes.txt").write_text("a file, not a folder")
        return tmp_path / "notes.txt" / "out", f"cannot be made: {tmp_path / 'notes.txt'} is not a folder"
    return request.getfixturevalue("read_only"), "(permission denied)"


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hx.save(hx.create(TINY_WIDTHS, seed=1, name="net"), tmp_path / "net.safetensors")
    procedural_images(tmp_path / "data", 2, seed=1, colour="red")

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(cli, "_load_source", refuse)
    monkeypatch.setattr("hypernetwork_ext.ops.checkpoints.read_unet", refuse)
    monkeypatch.setattr("hypernetwork_ext.standalone.pipelines.load_model", refuse)
    return tmp_path


COMMANDS = {
    "generate": lambda out: ["generate", "a red circle", "-o", f"{out}/out.png"],
    "generate --batch": lambda out: ["generate", "a red circle", "--batch", "2", "-o", f"{out}/out.png"],
    "generate --grid": lambda out: ["generate", "a red circle <hypernet:net>", "--grid=0,1", "-o", f"{out}/g.png"],
    "train --output-dir": lambda out: ["train", "--create", "n", "--data-root", "data", "--output-dir", str(out)],
    "train --log-directory": lambda out: ["train", "--create", "n", "--data-root", "data", "--log-directory", str(out)],
    "train --save-preset": lambda out: ["train", "--create", "n", "--data-root", "data", "--save-preset", f"{out}/p.json"],
    "convert": lambda out: ["convert", "net.safetensors", f"{out}/net.pt"],
    "convert a folder": lambda out: ["convert", ".", f"{out}/converted", "--to", "pt"],
    "merge": lambda out: ["merge", f"{out}/blend.safetensors", "net.safetensors:0.5", "net.safetensors:0.5"],
    "bake": lambda out: ["bake", "checkpoint.safetensors", "net.safetensors", "-o", f"{out}/baked.safetensors"],
    "export-lora": lambda out: ["export-lora", "net.safetensors", "--model", "m", "-o", f"{out}/lora.safetensors"],
    "demo": lambda out: ["demo", "--output", f"{out}/demo"],
}  # fmt: skip


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_refuses_an_unwritable_output_first_with_exit_2(command, unwritable, workdir, capsys):
    folder, problem = unwritable
    before = sorted(p.name for p in workdir.iterdir())
    assert main(COMMANDS[command](folder)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and problem in err and "nothing was written" in err
    assert str(folder) in err and "Traceback" not in err and ".partial" not in err
    assert sorted(p.name for p in workdir.iterdir()) == before  # train --create took nothing to write either


def test_the_app_refuses_an_unwritable_network_folder_before_loading_the_model(unwritable, workdir, capsys):
    pytest.importorskip("gradio")
    folder, problem = unwritable
    assert main(["app", "--hypernetwork-dir", str(folder / "nets")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(folder) in err and problem in err and "Traceback" not in err
    assert main(["app", "--output-dir", str(folder / "app")]) == 2
    assert "error: " in capsys.readouterr().err


def test_a_folder_that_turns_read_only_mid_run_is_named_not_its_temporary_file(read_only):
    """What the checks before the work cannot see (the folder changed since): the write itself says it."""
    with pytest.raises(OutputNotWritableError) as refused:
        atomic_write_bytes(read_only / "late.safetensors", b"weights")
    message = str(refused.value)
    assert message.startswith(f"{read_only}: cannot write {read_only / 'late.safetensors'} here (")
    assert ".partial" not in message and os.listdir(read_only) == []


def test_a_folder_given_as_the_output_file_is_refused(tmp_path):
    with pytest.raises(OutputNotWritableError, match="is a folder; give a file name"):
        check_writable_file(tmp_path)


def test_training_refuses_an_unwritable_output_folder_before_the_dataset(read_only, tmp_path):
    """The engine checks too, for every caller (the app's and the WebUI's Train tabs, the HTTP API)."""
    from hypernetwork_ext.standalone.pipelines import load_model
    from hypernetwork_ext.standalone.workflows import training_backend
    from hypernetwork_ext.training import TrainingCallbacks, TrainingConfig, train

    source = load_model()
    network = hx.create(TINY_WIDTHS, seed=1, name="n")
    config = TrainingConfig(
        hypernetwork_name="n", data_root=str(tmp_path / "nowhere"), log_directory=str(tmp_path / "logs"), steps=2,
        training_width=64, training_height=64, template_filename="filewords.txt",
    )  # fmt: skip
    messages = []
    with pytest.raises(OutputNotWritableError, match="cannot write into this folder"):
        train(network, training_backend(source), config, TrainingCallbacks(on_message=messages.append),
              output_dir=str(read_only), progress_bar=False)  # fmt: skip
    assert not any("Preparing dataset" in m for m in messages)  # refused before the dataset was looked at
