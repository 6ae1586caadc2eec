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
import warnings
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
    install_extension,
    install_reference_extension,
    remove_extension,
)
from tests.hosts.training_data import choose_plain_prompt, rendered_or_reason


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
    plain: str  # the prompt every tag is appended to: one the host renders finitely (choose_plain)
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


def stored_plain(references: ReferenceStore, kind: str) -> str | None:
    """The first candidate plain prompt whose every reference image a former run stored (it rendered
    them all, the plain one finitely: A1111 refuses a NaN image), or None: the reference run chooses."""
    for plain in files.PLAIN_CANDIDATES:
        stored = all(
            references.get(case, prompt, _settings()) is not None for case, prompt in files.reference_cases(plain)
        )
        if stored and not host_modes.missing_references(references, kind, plain):
            return plain
    return None


def choose_plain(artifacts: Path, server: Server, known: dict[str, Rendered | str] | None = None) -> str:
    """The session's plain prompt: the first of ``files.PLAIN_CANDIDATES`` that ``server`` renders
    finitely without a tag (``known``: renders already made). The choice and what each candidate tried
    before it rendered go to ``plain-prompt.json`` in ``artifacts``, and to a warning."""
    renders = dict(known or {})

    def reason_for(prompt: str) -> str | None:
        if prompt not in renders:
            renders[prompt] = rendered_or_reason(server, prompt)
        found = renders[prompt]
        return found if isinstance(found, str) else None

    try:
        plain, dropped = choose_plain_prompt(files.PLAIN_CANDIDATES, reason_for)
    finally:
        tried = {p: r if isinstance(r, str) else f"finite (mean {r.pixels.mean():.1f})" for p, r in renders.items()}
        (artifacts / "plain-prompt.json").write_text(
            json.dumps({"server": server.log_path.stem, "tried": tried}, indent=1)
        )
    if dropped:
        warnings.warn(
            f"plain prompt {plain!r}; the host renders these non-finitely without a tag: "
            + "; ".join(f"{item.caption!r} ({item.reason})" for item in dropped),
            stacklevel=2,
        )
    return plain


def render_builtin_references(config: HostConfig, references: ReferenceStore, checkpoint: files.Checkpoint) -> str:
    """A1111 without the extension: its own ``<hypernet:...>`` handling renders the references (the
    host modes' too), for the plain prompt it chooses (returned). Its safe unpickler refuses .pt files
    written by current torch, so this run lifts it."""
    plain = stored_plain(references, config.kind)
    if plain is not None:
        return plain
    remove_extension(config)
    extra = "" if "--disable-safe-unpickle" in config.launch else "--disable-safe-unpickle"
    server = Server(config, "builtin").start(extra)
    try:
        plain = choose_plain(config.artifacts, server)
        for case, prompt in files.reference_cases(plain):
            if references.get(case, prompt, _settings()) is None:
                references.put(case, prompt, _settings(), server.txt2img(prompt))
        missing_modes = host_modes.missing_references(references, config.kind, plain)
        host_modes.render_references(server, references, missing_modes, checkpoint, plain)
    finally:
        server.stop()
    return plain


def render_formula_references(config: HostConfig, references: ReferenceStore) -> str:
    """SD.Next without the extension, with the reference formula's own small extension in its place
    (SD.Next has no hypernetworks): the images the tags must render on SD.Next's pipeline, for the
    plain prompt it chooses (returned)."""
    plain = stored_plain(references, config.kind)
    if plain is not None:
        return plain
    remove_extension(config)
    sdnext_host.install_reference(config)
    try:
        server = Server(config, "reference").start()
        try:
            plain = choose_plain(config.artifacts, server)
            for case, prompt in files.reference_cases(plain):
                if references.get(case, prompt, _settings()) is None:
                    references.put(case, prompt, _settings(), server.txt2img(prompt))
        finally:
            server.stop()
    finally:
        sdnext_host.remove_reference(config)
    return plain


def _settings() -> dict:
    from tests.hosts.real_host import DEFAULT_SETTINGS

    return {key: DEFAULT_SETTINGS[key] for key in ("seed", "width", "height", "steps", "sampler_name", "cfg_scale")}


def start_with_extension(
    config: HostConfig, plain: str | None
) -> tuple[Server, list[RouteCall], str, Rendered, float | None]:
    """Install, start, and call the routes while the host loads its checkpoint (the first txt2img,
    of ``plain`` or else the first candidate plain prompt, waits for it). Returns the session's plain
    prompt (chosen here when the reference run did not) and its image."""
    server = Server(config, "extension").start()
    calls: list[RouteCall] = []
    first: dict = {}
    loaded_at: dict = {}
    first_prompt = plain or files.PLAIN_CANDIDATES[0]

    def first_generation():
        try:
            first["rendered"] = rendered_or_reason(server, first_prompt)
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
    try:
        if "error" in first:
            raise first["error"]
        if plain is not None and isinstance(first["rendered"], str):
            raise RuntimeError(
                f"the host with the extension renders the plain prompt {plain!r} non-finitely without a tag, "
                f"which the reference run rendered finitely: {first['rendered']}"
            )
        plain = plain or choose_plain(config.artifacts, server, {first_prompt: first["rendered"]})
        before = first["rendered"] if first_prompt == plain else server.txt2img(plain)
    except BaseException:
        server.stop()
        raise
    return server, calls, plain, before, loaded_at["t"] - started


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
    plain = None  # chosen by the reference run, or else by the host with the extension
    if config.kind == "a1111":
        plain = render_builtin_references(config, references, checkpoint)
    elif config.kind == "sdnext":
        plain = render_formula_references(config, references)
    commit = install_extension(config)
    if config.kind not in ("a1111", "sdnext"):  # A1111 is the reference itself; SD.Next has its own
        install_reference_extension(config)
    server, calls, plain, before, loaded_in = start_with_extension(config, plain)
    try:
        yield Suite(config, server, checkpoint, references, commit, plain, before, calls, loaded_in)
    finally:
        server.stop()
        remove_extension(config)  # the host is left as found (its log stays with the artifacts)
