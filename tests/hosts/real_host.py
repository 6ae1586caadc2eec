"""A real WebUI (A1111 1.10.1, Forge, reForge, Forge Classic) started from its own folder, with this extension installed
the way users install it, and driven over its HTTP API.

The suite is told where the host is by three environment variables (see ``HostConfig.from_env``):
the folder, the URL it serves on, and the command that starts it from that folder (its launcher, so
that the launcher runs the extension's ``install.py`` as it does for users). Nothing of the host is
part of this repository.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
# The folder under extensions/; another name (HNX_EXTENSION_FOLDER) lets a second checkout be tested
# in a host without touching the suite's usual one.
EXTENSION_FOLDER = os.environ.get("HNX_EXTENSION_FOLDER", "").strip() or "sd-webui-hypernetworks"
SUITE_MARKER = "hnx-host-suite"  # in the clone's .git: the suite may replace a clone it made itself
# The suite's in-host reference (tests/hosts/reference_extension), for hosts that do not draw A1111's images
REFERENCE_FOLDER = "hnx-suite-reference"
REFERENCE_SCRIPT = "hnx suite reference"
ENV_DIR, ENV_URL, ENV_LAUNCH = "HNX_HOST_DIR", "HNX_HOST_URL", "HNX_HOST_LAUNCH"
ENV_ARTIFACTS = "HNX_HOST_ARTIFACTS"
START_TIMEOUT = float(os.environ.get("HNX_HOST_START_TIMEOUT", "1200"))
REQUEST_TIMEOUT = 1800
TOLERANCE = 2  # in 1/255, between images that should agree: CPU float32 kernels in another order, PNG rounding
STARTED = "Startup time:"  # what A1111, Forge and reForge log once their UI and API are ready
USAGE = (
    "the real-host suite needs a WebUI to start: set HNX_HOST_DIR (its folder), HNX_HOST_URL (e.g. "
    "http://127.0.0.1:7860) and HNX_HOST_LAUNCH (the command that starts it from its folder with --api, e.g. "
    "'venv/bin/python launch.py --api --port 7860 ...'); see docs/testing.md"
)


def host_kind(folder: Path) -> str:
    """``a1111``, ``forge``, ``reforge``, ``forgeclassic`` or ``sdnext``, from the host's own files."""
    if (folder / "modules" / "processing_diffusers.py").is_file():
        return "sdnext"
    if (folder / "backend" / "patcher" / "unet.py").is_file():
        return "forge"
    if (folder / "ldm_patched").is_dir() or (folder / "modules_forge" / "unet_patcher.py").is_file():
        # both run ldm_patched; Forge Classic removed A1111's hypernetwork code, reForge kept it
        return "reforge" if (folder / "modules" / "hypernetworks").is_dir() else "forgeclassic"
    if (folder / "modules" / "launch_utils.py").is_file():
        return "a1111"
    raise ValueError(f"{folder} is not an A1111, Forge, reForge, Forge Classic or SD.Next folder")


# Hosts without A1111's Train tab: the extension's Train tab is a top-level one there.
WITHOUT_TRAIN_TAB = ("forge", "forgeclassic", "sdnext")


@dataclass
class HostConfig:
    folder: Path
    url: str
    launch: str
    artifacts: Path
    kind: str = field(init=False)

    def __post_init__(self) -> None:
        self.kind = host_kind(self.folder)
        self.artifacts = self.artifacts / self.kind
        self.artifacts.mkdir(parents=True, exist_ok=True)

    @classmethod
    def from_env(cls) -> HostConfig | None:
        values = [os.environ.get(name, "").strip() for name in (ENV_DIR, ENV_URL, ENV_LAUNCH)]
        if not all(values):
            return None
        artifacts = Path(os.environ.get(ENV_ARTIFACTS) or ROOT / "out" / "hosts")
        return cls(Path(values[0]).resolve(), values[1].rstrip("/"), values[2], artifacts)

    @property
    def extension_dir(self) -> Path:
        return self.folder / "extensions" / EXTENSION_FOLDER

    @property
    def hypernetwork_dir(self) -> Path:
        return self.folder / "models" / "hypernetworks"


# -- installing the extension ---------------------------------------------------------------------------
def install_extension(config: HostConfig) -> str:
    """``git clone`` this repository into the host's extensions folder (its committed HEAD), as
    *Extensions → Install from URL* does; returns the commit. Refuses to replace a folder of that
    name that this suite did not clone."""
    target = config.extension_dir
    copies = other_copies(config)
    if copies:
        raise RuntimeError(
            f"another copy of this extension is enabled in the host: {', '.join(copies)}; remove it first"
        )
    if target.exists():
        if not (target / ".git" / SUITE_MARKER).exists():
            raise RuntimeError(f"{target} exists and was not made by this suite; move it away first")
        remove_extension(config)
    subprocess.run(["git", "clone", "-q", str(ROOT), str(target)], check=True)
    (target / ".git" / SUITE_MARKER).write_text("cloned by tests/hosts\n")
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=target, check=True, capture_output=True, text=True).stdout


