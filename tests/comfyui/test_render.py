"""The loader and the prompt node in the real ComfyUI, on SD1.5 and on the reduced SDXL checkpoint:
strength 0 is ComfyUI's own image, every other strength is A1111's formula (the suite's reference node)
on the same sampler and seed, within 2/255; each control changes the image; the step windows are
A1111's steps; the UNet's weights in each of ComfyUI's float8 types, and computing in bfloat16."""

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


def ours(model, entries, base=None, **controls):
    base = base or model.workflow()
    return graphs.with_nodes(base, *(graphs.ours(model.listed(n), s, **controls) for n, s in entries))


def reference(model, entries, base=None, precision="float32"):
    base = base or model.workflow()
    return graphs.with_nodes(base, *(graphs.reference(model.path(n), s, precision) for n, s in entries))


def test_the_node_pack_is_installed_by_a_clone(comfy):
    assert (comfy.config.pack_dir / "__init__.py").is_file()
    for node in ("HypernetworkLoaderA1111", "HypernetworksFromPrompt", "TrainHypernetwork"):
        info = comfy.server.object_info(node)
        assert info["python_module"].startswith("custom_nodes"), info["python_module"]
    names = comfy.server.object_info("HypernetworkLoaderA1111")["input"]["required"]["hypernetwork_name"][0]
    for model in comfy.models.values():
        assert model.listed("hnx-relu-ln") in names and model.listed("hnx-relu-ln-st") in names
    print(
        f"\n[comfyui] pack commit {comfy.commit}, ComfyUI started in {comfy.server.started_in:.0f} s; "
        f"models {', '.join(f'{m.label}: {m.checkpoint}' for m in comfy.models.values())}"
    )


def test_strength_zero_is_comfyuis_own_image(comfy, model):
    baseline = comfy.baseline(model)
    zero = comfy.render(ours(model, [("hnx-relu-ln", 0.0)]))
    print(
        f"\n[comfyui] {model.label} strength 0 vs no hypernetwork: max {max_difference(zero, baseline)}/255 "
        f"(baseline {baseline.seconds:.0f} s)"
    )
    assert max_difference(zero, baseline) == 0


@pytest.mark.parametrize("case", CASES)
def test_matches_a1111s_formula(comfy, model, case):
    entries = CASES[case]
    got = comfy.render(ours(model, entries))
    want = comfy.render(reference(model, entries))
    comfy.save(f"{model.label}-ours-{case}", got)
    comfy.save(f"{model.label}-reference-{case}", want)
    effect = max_difference(got, comfy.baseline(model))
    difference = max_difference(got, want)
    print(
        f"\n[comfyui] {model.label} {case}: vs reference max {difference}/255 (mean {mean_difference(got, want):.3f}); "
        f"effect max {effect}/255; {got.seconds:.1f} s"
    )
    assert effect > EFFECT
    assert difference <= TOLERANCE


def test_safetensors_renders_as_its_pt(comfy, model):
    pt = comfy.render(ours(model, [("hnx-relu-ln", 0.8)]))
    st = comfy.render(ours(model, [("hnx-relu-ln-st", 0.8)]))
    print(f"\n[comfyui] {model.label} .safetensors vs .pt: max {max_difference(st, pt)}/255")
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


def test_each_control_changes_the_image(comfy, model):
    full = comfy.render(ours(model, [("hnx-relu-ln", 1.0)]))
    baseline = comfy.baseline(model)
    changes = {}
    for label, controls in CONTROLS.items():
        rendered = comfy.render(ours(model, [("hnx-relu-ln", 1.0)], **controls))
        changes[label] = (max_difference(rendered, full), max_difference(rendered, baseline))
    print(f"\n[comfyui] {model.label} control: (max vs full strength, max vs no hypernetwork) {changes!r}")
    # Renders are deterministic here (strength 0 and a file's two formats give identical images), so
    # any difference is the control acting; a window that leaves out only the last of two steps moves
    # the picture little (the last step's sigma is small): test_step_windows_are_a1111s_steps shows
    # that it is the right step.
    assert all(vs_full > 0 for vs_full, _vs_none in changes.values()), changes
    both_off = comfy.render(ours(model, [("hnx-relu-ln", 1.0)], key=0.0, value=0.0))
    assert max_difference(both_off, baseline) == 0


