"""A stand-in of the ComfyUI calls the node pack makes, for fast tests (the real ComfyUI runs in tests/comfyui).

Names and behaviour from ComfyUI v0.8.0 (fc0cb10b), read in its source:

- ``comfy/model_patcher.py``: ``ModelPatcher.clone()`` deep-copies ``model_options``;
  ``set_model_attn1_patch``/``attn2_patch`` append to ``transformer_options["patches"]``;
  ``model_patches_to(device_or_dtype)`` replaces each patch that has ``to`` by ``patch.to(...)``,
  called by ``model_management.LoadedModel.model_load`` with the load device and then the model's
  dtype, and by ``detach`` with the offload device.
- ``comfy/samplers.py``: each denoiser call's ``transformer_options`` are the patcher's, plus
  ``cond_or_uncond`` (0 positive, 1 negative per batch chunk), ``sigmas`` (this call's sigma) and
  ``sample_sigmas`` (the sampling's schedule).
- ``comfy/ldm/modules/attention.py``: ``BasicTransformerBlock`` calls the patches as Forge's does
  (Forge's backend descends from it), adding attention outputs out of place; the UNet sets
  ``block`` for each input, middle and output block (``forge_standin.forge_unet``).
- ``folder_paths``, ``comfy.utils.ProgressBar``, ``comfy.model_management``: the functions the nodes call.

Training uses the reForge-shaped model of ``forge_engine.build(reforge=True)`` (ComfyUI's
``BaseModel`` with ``model_sampling`` and ``latent_format``), a CLIP with ``tokenize`` and
``encode_from_tokens`` and the same VAE.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from tests.support import forge_engine, forge_standin
from tests.support.webui_standin import module

SUPPORTED = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}  # folder_paths' list


class ModelPatcher:
    def __init__(self, model: nn.Module, load_device="cpu", offload_device="cpu"):
        self.model = model
        self.load_device = torch.device(load_device)
        self.offload_device = torch.device(offload_device)
        self.model_options = {"transformer_options": {}}
        self.moves: list = []

    def clone(self):
        n = ModelPatcher(self.model, self.load_device, self.offload_device)
        n.model_options = copy.deepcopy(self.model_options)
        return n

    def set_model_patch(self, patch, name):
        to = self.model_options["transformer_options"]
        to.setdefault("patches", {})
        to["patches"][name] = [*to["patches"].get(name, []), patch]

    def set_model_attn1_patch(self, patch):
        self.set_model_patch(patch, "attn1_patch")

    def set_model_attn2_patch(self, patch):
        self.set_model_patch(patch, "attn2_patch")

    def model_patches_to(self, device):
        self.moves.append(device)
        for patch_list in self.model_options["transformer_options"].get("patches", {}).values():
            for i in range(len(patch_list)):
                if hasattr(patch_list[i], "to"):
                    patch_list[i] = patch_list[i].to(device)

    def model_dtype(self):
        return next(self.model.parameters()).dtype

    def load(self):
        """``LoadedModel.model_load``: the patches follow the model to its device and dtype."""
        self.model_patches_to(self.load_device)
        self.model_patches_to(self.model_dtype())

    def detach(self):
        self.model_patches_to(self.offload_device)


class BaseModel(nn.Module):
    """ComfyUI's ``model_base.BaseModel``: the UNet, its noise schedule and latent format; SD1 has no
    ``encode_adm`` vector."""

    def __init__(self, diffusion_model: nn.Module):
        super().__init__()
        self.diffusion_model = diffusion_model
        self.model_sampling = type(
            "ModelSamplingDiscreteEPS", (forge_engine.ModelSamplingDiscrete, forge_engine.EPS), {}
        )()
        self.latent_format = forge_engine.LatentFormat()
        self.manual_cast_dtype = None

    def encode_adm(self, **kwargs):
        return None


def comfy_unet(unet: nn.Module) -> nn.Module:
    """A real ldm UNet run as ComfyUI runs it (patch calls, ``block`` in the options, out-of-place adds)."""
    return forge_standin.forge_unet(unet, in_place=False)


def model_of(unet: nn.Module) -> ModelPatcher:
    """A ComfyUI MODEL over an ldm UNet (made into ComfyUI's with ``comfy_unet`` here)."""
    return ModelPatcher(BaseModel(comfy_unet(unet)))


def denoise(patcher: ModelPatcher, x, timesteps, context, *, cond_or_uncond=None, sigma=None, schedule=None):
    """One denoiser call as ``samplers._calc_cond_batch`` makes it."""
    options = dict(patcher.model_options["transformer_options"])
    options["cond_or_uncond"] = cond_or_uncond if cond_or_uncond is not None else [0] * 1
    if sigma is not None:
        options["sigmas"] = sigma
    if schedule is not None:
        options["sample_sigmas"] = schedule
    return patcher.model.diffusion_model(x, timesteps, context=context, transformer_options=options)


# -- CLIP and the modules the nodes import ------------------------------------------------------------
class Clip:
    """ComfyUI's ``comfy.sd.CLIP``: ``tokenize`` and ``encode_from_tokens`` over a small text encoder."""

    def __init__(self, encoder: nn.Module):
        self.encoder = encoder
        self.calls = 0

    def tokenize(self, text: str):
        return {"l": [text]}

    def encode_from_tokens(self, tokens, return_pooled=False, return_dict=False):
        self.calls += 1
        with torch.no_grad():
            cond = self.encoder(tokens["l"])
        return {"cond": cond, "pooled_output": cond[:, -1]}


class ProgressBar:
    updates: ClassVar[list] = []

    def __init__(self, total, node_id=None):
        self.total = total

    def update_absolute(self, value, total=None, preview=None):
        ProgressBar.updates.append((value, total or self.total))


class Host:
    """``folder_paths``, ``comfy.utils`` and ``comfy.model_management`` installed as modules, over
    ComfyUI's folder layout in ``root``."""

    def __init__(self, monkeypatch, root: Path):
        self.root = root
        self.hypernetwork_dir = root / "models" / "hypernetworks"
        self.input_dir = root / "input"
        self.output_dir = root / "output"
        for folder in (self.hypernetwork_dir, self.input_dir, self.output_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.loads: list = []  # (patchers, force_full_load) of every load_models_gpu call
        self.interrupt_after: int | None = None  # Cancel pressed after this many progress updates
        ProgressBar.updates = []
        folders = module(
            "folder_paths",
            get_folder_paths=lambda name: [str(self.hypernetwork_dir)] if name == "hypernetworks" else [],
            get_filename_list=self.filename_list,
            get_full_path_or_raise=self.full_path,
            get_input_directory=lambda: str(self.input_dir),
            get_output_directory=lambda: str(self.output_dir),
            get_input_subfolders=lambda: sorted(p.name for p in self.input_dir.iterdir() if p.is_dir()),
        )
        utils = module("comfy.utils", ProgressBar=ProgressBar)
        management = module(
            "comfy.model_management",
            load_models_gpu=self.load_models_gpu,
            processing_interrupted=self.interrupted,
            throw_exception_if_processing_interrupted=self._throw_if_interrupted,
            InterruptProcessingException=InterruptProcessingException,
        )
        comfy = module("comfy", __path__=[], utils=utils, model_management=management)
        for name, value in {
            "folder_paths": folders,
            "comfy": comfy,
            "comfy.utils": utils,
            "comfy.model_management": management,
        }.items():
            monkeypatch.setitem(sys.modules, name, value)

    def filename_list(self, name: str) -> list[str]:
        if name != "hypernetworks":
            return []
        found = []
        for directory, _dirs, files in os.walk(self.hypernetwork_dir):
            for file in files:
                if os.path.splitext(file)[1].lower() in SUPPORTED:
                    found.append(
                        os.path.relpath(os.path.join(directory, file), self.hypernetwork_dir).replace(os.sep, "/")
                    )
        return sorted(found)

    def load_models_gpu(
        self, models, memory_required=0, force_patch_weights=False, minimum_memory_required=None, force_full_load=False
    ):
        self.loads.append((list(models), force_full_load))
        for patcher in models:
            if hasattr(patcher, "load"):
                patcher.load()

    def interrupted(self) -> bool:
        return self.interrupt_after is not None and len(ProgressBar.updates) >= self.interrupt_after

    def full_path(self, name: str, filename: str) -> str:
        path = self.hypernetwork_dir / filename
        if name != "hypernetworks" or not path.is_file():
            raise FileNotFoundError(f"Model in folder '{name}' with filename '{filename}' not found.")
        return str(path)

    def _throw_if_interrupted(self):
        if self.interrupted():
            self.interrupt_after = None
            raise InterruptProcessingException()


class InterruptProcessingException(Exception):
    pass
