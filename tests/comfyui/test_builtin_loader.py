"""Against ComfyUI's own HypernetworkLoader (comfy_extras/nodes_hypernetwork.py) on the same files:
equal where it follows A1111, and each documented difference shown where it does not."""

from __future__ import annotations

import pytest

from tests.comfyui import graphs
from tests.comfyui.comfy_host import WorkflowError, max_difference
from tests.comfyui.test_render import EFFECT, ours, reference
from tests.hosts.real_host import TOLERANCE

# Networks without layer norm and without dropout: there ComfyUI's loader computes A1111's formula.
AGREED = {
    "linear": [("hnx-linear", 1.2)],
    "tanh": [("hnx-tanh", 0.8)],
    "relu-deep-negative": [("hnx-relu-deep", -0.7)],
    "stacked": [("hnx-tanh", 0.8), ("hnx-linear", -0.5)],
}


def builtin(model, entries, **kwargs):
    return graphs.with_nodes(model.workflow(**kwargs), *(graphs.comfy_builtin(model.listed(n), s) for n, s in entries))


@pytest.mark.parametrize("case", AGREED)
def test_equal_where_comfyui_follows_a1111(comfy, model, case):
    entries = AGREED[case]
    theirs = comfy.render(builtin(model, entries))
    mine = comfy.render(ours(model, entries))
    want = comfy.render(reference(model, entries))
    effect = max_difference(mine, comfy.baseline(model))
    print(
        f"\n[comfyui] {model.label} {case}: ours vs HypernetworkLoader max {max_difference(mine, theirs)}/255, "
        f"HypernetworkLoader vs A1111 {max_difference(theirs, want)}/255, ours vs A1111 {max_difference(mine, want)}/255; "
        f"effect {effect}/255"
    )
    assert effect > EFFECT
    assert max_difference(mine, theirs) <= TOLERANCE
    assert max_difference(mine, want) <= TOLERANCE


def test_layer_norm_networks_get_an_activation_after_their_output_layer(comfy, model):
    """ComfyUI's loader counts the LayerNorm weights among the Linears, so the output Linear is not
    the last one it sees: it adds the activation after it although the file says activate_output False."""
    entries = [("hnx-relu-ln", 0.8)]
    theirs = comfy.render(builtin(model, entries))
    want = comfy.render(reference(model, entries))
    mine = comfy.render(ours(model, entries))
    print(
        f"\n[comfyui] {model.label} layer norm file: HypernetworkLoader vs A1111 max {max_difference(theirs, want)}/255, "
        f"ours vs A1111 max {max_difference(mine, want)}/255"
    )
    assert max_difference(theirs, want) > TOLERANCE
    assert max_difference(mine, want) <= TOLERANCE


def test_activate_output_default_of_2022_files(comfy, model):
    """A file without the key: A1111 activates the output (True), ComfyUI's loader does not (False)."""
    entries = [("hnx-2022-relu", 1.0)]
    theirs = comfy.render(builtin(model, entries))
    want = comfy.render(reference(model, entries))
    mine = comfy.render(ours(model, entries))
    print(
        f"\n[comfyui] {model.label} 2022 file: HypernetworkLoader vs A1111 max {max_difference(theirs, want)}/255, "
        f"ours vs A1111 max {max_difference(mine, want)}/255"
    )
    assert max_difference(theirs, want) > TOLERANCE
    assert max_difference(mine, want) <= TOLERANCE


def test_dropout_left_in_train_mode(comfy, model):
    """ComfyUI builds Dropout(0.3) layers from use_dropout/last_layer_dropout (not A1111's
    dropout_structure) and never sets eval mode: while sampling, they drop 30% of the hidden units
    (masks from the RNG the sampler seeds). The same weights declared without dropout render as A1111."""
    theirs = comfy.render(builtin(model, [("hnx-dropout-deep", 1.0)]))
    without = comfy.render(builtin(model, [("hnx-dropout-deep-nodrop", 1.0)]))
    want = comfy.render(reference(model, [("hnx-dropout-deep", 1.0)]))
    mine = comfy.render(ours(model, [("hnx-dropout-deep", 1.0)]))
    print(
        f"\n[comfyui] {model.label} dropout file: HypernetworkLoader vs A1111 max {max_difference(theirs, want)}/255; the same "
        f"weights without dropout {max_difference(without, want)}/255; ours vs A1111 {max_difference(mine, want)}/255"
    )
    assert max_difference(theirs, want) > TOLERANCE
    assert max_difference(without, want) <= TOLERANCE
    assert max_difference(mine, want) <= TOLERANCE


def test_safetensors_loaded_as_nothing(comfy, model):
    """ComfyUI's loader reads a .safetensors hypernetwork as an empty network: the image is unchanged."""
    baseline = comfy.baseline(model)
    theirs = comfy.render(builtin(model, [("hnx-relu-ln-st", 0.8)]))
    mine = comfy.render(ours(model, [("hnx-relu-ln-st", 0.8)]))
    print(
        f"\n[comfyui] {model.label} .safetensors: HypernetworkLoader vs no hypernetwork max {max_difference(theirs, baseline)}/255; "
        f"ours moves it by {max_difference(mine, baseline)}/255"
    )
    assert max_difference(theirs, baseline) == 0
    assert max_difference(mine, baseline) > EFFECT


def test_fp8_weights_with_comfyuis_loader(comfy, model):
    """With the UNet stored in float8, ComfyUI moves its loader's network to the model's dtype
    (``model_patches_to(model_dtype())``): float8 Linears meet float32 activations and sampling fails.
    Ours computes in float32 (test_render.py::test_fp8_weights)."""
    with pytest.raises(WorkflowError, match="Float8") as failure:
        comfy.render(builtin(model, [("hnx-tanh", 0.8)], unet_dtype="fp8_e4m3fn"))
    print(f"\n[comfyui] {model.label} fp8 UNet: HypernetworkLoader fails: {failure.value}")
