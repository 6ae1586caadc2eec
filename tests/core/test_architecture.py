"""The layers of docs/architecture.md, read from the import statements of every module.

The core is the same behind each face: it imports neither a host (``modules``, ``comfy``, gradio)
nor a face (``hosts``, ``ui``, ``standalone``); the UI builders never touch a host; the standalone
tools never touch a host's adapters.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "hypernetwork_ext"
HOST_MODULES = ("modules", "comfy", "ldm_patched", "backend")
FACES = ("hosts", "ui", "standalone")

# What each layer may not import: top-level modules outside the package, and the package's own faces.
FORBIDDEN = {
    "core": ((*HOST_MODULES, "gradio"), FACES),
    "ui": (HOST_MODULES, ("hosts", "standalone")),
    "standalone": (HOST_MODULES, ("hosts",)),
}


def layer_of(path: Path) -> str:
    first = path.relative_to(PACKAGE).parts[0]
    if first == "__main__.py":  # `python -m hypernetwork_ext` is the command line
        return "standalone"
    return first if first in FACES else "core"


def imported_names(path: Path) -> list[tuple[int, str]]:
    """(line, absolute dotted name) of every import in a module, relative ones resolved."""
    package_parts = ["hypernetwork_ext", *path.relative_to(PACKAGE).parent.parts]
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package_parts[: len(package_parts) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            names += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return names


def violations(path: Path) -> list[str]:
    outside, faces = FORBIDDEN.get(layer_of(path), ((), ()))
    found = []
    for line, name in imported_names(path):
        parts = name.split(".")
        if parts[0] in outside:
            found.append(f"{path.relative_to(PACKAGE)}:{line} imports {name}")
        if parts[0] == "hypernetwork_ext" and len(parts) > 1 and parts[1] in faces:
            found.append(f"{path.relative_to(PACKAGE)}:{line} imports {name}")
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_imports_only_what_its_layer_may(path):
    assert violations(path) == []


def test_the_check_sees_a_forbidden_import(tmp_path, monkeypatch):
    fake = PACKAGE / "attach.py"
    source = "from .standalone.tiny import TINY_WIDTHS\nimport modules.shared\n"
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: source if self == fake else "")
    assert violations(fake) == [
        "attach.py:1 imports hypernetwork_ext.standalone.tiny.TINY_WIDTHS",
        "attach.py:2 imports modules.shared",
    ]
