"""A backend over the model Forge or reForge has loaded (``sd_model.forge_objects``): SD1, SD2, SDXL.

What the trainer needs is taken from the host's own objects: latents from its VAE, conditioning
from its text encoders (``sd_model.get_learned_conditioning``, so emphasis, embeddings and SDXL's
size conditioning are the host's), the noise schedule and prediction type from the UNet patcher's
predictor (Forge) or model sampling (reForge). The network acts through the same attn1/attn2 patch
points as in generation (:mod:`hypernetwork_ext.patches`), passed to the UNet in its
``transformer_options``.

What differs from A1111, found by running on the real hosts:

- **Inference tensors.** Forge loads checkpoints and merges LoRA inside ``torch.inference_mode()``,
  and its VAE and text encoders compute there: autograd refuses to keep such tensors for the
  backward pass. While the network learns, each inference tensor of the UNet is replaced by a
  normal tensor sharing its memory (no copy), and the host's latents and conditioning are copied.
- **In-place updates.** Forge's transformer block adds attention outputs in place (``x += n``) to
  the tensor its LayerNorm keeps for the backward pass; the input of each LayerNorm is copied when
  it takes part in autograd, so the gradients are exact.
- **The memory manager** owns devices: the UNet is loaded through it before the run (refused when
  it could load only part of it, as in Forge's low-VRAM modes), the host's own text and VAE
  encoding load their models through it, and after each such call the UNet is loaded again.
- **LoRA.** The run trains on the checkpoint without the LoRA of earlier generations: the host's
  patchers are set to the original ones for the run and put back after it, so the next generation
  loads exactly what it would have loaded.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Protocol

import torch
from torch import nn

from ...attach import KVRewriter
from ...errors import HypernetworkError
from ...patches import attention_patch
from ...strength import CROSS, SELF, Strength
from .base import Conditioning, PreviewGenerator, PreviewRequest, TrainingBackend, first_parameter, stored_dtype
from .ldm import SizedPrompts

PARTIAL_LOAD_REFUSAL = (
    "the host's memory manager could load only part of the UNet onto {device} (a low-VRAM mode, "
    "--always-low-vram / --always-no-vram, or too little free memory): training needs the whole UNet "
    "there. Restart without the low-VRAM option, lower 'GPU Weights', or free memory, and try again."
)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class ForgeMemory(Protocol):
    """The host's memory manager, as the backend uses it."""

    def load(self, patchers: Sequence) -> None:
        """Load these model patchers onto their device (``load_models_gpu``)."""

    def fully_loaded(self, patcher) -> bool:
        """Whether all of this patcher's weights sit on its device (no CPU swap, no low-VRAM split)."""

    def unload_others(self, patcher) -> None:
        """Unload every model but this patcher from its device (``free_memory`` keeping it)."""


def normal_view(tensor: torch.Tensor) -> torch.Tensor:
    """A normal tensor over the memory of ``tensor`` (an inference tensor too): autograd may keep
    it, nothing is copied."""
    view = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
    with torch.no_grad():
        view.set_(tensor.untyped_storage(), tensor.storage_offset(), tensor.size(), tensor.stride())
    return view


def _copy_input_for_autograd(module, args):
    if args and isinstance(args[0], torch.Tensor) and args[0].requires_grad:
        return (args[0].clone(), *args[1:])
    return None


class AutogradView:
    """While installed, the UNet can be differentiated through: its tensors are swapped for normal
    views of the same memory, and LayerNorms work on copies of inputs the block later updates in
    place. ``remove`` puts every original tensor object back.

    Every tensor is swapped, not only those that say they are inference tensors: a weight Forge
    moved outside inference mode (its unload before a checkpoint change) keeps an inference
    tensor's storage without the flag, and autograd refuses it all the same."""

    def __init__(self, unet: nn.Module):
        self.unet = unet
        self.swapped: list[tuple[dict, str, torch.Tensor]] = []
        self.hooks: list = []

    @property
    def installed(self) -> bool:
        return bool(self.swapped or self.hooks)

    def install(self) -> None:
        for module in self.unet.modules():
            for table in (module._parameters, module._buffers):
                for name, tensor in list(table.items()):
                    if tensor is None:
                        continue
                    view = normal_view(tensor)
                    table[name] = nn.Parameter(view, requires_grad=False) if table is module._parameters else view
                    self.swapped.append((table, name, tensor))
            if isinstance(module, nn.LayerNorm):
                self.hooks.append(module.register_forward_pre_hook(_copy_input_for_autograd))

    def remove(self) -> None:
        for table, name, tensor in reversed(self.swapped):
            table[name] = tensor
        for hook in self.hooks:
            hook.remove()
        self.swapped, self.hooks = [], []


def _normal(value):
    """A copy made outside inference mode (the host computes latents and conditioning inside it)."""
    if isinstance(value, dict):
        return {key: _normal(item) for key, item in value.items()}
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    return value


