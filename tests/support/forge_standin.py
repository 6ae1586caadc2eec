"""A stand-in of Forge's UNet patcher API and of how its UNet calls attention patches.

Names and behaviour from lllyasviel/stable-diffusion-webui-forge (dfdcbab): ``backend/patcher/base.py``
(``ModelPatcher.model_options["transformer_options"]``, ``clone()`` deep-copying the options,
``set_model_patch``, ``set_model_attn1_patch``/``attn2_patch``), ``backend/patcher/unet.py``
(``UnetPatcher``), ``modules_forge``'s ``ForgeObjects.shallow_copy`` and ``backend/nn/unet.py``
(``BasicTransformerBlock._forward``: patches get ``(n, context, value, extra_options)`` and return
the inputs of ``to_q``/``to_k``/``to_v``; ``extra_options`` carries ``block``, ``block_index``,
``cond_or_uncond``, ``n_heads``, ``dim_head``). reForge's ``ldm_patched`` patcher has the same calls.

The UNet is the real ldm ``UNetModel``; each transformer block is run the way Forge's block runs,
adding its outputs in place as Forge does (reForge: out of place). The model Forge loads, its
memory manager and LoRA merging are in ``forge_engine.py``.
"""

from __future__ import annotations

import copy
import sys

import torch
from torch import nn

from tests.support.webui_standin import module


class ModelPatcher:
    def __init__(self, model, load_device, offload_device, size=0, current_device=None, **kwargs):
        self.size = size
        self.model = model
        self.lora_patches = {}
        self.object_patches = {}
        self.model_options = {"transformer_options": {}}
        self.load_device = load_device
        self.offload_device = offload_device
        self.current_device = current_device

    def clone(self):
        n = type(self)(self.model, self.load_device, self.offload_device, self.size, self.current_device)
        n.lora_patches = self.lora_patches.copy()
        n.object_patches = self.object_patches.copy()
        n.model_options = copy.deepcopy(self.model_options)
        return n

    def set_model_patch(self, patch, name):
        to = self.model_options["transformer_options"]
        if "patches" not in to:
            to["patches"] = {}
        to["patches"][name] = [*to["patches"].get(name, []), patch]

    def set_model_attn1_patch(self, patch):
        self.set_model_patch(patch, "attn1_patch")

    def set_model_attn2_patch(self, patch):
        self.set_model_patch(patch, "attn2_patch")

    def model_patches_to(self, device):
        """What the memory manager calls on loading (the load device, then the model's dtype) and
        on unloading the model (its offload device): every patch that has ``to`` is replaced by
        what ``to`` returns (``patches`` and ``patches_replace``; the wrapper function too)."""
        to = self.model_options["transformer_options"]
        for patch_list in to.get("patches", {}).values():
            for i in range(len(patch_list)):
                if hasattr(patch_list[i], "to"):
                    patch_list[i] = patch_list[i].to(device)
        for patch_dict in to.get("patches_replace", {}).values():
            for key in patch_dict:
                if hasattr(patch_dict[key], "to"):
                    patch_dict[key] = patch_dict[key].to(device)

    def model_dtype(self):
        return next(self.model.parameters()).dtype


