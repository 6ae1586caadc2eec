"""Every shell and Python example of the README and of the docs/ pages runs as written.

In a copy of the checkout (the files git tracks, with the shared .venvs), the README's set-up runs
first (its `python3 tools/dev.py demo`; not `tools/dev.py test`, which runs this very test), then every
example block of README.md and docs/*.md in page order, in the same folder, so later examples find
what the demo and earlier ones wrote. HYPERNETWORK_STEP_LIMIT=2 caps every step count (the documented
way to try commands quickly, docs/cli.md); nothing else is changed. A block that cannot run here
carries a tag after its language (```sh needs-webui) and is reported as skipped with its reason.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_RUNNABLE = {
    "needs-webui": "talks to a running WebUI or runs inside one",
    "needs-comfyui": "needs a ComfyUI folder to install into or to start (tests/comfyui runs one)",
    "needs-checkpoint": "needs a real Stable Diffusion checkpoint, its networks and data",
    "needs-gpus": "needs CUDA GPUs",
    "long-running": "serves until interrupted (tests/core/test_app.py drives the app in Chromium)",
    "benchmark": "a benchmark: minutes of CPU time (tests/core/test_benchmark_script.py runs it small)",
    "test-suite": "runs the test suite this test belongs to, or builds its environments",
    "long-training": "trains the embedded model for an hour (tests/core/test_tiny_model.py runs each stage 2 steps)",
}
SETUP = "setup"  # the README's set-up commands: run first, by the fixture
RUNNABLE = {"sh", "python"}
NOT_CODE = {"text", "json"}
RUNS_THIS_TEST = re.compile(r"tools/dev\.py test\b")
TIMEOUT = 1800  # seconds per block; a busy 2-core machine is slow, an idle one takes seconds


@dataclass
class Example:
    page: Path
    line: int
    language: str
    tags: list[str]
    code: str

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


@dataclass
class Checkout:
    folder: Path
    env: dict
    setup_output: dict[str, str] = field(default_factory=dict)


def read_examples() -> list[Example]:
    """Every fenced block of the pages, in page order."""
    found = []
    for page in PAGES:
        lines = page.read_text().splitlines()
        start = None
        for number, line in enumerate(lines, 1):
            if not line.startswith("```"):
                continue
            if start is None:
                start, info = number, line[3:].split()
            else:
                code = "\n".join(lines[start : number - 1]) + "\n"
                found.append(Example(page, start, info[0] if info else "", info[1:], code))
                start = None
    return found


EXAMPLES = read_examples()


def _dev_module():
    spec = importlib.util.spec_from_file_location("dev_for_docs_test", ROOT / "tools" / "dev.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _environment_is_current() -> bool:
    """tools/dev.py rebuilds (deletes) an environment whose requirements changed; the examples may
    only run where that cannot happen, as after `tools/dev.py test` built them."""
    dev = _dev_module()
    stamp = dev.VENVS / "core" / ".requirements-stamp"
    return dev.venv_python("core").exists() and stamp.exists() and stamp.read_text() == dev._stamp("core")


def _copy_checkout(destination: Path) -> None:
    """The files a clone has: those git tracks (staged ones included), as they are in the working
    tree; not the outputs of earlier runs lying around (a grid.png would refuse the README's)."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached"],
            cwd=ROOT, capture_output=True, check=True,
        ).stdout.decode().split("\0")  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        ignored = shutil.ignore_patterns(".git", ".venvs", "hypernetwork-demo", "__pycache__", "*.pyc", ".*_cache")
        shutil.copytree(ROOT, destination, ignore=ignored, symlinks=True)
        return
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)


def _run(example: Example, checkout: Checkout, code: str | None = None) -> subprocess.CompletedProcess:
    code = example.code if code is None else code
    if example.language == "python":
        command = [str(checkout.folder / ".venvs" / "core" / "bin" / "python"), "-"]
    else:
        command = ["bash", "-e", "-o", "pipefail", "-s"]
    return subprocess.run(
        command, input=code, cwd=checkout.folder, env=checkout.env, capture_output=True, text=True, timeout=TIMEOUT
    )


