"""Backends for the models A1111 and Forge's ldm path load: ldm ``LatentDiffusion`` (SD1/SD2,
epsilon or v prediction) and sgm ``DiffusionEngine`` (SDXL).

Both are driven through the methods the host itself uses for generation
(``get_learned_conditioning``, ``apply_model``, ``encode_first_stage``), so the host's prompt
handling (emphasis, embeddings, SD2/SDXL text encoders) is what the network is trained with. The
model is reused as loaded: nothing is copied, moved between devices or re-wrapped.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .base import Conditioning, PreviewGenerator, TrainingBackend, first_parameter


class SizedPrompts(list):
    """A list of prompts that also says the image size (A1111's ``SdConditioning`` shape)."""

    def __init__(self, prompts: Sequence[str], width: int, height: int, *, negative: bool = False):
        super().__init__(prompts)
        self.width = width
        self.height = height
        self.is_negative_prompt = negative  # A1111 and Forge encode an empty negative as zeros on SDXL


class LdmBackend(TrainingBackend):
    name = "ldm"

    def __init__(
        self,
        sd_model: nn.Module,
        *,
        preview_generator: PreviewGenerator | None = None,
        model_family: str | None = None,
        checkpoint_name: str | None = None,
        checkpoint_hash: str | None = None,
    ):
        self.sd_model = sd_model
        self.unet = self._unet()
        reference = first_parameter(self.unet)
        self.device = reference.device if reference is not None else torch.device("cpu")
        self.prediction_type = "v_prediction" if self._parameterization() == "v" else "epsilon"
        self.preview_generator = preview_generator
        self.model_family = model_family
        self.checkpoint_name = checkpoint_name
        self.checkpoint_hash = checkpoint_hash

    def _unet(self) -> nn.Module:
        return self.sd_model.model.diffusion_model

    def _parameterization(self) -> str:
        return getattr(self.sd_model, "parameterization", "eps")

    def alphas_cumprod(self) -> torch.Tensor:
        return torch.as_tensor(self.sd_model.alphas_cumprod).to(self.device, torch.float32)

    def _first_stage_dtype(self) -> torch.dtype:
        reference = first_parameter(self.sd_model.first_stage_model)
        return reference.dtype if reference is not None else torch.float32

    def encoder_modules(self, kind: str) -> list[nn.Module]:
        if kind == "image":
            return [self.sd_model.first_stage_model]
        text = getattr(self.sd_model, "cond_stage_model", None) or getattr(self.sd_model, "conditioner", None)
        return [text] if text is not None else []

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with self.encoders_on_device("image"):
            return self._encode_images(pixels)

    def _encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = pixels.to(self.device, self._first_stage_dtype())
        encoded = self.sd_model.encode_first_stage(pixels)
        scale = float(self.sd_model.scale_factor)
        if hasattr(encoded, "mean") and hasattr(encoded, "std") and isinstance(encoded.std, torch.Tensor):
            return encoded.mean.float() * scale, encoded.std.float() * scale
        latent = self.sd_model.get_first_stage_encoding(encoded).float()
        return latent, torch.zeros_like(latent)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], size: tuple[int, int]) -> Conditioning:
        with self.encoders_on_device("text"):
            return self.sd_model.get_learned_conditioning(SizedPrompts(texts, *size))

    @torch.no_grad()
    def encode_unconditional(self, count: int, size: tuple[int, int]) -> Conditioning:
        with self.encoders_on_device("text"):
            return self.sd_model.get_learned_conditioning(SizedPrompts([""] * count, *size, negative=True))

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return self.sd_model.apply_model(noisy, timesteps, cond)

    def host_modules(self) -> list[nn.Module]:
        return [self.sd_model]


# SDXL's noise schedule (sgm's LegacyDDPMDiscretization): scaled-linear betas 0.00085 .. 0.012.
def legacy_ddpm_alphas_cumprod(steps: int = 1000, start: float = 0.00085, end: float = 0.012) -> torch.Tensor:
    betas = torch.linspace(start**0.5, end**0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


class SgmBackend(LdmBackend):
    """sgm ``DiffusionEngine`` (SDXL). With A1111's additions (``get_learned_conditioning``,
    ``apply_model``, ``alphas_cumprod``) those are used; a bare engine is driven through
    ``conditioner`` and ``model`` the same way A1111 drives it."""

    name = "sgm"

    def _parameterization(self) -> str:
        declared = getattr(self.sd_model, "parameterization", None)
        if declared:
            return declared
        scaling = getattr(getattr(self.sd_model, "denoiser", None), "scaling", None)
        return "v" if type(scaling).__name__ == "VScaling" else "eps"

    def alphas_cumprod(self) -> torch.Tensor:
        declared = getattr(self.sd_model, "alphas_cumprod", None)
        if declared is None:
            declared = legacy_ddpm_alphas_cumprod()
        return torch.as_tensor(declared).to(self.device, torch.float32)

    def _encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        first_stage = self.sd_model.first_stage_model
        pixels = pixels.to(self.device, self._first_stage_dtype())
        scale = float(self.sd_model.scale_factor)
        if hasattr(first_stage, "encoder") and hasattr(first_stage, "quant_conv"):
            # The posterior itself (SDXL's inference wrapper would hand back one sample of it).
            moments = first_stage.quant_conv(first_stage.encoder(pixels)).float()
            mean, logvar = torch.chunk(moments, 2, dim=1)
            std = torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))
            return mean * scale, std * scale
        latent = self.sd_model.encode_first_stage(pixels).float()
        return latent, torch.zeros_like(latent)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], size: tuple[int, int]) -> Conditioning:
        return self._encode(texts, size, negative=False)

    @torch.no_grad()
    def encode_unconditional(self, count: int, size: tuple[int, int]) -> Conditioning:
        return self._encode([""] * count, size, negative=True)

    def _encode(self, texts: Sequence[str], size: tuple[int, int], *, negative: bool) -> Conditioning:
        with self.encoders_on_device("text"):
            return self._encode_here(texts, size, negative=negative)

    def _encode_here(self, texts: Sequence[str], size: tuple[int, int], *, negative: bool) -> Conditioning:
        prompts = SizedPrompts(texts, *size, negative=negative)
        if hasattr(self.sd_model, "get_learned_conditioning"):
            return self.sd_model.get_learned_conditioning(prompts)
        for embedder in self.sd_model.conditioner.embedders:
            embedder.ucg_rate = 0.0
        width, height = size
        count = len(texts)
        options = {"device": self.device, "dtype": torch.float32}
        batch = {
            "txt": list(texts),
            "original_size_as_tuple": torch.tensor([height, width], **options).repeat(count, 1),
            "crop_coords_top_left": torch.tensor([0, 0], **options).repeat(count, 1),
            "target_size_as_tuple": torch.tensor([height, width], **options).repeat(count, 1),
            "aesthetic_score": torch.tensor([6.0], **options).repeat(count, 1),
        }
        # as A1111 does for an empty negative prompt on SDXL
        zeroed = ["txt"] if negative and not any(texts) else []
        return self.sd_model.conditioner(batch, force_zero_embeddings=zeroed)

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        if hasattr(self.sd_model, "apply_model"):
            return self.sd_model.apply_model(noisy, timesteps, cond)
        return self.sd_model.model(noisy, timesteps, cond)
