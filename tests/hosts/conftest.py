"""The real-host suite: one real WebUI per run, told by HNX_HOST_DIR / HNX_HOST_URL / HNX_HOST_LAUNCH.

Without them every test here is skipped, saying what to set. With them the session:
1. writes the suite's networks and LoRA for the checkpoint the launch command loads;
2. on A1111, renders every case with the host's *built-in* hypernetworks first (the extension not
   installed), the reference the extension must match; the images are kept per checkpoint hash under
   the artifacts folder, where Forge and reForge runs find them too;
3. clones this repository into ``extensions/`` and starts the host through its launcher (which runs
   ``install.py``), calling the extension's routes while the checkpoint is still loading;
4. runs the tests; then stops the host, whose log stays with the artifacts.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.hosts import host_modes, sdnext_host
from tests.hosts import suite_files as files
from tests.hosts.real_host import (
    USAGE,
    HostConfig,
    HttpError,
    Rendered,
    Server,
    flat_image_reason,
    install_extension,
    install_reference_extension,
    remove_extension,
)


@dataclass
class RouteCall:
    seconds: float
    status: int
    detail: str


@dataclass
class Suite:
    config: HostConfig
    server: Server
    checkpoint: files.Checkpoint
    references: ReferenceStore
    commit: str
    before_tags: Rendered
    calls_while_loading: list[RouteCall] = field(default_factory=list)
    model_loaded_at: float | None = None

    @property
    def kind(self) -> str:
        return self.config.kind

    def record(self, check: str, case: str, figures) -> None:
        """Keep a check's figures in ``figures.json`` with the artifacts, per checkpoint (for the notes
        that report a run)."""
        path = self.config.artifacts / "figures.json"
        recorded = json.loads(path.read_text()) if path.exists() else {}
        recorded.setdefault(self.checkpoint.path.name, {}).setdefault(check, {})[case] = figures
        path.write_text(json.dumps(recorded, indent=1))

    def save(self, name: str, rendered: Rendered) -> Path:
        path = self.config.artifacts / "images" / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        rendered.image.save(path)
        return path


class ReferenceStore:
    """Images the host's own hypernetworks rendered, per checkpoint, with what made them."""

    def __init__(self, folder: Path, network_hashes: dict[str, str]):
        self.folder = folder
        self.network_hashes = network_hashes
        folder.mkdir(parents=True, exist_ok=True)
        self.index_file = folder / "index.json"
        self.index = json.loads(self.index_file.read_text()) if self.index_file.exists() else {}

    def _record(self, prompt: str, settings: dict) -> dict:
        return {"prompt": prompt, "settings": settings, "networks": self.network_hashes}

    def get(self, case: str, prompt: str, settings: dict) -> np.ndarray | None:
        if self.index.get(case) != self._record(prompt, settings):
            return None
        return np.asarray(Image.open(self.folder / f"{case}.png").convert("RGB"), dtype=np.int16)

    def put(self, case: str, prompt: str, settings: dict, rendered: Rendered) -> None:
        """Stored atomically, the index merged with what other runs wrote meanwhile: several checkouts
        may share one references folder (a symlink), so each A1111 run renders only what none has."""
        with open(self.folder / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            partial = self.folder / f".{case}.png.partial"
            rendered.image.save(partial, format="PNG")
            os.replace(partial, self.folder / f"{case}.png")
            self.index = json.loads(self.index_file.read_text()) if self.index_file.exists() else {}
            self.index[case] = self._record(prompt, settings)
            partial = self.index_file.with_suffix(".partial")
            partial.write_text(json.dumps(self.index, indent=1))
            os.replace(partial, self.index_file)


ALL_CASES = (("no-tag", files.NO_TAG), *files.RENDER_CASES, *files.LORA_CASES)


def render_builtin_references(config: HostConfig, references: ReferenceStore, checkpoint: files.Checkpoint) -> None:
    """A1111 without the extension: its own ``<hypernet:...>`` handling renders the references (the
    host modes' too). Its safe unpickler refuses .pt files written by current torch, so this run lifts it."""
    missing = [(case, prompt) for case, prompt in ALL_CASES if references.get(case, prompt, _settings()) is None]
    missing_modes = host_modes.missing_references(references, config.kind)
    if not missing and not missing_modes:
        return
    remove_extension(config)
    extra = "" if "--disable-safe-unpickle" in config.launch else "--disable-safe-unpickle"
    server = Server(config, "builtin").start(extra)
    try:
        for case, prompt in missing:
            references.put(case, prompt, _settings(), server.txt2img(prompt))
        host_modes.render_references(server, references, missing_modes, checkpoint)
    finally:
        server.stop()


def render_formula_references(config: HostConfig, references: ReferenceStore) -> None:
    """SD.Next without the extension, with the reference formula's own small extension in its place
    (SD.Next has no hypernetworks): the images the tags must render on SD.Next's pipeline."""
    missing = [(case, prompt) for case, prompt in ALL_CASES if references.get(case, prompt, _settings()) is None]
    if not missing:
        return
    remove_extension(config)
    sdnext_host.install_reference(config)
    try:
        server = Server(config, "reference").start()
        try:
            for case, prompt in missing:
                references.put(case, prompt, _settings(), server.txt2img(prompt))
        finally:
            server.stop()
    finally:
        sdnext_host.remove_reference(config)


def _settings() -> dict:
    from tests.hosts.real_host import DEFAULT_SETTINGS

    return {key: DEFAULT_SETTINGS[key] for key in ("seed", "width", "height", "steps", "sampler_name", "cfg_scale")}


def start_with_extension(config: HostConfig) -> tuple[Server, list[RouteCall], Rendered, float | None]:
    """Install, start, and call the routes while the host loads its checkpoint (the first
    txt2img waits for it)."""
    server = Server(config, "extension").start()
    calls: list[RouteCall] = []
    first: dict = {}
    loaded_at: dict = {}

    def first_generation():
        try:
            first["rendered"] = server.txt2img(files.NO_TAG)
        except Exception as exc:  # reported by the test that needs it
            first["error"] = exc
        loaded_at["t"] = time.monotonic()

    started = time.monotonic()
    worker = threading.Thread(target=first_generation)
    worker.start()
    while worker.is_alive():
        for path in ("/hypernetworks/v1/networks", "/hypernetworks/v1/networks/hnx-relu-ln"):
            try:
                server.get(path, timeout=60)
                calls.append(RouteCall(time.monotonic() - started, 200, path))
            except HttpError as exc:
                calls.append(RouteCall(time.monotonic() - started, exc.status, f"{path}: {exc.body[:300]}"))
        time.sleep(0.2)
    worker.join()
    if "error" in first:
        server.stop()
        raise first["error"]
    flat = flat_image_reason(first["rendered"].pixels)
    if flat:
        server.stop()
        raise RuntimeError(f"the host renders the suite's plain prompt {files.NO_TAG!r} non-finitely: {flat}")
    return server, calls, first["rendered"], loaded_at["t"] - started


@pytest.fixture(scope="session")
def config() -> HostConfig:
    found = HostConfig.from_env()
    if found is None:
        pytest.skip(USAGE)
    return found


@pytest.fixture(scope="session")
def suite(config: HostConfig):
    checkpoint = files.launch_checkpoint(config)
    paths = files.write_networks(config, checkpoint.widths)
    paths[files.LORA_NAME] = files.write_lora(config, checkpoint)
    hashes = {name: files.file_sha256(path, config) for name, path in sorted(paths.items())}
    folder = config.artifacts.parent / "references" / checkpoint.sha256[:12]
    references = ReferenceStore(folder / "sdnext" if config.kind == "sdnext" else folder, hashes)
    if config.kind == "a1111":
        render_builtin_references(config, references, checkpoint)
    elif config.kind == "sdnext":
        render_formula_references(config, references)
    commit = install_extension(config)
    if config.kind not in ("a1111", "sdnext"):  # A1111 is the reference itself; SD.Next has its own
        install_reference_extension(config)
    server, calls, before, loaded_in = start_with_extension(config)
    try:
        yield Suite(config, server, checkpoint, references, commit, before, calls, loaded_in)
    finally:
        server.stop()
        remove_extension(config)  # the host is left as found (its log stays with the artifacts)
