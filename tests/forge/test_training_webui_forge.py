"""Forge and reForge get no training (see README, "Forge and reForge" under training): nothing of it registers,
and the generation side and its routes stay as they are. The tab's host hooks build on gradio 4.40."""

from fastapi import FastAPI
from fastapi.testclient import TestClient

from tests.core.test_training_ui_host import (  # noqa: F401  (pytest collects the imported tests)
    hosted,
    test_the_train_button_runs_the_hosts_script_then_the_handler,
    test_txt2img_values_replace_the_preview_options_when_asked,
)


def test_nothing_of_training_registers_on_forge(forge):
    callbacks = forge.script_callbacks.callback_map
    assert callbacks["callbacks_ui_train_tabs"] == [] and callbacks["callbacks_after_component"] == []
    assert not any("training" in c.name for category in callbacks.values() for c in category)
    assert "hypernetwork_hide_host_training" not in forge.shared.opts.data_labels
    app = FastAPI()
    forge.script_callbacks.app_started_callback(None, app)
    client = TestClient(app)
    assert client.get("/hypernetworks/v1/networks").status_code == 200
    assert client.post("/hypernetworks/v1/train", json={}).status_code == 404
    assert client.post("/hypernetworks/v1/create", json={"name": "x"}).status_code == 404
