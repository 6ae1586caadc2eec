"""Import a script of the repository (a benchmark, a tool) as a module, for its tests."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType


@contextlib.contextmanager
def script_module(path: Path, name: str) -> Iterator[ModuleType]:
    """The script at ``path`` imported as ``name``, listed in ``sys.modules`` while in use (its
    dataclasses look their module up there)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[name]
