"""The real entry script on the Forge stand-in: patches through the UNet patcher, equal to A1111's
hooks, never leaking into the shared patcher, once per sampling; the page and API on gradio 4.40."""

import gradio as gr
import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient

import hypernetwork_ext as hx
from hypernetwork_ext.strength import Strength
from tests.support.reference import reference_model
from tests.support.webui_generation import generate, sample
from tests.support.webui_standin import StableDiffusionProcessing


def p_for(host, prompt, **kwargs):
    return StableDiffusionProcessing(sd_model=host.shared.sd_model, prompt=prompt, **kwargs)


def a1111_result(host, inputs, entries, *, rows=None, active_steps=None):
    """What A1111's hooks give for the same networks, on the ldm UNet with its own blocks."""
    unet = host.plain_unet
    twin = reference_model(unet, entries)
    calls = {"n": 0}

    def run(x, t, context):
        plain, changed = unet(x, t, context=context), twin(x, t, context=context)
        step = calls["n"]
        calls["n"] += 1
        if active_steps is not None and step not in active_steps:
            return plain
        return changed if rows is None else torch.where(rows.reshape(-1, 1, 1, 1), changed, plain)

    return sample(host, p_for(host, ""), inputs, 4, run)


def patches_of(patcher):
    return patcher.model_options["transformer_options"].get("patches", {})


def test_forge_is_detected_and_the_page_replaces_nothing_twice(forge):
    webui = __import__("hypernetwork_ext.hosts.webui", fromlist=["x"])
    assert type(webui.EXTENSION.applier).__name__ == "PatcherApplier"
    assert type(forge.extra_networks.extra_network_registry["hypernet"]).__name__ == "HypernetExtraNetwork"
    assert [p.name for p in forge.ui_extra_networks.extra_pages].count("hypernetworks") == 1


def test_tag_acts_through_the_patcher_like_a1111(forge, inputs):
    (got,) = generate(forge, p_for(forge, "<hypernet:anime:0.8>"), inputs, forge.runner.run)
    want = a1111_result(forge, inputs, [(hx.load(forge.hypernetwork_dir / "anime.pt"), 0.8)])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert patches_of(forge.shared.sd_model.forge_objects_after_applying_lora.unet) == {}  # nothing leaked
    blocks = set(forge.runner.blocks_seen)
    assert ("middle", 0) in blocks and any(b[0] == "output" for b in blocks)


def test_no_tag_installs_no_patch(forge, inputs):
    generate(forge, p_for(forge, "plain"), inputs, forge.runner.run)
    assert all("patches" not in call for call in forge.runner.calls)


def test_hires_installs_once_per_sampling(forge, inputs):
    p = p_for(forge, "<hypernet:anime>", enable_hr=True, hr_prompt="<hypernet:ink:0.5>")
    _, second = generate(forge, p, inputs, forge.runner.run)
    last = forge.runner.calls[-1]["patches"]
    assert len(last["attn1_patch"]) == 1 and len(last["attn2_patch"]) == 1
    want = a1111_result(forge, inputs, [(hx.load(forge.hypernetwork_dir / "ink.safetensors"), 0.5)])
    torch.testing.assert_close(second, want, rtol=1e-4, atol=1e-5)
    assert "anime: " in p.extra_generation_params["Hypernet hashes"]


