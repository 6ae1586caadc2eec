"""The A1111 ``.pt`` layout: a dict with one ``width -> (key_state, value_state)`` entry per width
plus metadata under string keys. NovelAI-era files (``linear1``/``linear2`` keys, missing newer
metadata) are read with the host's legacy rules."""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping

import torch

from ..errors import FileFormatError, InvalidConfigError, brief
from ..network import Architecture, Hypernetwork, NetworkInfo, build_from_state, parse_dropout_structure
from .limits import ReadLimits
from .safe_pickle import dump_a1111_pt, load_torch_bytes

# Metadata keys in the order A1111 writes them.
A1111_KEYS = (
    "step",
    "name",
    "layer_structure",
    "activation_func",
    "is_layer_norm",
    "weight_initialization",
    "sd_checkpoint",
    "sd_checkpoint_name",
    "activate_output",
    "use_dropout",
    "dropout_structure",
    "last_layer_dropout",
    "optional_info",
)
OWN_KEYS = ("model_family",)
_NOVELAI_RENAMES = {
    "linear1.weight": "linear.0.weight",
    "linear1.bias": "linear.0.bias",
    "linear2.weight": "linear.1.weight",
    "linear2.bias": "linear.1.bias",
}


def read_pt_bytes(data: bytes, path: str, limits: ReadLimits) -> Hypernetwork:
    return network_from_dict(load_torch_bytes(data, path, limits), path)


def network_from_dict(content: object, path: str) -> Hypernetwork:
    """Build a network from the dict stored in an A1111/NovelAI ``.pt`` file."""
    if not isinstance(content, Mapping):
        raise FileFormatError(f"not a hypernetwork: the file holds a {type(content).__name__}, not a dict", path)
    width_keys = [key for key in content if type(key) is int]
    if not width_keys:
        raise FileFormatError(f"not a hypernetwork: it has no per-width module pairs{_looks_like(content)}", path)
    try:
        architecture = architecture_from_metadata(content)
        architecture.check(strict=False)
        states = {width: _module_pair(content[width], width) for width in width_keys}
        info = _info_from_metadata(content, path)
        network = build_from_state(architecture, states, info)
    except InvalidConfigError as exc:
        raise FileFormatError(exc.problem, path) from None
    network.filename = path
    return network


def architecture_from_metadata(meta: Mapping) -> Architecture:
    """The architecture a file declares, with A1111's defaults for keys that older files lack."""
    structure = _number_list(meta.get("layer_structure", [1, 2, 1]), "layer_structure")
    activation = meta.get("activation_func")
    if activation is not None and not isinstance(activation, str):
        raise InvalidConfigError(f"activation_func is a {type(activation).__name__}, not a name")
    dropout = meta.get("dropout_structure")
    use_dropout = bool(meta.get("use_dropout", False))
    last_layer_dropout = bool(meta.get("last_layer_dropout", False))
    if dropout is None:
        dropout = parse_dropout_structure(structure, use_dropout, last_layer_dropout)
    else:
        dropout = _number_list(dropout, "dropout_structure")
        use_dropout = use_dropout or any(p != 0 for p in dropout)
    return Architecture(
        layer_structure=tuple(structure),
        activation_func=activation,
        is_layer_norm=bool(meta.get("is_layer_norm", False)),
        dropout_structure=tuple(dropout),
        activate_output=bool(meta.get("activate_output", True)),  # missing: the 2022 behaviour
        weight_initialization=str(meta.get("weight_initialization", "Normal")),
        use_dropout=use_dropout,
        last_layer_dropout=last_layer_dropout,
    )


def _number_list(value: object, key: str) -> list:
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
    ):
        raise InvalidConfigError(f"{key} must be a list of numbers, found {brief(value)}")
    return list(value)


def _module_pair(entry: object, width: int) -> tuple[dict, dict]:
    if not isinstance(entry, (tuple, list)) or len(entry) < 2 or not all(isinstance(s, Mapping) for s in entry[:2]):
        raise InvalidConfigError(
            f"width {width} must hold a pair of state dicts (key module, value module), found {type(entry).__name__}"
        )
    return _renamed_novelai(entry[0]), _renamed_novelai(entry[1])


def _renamed_novelai(state: Mapping) -> dict:
    return {_NOVELAI_RENAMES.get(key, key): value for key, value in state.items()}


def _info_from_metadata(meta: Mapping, path: str) -> NetworkInfo:
    stem = os.path.splitext(os.path.basename(path))[0] if path else "hypernetwork"
    known = set(A1111_KEYS) | set(OWN_KEYS)
    return NetworkInfo(
        name=_optional_str(meta.get("name")) or stem,
        step=_int(meta.get("step", 0), "step"),
        sd_checkpoint=_optional_str(meta.get("sd_checkpoint")),
        sd_checkpoint_name=_optional_str(meta.get("sd_checkpoint_name")),
        optional_info=_optional_str(meta.get("optional_info")),
        model_family=_optional_str(meta.get("model_family")),
        extra={key: value for key, value in meta.items() if isinstance(key, str) and key not in known},
    )


def _optional_str(value: object) -> str | None:
    return None if value is None else str(value)


def _int(value: object, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidConfigError(f"{key} must be a number, found {brief(value)}")
    return int(value)


def _looks_like(content: Mapping) -> str:
    keys = [str(key) for key in content]
    if "string_to_param" in keys:
        return " (it looks like a textual-inversion embedding)"
    if "state_dict" in keys or any(key.startswith("model.diffusion_model.") for key in keys):
        return " (it looks like a Stable Diffusion checkpoint)"
    if any(key.startswith(("lora_", "lora.")) or ".lora_" in key for key in keys):
        return " (it looks like a LoRA)"
    shown = ", ".join(keys[:8]) + (", ..." if len(keys) > 8 else "")
    return f"; its keys are: {shown}" if keys else "; it is an empty dict"


def a1111_metadata(network: Hypernetwork) -> dict:
    """Every A1111 metadata key with the host's types, in the order it writes them."""
    arch = network.architecture
    info = network.info
    return {
        "step": int(info.step),
        "name": info.name,
        "layer_structure": list(arch.layer_structure),
        "activation_func": arch.activation_func,
        "is_layer_norm": bool(arch.is_layer_norm),
        "weight_initialization": arch.weight_initialization,
        "sd_checkpoint": info.sd_checkpoint,
        "sd_checkpoint_name": info.sd_checkpoint_name,
        "activate_output": bool(arch.activate_output),
        "use_dropout": bool(arch.use_dropout),
        "dropout_structure": list(arch.dropout_structure),
        "last_layer_dropout": bool(arch.last_layer_dropout),
        "optional_info": info.optional_info or None,
    }


def network_to_dict(network: Hypernetwork) -> dict:
    """The dict A1111 1.10.1 writes for this network (plus ``model_family`` when declared)."""
    info = network.info
    content: dict = {}
    for width, (key_state, value_state) in network.module_state_dicts().items():
        content[width] = (_cpu_state(key_state), _cpu_state(value_state))
    content.update(a1111_metadata(network))
    if info.model_family:
        content["model_family"] = info.model_family
    for key, value in info.extra.items():
        content.setdefault(key, value)
    return content


def _cpu_state(state: Mapping[str, torch.Tensor]) -> OrderedDict:
    return OrderedDict((key, value.detach().to("cpu").clone()) for key, value in state.items())


def pt_bytes(network: Hypernetwork) -> bytes:
    return dump_a1111_pt(network_to_dict(network))
