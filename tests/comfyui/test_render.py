"""The loader and the prompt node in the real ComfyUI: strength 0 is ComfyUI's own image, every other
strength is A1111's formula (the suite's reference node) on the same sampler and seed, within 2/255."""

from __future__ import annotations

import pytest

from tests.comfyui import graphs
from tests.comfyui.comfy_host import max_difference, mean_difference
from tests.hosts.real_host import TOLERANCE

# A network must move the picture by more than this (max |difference|, in 1/255) against the image
# without it, or matching the reference would prove nothing; the effects measured here are tens of levels.
EFFECT = 8

CASES = {
    # case: [(suite network, strength), ...] in the order they act
    "relu-ln": [("hnx-relu-ln", 0.8)],
    "swish-dropout-activate-output": [("hnx-swish-dropout", 1.0)],
    "linear": [("hnx-linear", 1.2)],
    "tanh": [("hnx-tanh", 0.8)],
    "relu-deep-negative": [("hnx-relu-deep", -0.7)],
    "elu-deep-negative": [("hnx-elu-deep", -0.7)],
    "stacked": [("hnx-relu-ln", 0.8), ("hnx-linear", -0.5)],
    "2022-no-activate-output": [("hnx-2022-relu", 1.0)],
    "dropout-deep": [("hnx-dropout-deep", 1.0)],
}


def ours(model, entries, **controls):
    return graphs.with_nodes(model.workflow(), *(graphs.ours(model.listed(n), s, **controls) for n, s in entries))


def reference(model, entries, **kwargs):
    return graphs.with_nodes(model.workflow(**kwargs), *(graphs.reference(model.path(n), s) for n, s in entries))


def test_the_node_pack_is_installed_by_a_clone(comfy):
    assert (comfy.config.pack_dir / "__init__.py").is_file()
    for node in ("HypernetworkLoaderA1111", "HypernetworksFromPrompt", "TrainHypernetwork"):
        info = comfy.server.object_info(node)
        assert info["python_module"].startswith("custom_nodes"), info["python_module"]
    names = comfy.server.object_info("HypernetworkLoaderA1111")["input"]["required"]["hypernetwork_name"][0]
    assert comfy.sd1.listed("hnx-relu-ln") in names and comfy.sd1.listed("hnx-relu-ln-st") in names
    print(f"\n[comfyui] pack commit {comfy.commit}, ComfyUI started in {comfy.server.started_in:.0f} s")


def test_strength_zero_is_comfyuis_own_image(comfy):
    baseline = comfy.baseline(comfy.sd1)
    zero = comfy.render(ours(comfy.sd1, [("hnx-relu-ln", 0.0)]))
    print(f"\n[comfyui] strength 0 vs no hypernetwork: max {max_difference(zero, baseline)}/255")
    assert max_difference(zero, baseline) == 0


@pytest.mark.parametrize("case", CASES)
def test_matches_a1111s_formula(comfy, case):
    entries = CASES[case]
    got = comfy.render(ours(comfy.sd1, entries))
    want = comfy.render(reference(comfy.sd1, entries))
    comfy.save(f"ours-{case}", got)
    comfy.save(f"reference-{case}", want)
    effect = max_difference(got, comfy.baseline(comfy.sd1))
    difference = max_difference(got, want)
    print(
        f"\n[comfyui] {case}: vs reference max {difference}/255 (mean {mean_difference(got, want):.3f}); "
        f"effect max {effect}/255; {got.seconds:.1f} s"
    )
    assert effect > EFFECT
    assert difference <= TOLERANCE


def test_safetensors_renders_as_its_pt(comfy):
    pt = comfy.render(ours(comfy.sd1, [("hnx-relu-ln", 0.8)]))
    st = comfy.render(ours(comfy.sd1, [("hnx-relu-ln-st", 0.8)]))
    print(f"\n[comfyui] .safetensors vs .pt: max {max_difference(st, pt)}/255")
    assert max_difference(st, pt) == 0


