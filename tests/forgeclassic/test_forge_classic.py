"""The real entry script on Forge Classic's stand-in: what its removal of every hypernetwork line
(and of the Train tab, ``--lowvram`` and ``modules.lowvram``) means for the extension. Generation
goes through reForge's patcher calls, as tests/forge checks for Forge; those tests run here too."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient

import hypernetwork_ext as hx
from tests.forge.test_forge import (  # noqa: F401  (pytest collects the imported tests, on Forge Classic's host)
    a1111_result,
    p_for,
    test_block_and_site_arguments_match_a1111,
    test_hires_installs_once_per_sampling,
    test_negative_pass_and_step_window_use_extra_options,
    test_next_generation_with_the_same_networks_keeps_what_was_computed,
    test_no_tag_installs_no_patch,
    test_tag_acts_through_the_patcher_like_a1111,
    test_unknown_names_are_reported,
)
from tests.support.scripts import script_module
from tests.support.webui_generation import generate


def webui():
    return sys.modules["hypernetwork_ext.hosts.webui"]


def test_forge_classic_is_told_from_reforge_by_its_missing_hypernetwork_code(forge):
    from hypernetwork_ext.hosts import forge as forge_host
    from hypernetwork_ext.hosts import forge_training

    assert forge_host.detect_patcher_host() == "modules_forge.unet_patcher"
    assert forge_host.is_forge_classic() and not forge_training.host_has_train_tab()
    assert type(webui().EXTENSION.applier).__name__ == "PatcherApplier"


def test_the_tag_and_the_page_come_back_and_leave_nothing_on_unload(forge, inputs):
    """Forge Classic has no ``hypernet`` handler and no page of its own: ours are the only ones, and
    after the script unloads the host is as before (no handler, no page)."""
    registry = forge.extra_networks.extra_network_registry
    assert type(registry["hypernet"]).__name__ == "HypernetExtraNetwork"
    assert [page.name for page in forge.ui_extra_networks.extra_pages] == ["checkpoints", "hypernetworks"]
    (got,) = generate(forge, p_for(forge, "<hypernet:anime:0.8>"), inputs, forge.runner.run)
    want = a1111_result(forge, inputs, [(hx.load(forge.hypernetwork_dir / "anime.pt"), 0.8)])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    forge.script_callbacks.script_unloaded_callback()
    assert "hypernet" not in registry
    assert [page.name for page in forge.ui_extra_networks.extra_pages] == ["checkpoints"]


def test_networks_are_found_in_models_hypernetworks_without_the_option(forge):
    assert not hasattr(forge.shared.cmd_opts, "hypernetwork_dir")
    assert webui().hypernetwork_folders() == [str(forge.hypernetwork_dir)]
    page = next(p for p in forge.ui_extra_networks.extra_pages if p.name == "hypernetworks")
    page.create_html("txt2img")
    assert set(page.items) == {"anime", "ink"}
    app = FastAPI()
    forge.script_callbacks.app_started_callback(None, app)
    client = TestClient(app)
    assert {n["name"] for n in client.get("/hypernetworks/v1/networks").json()} == {"anime", "ink"}


def test_the_option_preload_brings_back_is_the_folder(forge, tmp_path):
    other = tmp_path / "elsewhere"
    other.mkdir()
    hx.save(hx.load(forge.hypernetwork_dir / "anime.pt"), other / "moved.pt")
    forge.shared.cmd_opts.hypernetwork_dir = str(other)
    webui().EXTENSION.library.refresh()
    assert [entry.name for entry in webui().EXTENSION.library.entries] == ["moved"]


ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def preload(monkeypatch, tmp_path):
    """The extension's preload.py as the host loads it, with the host's ``modules.paths_internal``."""
    paths = type(sys)("modules.paths_internal")
    paths.models_path = str(tmp_path / "models")
    paths.normalized_filepath = lambda filepath: str(Path(filepath).absolute())
    monkeypatch.setitem(sys.modules, "modules", type(sys)("modules"))
    monkeypatch.setitem(sys.modules, "modules.paths_internal", paths)
    with script_module(ROOT / "preload.py", "preload.py") as module:
        yield module


def test_preload_adds_the_hypernetwork_dir_option_forge_classic_removed(preload, tmp_path):
    """Extensions that read ``shared.cmd_opts.hypernetwork_dir`` (tag autocomplete, Civitai Helper)
    failed with an AttributeError on Forge Classic; with the extension installed they find it."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--embeddings-dir", default="e")
    preload.preload(parser)
    assert parser.parse_args([]).hypernetwork_dir == str(tmp_path / "models" / "hypernetworks")
    assert parser.parse_args(["--hypernetwork-dir", "/x/y"]).hypernetwork_dir == "/x/y"


def test_preload_leaves_a_hosts_own_option_alone(preload):
    """A1111, Forge and reForge keep theirs: adding it again would stop the host (argparse conflict)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--hypernetwork-dir", default="/host/default", help="the host's")
    preload.preload(parser)
    assert parser.parse_args([]).hypernetwork_dir == "/host/default"
    assert [a.help for a in parser._actions if "--hypernetwork-dir" in a.option_strings] == ["the host's"]


def test_add_hypernetwork_to_prompt_comes_back_with_a1111s_key(forge, inputs):
    """Forge Classic removed A1111's ``sd_hypernetwork`` option; the extension registers it again
    (extensions and saved configs use that key) and applies it as A1111 did."""
    info = forge.shared.opts.data_labels["sd_hypernetwork"]
    assert info.section == ("hypernetworks", "Hypernetworks") and info.default == "None"
    assert info.component_args()["choices"] == ["None", "anime", "ink"]
    forge.shared.opts.data["sd_hypernetwork"] = "anime"
    p = p_for(forge, "plain")
    (got,) = generate(forge, p, inputs, forge.runner.run)
    want = a1111_result(forge, inputs, [(hx.load(forge.hypernetwork_dir / "anime.pt"), 1.0)])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert p.all_prompts == ["plain<hypernet:anime:1>"] and "anime: " in p.extra_generation_params["Hypernet hashes"]
