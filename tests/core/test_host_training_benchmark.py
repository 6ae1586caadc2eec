"""benchmarks/host_training.py without a host: against a stand-in of A1111's and the extension's routes
on a fake clock, the table finds the seconds a step, CPU time, memory and NaN steps it was given."""

import io
import threading
import types
import urllib.error
from pathlib import Path
from typing import ClassVar

import pytest

from tests.support.scripts import script_module

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "host_training.py"
GIB = 1 << 30


@pytest.fixture
def bench():
    with script_module(SCRIPT, "bench_host_training") as module:
        yield module


class FakeServer:
    """A1111's trainer takes 3 s a step (its first step 10 s), ours 1 s (its first 5 s); CPU time runs at
    1.5x the clock; the server holds 5 GiB, plus 4 GiB while A1111's trainer runs and 1 GiB while ours
    does; A1111's loss is NaN at step 3."""

    SECONDS: ClassVar[dict] = {"a1111": (10.0, 3.0), "ours": (5.0, 1.0)}

    def __init__(self, steps: int):
        self.steps = steps
        self.clock = 0.0
        self.trainer = None
        self.step = 0
        self.finished = threading.Event()
        self.requests = []

    def advance(self) -> None:
        if self.trainer and self.step < self.steps:
            first, later = self.SECONDS[self.trainer]
            self.clock += first if self.step == 0 else later
            self.step += 1
            if self.step == self.steps:
                self.finished.set()

    def call(self, url, path, payload=None, timeout=0):
        self.requests.append((path, payload))
        if path.endswith("/create/hypernetwork") or path.endswith("/v1/create"):
            return {}
        if path == "/sdapi/v1/train/hypernetwork":
            assert payload["id_task"], "A1111's train_hypernetwork() takes id_task first: without it the run fails"
            self.begin("a1111")
            self.finished.wait(5)
            self.trainer = None
            return {"info": "train embedding complete: filename: x.pt error: None"}
        if path.startswith("/sdapi/v1/progress"):
            self.advance()
            loss = "nan" if self.step == 3 else f"{0.1 * self.step:.7f}"
            job = "train-hypernetwork" if self.trainer else ""
            return {"state": {"job": job, "job_no": self.step}, "textinfo": f"<p>\nLoss: {loss}<br/>\nStep: x"}
        if path == "/hypernetworks/v1/train":
            self.begin("ours")
            return {"job_id": "j1"}
        if path.startswith("/hypernetworks/v1/jobs/j1"):
            self.advance()
            state = "finished" if self.step == self.steps else "running"
            if state == "finished":
                self.trainer = None
            return {"state": state, "step": self.step, "last_loss": 0.2, "message": "done"}
        raise AssertionError(path)

    def begin(self, trainer: str) -> None:
        self.trainer, self.step = trainer, 0
        self.finished.clear()

    def resident(self, pid) -> int:
        return (5 + {"a1111": 4, "ours": 1, None: 0}[self.trainer]) * GIB


def test_the_table_finds_back_what_the_stand_in_took(bench, monkeypatch, capsys, tmp_path):
    server = FakeServer(steps=6)
    monkeypatch.setattr(bench, "call", server.call)
    monkeypatch.setattr(bench, "resident_bytes", server.resident)
    monkeypatch.setattr(bench, "cpu_seconds", lambda pid: 1.5 * server.clock)
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: server.clock, sleep=lambda s: None))
    arguments = ["--url", "http://x", "--pid", "1", "--data", str(tmp_path / "set"), "--steps", "6", "--warmup", "1"]
    table = bench.main([*arguments, "--rounds", "2", "--json", str(tmp_path / "runs.json")])

    assert table["a1111"]["wall"] == [3.0, 3.0] and table["ours"]["wall"] == [1.0, 1.0]  # the first step left out
    assert table["a1111"]["cpu"] == [4.5, 4.5] and table["ours"]["cpu"] == [1.5, 1.5]
    assert table["a1111"]["extra_gib"] == [4.0, 4.0] and table["ours"]["extra_gib"] == [1.0, 1.0]
    assert table["a1111"]["nan_steps"] == [[3], [3]] and table["ours"]["nan_steps"] == [[], []]
    assert table["a1111"]["last_steps"] == [6, 6] and table["ours"]["outcomes"] == ["finished: done"] * 2
    trainers = [path.split("/")[-1] for path, _ in server.requests if path.endswith(("/train/hypernetwork", "/train"))]
    assert trainers == ["hypernetwork", "train", "train", "hypernetwork"]  # A1111, ours, then ours, A1111
    a1111_body = next(body for path, body in server.requests if path == "/sdapi/v1/train/hypernetwork")
    ours_body = next(body for path, body in server.requests if path == "/hypernetworks/v1/train")
    for key in ("learn_rate", "batch_size", "training_width", "steps", "template_filename", "latent_sampling_method"):
        assert a1111_body[key] == ours_body[key], key
    assert ours_body["caption_dropout"] == 0.0  # A1111 has none
    printed = capsys.readouterr().out
    assert "| a1111 | 2 | 3.00 [3.00, 3.00] | 4.50 [4.50, 4.50] | 1.00 | 4.00 [4.00, 4.00] |" in printed
    assert "| ours | 2 | 1.00 [1.00, 1.00] | 1.50 [1.50, 1.50] | 3.00 | 1.00 [1.00, 1.00] |" in printed
    assert (tmp_path / "runs.json").is_file()


