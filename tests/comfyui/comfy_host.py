"""A real ComfyUI started from its own folder, with this repository cloned into ``custom_nodes/`` the way
users install a node pack, driven through its HTTP API (API-format workflows on ``/prompt``, results
from ``/history`` and ``/view``).

The suite is told where ComfyUI is by three environment variables (see ``ComfyConfig.from_env``):
its folder, the URL it serves on and the command that starts it from that folder. Nothing of ComfyUI
is part of this repository.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
PACK_FOLDER = "sd-webui-hypernetworks"  # under custom_nodes/: what `git clone <url>` names it
REFERENCE_FOLDER = "hnx-suite-reference"  # the suite's own node: A1111's formula from tests/support/reference.py
SUITE_MARKER = "hnx-comfy-suite"
ENV_DIR, ENV_URL, ENV_LAUNCH = "HNX_COMFYUI_DIR", "HNX_COMFYUI_URL", "HNX_COMFYUI_LAUNCH"
ENV_ARTIFACTS = "HNX_HOST_ARTIFACTS"
START_TIMEOUT = float(os.environ.get("HNX_HOST_START_TIMEOUT", "900"))
STARTED = "To see the GUI go to:"  # what ComfyUI logs once it serves
USAGE = (
    "the real-ComfyUI suite needs a ComfyUI to start: set HNX_COMFYUI_DIR (its folder, with a random SD1.5 "
    "checkpoint in models/checkpoints), HNX_COMFYUI_URL (e.g. http://127.0.0.1:8188) and HNX_COMFYUI_LAUNCH "
    "(the command that starts it from its folder, e.g. 'venv/bin/python main.py --cpu --listen 127.0.0.1 "
    "--port 8188'); see docs/comfyui.md"
)


@dataclass
class ComfyConfig:
    folder: Path
    url: str
    launch: str
    artifacts: Path

    @classmethod
    def from_env(cls) -> ComfyConfig | None:
        values = [os.environ.get(name, "").strip() for name in (ENV_DIR, ENV_URL, ENV_LAUNCH)]
        if not all(values):
            return None
        artifacts = Path(os.environ.get(ENV_ARTIFACTS) or ROOT / "out" / "hosts") / "comfyui"
        artifacts.mkdir(parents=True, exist_ok=True)
        return cls(Path(values[0]).resolve(), values[1].rstrip("/"), values[2], artifacts)

    @property
    def pack_dir(self) -> Path:
        return self.folder / "custom_nodes" / PACK_FOLDER

    @property
    def reference_dir(self) -> Path:
        return self.folder / "custom_nodes" / REFERENCE_FOLDER

    @property
    def hypernetwork_dir(self) -> Path:
        return self.folder / "models" / "hypernetworks"

    @property
    def checkpoint_dir(self) -> Path:
        return self.folder / "models" / "checkpoints"

    @property
    def input_dir(self) -> Path:
        return self.folder / "input"


# -- installing ----------------------------------------------------------------------------------------
def install_pack(config: ComfyConfig) -> str:
    """``git clone`` this repository (its committed HEAD) into ``custom_nodes/``, as users do; returns the commit."""
    target = config.pack_dir
    if target.exists():
        if not (target / ".git" / SUITE_MARKER).exists():
            raise RuntimeError(f"{target} exists and was not made by this suite; move it away first")
        shutil.rmtree(target)
    subprocess.run(["git", "clone", "-q", str(ROOT), str(target)], check=True)
    (target / ".git" / SUITE_MARKER).write_text("cloned by tests/comfyui\n")
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=target, check=True, capture_output=True, text=True).stdout


def install_reference_node(config: ComfyConfig) -> None:
    """The suite's reference node: tests/support/reference.py (A1111's formula, sharing no code with the
    package) applied through the same attention patch points."""
    target = config.reference_dir
    target.mkdir(parents=True, exist_ok=True)
    source = (Path(__file__).parent / "reference_node.py").read_text()
    source = source.replace("@REFERENCE_PY@", str(ROOT / "tests" / "support" / "reference.py"))
    (target / "__init__.py").write_text(source)
    (target / SUITE_MARKER).write_text("written by tests/comfyui\n")


def remove_installed(config: ComfyConfig) -> None:
    if config.pack_dir.exists() and (config.pack_dir / ".git" / SUITE_MARKER).exists():
        shutil.rmtree(config.pack_dir)
    if (config.reference_dir / SUITE_MARKER).exists():
        shutil.rmtree(config.reference_dir)


# -- the server ----------------------------------------------------------------------------------------
class HttpError(RuntimeError):
    def __init__(self, method: str, path: str, status: int, body: str):
        super().__init__(f"{method} {path}: HTTP {status}: {body[:3000]}")
        self.status = status
        self.body = body


class WorkflowError(RuntimeError):
    pass


@dataclass
class Rendered:
    image: Image.Image
    seconds: float
    outputs: dict

    @property
    def pixels(self) -> np.ndarray:
        return np.asarray(self.image.convert("RGB"), dtype=np.int16)


class ComfyServer:
    """One run of ComfyUI: started by its command, logged to a file, stopped with its process group."""

    def __init__(self, config: ComfyConfig):
        self.config = config
        self.log_path = config.artifacts / "comfyui.log"
        self.process: subprocess.Popen | None = None
        self.started_in: float | None = None
        self.client_id = uuid.uuid4().hex

    def start(self) -> ComfyServer:
        if self._answers():
            raise RuntimeError(f"something already answers at {self.config.url}; stop it first")
        log = open(self.log_path, "w")  # noqa: SIM115 (kept open for the server's life)
        log.write(f"$ {self.config.launch}\n")
        log.flush()
        started = time.monotonic()
        self.process = subprocess.Popen(
            self.config.launch, shell=True, cwd=self.config.folder, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        while not (STARTED in self.log() and self._answers()):
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode}; see {self.log_path}")
            if time.monotonic() - started > START_TIMEOUT:
                self.stop()
                raise RuntimeError(f"ComfyUI was not ready within {START_TIMEOUT:.0f} s; see {self.log_path}")
            time.sleep(1)
        self.started_in = time.monotonic() - started
        return self

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
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
            self.get("/system_stats", timeout=5)
            return True
        except (OSError, HttpError):
            return False

    # -- HTTP
    def request(self, method: str, path: str, body=None, *, timeout: float = 60, raw: bool = False):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.config.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                payload = response.read()
        except urllib.error.HTTPError as exc:
            raise HttpError(method, path, exc.code, exc.read().decode(errors="replace")) from None
        return payload if raw else json.loads(payload or b"null")

    def get(self, path: str, **kwargs):
        return self.request("GET", path, **kwargs)

    def free(self) -> None:
        """ComfyUI unloads its models and empties its caches (what the Manager's "Free model and node
        cache" asks): it does so between two queue items, at once when the queue is idle."""
        self.request("POST", "/free", {"unload_models": True, "free_memory": True}, raw=True)
        time.sleep(5)

    def object_info(self, node: str) -> dict:
        return self.get(f"/object_info/{node}")[node]

    # -- workflows
    def run(self, workflow: dict, *, timeout: float = 1800) -> dict:
        """Queue an API-format workflow, wait for it; its history entry (outputs of every output node)."""
        started = time.monotonic()
        queued = self.request("POST", "/prompt", {"prompt": workflow, "client_id": self.client_id})
        prompt_id = queued["prompt_id"]
        while True:
            history = self.get(f"/history/{prompt_id}")
            entry = history.get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                status = entry["status"]
                if status.get("status_str") != "success":
                    raise WorkflowError(_error_of(status))
                entry["seconds"] = time.monotonic() - started
                return entry
            if time.monotonic() - started > timeout:
                raise WorkflowError(f"workflow {prompt_id} did not finish within {timeout:.0f} s")
            time.sleep(0.5)

    def image(self, reference: dict) -> Image.Image:
        query = urllib.parse.urlencode(
            {"filename": reference["filename"], "subfolder": reference.get("subfolder", ""), "type": reference["type"]}
        )
        return Image.open(io.BytesIO(self.get(f"/view?{query}", raw=True))).convert("RGB")

    def render(self, workflow: dict, save_node: str = "save") -> Rendered:
        entry = self.run(workflow)
        images = entry["outputs"][save_node]["images"]
        return Rendered(self.image(images[0]), entry["seconds"], entry["outputs"])


def _error_of(status: dict) -> str:
    for kind, data in status.get("messages", []):
        if kind == "execution_error":
            return f"{data.get('node_type')}: {data.get('exception_type')}: {data.get('exception_message')}"
    return json.dumps(status)[:3000]


def max_difference(a: Rendered | np.ndarray, b: Rendered | np.ndarray) -> int:
    a = a.pixels if isinstance(a, Rendered) else a
    b = b.pixels if isinstance(b, Rendered) else b
    return int(np.abs(a - b).max())


def mean_difference(a: Rendered, b: Rendered) -> float:
    return float(np.abs(a.pixels - b.pixels).mean())