def other_copies(config: HostConfig) -> list[str]:
    """Enabled extensions other than the suite's clone that hold this package: with two copies the host
    loads the extension twice, and nothing the suite measures is about one copy."""
    settings = config.folder / "config.json"
    disabled = set(json.loads(settings.read_text()).get("disabled_extensions", [])) if settings.is_file() else set()
    extensions = config.folder / "extensions"
    return sorted(
        folder.name
        for folder in (extensions.iterdir() if extensions.is_dir() else ())
        if folder.name not in disabled | {EXTENSION_FOLDER} and (folder / "hypernetwork_ext" / "__init__.py").is_file()
    )


def remove_extension(config: HostConfig) -> None:
    import shutil

    target = config.extension_dir
    if target.exists() and (target / ".git" / SUITE_MARKER).exists():
        shutil.rmtree(target)
    shutil.rmtree(config.folder / "extensions" / REFERENCE_FOLDER, ignore_errors=True)


def install_reference_extension(config: HostConfig) -> None:
    """The in-host reference beside the extension: its always-on script, with A1111's formula from
    tests/support/reference.py copied next to it (the host imports nothing from this checkout)."""
    import shutil

    target = config.folder / "extensions" / REFERENCE_FOLDER
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(ROOT / "tests" / "hosts" / "reference_extension", target)
    shutil.copy(ROOT / "tests" / "support" / "reference.py", target / "reference_formula.py")


# -- the server -------------------------------------------------------------------------------------------
SETTINGS_FILES = ("config.json", "secrets.json")  # what SD.Next writes when an option is set


def _modified(path: Path) -> int | None:
    return path.stat().st_mtime_ns if path.exists() else None


class HttpError(RuntimeError):
    def __init__(self, method: str, path: str, status: int, body: str):
        super().__init__(f"{method} {path}: HTTP {status}: {body[:2000]}")
        self.status = status
        self.body = body


class Server:
    """One run of the host: started by its launcher, logged to a file, stopped with its process group."""

    def __init__(self, config: HostConfig, name: str):
        self.config = config
        self.log_path = config.artifacts / f"{name}.log"
        self.process: subprocess.Popen | None = None
        self.started_in: float | None = None
        self.restore_options: dict = {}

    # -- lifecycle
    def start(self, extra_args: str = "") -> Server:
        if self._answers():
            raise RuntimeError(f"something already answers at {self.config.url}; stop it first")
        env = {**os.environ, "HNX_INSTALL_VERBOSE": "1"}
        log = open(self.log_path, "w")  # noqa: SIM115 (kept open for the server's life)
        command = f"{self.config.launch} {extra_args}".strip()
        log.write(f"$ {command}\n")
        log.flush()
        started = time.monotonic()
        self.process = subprocess.Popen(
            command, shell=True, cwd=self.config.folder, stdout=log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,
        )  # fmt: skip
        # No request before the host logs "Startup time": A1111 adds its API middleware after gradio
        # starts serving, and a request in between makes that fail ("Cannot add middleware after an
        # application has started"); and a generation sent before it runs the always-on scripts
        # without their arguments.
        while not (STARTED in self.log() and self._answers()):
            if self.process.poll() is not None:
                raise RuntimeError(f"the host exited with {self.process.returncode}; see {self.log_path}")
            if time.monotonic() - started > START_TIMEOUT:
                self.stop()
                raise RuntimeError(f"the host was not ready within {START_TIMEOUT:.0f} s; see {self.log_path}")
            time.sleep(1)
        self.started_in = time.monotonic() - started
        self._answer_lossless_images()
        return self

    def _answer_lossless_images(self) -> None:
        """The API answers in the host's own image format, JPEG by default in SD.Next (quality 90): the
        suite compares pixels, so the host answers PNG while it runs and gets its format back at the end."""
        before = self.get("/sdapi/v1/options").get("samples_format")
        if before == "png":
            return
        if before is None:  # SD.Next lists only the options set; its defaults are in /options-info
            before = self._option_default("samples_format")
        self.post("/sdapi/v1/options", {"samples_format": "png"})
        if before is not None:
            self.restore_options["samples_format"] = before

    def _set_options_and_wait_saved(self, options: dict) -> None:
        """SD.Next writes its settings files in a thread after it answers: stopping it at once cut its
        secrets.json short once (an error at its next start)."""
        files = [self.config.folder / name for name in SETTINGS_FILES]
        before = [_modified(path) for path in files]
        self.post("/sdapi/v1/options", options)
        deadline = time.monotonic() + 30
        while any(_modified(p) == b for p, b in zip(files, before, strict=True)) and time.monotonic() < deadline:
            time.sleep(0.1)

    def _option_default(self, key: str):
        try:
            return self.get("/sdapi/v1/options-info")["options"][key]["default"]
        except (HttpError, KeyError, TypeError):
            return None

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        if self.restore_options and self._answers():
            self._set_options_and_wait_saved(self.restore_options)
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _answers(self) -> bool:
        try:
            self.get("/sdapi/v1/sd-models", timeout=5)
            return True
        except (OSError, HttpError):
            return False

    # -- HTTP
    def request(self, method: str, path: str, body=None, *, timeout: float = REQUEST_TIMEOUT, raw: bool = False):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.config.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                payload = response.read()
        except urllib.error.HTTPError as exc:
            raise HttpError(method, path, exc.code, exc.read().decode(errors="replace")) from None
        if raw:
            return payload
        return json.loads(payload or b"null")

    def get(self, path: str, **kwargs):
        return self.request("GET", path, **kwargs)

    def post(self, path: str, body=None, **kwargs):
        return self.request("POST", path, {} if body is None else body, **kwargs)

    # -- what the host serves
    def txt2img(self, prompt: str, **settings) -> Rendered:
        payload = {**DEFAULT_SETTINGS, "prompt": prompt, **settings}
        started = time.monotonic()
        result = self.post("/sdapi/v1/txt2img", payload)
        seconds = time.monotonic() - started
        info = json.loads(result.get("info") or "{}")
        images = [decode_image(image) for image in result.get("images") or []]
        if not images:  # SD.Next answers 200 with no image when its model failed to load ("Aborted")
            raise RuntimeError(f"the host answered no image for {prompt!r} (is its checkpoint loaded? see its log)")
        if images[0].format != "PNG":  # a lossy image would hide or invent the differences measured
            raise RuntimeError(f"the host answered a {images[0].format} image; the suite compares PNG pixels")
        return Rendered(images[0], info.get("infotexts", [""])[0], seconds, payload)

    def checkpoint(self) -> str:
        return self.get("/sdapi/v1/options").get("sd_model_checkpoint") or ""

    def checkpoints(self) -> list[dict]:
        return self.get("/sdapi/v1/sd-models")

    def switch_checkpoint(self, title: str) -> None:
        self.post("/sdapi/v1/options", {"sd_model_checkpoint": title})


