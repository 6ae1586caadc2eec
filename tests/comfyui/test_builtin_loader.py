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
def test_equal_where_comfyui_follows_a1111(comfy, case):
    entries = AGREED[case]
    theirs = comfy.render(builtin(comfy.sd1, entries))
    mine = comfy.render(ours(comfy.sd1, entries))
    want = comfy.render(reference(comfy.sd1, entries))
    effect = max_difference(mine, comfy.baseline(comfy.sd1))
    print(
        f"\n[comfyui] {case}: ours vs HypernetworkLoader max {max_difference(mine, theirs)}/255, "
        f"HypernetworkLoader vs A1111 {max_difference(theirs, want)}/255, ours vs A1111 {max_difference(mine, want)}/255; "
        f"effect {effect}/255"
    )
    assert effect > EFFECT
    assert max_difference(mine, theirs) <= TOLERANCE
    assert max_difference(mine, want) <= TOLERANCE


def test_layer_norm_networks_get_an_activation_after_their_output_layer(comfy):
    """ComfyUI's loader counts the LayerNorm weights among the Linears, so the output Linear is not
    the last one it sees: it adds the activation after it although the file says activate_output False."""
    entries = [("hnx-relu-ln", 0.8)]
    theirs = comfy.render(builtin(comfy.sd1, entries))
    want = comfy.render(reference(comfy.sd1, entries))
    mine = comfy.render(ours(comfy.sd1, entries))
    print(
        f"\n[comfyui] layer norm file: HypernetworkLoader vs A1111 max {max_difference(theirs, want)}/255, "
        f"ours vs A1111 max {max_difference(mine, want)}/255"
    )
    assert max_difference(theirs, want) > TOLERANCE
    assert max_difference(mine, want) <= TOLERANCE


def test_activate_output_default_of_2022_files(comfy):
    """A file without the key: A1111 activates the output (True), ComfyUI's loader does not (False)."""
    entries = [("hnx-2022-relu", 1.0)]
    theirs = comfy.render(builtin(comfy.sd1, entries))
    want = comfy.render(reference(comfy.sd1, entries))
    mine = comfy.render(ours(comfy.sd1, entries))
    print(
        f"\n[comfyui] 2022 file: HypernetworkLoader vs A1111 max {max_difference(theirs, want)}/255, "
        f"ours vs A1111 max {max_difference(mine, want)}/255"
    )
    assert max_difference(theirs, want) > TOLERANCE
    assert max_difference(mine, want) <= TOLERANCE


def test_dropout_left_in_train_mode(comfy):
    """ComfyUI builds Dropout(0.3) layers from use_dropout and never sets eval mode: each run draws
    another mask (two names of one file, since ComfyUI's cache would run one name once). A1111's
    dropout_structure, which says where dropout is, is ignored."""
    first = comfy.render(builtin(comfy.sd1, [("hnx-dropout-deep", 1.0)]))
    second = comfy.render(builtin(comfy.sd1, [("hnx-dropout-deep-b", 1.0)]))
    want = comfy.render(reference(comfy.sd1, [("hnx-dropout-deep", 1.0)]))
    mine = comfy.render(ours(comfy.sd1, [("hnx-dropout-deep", 1.0)]))
    print(
        f"\n[comfyui] dropout file: HypernetworkLoader run vs run max {max_difference(first, second)}/255, "
        f"vs A1111 {max_difference(first, want)}/{max_difference(second, want)}; ours vs A1111 "
        f"{max_difference(mine, want)}/255"
    )
    assert max_difference(first, second) > TOLERANCE
    assert min(max_difference(first, want), max_difference(second, want)) > TOLERANCE
    assert max_difference(mine, want) <= TOLERANCE


def test_safetensors_loaded_as_nothing(comfy):
    """ComfyUI's loader reads a .safetensors hypernetwork as an empty network: the image is unchanged."""
    baseline = comfy.baseline(comfy.sd1)
    theirs = comfy.render(builtin(comfy.sd1, [("hnx-relu-ln-st", 0.8)]))
    mine = comfy.render(ours(comfy.sd1, [("hnx-relu-ln-st", 0.8)]))
    print(
        f"\n[comfyui] .safetensors: HypernetworkLoader vs no hypernetwork max {max_difference(theirs, baseline)}/255; "
        f"ours moves it by {max_difference(mine, baseline)}/255"
    )
    assert max_difference(theirs, baseline) == 0
    assert max_difference(mine, baseline) > EFFECT


def test_fp8_weights_with_comfyuis_loader(comfy):
    """With the UNet stored in float8, ComfyUI moves its hypernetwork to the model's dtype (float8) too."""
    try:
        theirs = comfy.render(builtin(comfy.sd1, [("hnx-relu-ln", 0.8)], unet_dtype="fp8_e4m3fn"))
    except WorkflowError as exc:
        print(f"\n[comfyui] fp8 UNet: HypernetworkLoader fails: {exc}")
        return
    want = comfy.render(reference(comfy.sd1, [("hnx-relu-ln", 0.8)], unet_dtype="fp8_e4m3fn"))
    print(f"\n[comfyui] fp8 UNet: HypernetworkLoader vs A1111 max {max_difference(theirs, want)}/255")
