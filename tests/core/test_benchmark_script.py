"""The benchmark script runs end to end and its two variants agree (tiny model: seconds, not timing)."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from tests.support.scripts import script_module

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "inference.py"


@pytest.fixture(scope="module")
def bench():
    with script_module(SCRIPT, "bench_inference") as module:
        yield module


@pytest.fixture
def training():
    """benchmarks/training.py as a module; torch's thread count as it was before the test."""
    threads = torch.get_num_threads()
    try:
        with script_module(SCRIPT.with_name("training.py"), "bench_training") as module:
            yield module
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype,tolerance", [("float32", 1e-5), ("bfloat16", 5e-2)])
def test_every_scenario_runs_and_agrees_with_the_naive_loop(bench, capsys, dtype, tolerance):
    threads = torch.get_num_threads()
    arguments = ["--configs", "tiny", "--scenarios", ",".join(bench.SCENARIOS), "--rounds", "2", "--no-load"]
    try:
        rows = bench.main([*arguments, "--dtype", dtype, "--threads", str(threads)])
    finally:
        torch.set_num_threads(threads)
    assert [row["scenario"] for row in rows] == list(bench.SCENARIOS)
    for row in rows:
        if row["max_diff"] is not None:
            assert row["max_diff"] < tolerance, row
        assert row["naive_kv"] is not None and row["ours_kv"] is not None
    stats = {row["scenario"]: row["stats"] for row in rows}
    assert stats["linear"]["folded_calls"] > 0 and stats["linear (fading)"]["composite_calls"] > 0
    assert stats["relu+LN"]["paired_calls"] > 0 and stats["relu+LN (uncond 0)"]["zero_rows_skipped"] > 0
    printed = capsys.readouterr().out
    assert "tiny (script check)" in printed and "ours/naive" in printed


def test_unknown_names_are_refused(bench):
    with pytest.raises(SystemExit):
        bench.main(["--configs", "sd99"])


