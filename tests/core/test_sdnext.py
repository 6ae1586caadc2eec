"""The real entry script against SD.Next's ``modules`` stand-in, on a real diffusers pipeline: the tag
through SD.Next's extra-network machinery against the reference formula on the same pipeline,
scheduler and seed; the step and the negative rows read from the pipeline; the Hypernetwork page's
items; settings; routes; training on the loaded pipeline; undo on unload."""

from __future__ import annotations

import json
import sys

import pytest
import torch

import hypernetwork_ext as hx
from tests.support import sdnext_standin
from tests.support.networks import perturbed
from tests.support.reference import reference_model

WIDTHS = None  # filled from the tiny pipeline


@pytest.fixture
def pipeline():
    from hypernetwork_ext.standalone.tiny import build_tiny_components

    pipe = build_tiny_components(0).pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def host(monkeypatch, tmp_path, pipeline):
    before = set(sys.modules)
    host = sdnext_standin.install(monkeypatch, tmp_path, pipeline).start()
    yield host
    host.unload()
    for name in set(sys.modules) - before:
        if name.startswith("hypernetwork_ext.hosts"):
            del sys.modules[name]


def widths_of(pipeline) -> tuple[int, ...]:
    from hypernetwork_ext.shape import model_shape

    return tuple(model_shape(pipeline.unet).default_widths)


def write_network(host, name: str, seed: int = 1, activation: str = "relu") -> hx.Hypernetwork:
    net = hx.create(widths_of(host.shared.sd_model), (1, 2, 1), activation, "XavierNormal", seed=seed, name=name)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in net.modules():
            if isinstance(layer, torch.nn.Linear):
                layer.weight.normal_(0.0, 0.2, generator=generator)
    net = perturbed(net, seed)
    folder = host.shared.models_path + "/hypernetworks"
    hx.save(net, f"{folder}/{name}.pt", overwrite=True)
    return hx.load(f"{folder}/{name}.pt")


def reference_latents(host, entries, prompt="a red circle", **kwargs):
    """The same generation on a twin pipeline whose to_k/to_v inputs go through the reference formula."""
    pipeline = host.shared.sd_model
    twin = type(pipeline)(**{**pipeline.components, "unet": reference_model(pipeline.unet, entries)})
    twin.set_progress_bar_config(disable=True)
    p = host.processing(prompt, **kwargs)
    generator = torch.Generator().manual_seed(p.seed)
    return twin(prompt=[prompt], negative_prompt=[""], num_inference_steps=p.steps, guidance_scale=p.cfg_scale,
                generator=generator, output_type="latent").images  # fmt: skip


def hooks(unet) -> int:
    return sum(len(m._forward_pre_hooks) for m in unet.modules()) + sum("forward" in m.__dict__ for m in unet.modules())


def test_sdnext_is_detected_and_its_own_handler_page_and_settings_are_registered(host):
    from hypernetwork_ext.hosts import extension, sdnext_webui

    assert type(extension.EXTENSION.applier).__name__ == "DiffusersApplier"
    assert isinstance(host.extra_networks.extra_network_registry["hypernet"], sdnext_webui.HypernetExtraNetwork)
    assert [page.title for page in host.shared.extra_networks] == ["Hypernetwork"]
    assert "hypernetwork_default_multiplier" in host.shared.opts.data_labels
    assert extension.primary_folder() == host.shared.models_path + "/hypernetworks"  # SD.Next has no default


def test_tag_renders_the_reference_formula_on_the_same_pipeline_and_comes_off(host):
    net = write_network(host, "ink")
    plain = host.generate(host.processing("a red circle"))
    tagged = host.generate(host.processing("a red circle <hypernet:ink:0.8>"))
    expected = reference_latents(host, [(net, 0.8)])
    assert (tagged - plain).abs().max() > 1e-3
    torch.testing.assert_close(tagged, expected, rtol=1e-4, atol=1e-4)
    assert hooks(host.shared.sd_model.unet) == 0
    assert torch.equal(host.generate(host.processing("a red circle")), plain)
    assert not host.errors


def test_zero_multiplier_and_untagged_prompts_leave_the_pipeline_untouched(host):
    write_network(host, "ink")
    plain = host.generate(host.processing("a red circle"))
    assert torch.equal(host.generate(host.processing("a red circle <hypernet:ink:0>")), plain)


def test_stacked_networks_apply_in_prompt_order(host):
    first, second = write_network(host, "a", seed=1), write_network(host, "b", seed=2, activation="elu")
    tagged = host.generate(host.processing("a red circle <hypernet:a:0.8> <hypernet:b:-0.5>"))
    torch.testing.assert_close(tagged, reference_latents(host, [(first, 0.8), (second, -0.5)]), rtol=1e-4, atol=1e-4)