def test_negative_pass_and_step_window_use_extra_options(forge, inputs):
    net = hx.load(forge.hypernetwork_dir / "anime.pt")
    (got,) = generate(forge, p_for(forge, "<hypernet:anime:neg=0>"), inputs, forge.runner.run)
    want = a1111_result(forge, inputs, [(net, 1.0)], rows=torch.tensor([True, False]))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    (got,) = generate(forge, p_for(forge, "<hypernet:anime:stop=0.5>"), inputs, forge.runner.run)
    want = a1111_result(forge, inputs, [(net, 1.0)], active_steps={0, 1})
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "args,strength",
    [
        ("in=0:OUT03=2", Strength(blocks=(("in", 0.0), ("OUT03", 2.0)))),
        ("self=0:v=0.5", Strength(self_attn=0.0, value=0.5)),
    ],
)
def test_block_and_site_arguments_match_a1111(forge, inputs, args, strength):
    (got,) = generate(forge, p_for(forge, f"<hypernet:anime:{args}>"), inputs, forge.runner.run)
    net = hx.load(forge.hypernetwork_dir / "anime.pt")
    unet = forge.plain_unet
    with hx.apply(unet, [(net, strength)]):
        want = sample(forge, p_for(forge, ""), inputs, 4, lambda x, t, c: unet(x, t, context=c))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_reload_ui_and_unload(forge, inputs):
    for _ in range(3):
        forge.reload_ui()
    assert [p.name for p in forge.ui_extra_networks.extra_pages].count("hypernetworks") == 1
    (got,) = generate(forge, p_for(forge, "<hypernet:anime:0.8>"), inputs, forge.runner.run)
    want = a1111_result(forge, inputs, [(hx.load(forge.hypernetwork_dir / "anime.pt"), 0.8)])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    forge.script_callbacks.script_unloaded_callback()
    assert type(forge.extra_networks.extra_network_registry["hypernet"]).__name__ == "BuiltinExtraNetworkHypernet"


def test_unknown_names_are_reported(forge, inputs):
    p = p_for(forge, "<hypernet:nosuch> <hypernet:anime:0.8>")
    (got,) = generate(forge, p, inputs, forge.runner.run)
    assert any("no hypernetwork named 'nosuch'" in c for c in p.comments)
    want = a1111_result(forge, inputs, [(hx.load(forge.hypernetwork_dir / "anime.pt"), 0.8)])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_editor_and_api_on_gradio_4(forge):
    page = next(p for p in forge.ui_extra_networks.extra_pages if p.name == "hypernetworks")
    page.create_html("txt2img")
    with gr.Blocks():
        editor = page.create_user_metadata_editor(None, "txt2img")
        editor.create_ui()
    assert len(editor.put_values_into_components("anime")) == 8
    app = FastAPI()
    forge.script_callbacks.app_started_callback(None, app)
    client = TestClient(app)
    assert {n["name"] for n in client.get("/hypernetworks/v1/networks").json()} == {"anime", "ink"}
    assert client.get("/hypernetworks/v1/networks/anime").json()["metadata"]["activation"] == "relu"


def test_the_same_row_layout_is_the_same_tensor():
    """The patch runs at every attention call; one tensor per layout lets the rewriter's per-step
    caches (row flags, active stages) hit instead of being rebuilt at every layer."""
    from hypernetwork_ext.patches import uncond_rows

    with torch.inference_mode():  # where Forge samples
        first = uncond_rows({"cond_or_uncond": [1, 0]}, 4)
    assert first is uncond_rows({"cond_or_uncond": [1, 0]}, 4) and not first.is_inference()
    assert first.tolist() == [True, True, False, False]
    assert uncond_rows({"cond_or_uncond": [0, 1]}, 4).tolist() == [False, False, True, True]
    assert uncond_rows({"cond_or_uncond": [0, 1]}, 3) is None and uncond_rows({}, 4) is None


def test_next_generation_with_the_same_networks_keeps_what_was_computed(forge, inputs):
    """The rewritten text contexts (and copies, composed matrices) of one generation serve the
    next one with the same networks; other networks start afresh."""
    results = [generate(forge, p_for(forge, "<hypernet:anime:0.8>"), inputs, forge.runner.run)[0] for _ in range(2)]
    stats = forge.extension.applier.rewriter.stats
    assert torch.equal(results[0], results[1])
    assert stats["context_computed"] == 2 and stats["context_hits"] > 0  # key and value context, once
    generate(forge, p_for(forge, "<hypernet:anime:0.5>"), inputs, forge.runner.run)
    assert stats["context_computed"] == 4
