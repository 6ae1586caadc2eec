"""The project's ``.safetensors`` layout for hypernetworks.

Tensors: ``hypernetwork.<width>.<key|value>.linear.<index>.<weight|bias>``; the part after the
role is the host's state-dict key, so the Sequential indices are A1111's.

Header metadata (safetensors allows only strings; every value is JSON):
``hypernetwork.format_version`` (marks the layout), every A1111 metadata key under its own name
(``step``, ``name``, ``layer_structure``, ``activation_func``, ``is_layer_norm``,
``weight_initialization``, ``sd_checkpoint``, ``sd_checkpoint_name``, ``activate_output``,
``use_dropout``, ``dropout_structure``, ``last_layer_dropout``, ``optional_info``), then
``widths`` (file order), ``model_family`` with ``model_family_inferred``, ``content_hash``,
``tool``, ``tool_version`` and ``extra`` (other keys a ``.pt`` carried).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping

import torch

from ..errors import FileFormatError, InvalidConfigError, brief
from ..hashing import content_hash
from ..network import Hypernetwork, NetworkInfo, build_from_state
from ..version import TOOL_NAME, __version__
from .limits import ReadLimits, refuse_size
from .pt import A1111_KEYS, a1111_metadata, architecture_from_metadata

FORMAT_VERSION_KEY = "hypernetwork.format_version"
FORMAT_VERSION = 1
TENSOR_PREFIX = "hypernetwork."
_TENSOR_KEY = re.compile(r"^hypernetwork\.(\d+)\.(key|value)\.(.+)$")


def looks_like_safetensors(data: bytes) -> bool:
    """An 8-byte header length then a JSON object; torch files start with a zip or pickle signature."""
    return len(data) >= 10 and int.from_bytes(data[:8], "little") >= 2 and data[8:9] == b"{"


def safetensors_bytes(network: Hypernetwork) -> bytes:
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    for width, (key_state, value_state) in network.module_state_dicts().items():
        for role, state in (("key", key_state), ("value", value_state)):
            for name, tensor in state.items():
                tensors[f"{TENSOR_PREFIX}{width}.{role}.{name}"] = tensor.detach().to("cpu").contiguous()
    return save(tensors, metadata=header_metadata(network))


def header_metadata(network: Hypernetwork) -> dict[str, str]:
    info = network.info
    values = {
        **a1111_metadata(network),
        "widths": network.widths,
        "model_family": network.family,
        "model_family_inferred": info.model_family is None,
        "content_hash": content_hash(network),
        "tool": TOOL_NAME,
        "tool_version": __version__,
        "extra": _json_safe_extra(info.extra),
    }
    metadata = {key: json.dumps(value) for key, value in values.items()}
    metadata["format"] = "pt"
    metadata[FORMAT_VERSION_KEY] = str(FORMAT_VERSION)
    return metadata


def _json_safe_extra(extra: Mapping) -> dict:
    safe = {}
    for key, value in extra.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            continue
        safe[key] = value
    return safe


def read_safetensors_bytes(data: bytes, path: str, limits: ReadLimits) -> Hypernetwork:
    from safetensors import SafetensorError
    from safetensors.torch import load

    if not data:
        raise FileFormatError("the file is empty", path)
    refuse_size(len(data), limits.max_file_bytes, "the file", path, allowed_for=limits.what)
    metadata = _read_header_metadata(data, path, limits)
    try:
        tensors = load(data)
    except (SafetensorError, Exception) as exc:
        raise FileFormatError(f"the safetensors file is truncated or damaged ({exc})", path) from None
    ours = {key: value for key, value in tensors.items() if key.startswith(TENSOR_PREFIX)}
    if not ours:
        raise FileFormatError(
            f"not a hypernetwork: a safetensors file without hypernetwork tensors{_looks_like(tensors)}", path
        )
    if FORMAT_VERSION_KEY not in metadata:
        raise FileFormatError(
            "hypernetwork tensors without the hypernetwork metadata header; cannot tell the architecture", path
        )
    try:
        version = int(metadata[FORMAT_VERSION_KEY])
    except ValueError:
        raise FileFormatError(f"unreadable {FORMAT_VERSION_KEY} {brief(metadata[FORMAT_VERSION_KEY])}", path) from None
    if version > FORMAT_VERSION:
        raise FileFormatError(
            f"written in hypernetwork layout version {version}; this tool reads up to {FORMAT_VERSION}", path
        )
    try:
        meta = _decoded(metadata, path)
        architecture = architecture_from_metadata(meta)
        architecture.check(strict=False)
        states = _states(ours, meta.get("widths"))
        network = build_from_state(architecture, states, _info(meta, path))
    except InvalidConfigError as exc:
        raise FileFormatError(exc.problem, path) from None
    except (TypeError, ValueError) as exc:
        raise FileFormatError(f"the hypernetwork metadata holds a value of the wrong type ({exc})", path) from None
    network.filename = path
    return network


def _read_header_metadata(data: bytes, path: str, limits: ReadLimits) -> dict[str, str]:
    """The header's ``__metadata__``, after checking the header's size, JSON and tensor count (the
    safetensors library checks each tensor's dtype, shape and offsets when it loads them)."""
    if len(data) < 8:
        raise FileFormatError("the file is truncated (shorter than a safetensors header)", path)
    length = int.from_bytes(data[:8], "little")
    if 8 + length > len(data):
        raise FileFormatError(
            f"the safetensors header declares {length:,} bytes but the file holds {len(data) - 8:,}; "
            "it is truncated or damaged",
            path,
        )
    refuse_size(length, limits.max_header_bytes, "the safetensors header", path, allowed_for=limits.what)
    try:
        header = json.loads(data[8 : 8 + length], object_pairs_hook=_refuse_repeated_keys)
    except ValueError as exc:
        raise FileFormatError(f"the safetensors header is not valid JSON ({exc})", path) from None
    if not isinstance(header, dict):
        raise FileFormatError("the safetensors header is not a JSON object", path)
    tensors = len(header) - ("__metadata__" in header)
    if tensors > limits.max_tensors:
        raise FileFormatError(
            f"the header lists {tensors:,} tensors, more than the {limits.max_tensors:,} allowed for {limits.what}; "
            "refused",
            path,
        )
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FileFormatError("the safetensors metadata must map names to strings", path)
    return metadata


def _refuse_repeated_keys(pairs: list[tuple[str, object]]) -> dict:
    """A name given twice could be read either way (JSON readers keep the first or the last)."""
    seen: set[str] = set()
    for key, _value in pairs:
        if key in seen:
            raise ValueError(f"the name {brief(key)} appears twice")
        seen.add(key)
    return dict(pairs)


def _decoded(metadata: Mapping[str, str], path: str) -> dict:
    decoded = {}
    for key in (*A1111_KEYS, "widths", "model_family", "model_family_inferred", "extra"):
        if key not in metadata:
            continue
        try:
            decoded[key] = json.loads(metadata[key])
        except ValueError:
            raise FileFormatError(f"metadata {key!r} is not valid JSON: {brief(metadata[key])}", path) from None
    return decoded


def _states(tensors: Mapping[str, torch.Tensor], declared_widths: object) -> dict[int, tuple[dict, dict]]:
    grouped: dict[int, tuple[dict, dict]] = {}
    for key, tensor in tensors.items():
        match = _TENSOR_KEY.match(key)
        if not match:
            raise InvalidConfigError(f"tensor {brief(key)} does not follow hypernetwork.<width>.<key|value>.<name>")
        width, role, name = int(match[1]), match[2], match[3]
        pair = grouped.setdefault(width, ({}, {}))
        pair[0 if role == "key" else 1][name] = tensor
    if declared_widths is not None:
        if not isinstance(declared_widths, list) or sorted(declared_widths) != sorted(grouped):
            raise InvalidConfigError(
                f"header widths {declared_widths} disagree with the tensors' widths {sorted(grouped)}"
            )
        return {width: grouped[width] for width in declared_widths}
    return grouped


def _info(meta: Mapping, path: str) -> NetworkInfo:
    inferred = bool(meta.get("model_family_inferred", False))
    extra = meta.get("extra") or {}
    return NetworkInfo(
        name=str(meta.get("name") or os.path.splitext(os.path.basename(path))[0]),
        step=int(meta.get("step") or 0),
        sd_checkpoint=meta.get("sd_checkpoint"),
        sd_checkpoint_name=meta.get("sd_checkpoint_name"),
        optional_info=meta.get("optional_info"),
        model_family=None if inferred else meta.get("model_family"),
        extra=dict(extra) if isinstance(extra, dict) else {},
    )


def _looks_like(tensors: Mapping[str, torch.Tensor]) -> str:
    keys = list(tensors)
    if any(key.startswith(("lora_", "lora.")) or ".lora_" in key or ".lora_A" in key for key in keys):
        return " (its tensors look like a LoRA)"
    if any(key.startswith("model.diffusion_model.") for key in keys):
        return " (its tensors look like a Stable Diffusion checkpoint)"
    if not keys:
        return " (it holds no tensors at all)"
    shown = ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")
    return f" (its tensors are: {shown})"
