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


class Interrupted(threading.Event):
    """Set by the first Ctrl-C; ``quit`` by the second."""

    def __init__(self) -> None:
        super().__init__()
        self.quit = False

    def should_stop(self) -> bool:
        """The engine's stop check. The second Ctrl-C raises KeyboardInterrupt in its handler, but one
        that lands while Python runs a finalizer is printed and ignored there; raising it again here,
        before the step ends and the run saves, keeps "quit at once, without saving" true."""
        if self.quit:
            raise KeyboardInterrupt
        return self.is_set()


@contextlib.contextmanager
def stop_on_first_interrupt(enabled: bool = True) -> Iterator[Interrupted]:
    """An event set by the first Ctrl-C (the run stops after its step and saves); the second raises
    KeyboardInterrupt as usual. Only in the main thread (where signals arrive) and when ``enabled``."""
    stop = Interrupted()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def on_interrupt(signum, frame) -> None:
        if stop.is_set():
            stop.quit = True
            raise KeyboardInterrupt
        stop.set()
        print(
            "\ninterrupted: finishing the current step, then saving the network (Ctrl-C again to quit at once, "
            "without saving)",
            file=sys.stderr,
            flush=True,
        )

    def on_unraisable(unraisable) -> None:
        # the second Ctrl-C, swallowed by a finalizer: should_stop() raises it again, so no traceback
        if not (stop.quit and isinstance(unraisable.exc_value, KeyboardInterrupt)):
            previous_hook(unraisable)

    previous, previous_hook = signal.signal(signal.SIGINT, on_interrupt), sys.unraisablehook
    sys.unraisablehook = on_unraisable
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)
        sys.unraisablehook = previous_hook


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
