"""Run by the WebUI (A1111, Forge, reForge) when the extension is installed and at each start.

Installs only the dependencies of ``pyproject.toml`` that the host's Python lacks, through the
host's ``launch.run_pip`` (which honours ``--skip-install`` and the host's index settings). Imports
nothing of the extension or of the host's ``modules``. ComfyUI-Manager runs it too after cloning a
node pack: outside a WebUI there is nothing to install (ComfyUI's environment has torch and
safetensors, all the nodes need), and it says so and succeeds.
"""

from __future__ import annotations

import os
import re
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
# Import names differ from distribution names for some packages.
IMPORT_NAMES = {"pillow": "PIL", "pyyaml": "yaml"}


def read_dependencies(pyproject: str = os.path.join(ROOT, "pyproject.toml")) -> list[str]:
    """``[project].dependencies`` of pyproject.toml (tomllib where there is one, else a small reader)."""
    with open(pyproject, "rb") as handle:
        data = handle.read()
    try:
        import tomllib
    except ImportError:  # Python 3.10, which A1111 recommends
        return _dependencies_without_tomllib(data.decode("utf-8"))
    return list(tomllib.loads(data.decode("utf-8")).get("project", {}).get("dependencies", []))


def _dependencies_without_tomllib(text: str) -> list[str]:
    section = re.search(r"^\[project\]\s*$(.*?)(?=^\[)", text, re.M | re.S)
    body = section[1] if section else ""
    array = re.search(r"^dependencies\s*=\s*\[(.*?)\]", body, re.M | re.S)
    return re.findall(r"\"([^\"]+)\"", array[1]) if array else []


def distribution_name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement.strip(), maxsplit=1)[0]


def missing(requirements: list[str], is_installed) -> list[str]:
    result = []
    for requirement in requirements:
        name = distribution_name(requirement)
        if not (is_installed(name) or is_installed(IMPORT_NAMES.get(name.lower(), name))):
            result.append(requirement)
    return result


def main() -> int:
    try:
        import launch
    except ImportError:
        print("[Hypernetworks] install.py: not in a WebUI; nothing to install (ComfyUI has what the nodes need)")
        return 0
    if getattr(getattr(launch, "args", None), "skip_install", False):
        return 0
    needed = missing(read_dependencies(), launch.is_installed)
    if os.environ.get("HNX_INSTALL_VERBOSE"):  # set by the real-host tests, to see that the launcher ran us
        print(f"[Hypernetworks] install.py: {len(needed)} dependencies to install")
    for requirement in needed:
        try:
            launch.run_pip(f'install "{requirement}"', f"{requirement} for sd-webui-hypernetworks")
        except Exception as exc:  # one failed package must not stop the WebUI from starting
            print(f"[Hypernetworks] could not install {requirement}: {exc}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
