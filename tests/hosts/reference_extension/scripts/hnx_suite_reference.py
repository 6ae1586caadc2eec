"""The real-host suite's in-host reference (copied into the host's extensions/ by tests/hosts, never shipped).

For a host whose image without a tag is not A1111's (so A1111's own renders cannot be the reference),
the suite renders the same prompt without a tag and passes networks to this always-on script
(``alwayson_scripts: {"hnx suite reference": {"args": ["name:multiplier, name:multiplier"]}}``). It
applies A1111's formula, ``k_in = x + m * mlp_k(x)`` and ``v_in = x + m * mlp_v(x)`` in prompt order, with
tests/support/reference.py (which shares no code with the extension), through forward pre-hooks on every
attention module's ``to_k``/``to_v``: a mechanism apart from the extension's patcher patches. The
networks are read from the suite's own ``.pt`` files in ``models/hypernetworks/hnx-suite``.
"""

import importlib.util
import os

import gradio as gr
import torch
from modules import paths_internal, scripts

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    "hnx_suite_reference_formula", os.path.join(HERE, "reference_formula.py")
)
formula = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(formula)
NETWORK_FOLDER = os.path.join(paths_internal.models_path, "hypernetworks", "hnx-suite")


def modules_by_width(path, multiplier):
    """{input width: (key module, value module)} of one A1111 .pt file, as reference callables."""
    data = torch.load(path, map_location="cpu", weights_only=False)  # the suite's own files
    structure = list(data["layer_structure"])
    arch = {
        "layer_structure": structure,
        "activation_func": data.get("activation_func"),
        "is_layer_norm": bool(data.get("is_layer_norm", False)),
        "dropout_structure": list(data.get("dropout_structure") or [0.0] * len(structure)),
        "activate_output": bool(data.get("activate_output", False)),
    }
    return {
        width: tuple(formula.reference_module(state, arch, multiplier) for state in pair)
        for width, pair in data.items()
        if isinstance(width, int)
    }


class SuiteReference(scripts.Script):
    def __init__(self):
        self.hooks = []

    def title(self):
        return "hnx suite reference"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        return [gr.Textbox(value="", visible=False)]

    def process(self, p, networks=""):
        self.remove()
        stages = []
        for item in (part.strip() for part in str(networks or "").split(",")):
            if item:
                name, multiplier = item.rsplit(":", 1)
                stages.append(modules_by_width(os.path.join(NETWORK_FOLDER, f"{name}.pt"), float(multiplier)))
        if not stages:
            return
        forge_objects = getattr(p.sd_model, "forge_objects", None)
        unet = (
            forge_objects.unet.model.diffusion_model if forge_objects is not None else p.sd_model.model.diffusion_model
        )
        for module in unet.modules():
            if hasattr(module, "to_k") and hasattr(module, "to_v"):
                for projection, index in ((module.to_k, 0), (module.to_v, 1)):
                    self.hooks.append(projection.register_forward_pre_hook(self.rewrite(stages, index)))
        p.extra_generation_params["hnx suite reference"] = networks

    @staticmethod
    def rewrite(stages, index):
        def hook(module, args):
            x = args[0]
            for by_width in stages:
                pair = by_width.get(x.shape[-1])
                if pair is not None:
                    x = pair[index](x.float().cpu()).to(x.device, x.dtype)  # the files load on the CPU
            return (x, *args[1:])

        return hook

    def postprocess(self, p, processed, *args):
        self.remove()

    def remove(self):
        for hook in self.hooks:
            hook.remove()
        self.hooks = []