class UnetPatcher(ModelPatcher):
    """``add_extra_preserved_memory_during_sampling``: memory the manager keeps free while sampling
    (``sampling_prepare`` passes it to ``load_models_gpu`` as ``hard_memory_preservation``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.extra_preserved_memory_during_sampling = 0

    def clone(self):
        n = super().clone()
        n.extra_preserved_memory_during_sampling = self.extra_preserved_memory_during_sampling
        return n

    def add_extra_preserved_memory_during_sampling(self, memory_in_bytes: int):
        self.extra_preserved_memory_during_sampling += memory_in_bytes


class KModel(nn.Module):
    def __init__(self, diffusion_model):
        super().__init__()
        self.diffusion_model = diffusion_model


class ForgeObjects:
    def __init__(self, unet, clip, vae, clipvision):
        self.unet = unet
        self.clip = clip
        self.vae = vae
        self.clipvision = clipvision

    def shallow_copy(self):
        return ForgeObjects(self.unet, self.clip, self.vae, self.clipvision)


class ForgeModel:
    """``shared.sd_model`` on Forge: the patchers, and the post-Lora copy each sampling starts from."""

    def __init__(self, unet: nn.Module):
        patcher = UnetPatcher(KModel(unet), "cpu", "cpu")
        self.forge_objects = ForgeObjects(patcher, None, None, None)
        self.forge_objects_original = self.forge_objects.shallow_copy()
        self.forge_objects_after_applying_lora = self.forge_objects.shallow_copy()


FORGE_MODULES = ("backend", "backend.patcher", "backend.patcher.base", "backend.patcher.unet")
REFORGE_MODULES = ("modules_forge", "modules_forge.unet_patcher")


def install(monkeypatch, *, reforge: bool = False, memory=None) -> None:
    """Forge's modules (``backend.patcher.*``, ``backend.memory_management``) or reForge's
    (``modules_forge.unet_patcher``, ``ldm_patched.modules.model_management``); ``memory`` is the
    memory manager (tests/support/forge_engine.py) when the test has one."""
    if reforge:
        unet = module("modules_forge.unet_patcher", UnetPatcher=UnetPatcher)
        names = {
            "modules_forge": module("modules_forge", __path__=[], unet_patcher=unet),
            "modules_forge.unet_patcher": unet,
        }
        if memory is not None:
            management = _memory_module("ldm_patched.modules.model_management", memory)
            ldm_modules = module("ldm_patched.modules", __path__=[], model_management=management)
            names.update(
                {
                    "ldm_patched": module("ldm_patched", __path__=[], modules=ldm_modules),
                    "ldm_patched.modules": ldm_modules,
                    "ldm_patched.modules.model_management": management,
                }
            )
    else:
        base = module("backend.patcher.base", ModelPatcher=ModelPatcher)
        unet = module("backend.patcher.unet", UnetPatcher=UnetPatcher)
        patcher_package = module("backend.patcher", __path__=[], base=base, unet=unet)
        backend = module("backend", __path__=[], patcher=patcher_package)
        names = {"backend": backend, "backend.patcher": patcher_package, "backend.patcher.base": base}
        names["backend.patcher.unet"] = unet
        if memory is not None:
            names["backend.memory_management"] = backend.memory_management = _memory_module(
                "backend.memory_management", memory
            )
    for name, value in names.items():
        monkeypatch.setitem(sys.modules, name, value)


def _memory_module(name: str, memory):
    return module(
        name,
        load_models_gpu=memory.load_models_gpu,
        load_model_gpu=memory.load_model_gpu,
        unload_all_models=memory.unload_all_models,
        current_loaded_models=memory.current_loaded_models,
    )


def _attention(attn, n, context, value):
    q = attn.to_q(n)
    context = n if context is None else context
    k = attn.to_k(context)
    v = attn.to_v(value if value is not None else context)
    h = attn.heads
    q, k, v = (t.reshape(t.shape[0], t.shape[1], h, -1).transpose(1, 2) for t in (q, k, v))
    sim = torch.einsum("b h i d, b h j d -> b h i j", q, k) * attn.scale
    out = torch.einsum("b h i j, b h j d -> b h i d", sim.softmax(dim=-1), v)
    return attn.to_out(out.transpose(1, 2).reshape(n.shape[0], n.shape[1], -1))


def _forge_block(block, state, in_place: bool):
    """``BasicTransformerBlock._forward``: Forge adds each output in place (``x += n``) to the
    tensor its norms read; reForge (ldm_patched) adds out of place."""

    def add(x, n):
        if in_place:
            x += n
            return x
        return n + x

    def forward(x, context=None):
        to = state["transformer_options"]
        patches = to.get("patches", {})
        extra = {k: v for k, v in to.items() if k not in ("patches", "patches_replace")}
        extra["n_heads"] = block.attn1.heads
        extra["dim_head"] = block.attn1.to_q.out_features // block.attn1.heads
        n = block.norm1(x)
        context_attn1 = context if block.disable_self_attn else None
        value_attn1 = None
        if "attn1_patch" in patches:
            if context_attn1 is None:
                context_attn1 = n
            value_attn1 = context_attn1
            for p in patches["attn1_patch"]:
                n, context_attn1, value_attn1 = p(n, context_attn1, value_attn1, extra)
        x = add(x, _attention(block.attn1, n, context_attn1, value_attn1))
        n = block.norm2(x)
        context_attn2, value_attn2 = context, None
        if "attn2_patch" in patches:
            value_attn2 = context_attn2
            for p in patches["attn2_patch"]:
                n, context_attn2, value_attn2 = p(n, context_attn2, value_attn2, extra)
        x = add(x, _attention(block.attn2, n, context_attn2, value_attn2))
        skip = x
        return add(block.ff(block.norm3(x)), skip)

    return forward


def forge_unet(unet: nn.Module, *, in_place: bool = True) -> nn.Module:
    """Give a real ldm ``UNetModel`` the behaviour of Forge's ``IntegratedUNet2DConditionModel``:
    ``forward(x, timesteps, context, y, control, transformer_options)``, ``transformer_options``
    carrying the running block (``block``, ``block_index``, ``original_shape``) to every
    transformer block, and Forge's transformer blocks (``_forge_block``)."""
    from ldm.modules.attention import BasicTransformerBlock

    state: dict = {"transformer_options": {}, "blocks_seen": []}

    def set_block(kind, index):
        def hook(module, args):
            state["transformer_options"]["block"] = (kind, index)
            state["transformer_options"]["block_index"] = 0
            state["blocks_seen"].append((kind, index))

        return hook

    for index, block in enumerate(unet.input_blocks):
        block.register_forward_pre_hook(set_block("input", index))
    unet.middle_block.register_forward_pre_hook(set_block("middle", 0))
    for index, block in enumerate(unet.output_blocks):
        block.register_forward_pre_hook(set_block("output", index))
    for block in unet.modules():
        if isinstance(block, BasicTransformerBlock):
            block.forward = _forge_block(block, state, in_place)

    def forward(x, timesteps=None, context=None, y=None, control=None, transformer_options=None, **kwargs):
        options = {} if transformer_options is None else transformer_options
        options["original_shape"] = list(x.shape)
        state["transformer_options"] = options
        return type(unet).forward(unet, x, timesteps, context, y)

    unet.forward = forward
    unet.forge_state = state
    return unet


class ForgeUnetRunner:
    """Runs the UNet as Forge's sampling does: the sampling patcher's ``transformer_options`` with
    the batch layout, for the generation tests (which drive the UNet without a memory manager)."""

    def __init__(self, unet: nn.Module):
        self.unet = forge_unet(unet)
        self.calls: list[dict] = []

    @property
    def blocks_seen(self) -> list[tuple]:
        return self.unet.forge_state["blocks_seen"]

    def run(self, p):
        def call(x, t, context):
            patcher = p.sd_model.forge_objects.unet
            to = dict(patcher.model_options["transformer_options"])
            to["cond_or_uncond"] = [0, 1] if x.shape[0] % 2 == 0 and x.shape[0] > 1 else [0]
            self.calls.append(to)
            return self.unet(x, t, context=context, transformer_options=to)

        return call
