"""Ctrl-C during a command-line training run: the first one lets the step running finish and the
run save its weights (the engine writes them atomically, as every copy), the second one stops at
once; and the command that resumes the run from what was saved."""

from __future__ import annotations

import contextlib
import shlex
import signal
import sys
import threading
from collections.abc import Iterator, Sequence

# `train` options that choose or create the network: a resumed run takes its network from the file saved.
_NETWORK_OPTIONS = {
    "--create", "--network", "--resume-from", "--widths", "--layer-structure", "--activation", "--weight-init",
    "--dropout-structure", "--init-seed", "--format", "--save-preset", "--output-name",
}  # fmt: skip
_NETWORK_SWITCHES = {"--layer-norm", "--activate-output"}


@contextlib.contextmanager
def stop_on_first_interrupt(enabled: bool = True) -> Iterator[threading.Event]:
    """An event set by the first Ctrl-C (the run stops after its step and saves); the second raises
    KeyboardInterrupt as usual. Only in the main thread (where signals arrive) and when ``enabled``."""
    stop = threading.Event()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def on_interrupt(signum, frame) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        print(
            "\ninterrupted: finishing the current step, then saving the network (Ctrl-C again to quit at once, "
            "without saving)",
            file=sys.stderr,
            flush=True,
        )

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def resume_command(program: str, argv: Sequence[str], saved: str) -> str:
    """``argv`` (a ``train`` command line) continuing from ``saved``: the options that chose or
    created the network replaced by ``--resume-from saved``; ``--steps`` still counts the steps done."""
    kept, skip = [], False
    for item in argv:
        if skip:
            skip = False
            continue
        option = item.split("=", 1)[0]
        if option in _NETWORK_OPTIONS:
            skip = "=" not in item
            continue
        if item in _NETWORK_SWITCHES:
            continue
        kept.append(item)
    return shlex.join([program, *kept[:1], "--resume-from", saved, *kept[1:]])