def noise_schedule(model) -> tuple[str, torch.Tensor]:
    """(prediction type, alphas_cumprod) from Forge's ``predictor`` or reForge's ``model_sampling``."""
    sampling = getattr(model, "predictor", None) or getattr(model, "model_sampling", None)
    sigmas = getattr(sampling, "sigmas", None)
    if not isinstance(sigmas, torch.Tensor) or sigmas.dim() != 1 or sigmas.shape[0] < 2:
        raise HypernetworkError("the loaded model has no discrete noise schedule (sigmas) to train on")
    declared = getattr(sampling, "prediction_type", None)
    kinds = {cls.__name__ for cls in type(sampling).__mro__}
    if declared == "v_prediction" or (declared is None and "V_PREDICTION" in kinds):
        prediction = "v_prediction"
    elif declared == "epsilon" or (declared is None and "EPS" in kinds and not kinds & {"EDM", "X0", "IMG_TO_IMG"}):
        prediction = "epsilon"
    else:
        found = declared or sorted(kinds - {"object", "Module"})
        raise HypernetworkError(f"the loaded model predicts {found}; hypernetworks train on epsilon or v prediction")
    sigmas = sigmas.detach().float()
    return prediction, 1.0 / (1.0 + sigmas**2)


def computation_dtype(model) -> torch.dtype:
    for name in ("computation_dtype", "manual_cast_dtype"):
        dtype = getattr(model, name, None)
        if isinstance(dtype, torch.dtype):
            return dtype
    return stored_dtype(model.diffusion_model)


class PatcherBackend(TrainingBackend):
    """What Forge, reForge and ComfyUI share: a UNet behind a model patcher whose memory manager owns
    the devices, latents from the host's VAE, the attention patch points. Subclasses give the
    conditioning, the VAE and the session."""

    host_places_weights = True

    def __init__(
        self,
        patcher,
        memory: ForgeMemory,
        *,
        model_family: str | None = None,
        checkpoint_name: str | None = None,
        checkpoint_hash: str | None = None,
    ):
        self.memory = memory
        self.patcher = patcher
        model = self.patcher.model
        self.unet = model.diffusion_model
        self.device = torch.device(self.patcher.load_device)
        self.prediction_type, self._alphas = noise_schedule(model)
        self.compute_dtype = computation_dtype(model)
        storage = getattr(model, "storage_dtype", None) or getattr(first_parameter(self.unet), "dtype", None)
        if storage not in FLOAT_DTYPES:
            raise HypernetworkError(
                f"the UNet's weights are stored as {storage}; training needs float32, float16 or bfloat16 weights "
                "(Forge: Automatic or a float type for 'Diffusion in Low Bits'; ComfyUI: weight_dtype default)"
            )
        self.model_family = model_family
        self.checkpoint_name = checkpoint_name
        self.checkpoint_hash = checkpoint_hash
        self._view = AutogradView(self.unet)
        self._network: nn.Module | None = None
        self._patches: tuple | None = None

    def vae(self):
        """The host's VAE object (``first_stage_model``, ``patcher``, ``device``, ``vae_dtype``)."""
        raise NotImplementedError

    def latent_owners(self) -> tuple:
        """Objects that may scale latents with ``process_in``, the first that has one wins."""
        return (
            getattr(self.patcher.model, "latent_format", None),
            getattr(getattr(self.patcher.model, "model_config", None), "latent_format", None),
        )

    # -- the run --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def attach(self, network: nn.Module) -> Iterator[None]:
        rewriter = KVRewriter([(network, Strength())])
        self._network = network
        self._patches = (attention_patch(rewriter, SELF), attention_patch(rewriter, CROSS))
        try:
            self._resume()
            yield
        finally:
            self._view.remove()
            self._network = self._patches = None

    def _resume(self) -> None:
        self.memory.load([self.patcher])
        if not self.memory.fully_loaded(self.patcher):
            raise HypernetworkError(PARTIAL_LOAD_REFUSAL.format(device=self.device))
        if self.unloading:
            self.memory.unload_others(self.patcher)
        self._view.install()

    # -- unloading the text encoders and VAE: through the host's memory manager --------------------
    # No encoder_modules: the host picks its VAE's and text encoders' precision and casts weights
    # itself (a sample they make non-finite is skipped, not recomputed).
    def start_unloading(self) -> bool:
        """The memory manager loads the text encoders and VAE for each host call; after each, and
        now, it is told to unload everything but the UNet."""
        if not self.computes_off_host:
            return False
        self.unloading = True
        self.memory.unload_others(self.patcher)
        return True

    @contextlib.contextmanager
    def encoders_on_device(self, *kinds: str) -> Iterator[None]:
        yield  # the host's memory manager loads them for its own calls

    @contextlib.contextmanager
    def _host_call(self) -> Iterator[None]:
        """The host computes in its own way (inference mode, its memory manager moving models):
        the UNet is its own meanwhile, and loaded and differentiable again afterwards."""
        active = self._view.installed
        self._view.remove()
        try:
            yield
        finally:
            if active:
                self._resume()

    # -- what the engine asks ---------------------------------------------------------------------
    def alphas_cumprod(self) -> torch.Tensor:
        return self._alphas.to(self.device)

    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE's posterior (mean and deviation), scaled as the host scales latents."""
        vae = self.vae()
        with self._host_call(), torch.no_grad():
            self.memory.load([vae.patcher])
            autoencoder = vae.first_stage_model
            moments = autoencoder.encoder(pixels.to(vae.device, vae.vae_dtype))
            if getattr(autoencoder, "quant_conv", None) is not None:
                moments = autoencoder.quant_conv(moments)
            mean, logvar = torch.chunk(moments.float(), 2, dim=1)
            std = torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))
            scale, shift = self._latent_scaling()
        return ((mean - shift) * scale).to(self.device), (std * scale).to(self.device)

    def _latent_scaling(self) -> tuple[float, float]:
        """The affine map ``process_in`` applies to latents, as (scale, shift)."""
        for owner in self.latent_owners():
            process_in = getattr(owner, "process_in", None)
            if callable(process_in):
                zero, one = (float(process_in(torch.tensor(value))) for value in (0.0, 1.0))
                return one - zero, -zero / (one - zero)
        raise HypernetworkError("cannot tell how the loaded model scales latents (no process_in)")

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        context, vector = (cond["crossattn"], cond.get("vector")) if isinstance(cond, dict) else (cond, None)
        dtype = self.compute_dtype
        options = {}
        if self._patches is not None:
            options["patches"] = {"attn1_patch": [self._patches[0]], "attn2_patch": [self._patches[1]]}
        extra = {"y": vector.to(self.device, dtype)} if vector is not None else {}
        return self.unet(
            noisy.to(self.device, dtype),
            timesteps.to(self.device).float(),
            context=context.to(self.device, dtype),
            transformer_options=options,
            **extra,
        )

    def host_modules(self) -> list[nn.Module]:
        return [self.unet]


