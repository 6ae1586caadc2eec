"""The real-ComfyUI suite's reference node (written into ``custom_nodes/`` by the suite, never shipped).

It applies a hypernetwork file the way AUTOMATIC1111 v1.10.1 does, through ComfyUI's attention
patch points, with ``tests/support/reference.py``: an implementation from A1111's rules that shares
no code with the package. The file is read with ``torch.load(weights_only=True)`` in A1111's layout;
missing keys take A1111's defaults (``activate_output`` True, dropout derived from ``use_dropout``
and ``last_layer_dropout``), and dropout is left out, as A1111 samples in eval mode.
"""

import importlib.util

import torch

_spec = importlib.util.spec_from_file_location("hnx_suite_reference_impl", "@REFERENCE_PY@")
reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reference)


def a1111_dropout_structure(layer_structure, use_dropout, last_layer_dropout):
    """``modules.hypernetworks.hypernetwork.parse_dropout_structure`` of A1111 1.10.1."""
    if not use_dropout:
        return [0] * len(layer_structure)
    values = [0, *([0.3] * (len(layer_structure) - 3)), 0.3 if last_layer_dropout else 0, 0]
    return values


def load_reference(path, strength):
    state = torch.load(path, map_location="cpu", weights_only=True)
    structure = state.get("layer_structure", [1, 2, 1])
    dropout = state.get("dropout_structure") or a1111_dropout_structure(
        structure, state.get("use_dropout", False), state.get("last_layer_dropout", False)
    )
    arch = {
        "layer_structure": structure,
        "activation_func": state.get("activation_func"),
        "is_layer_norm": state.get("is_layer_norm", False),
        "dropout_structure": dropout,
        "activate_output": state.get("activate_output", True),
    }
    pairs = {}
    for width, modules in state.items():
        if isinstance(width, int):
            pairs[width] = tuple(reference.reference_module(modules[i], arch, strength) for i in (0, 1))
    return pairs


class ReferencePatch:
    def __init__(self, pairs, dtype):
        self.pairs = pairs
        self.dtype = dtype  # float32 as A1111 computes; float64 for the formula without its rounding

    def __call__(self, n, context, value, extra_options):
        pair = self.pairs.get(context.shape[-1])
        if pair is not None:
            context = pair[0](context.to(self.dtype)).to(context.dtype)
        pair = self.pairs.get(value.shape[-1])
        if pair is not None:
            value = pair[1](value.to(self.dtype)).to(value.dtype)
        return n, context, value

    def __deepcopy__(self, memo):
        return self


PRECISIONS = {"float32": torch.float32, "float64": torch.float64}


class HnxSuiteReferenceHypernetwork:
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"
    CATEGORY = "testing"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"model": ("MODEL",), "path": ("STRING", {"default": ""}), "strength": ("FLOAT",)},
            "optional": {"precision": (list(PRECISIONS), {"default": "float32"})},
        }

    def apply(self, model, path, strength, precision="float32"):
        patch = ReferencePatch(load_reference(path, strength), PRECISIONS[precision])
        clone = model.clone()
        clone.set_model_attn1_patch(patch)
        clone.set_model_attn2_patch(patch)
        return (clone,)


NODE_CLASS_MAPPINGS = {"HnxSuiteReferenceHypernetwork": HnxSuiteReferenceHypernetwork}
