"""How many CPU threads a job should use: the cores actually free, unless the user says.

torch starts one thread per core. On a machine other work keeps busy, a thread waiting for a core
holds up the others at every operation (the embedded model's operations are small, so this is most
of its time). So the number follows the cores this process may run on (its CPU affinity and its
cgroup's CPU quota) less the load average, at least 1.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import InvalidConfigError

THREADS_ENV = "HYPERNETWORK_THREADS"
_CGROUP_CPU_MAX = "/sys/fs/cgroup/cpu.max"


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    why: str  # what it was chosen from, for the console
    cores: int
    load: float | None

    def describe(self) -> str:
        return f"threads: {self.threads} ({self.why}; --threads N or {THREADS_ENV}=N to choose)"


def usable_cores(cpu_max_path: str = _CGROUP_CPU_MAX) -> int:
    """The cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cores = os.cpu_count() or 1
    try:
        with open(cpu_max_path, encoding="ascii") as handle:
            quota, period = handle.read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def choose_threads(
    requested: int | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    cores: int | None = None,
    load: float | None = None,
) -> ThreadChoice:
    """``requested`` (a --threads flag), else ``HYPERNETWORK_THREADS``, else ``OMP_NUM_THREADS``
    (the user's own choice for torch), else the usable cores less the one-minute load average."""
    environ = os.environ if environ is None else environ
    cores = usable_cores() if cores is None else cores
    if requested is not None:
        return ThreadChoice(requested, "--threads", cores, None)
    for name in (THREADS_ENV, "OMP_NUM_THREADS"):
        text = environ.get(name, "").strip()
        if text:
            try:
                value = int(text)
            except ValueError:
                value = 0
            if value < 1:
                raise InvalidConfigError(f"{name}={text!r}: expected a whole number of threads, at least 1")
            return ThreadChoice(value, f"{name}={value}", cores, None)
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):
            load = 0.0
    threads = max(1, min(cores, math.floor(cores - load + 0.5)))
    why = f"{cores} core{'s' if cores > 1 else ''} usable here, load average {load:.1f} over the last minute"
    return ThreadChoice(threads, why, cores, load)


def apply_threads(choice: ThreadChoice) -> None:
    import torch

    torch.set_num_threads(choice.threads)
