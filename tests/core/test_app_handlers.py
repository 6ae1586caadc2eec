"""The local app without a browser: Generate's sampler choice, random seeds, progress and Interrupt,
and the Train tab on the loaded model."""

from __future__ import annotations

import os
import re

import pytest

from hypernetwork_ext.library import Library
from hypernetwork_ext.standalone.pipelines import ModelSource
from hypernetwork_ext.standalone.tiny import build_tiny_components
from tests.support.fixtures import one_torch_thread  # noqa: F401 (autouse fixture)

gradio = pytest.importorskip("gradio")
from hypernetwork_ext.standalone.app import AppState, build_app, generate_images, interrupt_generation  # noqa: E402


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    components = build_tiny_components(0)
    source = ModelSource(components.pipeline(), "tiny", None, False)
    return AppState(source, Library([]), str(tmp_path_factory.mktemp("out")))


def generate(state, *, seed=3, sampler="", steps=4, on_step=None):
    return generate_images(state, "a red circle", "", steps, 5.0, seed, 64, 64, 1, sampler, on_step)


def test_the_sampler_chosen_samples_and_is_recorded(state):
    images, infotext, messages = generate(state, sampler="DDIM")
    assert len(images) == 1 and "Sampler: DDIM" in infotext and not messages
    euler, euler_info, _ = generate(state, sampler="Euler")
    assert "Sampler: Euler," in euler_info and euler[0].tobytes() != images[0].tobytes()
    assert type(state.source.pipe.scheduler).__name__ == "EulerDiscreteScheduler"  # put back afterwards
    assert "unknown sampler" in generate(state, sampler="Nope")[2]


def test_a_seed_of_minus_one_draws_one_and_says_which(state):
    seeds = set()
    for _ in range(2):
        _images, infotext, _ = generate(state, seed=-1, steps=1)
        seeds.add(int(re.search(r"Seed: (\d+)", infotext)[1]))
    assert len(seeds) == 2


def test_progress_is_reported_and_interrupt_stops_after_the_current_step(state):
    seen = []

    def on_step(done, total):
        seen.append((done, total))
        if done == 2:
            interrupt_generation(state)

    images, _infotext, messages = generate(state, steps=6, on_step=on_step)
    assert seen == [(1, 6), (2, 6)] and len(images) == 1
    assert "interrupted after step 2 of 6" in messages
    assert "nothing is generating" in interrupt_generation(state)
    _images, _info, messages = generate(state, steps=2)
    assert "interrupted" not in messages  # the next generation is not stopped by the last Interrupt


def test_create_offers_the_loaded_models_widths(state):
    """On the tiny model Create used to tick SD1's widths (a network that could not train on it)."""
    app = build_app(state)
    sizes = [b for b in app.blocks.values() if isinstance(b, gradio.CheckboxGroup) and b.label == "Modules (widths)"]
    assert len(sizes) == 1 and sizes[0].value == ["48", "32", "64"]


def _started_app(monkeypatch, state, argv):
    """What ``app`` serves, from its command line, without loading a model or starting a server."""
    import hypernetwork_ext.standalone.app as app_module

    served = {}

    class NotServed:
        def queue(self):
            return self

        def launch(self, server_name=None, server_port=None, show_api=None, allowed_paths=None):
            served["allowed_paths"] = allowed_paths

    def build(app_state, **kwargs):
        served["state"] = app_state
        return NotServed()

    monkeypatch.setattr(app_module, "load_model", lambda *args, **kwargs: state.source)
    monkeypatch.setattr(app_module, "build_app", build)
    assert app_module.main(argv) == 0
    return served


def test_the_app_finds_the_demos_networks_as_generate_does(state, tmp_path, monkeypatch):
    """``<hypernet:demo-trained:1>`` in the app answered "no hypernetwork named 'demo-trained' in
    models/hypernetworks" while ``generate`` found it in the newest demo run."""
    import hypernetwork_ext as hx
    from hypernetwork_ext.standalone.tiny import TINY_WIDTHS

    monkeypatch.chdir(tmp_path)
    run = tmp_path / "hypernetwork-demo" / "run-1"
    hx.save(
        hx.create(TINY_WIDTHS, activation="relu", seed=1, name="demo-trained"),
        run / "networks" / "demo-trained.safetensors",
    )
    (tmp_path / "hypernetwork-demo" / "latest").symlink_to("run-1")
    served = _started_app(monkeypatch, state, ["--output-dir", "out"])
    app_state = served["state"]
    _images, _infotext, messages = generate_images(
        app_state, "a red circle <hypernet:demo-trained:1>", "", 1, 5.0, 1, 64, 64, 1
    )
    assert messages == ""
    allowed = served["allowed_paths"]
    assert str(tmp_path / "hypernetwork-demo" / "latest" / "networks") in allowed  # its previews can be shown
    assert (tmp_path / "models" / "hypernetworks").is_dir()  # where the Train tab writes
    jobs = app_module_jobs(app_state)
    assert "demo-trained" in jobs.services.names()  # and trained further
    assert jobs.services.network_path("demo-trained").endswith(os.path.join("networks", "demo-trained.safetensors"))
    only = _started_app(monkeypatch, state, ["--hypernetwork-dir", "mine", "--output-dir", "out"])["state"]
    assert [os.path.basename(f) for f in only.library.folders()] == ["mine"]  # a folder given replaces both


def app_module_jobs(app_state):
    from hypernetwork_ext.standalone.app import _training_jobs

    return _training_jobs(app_state)


@pytest.mark.parametrize("program", [None, "./hypernetwork"])
def test_app_help_shows_the_command_users_type_with_examples(program, monkeypatch, capsys):
    from hypernetwork_ext.standalone.cli import main

    if program:
        monkeypatch.setenv("HYPERNETWORK_PROG", program)
    else:
        monkeypatch.delenv("HYPERNETWORK_PROG", raising=False)
    with pytest.raises(SystemExit) as exited:
        main(["app", "--help"])
    shown = capsys.readouterr().out
    typed = program or "hypernetwork"
    assert exited.value.code == 0
    assert shown.startswith(f"usage: {typed} app ") and "python -m" not in shown
    assert "examples:" in shown and f"{typed} app --model sd15-diffusers/" in shown


def test_the_train_tab_starts_at_the_loaded_models_size(state):
    """A1111's 512 px is SD1.5's; on the embedded 64 px model the tab offers 64."""
    app = build_app(state)
    sizes = {b.elem_id: b.value for b in app.blocks.values() if getattr(b, "elem_id", None) in SIZE_FIELDS}
    assert sizes == dict.fromkeys(SIZE_FIELDS, 64)


SIZE_FIELDS = (
    "hnx_train_training_width",
    "hnx_train_training_height",
    "hnx_train_preview_width",
    "hnx_train_preview_height",
)