def test_each_named_argument_changes_the_result(host):
    write_network(host, "ink")
    base = host.generate(host.processing("a red circle <hypernet:ink:0.8>"))
    plain = host.generate(host.processing("a red circle"))
    for argument in ("k=0", "v=0", "self=0", "cross=0", "IN01=0", "start=0.25", "stop=0.25", "neg=off"):
        changed = host.generate(host.processing(f"a red circle <hypernet:ink:0.8:{argument}>"))
        assert (changed - base).abs().max() > 1e-4, argument
        assert (changed - plain).abs().max() > 1e-4, argument


def test_negative_off_acts_only_on_the_positive_rows(host, monkeypatch):
    """neg=off: the negative pass (the first half of diffusers' CFG batch) runs without the network."""
    net = write_network(host, "ink")
    unet = host.shared.sd_model.unet
    twin = reference_model(unet, [(net, 0.8)])
    seen = []

    def mixed(sample, timestep, encoder_hidden_states, **kwargs):
        kwargs["return_dict"] = False
        plain = type(unet).forward(unet, sample, timestep, encoder_hidden_states, **kwargs)[0]
        changed = twin(sample, timestep, encoder_hidden_states, **kwargs)[0]
        half = sample.shape[0] // 2
        seen.append(sample.shape[0])
        return (torch.cat([plain[:half], changed[half:]]),)

    tagged = host.generate(host.processing("a red circle <hypernet:ink:0.8:neg=off>"))
    monkeypatch.setattr(unet, "forward", mixed)
    expected = host.generate(host.processing("a red circle"))
    assert seen and all(rows == 2 for rows in seen)
    torch.testing.assert_close(tagged, expected, rtol=1e-4, atol=1e-4)


def test_progress_comes_from_the_scheduler_and_negative_rows_from_guidance():
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    from hypernetwork_ext.hosts.sdnext import negative_rows, sampling_progress

    euler = EulerDiscreteScheduler()
    euler.set_timesteps(4)
    assert sampling_progress(euler, euler.timesteps[0]) == 0.0
    euler._step_index = 2
    assert sampling_progress(euler, euler.timesteps[2]) == 0.5
    ddim = DDIMScheduler()
    ddim.set_timesteps(4)
    assert [sampling_progress(ddim, t) for t in ddim.timesteps] == [0.0, 0.25, 0.5, 0.75]
    assert sampling_progress(ddim, torch.tensor(-5)) is None

    class Guided:
        do_classifier_free_guidance = True

    assert negative_rows(Guided(), 4).tolist() == [True, True, False, False]
    assert negative_rows(Guided(), 3) is None
    assert negative_rows(object(), 2) is None


def test_hypernetwork_page_lists_cards_with_sdnext_fields(host):
    write_network(host, "ink")
    folder = host.shared.models_path + "/hypernetworks"
    with open(f"{folder}/ink.json", "w") as handle:
        json.dump({"preferred weight": 0.6, "activation text": "inked", "alias": "blot"}, handle)
    with open(f"{folder}/ink.txt", "w") as handle:
        handle.write("an ink style")
    page = host.shared.extra_networks[0]
    page.create_items("txt2img")
    (item,) = page.items
    assert item["name"] == "ink" and item["filename"].endswith("ink.pt")
    assert item["version"] == ""  # the tiny model is no SD family (an SD1.5 network shows "SD 1.5")
    assert json.loads(item["prompt"]) == " <hypernet:ink:0.6> inked"
    assert item["description"] == "an ink style" and "blot" in item["search_term"]
    assert json.loads(item["metadata"])["metadata"]["activation"] == "relu"


def test_page_hides_networks_of_another_family_unless_show_all(host):
    net = hx.create((1024, 320, 640, 1280), (1, 2, 1), "relu", "Normal", seed=1, name="sd2net")
    hx.save(net, host.shared.models_path + "/hypernetworks/sd2net.pt")
    page = host.shared.extra_networks[0]
    page.create_items("txt2img")
    assert page.items == []
    host.shared.opts.data["hypernetwork_show_all"] = True
    page.create_items("txt2img")
    assert [item["name"] for item in page.items] == ["sd2net"]


def test_unknown_name_is_reported_on_the_generation_and_the_image_is_made(host):
    p = host.processing("a red circle <hypernet:nothing-here:1>")
    host.generate(p)
    assert any("nothing-here" in comment for comment in p.comments)


def test_infotext_gets_hashes_and_paste_maps_them_to_a_local_file(host):
    write_network(host, "ink")
    p = host.processing("a red circle <hypernet:ink:0.8>")
    host.generate(p)
    hashes = p.extra_generation_params["Hypernet hashes"]
    assert hashes.startswith("ink: ")
    params = {"Prompt": "x <hypernet:their-ink:0.8>", "Hypernet hashes": hashes.replace("ink", "their-ink")}
    for callback in host.callbacks["infotext_pasted"]:
        callback("", params)
    assert params["Prompt"] == "x <hypernet:ink:0.8>"


