"""Where the standalone tools look for networks and put the demo's runs, relative to the folder
they run in (a checkout's root, like a WebUI's), and what they call themselves in help texts."""

from __future__ import annotations

import os

DEFAULT_NETWORK_DIR = os.path.join("models", "hypernetworks")
DEMO_OUTPUT = "hypernetwork-demo"
DEMO_NETWORKS = os.path.join(DEMO_OUTPUT, "latest", "networks")  # the newest demo run's networks
PROGRAM_ENV = "HYPERNETWORK_PROG"  # set by the ./hypernetwork script: the command as the user typed it


def network_folders(given: list[str] | None) -> list[str]:
    """The folders given, else models/hypernetworks and the newest demo run's networks; new and
    trained networks go to the first."""
    return list(given or [DEFAULT_NETWORK_DIR, DEMO_NETWORKS])


def program_name() -> str:
    """How the user runs the command line (``./hypernetwork`` from a checkout), for usage lines and examples."""
    return os.environ.get(PROGRAM_ENV, "").strip() or "hypernetwork"
