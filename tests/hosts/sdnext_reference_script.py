"""The reference formula inside SD.Next: an extension script the suite installs (without this project's
extension) to render what ``<hypernet:name:m>`` must look like on SD.Next's own pipeline, scheduler
and seed. SD.Next has no hypernetworks of its own to compare with (it removed them in 2025).

It shares no code with ``hypernetwork_ext``: it reads each A1111 ``.pt`` file with ``torch.load``
and applies ``tests/support/reference.py``'s independent implementation of A1111's formula,
``x + m * mlp(x)`` on the inputs of every to_k and to_v, to every batch row, in prompt order.
The suite copies this file to ``extensions/hnx-suite-reference/scripts/`` and ``reference.py`` beside
it as ``hnx_suite_reference/reference.py``.
"""

import os

import torch
from hnx_suite_reference.reference import reference_mlp  # put on sys.path by SD.Next while it loads scripts
from modules import extra_networks, script_callbacks, shared


def network_path(name: str) -> str:
    root = os.path.join(shared.models_path, "hypernetworks")
    for folder, _dirs, names in os.walk(root):
        if f"{name}.pt" in names:
            return os.path.join(folder, f"{name}.pt")
    raise FileNotFoundError(f"reference: no {name}.pt under {root}")


def load_stages(name: str, multiplier: float) -> tuple[dict, float]:
    data = torch.load(network_path(name), map_location="cpu", weights_only=True)
    structure = list(data["layer_structure"])
    dropout = list(data.get("dropout_structure") or [0.0] * len(structure))
    by_width = {}
    for width, pair in data.items():
        if isinstance(width, int):
            by_width[width] = [
                reference_mlp(
                    dict(state),
                    structure,
                    data.get("activation_func"),
                    bool(data.get("is_layer_norm")),
                    dropout,
                    bool(data.get("activate_output")),
                )
                for state in pair
            ]
    return by_width, multiplier


class ReferenceHypernet(extra_networks.ExtraNetwork):
    def __init__(self):
        super().__init__("hypernet")
        self.handles = []

    def activate(self, p, params_list, step=0, **kwargs):
        self.remove()
        stages = [load_stages(params.items[0], float(params.items[1])) for params in params_list]
        if not stages:
            return
        for module in shared.sd_model.unet.modules():
            if hasattr(module, "to_k") and hasattr(module, "to_v"):
                for index, projection in ((0, module.to_k), (1, module.to_v)):
                    self.handles.append(projection.register_forward_pre_hook(self.hook(stages, index)))

    @staticmethod
    def hook(stages, index):
        def rewrite(module, args):
            x = args[0]
            for by_width, multiplier in stages:
                pair = by_width.get(x.shape[-1])
                if pair is not None:
                    x = x + multiplier * pair[index](x.float()).to(x.dtype)
            return (x, *args[1:])

        return rewrite

    def deactivate(self, p, force=False, **kwargs):
        self.remove()

    def remove(self):
        for handle in self.handles:
            handle.remove()
        self.handles = []


def register():
    extra_networks.register_extra_network(ReferenceHypernet())


script_callbacks.on_before_ui(register)
