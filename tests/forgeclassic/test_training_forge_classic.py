"""Training on Forge Classic's stand-in: reForge's model and memory manager (``ldm_patched``),
blocks adding in place as Forge's do, no Train tab (the extension adds a top-level one), and none of
``--lowvram``, ``modules.lowvram``, ``--textual-inversion-templates-dir`` or
``shared.reload_hypernetworks``. The Forge tests of a run, previews, LoRA and interruption run here
on this host."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

import hypernetwork_ext as hx
from tests.forge.test_training_webui_forge import (  # noqa: F401  (pytest collects the imported tests, on Forge Classic)
    TASK,
    WIDTHS,
    data,  # the module's dataset fixture
    forge_tab,
    make_host,
    tab_values,
    test_an_interrupted_or_failed_run_saves_its_step_and_leaves_the_model_as_it_was,
    test_the_preview_is_the_tag_render_of_the_copy_and_the_no_tag_image_is_unchanged,
    test_the_run_trains_on_the_checkpoint_and_loras_of_earlier_generations_keep_working,
    txt2img,
)


@pytest.fixture
def forge(monkeypatch, tmp_path):
    host = make_host(monkeypatch, tmp_path, classic=True)
    yield host
    assert host.errors.reported == []


def test_a_top_level_train_tab_and_the_routes(forge):
    assert forge.script_callbacks.callback_map["callbacks_ui_train_tabs"] == []  # no Train tab to join
    tab, blocks, _preview = forge_tab(forge)
    ids = {c["props"].get("elem_id") for c in blocks.get_config_file()["components"]}
    assert {"hnx_train_tab", "hnx_train_progress", "hnx_train_gallery", "hnx_create_name"} <= ids
    assert "hypernetwork_hide_host_training" not in forge.shared.opts.data_labels  # nothing of A1111's to hide
    assert tab.network_names() == ["style"]
    app = FastAPI()
    forge.script_callbacks.app_started_callback(None, app)
    client = TestClient(app)
    created = client.post("/hypernetworks/v1/create", json={"name": "new", "enable_sizes": list(WIDTHS)})
    assert created.status_code == 200 and created.json()["widths"] == list(WIDTHS)
    assert (forge.hypernetwork_dir / "new.pt").is_file()  # models/hypernetworks: the host has no option for it


def test_training_names_the_host_lacks_are_not_needed(forge):
    training = sys.modules["hypernetwork_ext.hosts.webui_training"]
    assert training.host_lowvram() is None
    assert training.refusal(forge.shared.sd_model) is None
    assert training.template_dirs() == []
    assert training.build_services().hypernetwork_dir == str(forge.hypernetwork_dir)


def test_a_run_trains_previews_and_its_result_renders_by_its_tag(forge, tmp_path, data):  # noqa: F811
    tab, _blocks, preview = forge_tab(forge)
    plain_before = txt2img(forge, "a red cube")
    message = tab.start_from_host(TASK, "style", "filewords.txt", *tab_values(tab, data, tmp_path), True,
                                  *[c.value for c in preview])  # fmt: skip
    assert "Training started" in message
    job = tab.jobs.wait(tab.current_job, 300)
    assert job.state == "finished", job.message
    assert hx.load(job.result_path).step == 3 and len(job.previews) == 1
    assert "style-3" in tab.network_names()  # listed at once, without the host's own list
    tagged = txt2img(forge, "a red cube <hypernet:style-3:1>")
    assert np.abs(tagged.astype(int) - plain_before.astype(int)).max() > 0
    assert np.array_equal(txt2img(forge, "a red cube"), plain_before)
