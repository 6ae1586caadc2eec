"""Waiting for the extension's training jobs in a real host, through its routes or its Train tab.

Every wait ends as soon as the job ends: a job that stops in a state other than the one waited for
(non-finite, diverged, failed, interrupted, finished early) fails the test at once with the job's own
state, step and message, instead of waiting out the timeout for a step it will never reach.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass

ACTIVE = ("queued", "running")
JOB_TIMEOUT = 3600.0  # seconds: 20 steps at 64 px take minutes on a busy 2-core CPU


class JobEnded(AssertionError):
    """The job ended in a state the wait was not for."""


@dataclass(frozen=True)
class Progress:
    """What a job shows: its state and step, and the rest of what it says (message, error, ...)."""

    state: str
    step: int
    max_steps: int | None
    text: str

    @property
    def active(self) -> bool:
        return self.state in ACTIVE


def from_status(status: dict) -> Progress:
    """A job as ``GET /hypernetworks/v1/jobs/{id}`` describes it."""
    said = status.get("error") or status.get("message") or ""
    return Progress(status["state"], int(status["step"]), status.get("max_steps"), said)


# The Train tab's progress column begins "<state> step <step>/<max steps> (<percent>)"; the job's
# message follows on its own line.
_TAB_PROGRESS = re.compile(r"^\s*(?P<state>[a-z][a-z-]*) step (?P<step>\d+)/(?P<max>\d+)")


def from_tab_text(text: str) -> Progress | None:
    """A job as the Train tab's progress column shows it; None before it shows one."""
    match = _TAB_PROGRESS.match(text)
    if match is None:
        return None
    return Progress(match["state"], int(match["step"]), int(match["max"]), " ".join(text.split()))


def from_tab(progress_text: str, message_text: str, steps: int) -> Progress | None:
    """The run the Train tab shows, or its refusal to start one ("Not started: ..." under the Start
    button), which ends a wait at once: no job will ever show."""
    if "Not started" in message_text:
        return Progress("not started", 0, steps, " ".join(message_text.split()))
    return from_tab_text(progress_text)


def wait_for(
    read: Callable[[], Progress | None],
    until: Callable[[Progress], bool],
    what: str,
    *,
    timeout: float = JOB_TIMEOUT,
    poll: float = 0.25,
    ignore: Callable[[Progress], bool] = lambda progress: False,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Progress:
    """Read the job until ``until`` holds; fail at once if it ends without (``JobEnded``), or after
    ``timeout`` seconds. ``ignore`` skips readings that are not this job's (a tab still showing the
    previous run)."""
    deadline = clock() + timeout
    last = None
    while True:
        progress = read()
        if progress is not None and not ignore(progress):
            last = progress
            if until(progress):
                return progress
            if not progress.active:
                raise JobEnded(
                    f"waiting for {what}, the job ended {progress.state} at step {progress.step}: {progress.text}"
                )
        if clock() >= deadline:
            seen = f"{last.state} at step {last.step}: {last.text}" if last else "no progress shown"
            raise AssertionError(f"still waiting for {what} after {timeout:.0f} s; the job is {seen}")
        sleep(poll)


def reached(step: int) -> Callable[[Progress], bool]:
    """Running at ``step`` or later (a later wait interrupts it, so it must still be running)."""
    return lambda progress: progress.state == "running" and progress.step >= step


def ended(state: str, step: int | None = None) -> Callable[[Progress], bool]:
    """Ended in ``state`` (at ``step``, when given)."""
    return lambda progress: progress.state == state and (step is None or progress.step == step)
