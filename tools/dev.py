#!/usr/bin/env python3
"""Set up the project's environments and run its jobs; needs nothing but Python 3.10+.

    python3 tools/dev.py demo [ARGS...]      the main job on the embedded default model
    python3 tools/dev.py test [PYTEST ARGS]  install every test environment and run the whole suite
    python3 tools/dev.py env PROFILE         (re)build one environment and print its python

Each host profile has its own virtual environment under .venvs/ because their pins cannot live
together: A1111 1.10 (gradio 3.41.2, pydantic 1, transformers 4.30.2), Forge (gradio 4.40.0,
huggingface_hub<1.0) and the core/standalone tools (current diffusers, transformers, gradio).
An environment is rebuilt only when its requirements file changes. The project itself is not
installed into them: jobs run from the repository root, so each checkout tests its own code.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENVS = ROOT / ".venvs"
REQUIREMENTS = ROOT / "tools" / "requirements"
DEFAULT_TORCH = "torch==2.13.0"
# stable-diffusion-sdkit ships the ldm classes A1111 runs; its own pins are from 2022, so no deps.
NO_DEPS = ["stable-diffusion-sdkit==2.1.5"]

PROFILES = {
    "core": ["tests/core", "tests/hosts", "tests/comfyui"],
    "a1111": ["tests/a1111", "tests/forgeclassic"],  # Forge Classic pins A1111's gradio, fastapi, httpx, pydantic
    "forge": ["tests/forge"],
}


def log(message: str) -> None:
    print(f"[dev] {message}", flush=True)


def run(command: list[str], **kwargs) -> None:
    log(" ".join(str(part) for part in command))
    subprocess.run(command, check=True, cwd=ROOT, **kwargs)


def venv_python(profile: str) -> Path:
    return VENVS / profile / "bin" / "python"


def torch_pin(profile: str) -> str:
    """The profile's ``torch==`` line: the host's own torch where it matters (A1111 1.10 ships 2.1.2)."""
    for line in (REQUIREMENTS / f"{profile}.txt").read_text().splitlines():
        if line.strip().startswith("torch=="):
            return line.strip()
    return DEFAULT_TORCH


def _stamp(profile: str) -> str:
    digest = hashlib.sha256()
    digest.update((REQUIREMENTS / f"{profile}.txt").read_bytes())
    digest.update(" ".join([torch_pin(profile), *NO_DEPS]).encode())
    digest.update((ROOT / "pyproject.toml").read_bytes())
    return digest.hexdigest()


def ensure_env(profile: str) -> Path:
    """Create or refresh the virtual environment of a profile; return its python."""
    python = venv_python(profile)
    stamp_file = VENVS / profile / ".requirements-stamp"
    stamp = _stamp(profile)
    if python.exists() and stamp_file.exists() and stamp_file.read_text() == stamp:
        return python
    started = time.monotonic()
    if (VENVS / profile).exists():
        shutil.rmtree(VENVS / profile)
    run([sys.executable, "-m", "venv", str(VENVS / profile)])
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    # torch alone first, pinned: with it in place, no resolver can pull another build later.
    torch = torch_pin(profile)
    run([*pip, torch])
    constraints = VENVS / profile / "constraints.txt"
    constraints.write_text(f"{torch}\n")
    run([*pip, "-c", str(constraints), "-r", str(REQUIREMENTS / f"{profile}.txt")])
    run([*pip, "--no-deps", *NO_DEPS])
    stamp_file.write_text(stamp)
    log(f"environment {profile} ready in {time.monotonic() - started:.0f} s")
    return python


CHROMIUM = "/usr/bin/chromium"
NO_TESTS_COLLECTED = 5  # pytest's exit code


def ensure_chromium() -> None:
    """Browser tests drive Debian's chromium through Playwright (no browser download)."""
    if os.path.exists(CHROMIUM):
        return
    if shutil.which("apt-get") and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        run(["apt-get", "update", "-qq"], env=env)
        run(["apt-get", "install", "-y", "-qq", "chromium"], env=env)
        return
    raise SystemExit(
        f"[dev] the browser tests need Chromium at {CHROMIUM}; install Debian's 'chromium' package "
        "(sudo apt-get install chromium) and run again"
    )


def lint() -> None:
    python = ensure_env("core")
    run([str(python), "-m", "ruff", "check", "."])
    run([str(python), "-m", "ruff", "format", "--check", "."])


def test(args: list[str]) -> int:
    started = time.monotonic()
    lint()
    ensure_chromium()
    failures = []
    for profile, paths in PROFILES.items():
        existing = [p for p in paths if (ROOT / p).exists()]
        if not existing:
            continue
        python = ensure_env(profile)
        log(f"--- {profile}: {' '.join(existing)}")
        result = subprocess.run([str(python), "-m", "pytest", *existing, *args], cwd=ROOT)
        nothing_selected = result.returncode == NO_TESTS_COLLECTED and bool(args)  # e.g. -k in one profile only
        if result.returncode != 0 and not nothing_selected:
            failures.append(profile)
    log(f"whole suite took {time.monotonic() - started:.0f} s")
    if failures:
        log(f"FAILED in: {', '.join(failures)}")
        return 1
    log("all profiles passed")
    return 0


def demo(args: list[str]) -> int:
    python = ensure_env("core")
    return subprocess.run([str(python), "-m", "hypernetwork_ext", "demo", *args], cwd=ROOT).returncode


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    command, rest = argv[0], argv[1:]
    os.environ.setdefault("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    if command == "test":
        return test(rest)
    if command == "demo":
        return demo(rest)
    if command == "env" and rest and rest[0] in PROFILES:
        print(ensure_env(rest[0]))
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