def test_host_benchmark_separates_per_generation_from_per_step_cost(monkeypatch, capsys):
    """Against a stand-in of the server whose requests 'take' 1 s + 0.1 s per step, plus 0.5 s once
    and 0.02 s per step with a tag handled by the extension, 0.2 s once and 0.05 s per step with A1111's
    own code (the setting, switched through the options route): the table finds those figures back,
    and the setting is off again at the end."""
    spec = importlib.util.spec_from_file_location("bench_host", SCRIPT.with_name("host_generation.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    setting = {module.BUILTIN_SETTING: False}
    switches = []

    def fake_call(url, path, payload=None, timeout=0):
        assert path == "/sdapi/v1/options"
        if payload is not None:
            setting.update(payload)
            switches.append(payload[module.BUILTIN_SETTING])
        return dict(setting)

    def fake_txt2img(url, prompt, steps, size, seed):
        if "<hypernet:" not in prompt:
            return 1.0 + 0.1 * steps
        if setting[module.BUILTIN_SETTING]:
            return 1.0 + 0.1 * steps + 0.2 + 0.05 * steps
        return 1.0 + 0.1 * steps + 0.5 + 0.02 * steps

    monkeypatch.setattr(module, "call", fake_call)
    monkeypatch.setattr(module, "txt2img", fake_txt2img)
    monkeypatch.setattr(sys, "argv", ["host_generation.py", "--url", "http://x", "--tag", "<hypernet:n:1>",
                                      "--builtin", "--rounds", "3", "--low", "2", "--high", "6"])  # fmt: skip
    module.main()
    table = capsys.readouterr().out
    assert "| none | 1.00 [1.00, 1.00] | 0.100 [0.100, 0.100] | 1.60 [1.60, 1.60] | |" in table
    assert (
        "| ours | 1.50 [1.50, 1.50] | 0.120 [0.120, 0.120] | 2.22 [2.22, 2.22] | +0.50 [+0.50, +0.50] | +20.0% [+20.0%, +20.0%] |"
        in table
    )
    assert (
        "| builtin | 1.20 [1.20, 1.20] | 0.150 [0.150, 0.150] | 2.10 [2.10, 2.10] | +0.20 [+0.20, +0.20] | +50.0% [+50.0%, +50.0%] |"
        in table
    )
    assert "ours +0.62 s, A1111's own code +0.50 s" in table
    assert "load average during the rounds" in table
    assert switches[-1] is False and setting[module.BUILTIN_SETTING] is False


def test_the_prompt_scan_benchmark_runs_and_both_ways_find_the_same_tags(capsys):
    spec = importlib.util.spec_from_file_location("bench_prompt_scan", SCRIPT.parent / "prompt_scan.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.main(["--sizes", "300,3000"])  # raises when the scanner and the expression disagree
    assert len(rows) == 2 * len(module.KINDS) and "ratio" in capsys.readouterr().out


def test_the_training_benchmark_measures_every_variant(training, capsys):
    """benchmarks/training.py on the tiny ldm model, in this process: every variant trains, with
    finite losses, and gets a speed and a peak memory (the table's numbers; not their sizes)."""
    variants = ["a1111", "ours", "checkpointing", "bf16-autocast", "bf16-weights", "no-cache"]
    arguments = ["--rows", "tiny-64-b2", "--variants", ",".join(variants), "--rounds", "1", "--steps", "1"]
    rows = training.main([*arguments, "--in-process", "--threads", "1", "--device", "cpu"])
    assert [row["variant"] for row in rows] == variants
    for row in rows:
        assert row["losses_finite"] and row["steps_per_second"] > 0, row
        assert 0 < row["model_gib"] <= row["peak_gib"], row
    assert rows[0]["speed_ratio"] == 1.0 and rows[0]["peak_ratio"] == 1.0
    printed = capsys.readouterr().out
    assert "| tiny (script check) 64x64, batch 2 | A1111 1.10.1 step |" in printed


def test_the_training_benchmark_refuses_unknown_rows(training):
    with pytest.raises(SystemExit, match="sd99"):
        training.main(["--rows", "sd99"])


def test_the_training_benchmark_reads_weights_into_its_own_memory(training, tmp_path):
    """Every dtype and shape back bit for bit, and the file not mapped afterwards (safetensors'
    load_file keeps its mapping, which made the loaded model count twice in resident memory);
    a file shorter than its header says is refused, naming the file and the tensor."""
    from safetensors.torch import save_file

    state = {
        "f32": torch.randn(3, 5),
        "bf16": torch.randn(4, 2).to(torch.bfloat16),
        "f16": torch.randn(7).to(torch.float16),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "flags": torch.tensor([True, False, True]),
        "ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
    }
    path = tmp_path / "weights.safetensors"
    save_file(state, str(path))
    loaded = training.read_weights(path)
    assert loaded.keys() == state.keys()
    for name, tensor in state.items():
        assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape, name
        assert torch.equal(loaded[name], tensor), name
    assert str(path) not in Path("/proc/self/maps").read_text()
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(ValueError, match=r"data is not the \d+ bytes its header promises"):
        training.read_weights(path)


def test_the_training_benchmark_prints_its_table_again_from_recorded_runs(training, tmp_path, capsys):
    """Two runs, one row each, recorded: --table merges them into the table the runs printed, each
    row with its own A1111 baseline and a line saying when and under what it was measured."""
    record = tmp_path / "records.jsonl"
    common = ["--rounds", "2", "--steps", "1", "--in-process", "--threads", "1", "--device", "cpu"]
    first = training.main(["--rows", "tiny-64-b2", "--variants", "a1111,ours", "--record", str(record), *common])
    capsys.readouterr()
    merged = training.main(["--table", str(record)])
    assert merged == first
    printed = capsys.readouterr().out
    assert "tiny (script check) 64x64, batch 2: 4 measurements in 2 rounds" in printed
    assert "clock wall; threads 1; steps 1" in printed
    assert "| tiny (script check) 64x64, batch 2 | ours |" in printed
    ours_only = tmp_path / "ours.jsonl"
    ours_only.write_text("".join(line + "\n" for line in record.read_text().splitlines() if '"ours"' in line))
    training.main(["--table", str(ours_only)])
    row = capsys.readouterr().out.splitlines()[-1]
    assert row.startswith("| tiny (script check) 64x64, batch 2 | ours |") and row.count("| - |") == 3, row
    record.write_text(record.read_text() + '{"row": "tiny-64-b2"}\n')
    with pytest.raises(SystemExit, match=r"records\.jsonl:5"):
        training.main(["--table", str(record)])


def test_the_training_benchmark_gives_every_block_of_an_sdxl_level_its_context(training):
    """ldm's SpatialTransformer fails with one context and 2 blocks (SDXL's layout); after the
    benchmark's fix it runs them, each block seeing that context, as sgm's does."""
    from tests.support.training_models import import_ldm

    import_ldm()
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed(0)
    layout = dict(training.SDXL_SHAPED_UNET, model_channels=32, num_head_channels=8, context_dim=[24, 24])
    unet = UNetModel(**training._unet_params(layout, 8)).eval()
    x, t, context = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 5, 24)
    with pytest.raises(IndexError):
        unet(x, t, context)
    expected = unet(x, t, [context, context])
    training.one_context_for_every_block(unet)
    assert torch.equal(unet(x, t, context), expected)