def test_step_windows_are_a1111s_steps(comfy, model):
    """stop=0.5 over two steps acts on the first step only, start=0.5 on the second only (A1111's
    step/steps): the same images as sampling the steps in two KSamplerAdvanced passes, the network on
    the one pass and not on the other."""
    network = [graphs.ours(model.listed("hnx-relu-ln"), 1.0)]
    results = {}
    for label, controls, early, late in (
        ("stop=0.5", {"stop": 0.5}, network, []),
        ("start=0.5", {"start": 0.5}, [], network),
    ):
        windowed = comfy.render(ours(model, [("hnx-relu-ln", 1.0)], **controls))
        split = comfy.render(model.workflow(model_nodes=tuple(early), late_model_nodes=tuple(late), split_at=1))
        results[label] = (max_difference(windowed, split), max_difference(windowed, comfy.baseline(model)))
    # The two passes without any network are ComfyUI's one-pass image: the split itself changes nothing.
    plain_split = comfy.render(model.workflow(split_at=1))
    split_alone = max_difference(plain_split, comfy.baseline(model))
    print(
        f"\n[comfyui] {model.label} windows: (max vs the two-pass render, max vs no hypernetwork) {results!r}; "
        f"two passes without a network vs one: {split_alone}/255"
    )
    assert split_alone <= TOLERANCE
    assert all(difference <= TOLERANCE for difference, _effect in results.values()), results
    assert results["stop=0.5"][1] > EFFECT  # the first step carries most of the network's effect


def test_prompt_node_renders_as_the_loader_chain(comfy, model):
    text = (
        f"a red circle <hypernet:{model.stem('hnx-relu-ln')}:0.8> "
        f"<hypernet:{model.listed('hnx-linear')}:-0.5:neg=0:start=0.25>"
    )
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
    effect = max_difference(chain, comfy.baseline(model))
    print(f"\n[comfyui] {model.label} prompt node vs loader chain: max {difference}/255; effect {effect}/255")
    assert difference <= TOLERANCE
    assert effect > EFFECT


# ComfyUI's UNETLoader weight_dtype options (the UNet stored in float8, each weight cast at use), and
# ModelComputeDtype's bfloat16 on float8 weights (how fp8 checkpoints run on most GPUs). ComfyUI runs
# the same casting layers for fp8_e4m3fn_fast where the device has no float8 matmul (a CPU). fp16
# compute is left out here: half-precision matmuls are ~16x slower than float32 on this CPU.
WEIGHT_DTYPES = {
    "fp8_e4m3fn": ("fp8_e4m3fn", None),
    "fp8_e4m3fn_fast": ("fp8_e4m3fn_fast", None),
    "fp8_e5m2": ("fp8_e5m2", None),
    "fp8_e4m3fn-bf16": ("fp8_e4m3fn", "bf16"),
}


@pytest.mark.parametrize("option", WEIGHT_DTYPES)
def test_weight_dtypes(comfy, model, option):
    """The network acts on activations, in float32, whatever the UNet's weights are stored in.

    Computing in bfloat16, the network's float32 output is rounded to bfloat16 (8 bits of mantissa), and
    a last-bit difference of float32 arithmetic (ours and the reference add in another order) flips the
    rounding of a few activations, which the bfloat16 UNet carries on into the picture. How far that
    goes is measured in the same run: the reference in float32 against the reference in float64 (the
    same formula, without float32's rounding). Ours must be no farther from the float64 formula than
    twice that (it is a float32 evaluation as the reference is, each at most that far from the formula),
    and the rounding must stay small beside what the network does."""
    unet_dtype, compute_dtype = WEIGHT_DTYPES[option]
    base = model.workflow(unet_dtype=unet_dtype, compute_dtype=compute_dtype)
    entries = [("hnx-relu-ln", 0.8)]
    got = comfy.render(ours(model, entries, base))
    want = comfy.render(reference(model, entries, base))
    plain = comfy.render(base)
    comfy.save(f"{model.label}-ours-{option}", got)
    effect = max_difference(got, plain)
    rounding = ""
    if compute_dtype is not None:
        exact = comfy.render(reference(model, entries, base, precision="float64"))
        floor = max_difference(want, exact)
        rounding = (
            f"; float32 rounding: the reference vs its float64 form {floor}/255 (mean {mean_difference(want, exact):.3f}), "
            f"ours vs the float64 form {max_difference(got, exact)}/255 (mean {mean_difference(got, exact):.3f})"
        )
    print(
        f"\n[comfyui] {model.label} UNet {option}: vs reference max {max_difference(got, want)}/255 "
        f"(mean {mean_difference(got, want):.3f}); effect {effect}/255; no network vs the fp32 UNet "
        f"{max_difference(plain, comfy.baseline(model))}/255{rounding}"
    )
    assert effect > EFFECT
    if compute_dtype is None:
        assert max_difference(got, want) <= TOLERANCE
        return
    assert 4 * floor < effect, "bfloat16 rounding alone moves the image nearly as much as the network"
    assert max_difference(got, exact) <= max(TOLERANCE, 2 * floor)