def test_seconds_a_step_need_two_marks_after_the_warm_up(bench):
    marks = [(1, 0.0, 0.0), (2, 10.0, 20.0), (4, 16.0, 26.0)]
    assert bench.per_step(marks, 2) == (3.0, 3.0)
    assert bench.per_step(marks, 3) is None  # a run that stopped early has no figure, not a wrong one
    assert bench.per_step([], 0) is None


def test_a1111s_loss_line_is_read_including_nan(bench):
    assert float(bench.LOSS.search("<p>\nLoss: 0.1234567<br/>").group(1)) == pytest.approx(0.1234567)
    assert bench.LOSS.search("Loss: nan<br/>").group(1) == "nan"


def test_the_data_set_keeps_only_captions_the_host_renders_finitely(bench, monkeypatch, tmp_path):
    refused = []

    def fake_call(url, path, payload=None, timeout=0):
        assert path == "/sdapi/v1/txt2img"
        if "triangle" in payload["prompt"]:
            refused.append(payload["prompt"])
            body = io.BytesIO(b'{"error": "NansException: A tensor with all NaNs was produced in Unet."}')
            raise urllib.error.HTTPError(url, 500, "error", {}, body)
        return {}

    monkeypatch.setattr(bench, "call", fake_call)
    kept = bench.make_data("http://x", tmp_path / "set", 3, 64, seed=0)
    assert refused and len(kept) == 3 and not any("triangle" in caption for caption in kept)
    assert sorted(path.suffix for path in (tmp_path / "set").iterdir()) == [".png"] * 3 + [".txt"] * 3
    assert not (tmp_path / "set-candidates").exists()


def test_ours_stopped_by_a_nan_loss_runs_again_with_the_next_seed(bench, monkeypatch, capsys, tmp_path):
    """The extension stops at a non-finite loss where A1111 trains on: --retries gives the timing a run
    that got through, with the next seed, and the table names the seed."""
    server = FakeServer(steps=6)
    original = server.call

    def call(url, path, payload=None, timeout=0):
        if path == "/hypernetworks/v1/train" and payload["seed"] == 1:
            server.begin("ours")
            server.steps_before_nan = 1
            return {"job_id": "j1"}
        if path.startswith("/hypernetworks/v1/jobs/j1") and getattr(server, "steps_before_nan", None):
            server.advance()
            server.steps_before_nan = None
            server.trainer = None
            return {"state": "non-finite", "step": 0, "last_loss": None, "message": "the loss became nan at step 1"}
        return original(url, path, payload, timeout)

    monkeypatch.setattr(bench, "call", call)
    monkeypatch.setattr(bench, "resident_bytes", server.resident)
    monkeypatch.setattr(bench, "cpu_seconds", lambda pid: server.clock)
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: server.clock, sleep=lambda s: None))
    arguments = ["--url", "http://x", "--pid", "1", "--data", str(tmp_path / "set"), "--steps", "6", "--warmup", "1"]
    table = bench.main([*arguments, "--rounds", "1", "--retries", "2"])
    assert table["ours"]["wall"] == [1.0] and table["ours"]["seeds"] == [2]
    printed = capsys.readouterr().out
    assert "ours stopped before it could be timed" in printed and "ours run 1 (seed 2): reached step 6" in printed
