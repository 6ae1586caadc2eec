"""Ctrl-C during ``train``, as a user presses it (SIGINT to the process): the first one lets the step
finish, saves the weights of the step reached, says where and prints the command that resumes, which
works; a second one still ends the command at once."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import hypernetwork_ext as hx
from hypernetwork_ext.standalone.interrupts import resume_command
from hypernetwork_ext.standalone.tiny import procedural_images

ROOT = Path(__file__).resolve().parents[2]
PROGRAM = [sys.executable, "-m", "hypernetwork_ext"]


def _start_training(folder: Path, *options: str) -> subprocess.Popen:
    procedural_images(folder / "data", 4, seed=1, colour="red")
    command = [
        *PROGRAM, "train", "--create", "shapes", "--data-root", "data", "--output-dir", "nets", "--log-directory",
        "logs", "--steps", "100000", "--learn-rate", "0.001", "--save-hypernetwork-every", "1",
        "--create-image-every", "0", "--template-filename", "filewords.txt", "--seed", "3", "--quiet", *options,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_copy(folder: Path, process: subprocess.Popen, step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not list(folder.glob(f"logs/*/shapes/hypernetworks/shapes-{step}.safetensors")):
        if process.poll() is not None:
            raise AssertionError(f"training ended early: {process.communicate()[1][-2000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("training made no copy in time")
        time.sleep(0.2)


def test_ctrl_c_saves_the_step_reached_says_where_and_how_to_resume(tmp_path):
    process = _start_training(tmp_path)
    _wait_for_copy(tmp_path, process, 2)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 130, err[-2000:]
    assert "finishing the current step, then saving" in err and "Traceback" not in err
    saved = [line.removeprefix("wrote ") for line in out.splitlines() if line.startswith("wrote ")]
    assert len(saved) == 1 and saved[0].startswith(os.path.join("nets", "shapes-"))
    step = hx.load(tmp_path / saved[0]).step
    assert step >= 2 and saved[0] == os.path.join("nets", f"shapes-{step}.safetensors")  # the step reached
    assert not list((tmp_path / "nets").glob(".*partial"))
    hint = next(line for line in out.splitlines() if line.startswith("to resume: "))
    resume = shlex.split(hint.removeprefix("to resume: "))
    assert resume[:2] == ["hypernetwork", "train"] and resume[resume.index("--resume-from") + 1] == saved[0]
    assert "--create" not in resume
    resume[resume.index("--steps") + 1] = str(step + 1)  # one step more than was saved, not 100000
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    finished = subprocess.run([*PROGRAM, *resume[1:]], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert hx.load(tmp_path / "nets" / f"shapes-{step + 1}.safetensors").step == step + 1


def test_a_second_ctrl_c_still_ends_the_command_at_once(tmp_path):
    # steps of seconds (256 px, 4 images a batch), so the second Ctrl-C lands while one is running
    process = _start_training(tmp_path, "--training-width", "256", "--training-height", "256", "--batch-size", "4")
    _wait_for_copy(tmp_path, process, 1)
    process.send_signal(signal.SIGINT)
    time.sleep(0.3)
    process.send_signal(signal.SIGINT)
    _out, err = process.communicate(timeout=120)
    assert process.returncode == 130 and "finishing the current step" in err, err[-2000:]
    assert err.rstrip().endswith("interrupted") and "Traceback" not in err
    assert sorted(path.name for path in (tmp_path / "nets").iterdir()) == ["shapes.safetensors"]  # nothing saved


@pytest.mark.parametrize(
    "argv,expected",
    [
        (
            ["train", "--create", "a", "--layer-norm", "--activation=relu", "--data-root", "d", "--steps", "9"],
            "./hypernetwork train --resume-from 'nets/a 5.pt' --data-root d --steps 9",
        ),
        (
            [
                "train",
                "--network",
                "n.pt",
                "--save-preset",
                "p.json",
                "--output-name",
                "x",
                "--learn-rate",
                "1e-3:5, 1e-4",
            ],
            "./hypernetwork train --resume-from 'nets/a 5.pt' --learn-rate '1e-3:5, 1e-4'",
        ),
    ],
)
def test_the_resume_command_keeps_the_options_and_replaces_the_network(argv, expected):
    assert resume_command("./hypernetwork", argv, "nets/a 5.pt") == expected


def test_a_second_ctrl_c_swallowed_by_a_finalizer_is_raised_again_before_the_run_saves(capsys):
    """Python prints and ignores a KeyboardInterrupt raised while a finalizer runs (seen on a loaded
    machine: the step went on and the run saved); the engine's next stop check raises it again."""
    import types

    from hypernetwork_ext.standalone.interrupts import stop_on_first_interrupt

    hook = sys.unraisablehook
    with stop_on_first_interrupt() as stop:
        assert stop.should_stop() is False
        stop.set()
        assert stop.should_stop() is True
        stop.quit = True
        swallowed = types.SimpleNamespace(exc_value=KeyboardInterrupt(), exc_type=KeyboardInterrupt)
        sys.unraisablehook(swallowed)  # what Python calls with the swallowed exception: silent now
        with pytest.raises(KeyboardInterrupt):
            stop.should_stop()
    assert sys.unraisablehook is hook and capsys.readouterr().err == ""
