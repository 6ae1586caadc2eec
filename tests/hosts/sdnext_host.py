"""What the suite does differently in SD.Next (diffusers backend), which has no hypernetworks of its own.

- The checkpoint: a diffusers folder (SD.Next's usual form) named by ``--ckpt`` or by ``config.json``'s
  ``sd_model_checkpoint`` (SD.Next 058a7f0 fails to start with ``--ckpt`` naming a folder), or a single
  ``.safetensors`` file as for the other hosts.
- The references: SD.Next started *without* this extension and with a small reference extension
  (``sdnext_reference_script.py`` and ``tests/support/reference.py``, which share no code with the
  package) that applies A1111's formula to SD.Next's own pipeline; the images are kept like A1111's.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from tests.hosts.real_host import ROOT, HostConfig

REFERENCE_FOLDER = "hnx-suite-reference"  # under extensions/
REFERENCE_MARKER = ".hnx-host-suite"


def is_sdnext(folder: Path) -> bool:
    return (folder / "modules" / "processing_diffusers.py").is_file()


def configured_checkpoint(config: HostConfig) -> Path | None:
    """The model ``config.json`` loads at start (``sd_model_checkpoint``, e.g. ``Diffusers/name``)."""
    settings = config.folder / "config.json"
    if not settings.is_file():
        return None
    title = json.loads(settings.read_text()).get("sd_model_checkpoint") or ""
    title = re.sub(r"\s*\[[0-9a-f]+\]$", "", title)  # "name [hash]"
    for candidate in (config.folder / "models" / title, config.folder / title):
        if title and candidate.exists():
            return candidate
    return None


def reference_dir(config: HostConfig) -> Path:
    return config.folder / "extensions" / REFERENCE_FOLDER


def install_reference(config: HostConfig) -> None:
    target = reference_dir(config)
    remove_reference(config)
    if target.exists():
        raise RuntimeError(f"{target} exists and was not made by this suite; move it away first")
    (target / "scripts").mkdir(parents=True)
    (target / "hnx_suite_reference").mkdir()
    (target / REFERENCE_MARKER).write_text("made by tests/hosts\n")
    shutil.copy(Path(__file__).with_name("sdnext_reference_script.py"), target / "scripts" / "hnx_suite_reference.py")
    shutil.copy(ROOT / "tests" / "support" / "reference.py", target / "hnx_suite_reference" / "reference.py")
    (target / "hnx_suite_reference" / "__init__.py").write_text("")


def remove_reference(config: HostConfig) -> None:
    target = reference_dir(config)
    if (target / REFERENCE_MARKER).exists():
        shutil.rmtree(target)