def test_unload_takes_the_handler_and_page_out(host):
    host.unload()
    assert "hypernet" not in host.extra_networks.extra_network_registry
    assert host.shared.extra_networks == []
    host.start_ui()  # loaded again: registered once
    assert len(host.shared.extra_networks) == 1


def test_routes_list_networks_and_train_on_the_loaded_pipeline(host, tmp_path):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from hypernetwork_ext.standalone.tiny import procedural_images

    app = FastAPI()
    for callback in host.callbacks["app_started"]:
        callback(None, app)
    client = TestClient(app)
    created = client.post("/hypernetworks/v1/create", json={"name": "fresh", "weight_init_seed": 1}).json()
    assert created["widths"] == list(widths_of(host.shared.sd_model))
    assert [n["name"] for n in client.get("/hypernetworks/v1/networks").json()] == ["fresh"]
    data = tmp_path / "data"
    procedural_images(data, 2, seed=0, colour="red", size=64)
    unet_before = {k: v.clone() for k, v in host.shared.sd_model.unet.state_dict().items()}
    body = {"hypernetwork_name": "fresh", "data_root": str(data), "steps": 3, "training_width": 64,
            "training_height": 64, "learn_rate": "0.001", "create_image_every": 0, "save_hypernetwork_every": 0,
            "log_directory": str(tmp_path / "logs")}  # fmt: skip
    started = client.post("/hypernetworks/v1/train", json=body)
    assert started.status_code == 200, started.text
    job = started.json()["job_id"]
    status = _wait(client, job)
    assert status["state"] == "finished" and status["step"] == 3, status["message"]
    assert "finished at step 3" in host.shared.state.textinfo  # reported through SD.Next's shared.state
    assert hx.load(status["result_path"]).step == 3
    assert all(torch.equal(v, unet_before[k]) for k, v in host.shared.sd_model.unet.state_dict().items())
    assert hooks(host.shared.sd_model.unet) == 0


def _wait(client, job_id: str) -> dict:
    import time

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        status = client.get(f"/hypernetworks/v1/jobs/{job_id}").json()
        if status["state"] not in ("queued", "running"):
            return status
        time.sleep(0.1)
    raise AssertionError("the job did not end")


def test_preload_leaves_sdnexts_hidden_option_alone(monkeypatch):
    """SD.Next keeps ``--hypernetwork-dir`` hidden and without a default (``SD_HYPERNETWORKDIR`` or None),
    and its ``paths_internal`` has no ``models_path``: the extension's preload.py failed with an
    ImportError at every start of the real SD.Next until it asked for the option, not its default."""
    import argparse
    from pathlib import Path

    from tests.support.scripts import script_module

    monkeypatch.setitem(sys.modules, "modules", type(sys)("modules"))
    monkeypatch.setitem(sys.modules, "modules.paths_internal", type(sys)("modules.paths_internal"))
    parser = argparse.ArgumentParser()
    parser.add_argument("--hypernetwork-dir", type=str, default=None, help=argparse.SUPPRESS)
    with script_module(Path(sdnext_standin.ROOT) / "preload.py", "preload.py") as module:
        module.preload(parser)
    assert parser.parse_args([]).hypernetwork_dir is None
    assert len([a for a in parser._actions if "--hypernetwork-dir" in a.option_strings]) == 1


def test_listing_networks_and_the_training_state_load_no_model(host):
    """SD.Next's ``shared.sd_model`` loads the configured checkpoint when none is loaded (and logs
    "Model locked" while one loads: the real SD.Next logged it for each card while its model loaded)."""
    write_network(host, "ink")
    data = host.modules["modules.modeldata"].model_data
    data.sd_model = None
    page = host.shared.extra_networks[0]
    page.create_items("txt2img")
    assert [item["name"] for item in page.items] == ["ink"]
    from hypernetwork_ext.hosts import sdnext_training

    assert sdnext_training.loaded_model() is None
    assert data.load_requests == 0


def test_unloading_the_model_releases_what_the_networks_hold(host):
    """The real SD.Next kept what the networks held for the UNet (217 MiB there) after its unload."""
    write_network(host, "ink")
    host.generate(host.processing("a red circle <hypernet:ink:0.8>"))
    from hypernetwork_ext.hosts.extension import EXTENSION

    held = EXTENSION.memory.as_dict()["total_bytes"]
    host.modules["modules.sd_models"].unload_model_weights(op="model")
    after = EXTENSION.memory.as_dict()
    assert held > 0 and after["total_bytes"] == 0
    assert [r["bytes"] for r in after["releases"] if r["reason"] == "the checkpoint was unloaded"] == [held]
