"""Loose time and memory bounds for tests of hostile input (a hang or a bomb fails the test instead
of stalling or killing the run)."""

from __future__ import annotations

import contextlib
import signal
import time
from dataclasses import dataclass

import pytest


class DeadlineExceeded(Exception):
    pass


@dataclass
class Measured:
    seconds: float = 0.0
    peak_growth_bytes: int = 0  # the highest resident memory reached, above where it started


def _kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise LookupError(field)


def peak_memory_available() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # resets VmHWM, the peak resident size (Linux 4.0+)
        _kib("VmHWM")
    except (OSError, LookupError):
        return False
    return True


@pytest.fixture
def bounded():
    """``with bounded(seconds) as measured:``: raises DeadlineExceeded in the main thread after
    ``seconds`` (an open() blocked on a FIFO included) and records time and peak memory growth."""
    if not peak_memory_available():
        pytest.skip("the peak resident memory cannot be reset here (/proc/self/clear_refs)")

    @contextlib.contextmanager
    def limit(seconds: float):
        def expire(_signum, _frame):
            raise DeadlineExceeded(f"still running after {seconds} s")

        previous = signal.signal(signal.SIGALRM, expire)
        measured = Measured()
        peak_memory_available()  # reset the peak
        start_kib = _kib("VmRSS")
        started = time.perf_counter()
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            yield measured
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
            measured.seconds = time.perf_counter() - started
            measured.peak_growth_bytes = (_kib("VmHWM") - start_kib) * 1024

    return limit
