"""A backend over diffusers components (the standalone tools, and the embedded tiny model).

SD1/SD2 layouts: one CLIP text encoder, its last hidden state as context. SDXL layouts (a second
text encoder with projection): the penultimate hidden states of both encoders side by side as
context, the second encoder's pooled output plus the size ids as the added conditioning.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ...diffusers_pipeline import pipeline_from_components, run_txt2img
from .base import Conditioning, PreviewGenerator, PreviewRequest, TrainingBackend, first_parameter


class DiffusersBackend(TrainingBackend):
    name = "diffusers"

    def __init__(
        self,
        unet: nn.Module,
        vae: nn.Module,
        text_encoder: nn.Module,
        tokenizer,
        noise_scheduler,
        *,
        text_encoder_2: nn.Module | None = None,
        tokenizer_2=None,
        preview_generator: PreviewGenerator | None = None,
        model_family: str | None = None,
        checkpoint_name: str | None = None,
        checkpoint_hash: str | None = None,
        zeros_for_empty_prompt: bool = True,
    ):
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.text_encoder_2 = text_encoder_2
        self.tokenizer_2 = tokenizer_2
        self.noise_scheduler = noise_scheduler
        reference = first_parameter(unet)
        self.device = reference.device if reference is not None else torch.device("cpu")
        self.prediction_type = noise_scheduler.config.get("prediction_type", "epsilon")
        self.preview_generator = preview_generator
        self.model_family = model_family
        self.checkpoint_name = checkpoint_name
        self.checkpoint_hash = checkpoint_hash
        self.zeros_for_empty_prompt = zeros_for_empty_prompt

    @classmethod
    def from_components(cls, components, **kwargs) -> DiffusersBackend:
        """From a pipeline or anything with unet/vae/text_encoder/tokenizer/scheduler attributes;
        previews are drawn with a pipeline over the same components unless one is given."""
        backend = cls(
            components.unet,
            components.vae,
            components.text_encoder,
            components.tokenizer,
            components.scheduler,
            text_encoder_2=getattr(components, "text_encoder_2", None),
            tokenizer_2=getattr(components, "tokenizer_2", None),
            zeros_for_empty_prompt=_pipeline_option(components, "force_zeros_for_empty_prompt", True),
            **kwargs,
        )
        if backend.preview_generator is None:
            backend.preview_generator = PipelinePreviews(components)
        return backend

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    def alphas_cumprod(self) -> torch.Tensor:
        return torch.as_tensor(self.noise_scheduler.alphas_cumprod).to(self.device, torch.float32)

    def encoder_modules(self, kind: str) -> list[nn.Module]:
        if kind == "image":
            return [self.vae]
        return [module for module in (self.text_encoder, self.text_encoder_2) if module is not None]

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with self.encoders_on_device("image"):
            return self._encode_images(pixels)

    def _encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        reference = first_parameter(self.vae)
        pixels = pixels.to(self.device, reference.dtype if reference is not None else torch.float32)
        distribution = self.vae.encode(pixels).latent_dist
        scale = float(self.vae.config.scaling_factor)
        shift = float(self.vae.config.get("shift_factor", None) or 0.0)
        return (distribution.mean.float() - shift) * scale, distribution.std.float() * scale

    def _tokens(self, tokenizer, texts: Sequence[str]) -> torch.Tensor:
        return tokenizer(
            list(texts),
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], size: tuple[int, int]) -> Conditioning:
        with self.encoders_on_device("text"):
            return self._encode_text(texts, size)

    def _encode_text(self, texts: Sequence[str], size: tuple[int, int]) -> Conditioning:
        if not self.is_sdxl:
            return self.text_encoder(self._tokens(self.tokenizer, texts))[0]
        first = self.text_encoder(self._tokens(self.tokenizer, texts), output_hidden_states=True)
        second = self.text_encoder_2(self._tokens(self.tokenizer_2, texts), output_hidden_states=True)
        context = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        width, height = size
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], device=self.device, dtype=context.dtype)
        return {
            "encoder_hidden_states": context,
            "text_embeds": second[0],
            "time_ids": time_ids.repeat(len(texts), 1),
        }

    @torch.no_grad()
    def encode_unconditional(self, count: int, size: tuple[int, int]) -> Conditioning:
        """StableDiffusionXLPipeline samples an empty negative prompt as zeros (context and pooled
        text; its ``force_zeros_for_empty_prompt``), as A1111 and Forge do on SDXL."""
        cond = self.encode_text([""] * count, size)
        if not (self.is_sdxl and self.zeros_for_empty_prompt):
            return cond
        zeroed = ("encoder_hidden_states", "text_embeds")  # the size ids stay
        return {key: torch.zeros_like(value) if key in zeroed else value for key, value in cond.items()}

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        if isinstance(cond, dict):
            added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
            return self.unet(noisy, timesteps, cond["encoder_hidden_states"], added_cond_kwargs=added).sample
        return self.unet(noisy, timesteps, cond).sample

    def host_modules(self) -> list[nn.Module]:
        return [m for m in (self.unet, self.vae, self.text_encoder, self.text_encoder_2) if m is not None]


def _pipeline_option(components, name: str, default):
    config = getattr(components, "config", None)
    return config.get(name, default) if hasattr(config, "get") else default


class PipelinePreviews:
    """The default preview generator for diffusers components: txt2img with a diffusers pipeline."""

    def __init__(self, components):
        self.components = components
        self._pipeline = None

    def pipeline(self):
        if self._pipeline is None:
            make = getattr(self.components, "pipeline", None)
            if callable(make):
                self._pipeline = make()
            elif callable(self.components) and hasattr(self.components, "unet"):
                self._pipeline = self.components
            else:
                self._pipeline = pipeline_from_components(self.components)
            self._pipeline.set_progress_bar_config(disable=True)
        return self._pipeline

    def __call__(self, request: PreviewRequest):
        pipeline = self.pipeline()
        seed = request.seed if request.seed >= 0 else int(torch.randint(0, 2**31 - 1, (1,)).item())
        generator = torch.Generator(device="cpu").manual_seed(seed)
        return run_txt2img(pipeline, request, generator).images[0]