CONTROLS = {
    "key=0": {"key": 0.0},
    "value=0": {"value": 0.0},
    "self_attn=0": {"self_attn": 0.0},
    "cross_attn=0": {"cross_attn": 0.0},
    "blocks in=0": {"blocks": "in=0"},
    "blocks OUT preset": {"blocks": "OUT"},
    "start=0.5": {"start": 0.5},
    "stop=0.5": {"stop": 0.5},
    "negative=0": {"negative": 0.0},
}


def test_each_control_changes_the_image(comfy):
    full = comfy.render(ours(comfy.sd1, [("hnx-relu-ln", 1.0)]))
    baseline = comfy.baseline(comfy.sd1)
    changes = {}
    for label, controls in CONTROLS.items():
        rendered = comfy.render(ours(comfy.sd1, [("hnx-relu-ln", 1.0)], **controls))
        changes[label] = (max_difference(rendered, full), max_difference(rendered, baseline))
    print("\n[comfyui] control: (max vs full strength, max vs no hypernetwork) " + repr(changes))
    # Renders are deterministic here (strength 0 and a file's two formats give identical images), so
    # any difference is the control acting; a window that leaves out only the last of two steps moves
    # the picture little (the last step's sigma is small).
    assert all(vs_full > 0 for vs_full, _vs_none in changes.values()), changes
    both_off = comfy.render(ours(comfy.sd1, [("hnx-relu-ln", 1.0)], key=0.0, value=0.0))
    assert max_difference(both_off, baseline) == 0


def test_prompt_node_renders_as_the_loader_chain(comfy):
    model = comfy.sd1
    text = f"a red circle <hypernet:hnx-relu-ln:0.8> <hypernet:{model.listed('hnx-linear')}:-0.5:neg=0:start=0.25>"
    by_prompt = comfy.render(
        graphs.with_nodes(model.workflow(prompt=text), ("HypernetworksFromPrompt", {"text": text}))
    )
    chain = comfy.render(
        graphs.with_nodes(
            model.workflow(),
            graphs.ours(model.listed("hnx-relu-ln"), 0.8),
            graphs.ours(model.listed("hnx-linear"), -0.5, negative=0.0, start=0.25),
        )
    )
    difference = max_difference(by_prompt, chain)
    print(
        f"\n[comfyui] prompt node vs loader chain: max {difference}/255; effect {max_difference(chain, comfy.baseline(model))}/255"
    )
    assert difference <= TOLERANCE
    assert max_difference(chain, comfy.baseline(model)) > EFFECT


def test_fp8_weights(comfy):
    """The UNet stored in float8 (ComfyUI casts each weight at use): the network acts on activations."""
    model = comfy.sd1
    entries = [("hnx-relu-ln", 0.8)]
    got = comfy.render(
        graphs.with_nodes(
            model.workflow(unet_dtype="fp8_e4m3fn"), *(graphs.ours(model.listed(n), s) for n, s in entries)
        )
    )
    want = comfy.render(reference(model, entries, unet_dtype="fp8_e4m3fn"))
    plain = comfy.render(model.workflow(unet_dtype="fp8_e4m3fn"))
    print(
        f"\n[comfyui] fp8 UNet: vs reference max {max_difference(got, want)}/255; effect {max_difference(got, plain)}/255"
    )
    assert max_difference(got, plain) > EFFECT
    assert max_difference(got, want) <= TOLERANCE


def test_sdxl(comfy):
    model = comfy.sdxl
    if model is None:
        pytest.skip("no SDXL checkpoint in models/checkpoints")
    entries = [("hnx-sdxl-relu-ln", 0.8)]
    baseline = comfy.baseline(model)
    zero = comfy.render(ours(model, [("hnx-sdxl-relu-ln", 0.0)]))
    got = comfy.render(ours(model, entries))
    want = comfy.render(reference(model, entries))
    comfy.save("ours-sdxl", got)
    print(
        f"\n[comfyui] SDXL: strength 0 vs none max {max_difference(zero, baseline)}/255; vs reference max "
        f"{max_difference(got, want)}/255; effect {max_difference(got, baseline)}/255"
    )
    assert max_difference(zero, baseline) == 0
    assert max_difference(got, baseline) > EFFECT
    assert max_difference(got, want) <= TOLERANCE