class ForgeBackend(PatcherBackend):
    """Forge's or reForge's loaded model (``sd_model.forge_objects``)."""

    name = "forge"

    def __init__(
        self,
        sd_model,
        memory: ForgeMemory,
        *,
        render_preview: PreviewGenerator | None = None,
        model_family: str | None = None,
        checkpoint_name: str | None = None,
        checkpoint_hash: str | None = None,
    ):
        self.sd_model = sd_model
        self.render_preview = render_preview
        super().__init__(
            sd_model.forge_objects_original.unet,  # the checkpoint's UNet, without LoRA
            memory,
            model_family=model_family,
            checkpoint_name=checkpoint_name,
            checkpoint_hash=checkpoint_hash,
        )

    def vae(self):
        return self.sd_model.forge_objects.vae

    def latent_owners(self) -> tuple:
        """Forge scales latents in its autoencoder, reForge in the model's latent format."""
        return (getattr(self.vae(), "first_stage_model", None), *super().latent_owners())

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        model = self.sd_model
        saved = (model.forge_objects, model.forge_objects_after_applying_lora)
        model.forge_objects = model.forge_objects_original.shallow_copy()
        model.forge_objects_after_applying_lora = model.forge_objects_original.shallow_copy()
        try:
            self.memory.load([self.patcher])  # puts back the weights a LoRA had changed
            yield
        finally:
            model.forge_objects, model.forge_objects_after_applying_lora = saved

    def encode_text(self, texts: Sequence[str], size: tuple[int, int]) -> Conditioning:
        return self._learned_conditioning(SizedPrompts(texts, *size))

    def encode_unconditional(self, count: int, size: tuple[int, int]) -> Conditioning:
        return self._learned_conditioning(SizedPrompts([""] * count, *size, negative=True))

    def _learned_conditioning(self, prompts: SizedPrompts) -> Conditioning:
        with self._host_call(), torch.no_grad():
            cond = self.sd_model.get_learned_conditioning(prompts)
        return _normal(cond)

    @property
    def preview_generator(self):
        return self._preview if self.render_preview is not None else None

    def _preview(self, request: PreviewRequest):
        """The host's txt2img with the network on the sampling's patcher. The host resets its
        patchers to ``forge_objects_after_applying_lora`` before each sampling, so a patched clone
        goes there for the preview. Its own rewriter: what it computes inside the host's inference
        mode serves no backward pass and is dropped afterwards."""
        if self._network is None:
            return None
        rewriter = KVRewriter([(self._network, Strength())])
        patched = self.patcher.clone()
        patched.set_model_attn1_patch(attention_patch(rewriter, SELF))
        patched.set_model_attn2_patch(attention_patch(rewriter, CROSS))
        objects = self.sd_model.forge_objects_after_applying_lora
        unpatched, objects.unet = objects.unet, patched
        try:
            with self._host_call():
                return self.render_preview(request)
        finally:
            objects.unet = unpatched
