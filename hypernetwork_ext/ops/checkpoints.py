"""Reading and writing the UNet weights of Stable Diffusion checkpoints, without running their code.

Two layouts: a single file in the original (ldm/sgm) layout, ``.safetensors`` or a pickled
``.ckpt`` that passes the safe-pickle check, with UNet keys under ``model.diffusion_model.``; and a
diffusers folder, whose UNet weights sit in ``unet/``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import FileExistsRefusedError, FileFormatError
from ..formats.safe_pickle import load_torch_file
from .safetensors_files import write_streaming

LDM_PREFIX = "model.diffusion_model."
_PROJECTION = re.compile(r"^(?P<path>.*\.(?:attn1|attn2))\.(?P<proj>to_k|to_v|to_q|to_out\.0)\.(?P<param>weight|bias)$")
_DIFFUSERS_UNET_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


@dataclass
class UnetWeights:
    """The UNet tensors of a checkpoint, keyed by module path without any prefix."""

    source: str
    layout: str  # "single-file" or "diffusers"
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    everything: dict[str, torch.Tensor] | None = None  # single file: every tensor (to write back)

    def attention_paths(self) -> list[str]:
        """Paths of the attention modules (``...attn1``/``...attn2``) that have to_k and to_v."""
        paths = []
        for key in self.tensors:
            match = _PROJECTION.match(key)
            is_key_weight = match is not None and match["proj"] == "to_k" and match["param"] == "weight"
            if is_key_weight and f"{match['path']}.to_v.weight" in self.tensors:
                paths.append(match["path"])
        return sorted(paths, key=_natural_key)

    @property
    def is_ldm(self) -> bool:
        return self.layout == "single-file"


def _natural_key(text: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def read_unet(path: str | os.PathLike) -> UnetWeights:
    path = os.fspath(path)
    if os.path.isdir(path):
        return _read_diffusers_unet(path)
    if not os.path.exists(path):
        raise FileFormatError("no such checkpoint file or folder", path)
    everything, metadata = _read_state_file(path)
    unet = {key[len(LDM_PREFIX) :]: value for key, value in everything.items() if key.startswith(LDM_PREFIX)}
    if not unet:
        raise FileFormatError(
            f"no UNet weights (no keys under {LDM_PREFIX!r}); is this a Stable Diffusion checkpoint?", path
        )
    return UnetWeights(path, "single-file", unet, metadata, everything)


def _read_state_file(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if path.lower().endswith(".safetensors"):
        from safetensors import safe_open

        try:  # the library's tensors are views of the mapped file: an SDXL checkpoint costs page cache, not memory
            with safe_open(path, "pt") as handle:
                return {key: handle.get_tensor(key) for key in handle.keys()}, dict(handle.metadata() or {})  # noqa: SIM118
        except Exception as exc:
            raise FileFormatError(f"not a readable safetensors file ({exc})", path) from None
    content = pickled_state_dict(path)
    return {key: value for key, value in content.items() if isinstance(value, torch.Tensor)}, {}


def pickled_state_dict(path: str) -> dict:
    """The state dict of a ``.ckpt``/``.pt`` checkpoint (also under ``state_dict``), read through the
    safe loader, which refuses files that would run code."""
    content = load_torch_file(path)
    if isinstance(content, dict) and isinstance(content.get("state_dict"), dict):
        content = content["state_dict"]
    if not isinstance(content, dict):
        raise FileFormatError(f"the checkpoint holds a {type(content).__name__}, not a state dict", path)
    return content


def _read_diffusers_unet(folder: str) -> UnetWeights:
    unet_dir = Path(folder) / "unet"
    for name in _DIFFUSERS_UNET_FILES:
        candidate = unet_dir / name
        if candidate.exists():
            tensors, metadata = _read_state_file(str(candidate))
            return UnetWeights(folder, "diffusers", tensors, metadata)
    index = unet_dir / "diffusion_pytorch_model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        tensors: dict[str, torch.Tensor] = {}
        for shard in shards:
            tensors.update(_read_state_file(str(unet_dir / shard))[0])
        return UnetWeights(folder, "diffusers", tensors, {})
    raise FileFormatError("a folder without unet/diffusion_pytorch_model.* (not a diffusers model)", folder)


def layers_per_block(weights: UnetWeights) -> int:
    """ldm's ``num_res_blocks``: the first downsampler sits right after the first level's layers."""
    indices = [int(m[1]) for key in weights.tensors if (m := re.match(r"^input_blocks\.(\d+)\.0\.op\.weight$", key))]
    if not indices:
        raise FileFormatError("cannot tell the UNet's layers per block (no downsampler found)", weights.source)
    return min(indices) - 1


def diffusers_module_path(weights: UnetWeights, path: str) -> str:
    """The diffusers name of an attention module given by its ldm path (diffusers paths pass through)."""
    if not weights.is_ldm:
        return path
    per_level = layers_per_block(weights) + 1
    match = re.match(r"^input_blocks\.(\d+)\.1\.(.*)$", path)
    if match:
        index = int(match[1]) - 1
        return f"down_blocks.{index // per_level}.attentions.{index % per_level}.{match[2]}"
    match = re.match(r"^middle_block\.1\.(.*)$", path)
    if match:
        return f"mid_block.attentions.0.{match[1]}"
    match = re.match(r"^output_blocks\.(\d+)\.1\.(.*)$", path)
    if match:
        index = int(match[1])
        return f"up_blocks.{index // per_level}.attentions.{index % per_level}.{match[2]}"
    return path


def write_unet(
    weights: UnetWeights, changed: dict[str, torch.Tensor], destination: str | os.PathLike, note: dict[str, str]
) -> str:
    """Write a copy of the checkpoint with ``changed`` UNet tensors, never over an existing path."""
    destination = os.fspath(destination)
    if os.path.exists(destination):
        raise FileExistsRefusedError("exists; refusing to overwrite it", destination)
    metadata = {**weights.metadata, **note}
    if weights.is_ldm:
        if not destination.lower().endswith(".safetensors"):
            raise FileFormatError("a baked single-file checkpoint is written as .safetensors", destination)
        tensors = dict(weights.everything or {})
        tensors.update({LDM_PREFIX + key: value for key, value in changed.items()})
        write_streaming(destination, tensors, metadata)
        return destination
    partial = destination + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    unet_dir = os.path.realpath(os.path.join(weights.source, "unet"))

    def skip_unet_weights(directory: str, names: list[str]) -> list[str]:
        if os.path.realpath(directory) != unet_dir:
            return []
        return [name for name in names if name.startswith("diffusion_pytorch_model")]

    shutil.copytree(weights.source, partial, ignore=skip_unet_weights)
    write_streaming(os.path.join(partial, "unet", _DIFFUSERS_UNET_FILES[0]), {**weights.tensors, **changed}, metadata)
    os.replace(partial, destination)
    return destination