# Small and quick on a CPU: 64x64 is the smallest size the hosts accept; Euler is deterministic.
DEFAULT_SETTINGS = {
    "negative_prompt": "",
    "seed": 1234,
    "width": 64,
    "height": 64,
    "steps": 4,
    "sampler_name": "Euler",
    "cfg_scale": 7,
    "batch_size": 1,
    "n_iter": 1,
    "send_images": True,
    "save_images": False,
}


@dataclass
class Rendered:
    image: Image.Image
    infotext: str
    seconds: float
    payload: dict

    @property
    def pixels(self) -> np.ndarray:
        return np.asarray(self.image.convert("RGB"), dtype=np.int16)


def decode_image(data: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(data.split(",", 1)[-1])))
    image.load()
    return image


def max_difference(a: Rendered | np.ndarray, b: Rendered | np.ndarray) -> int:
    """The largest per-channel difference, in 1/255 steps."""
    a = a.pixels if isinstance(a, Rendered) else a
    b = b.pixels if isinstance(b, Rendered) else b
    return int(np.abs(a - b).max())


def mean_difference(a: Rendered, b: Rendered) -> float:
    return float(np.abs(a.pixels - b.pixels).mean())


def flat_image_reason(pixels: np.ndarray) -> str | None:
    """An image whose every pixel is the same colour is what a non-finite result decodes to."""
    first = pixels.reshape(-1, pixels.shape[-1])[0]
    if (pixels == first).all():
        return f"the host drew every pixel {tuple(int(v) for v in first)} (what a NaN image decodes to)"
    return None


# -- the server log ----------------------------------------------------------------------------------------
TRACEBACK = re.compile(r"Traceback \(most recent call last\):\n(?:[ \t].*\n|\n)*?\S.*", re.M)
# SD.Next prints its tracebacks with rich: no "Traceback" header, a frame is "/path/file.py:20 in preload"
RICH_FRAME = re.compile(r"^\S+\.py:\d+ in \S+[ \t]*$", re.M)
OURS = ("hypernetwork_ext", EXTENSION_FOLDER)


def extension_tracebacks(log: str) -> list[str]:
    """Tracebacks in the host's log that pass through this extension's code (Python's own format, or
    the frames of SD.Next's rich tracebacks, each with the lines that follow it)."""
    found = [match for match in TRACEBACK.findall(log) if any(name in match for name in OURS)]
    for frame in RICH_FRAME.finditer(log):
        if any(name in frame.group() for name in OURS):
            found.append("\n".join(log[frame.start() :].splitlines()[:8]))
    return found