def _assert_ran(example: Example, result: subprocess.CompletedProcess) -> None:
    output = (result.stdout + result.stderr)[-4000:]
    assert result.returncode == 0, f"{example.name} ({example.language}) exited with {result.returncode}:\n{output}"


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Checkout:
    if not _environment_is_current():
        pytest.skip(".venvs/core does not match this checkout's requirements: tools/dev.py would rebuild it")
    folder = tmp_path_factory.mktemp("docs-examples") / "checkout"
    folder.mkdir()
    _copy_checkout(folder)
    (folder / ".venvs").symlink_to((ROOT / ".venvs").resolve(), target_is_directory=True)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HYPERNETWORK_STEP_LIMIT="2", HF_HUB_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")
    result = Checkout(folder, env)
    for example in (e for e in EXAMPLES if SETUP in e.tags):
        code = "".join(line for line in example.code.splitlines(True) if not RUNS_THIS_TEST.search(line))
        ran = _run(example, result, code)
        _assert_ran(example, ran)
        result.setup_output[example.name] = ran.stdout
    return result


def test_every_block_is_classified_and_uses_the_documented_commands():
    problems = []
    for example in EXAMPLES:
        unknown = [tag for tag in example.tags if tag not in NOT_RUNNABLE and tag != SETUP]
        if example.language not in RUNNABLE | NOT_CODE or unknown:
            problems.append(f"{example.name}: ```{example.language} {' '.join(example.tags)}: unknown language or tag")
        if any(tag in NOT_RUNNABLE for tag in example.tags) and not example.code.startswith("# "):
            problems.append(f"{example.name}: a block that does not run here starts with a comment saying why")
        if example.language == "sh":
            for line in example.code.splitlines():
                if re.match(r"\s*(hypernetwork |python -m |python benchmarks)", line):
                    problems.append(f"{example.name}: {line.strip()!r}: use ./hypernetwork or .venvs/core/bin/python")
    assert problems == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_command_hides_in_an_indented_block(page):
    """Indented code blocks escape the test above and the example runs below: commands go in fences."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    hidden = [
        line
        for line in text.splitlines()
        if re.match(r" {4,}(\./hypernetwork|hypernetwork |python|curl|<hypernet)", line)
    ]
    assert hidden == []


def _marks(example: Example):
    reasons = [NOT_RUNNABLE[tag] for tag in example.tags if tag in NOT_RUNNABLE]
    if reasons:
        return [pytest.mark.skip(reason=f"{example.name}: not runnable here: {'; '.join(reasons)}")]
    return []


RUN = [e for e in EXAMPLES if e.language in RUNNABLE]


@pytest.mark.parametrize("example", [pytest.param(e, id=e.name, marks=_marks(e)) for e in RUN])
def test_example_runs_as_written(example, checkout):
    if SETUP in example.tags:
        assert example.name in checkout.setup_output  # ran first, by the fixture
        assert "everything:" in checkout.setup_output[example.name]  # the demo's last line
        return
    _assert_ran(example, _run(example, checkout))


def test_the_hypernetwork_script_runs_from_any_folder_and_through_a_link(tmp_path):
    if not _dev_module().venv_python("core").exists():
        pytest.skip("no .venvs/core: the script would build it first")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "hypernetwork").symlink_to(ROOT / "hypernetwork")
    for script in (ROOT / "hypernetwork", tmp_path / "bin" / "hypernetwork"):
        done = subprocess.run([str(script), "inspect", "--help"], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert done.returncode == 0 and done.stdout.startswith(f"usage: {script} inspect"), done.stderr
    # usage lines and examples show the command as typed: ./hypernetwork from the checkout
    done = subprocess.run(["./hypernetwork", "app", "--help"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.stdout.startswith("usage: ./hypernetwork app ") and "  ./hypernetwork app --model " in done.stdout


@pytest.mark.parametrize("language,code", [("sh", "true\nexit 3\n"), ("python", "raise SystemExit(3)\n")])
def test_a_broken_example_fails_with_its_page_and_line(language, code, tmp_path):
    (tmp_path / ".venvs").symlink_to((ROOT / ".venvs").resolve(), target_is_directory=True)
    example = Example(ROOT / "docs" / "cli.md", 7, language, [], code)
    with pytest.raises(AssertionError, match=f"docs/cli.md:7 \\({language}\\) exited with 3"):
        _assert_ran(example, _run(example, Checkout(tmp_path, dict(os.environ))))
