"""A diffusers txt2img pipeline over loaded components, called with A1111's request fields.

Shared by the diffusers training backend (its previews) and the standalone generation path.
"""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def quiet_transformers():
    """Without transformers' notices while diffusers looks up the pipeline's optional parts (without
    torchvision, every process was told twice that an image processor falls back to PIL)."""
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)


def pipeline_from_components(components):
    """A diffusers ``StableDiffusionPipeline`` over objects carrying ``vae``, ``text_encoder``,
    ``tokenizer``, ``unet`` and ``scheduler`` (no safety checker)."""
    with quiet_transformers():
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(
            vae=components.vae,
            text_encoder=components.text_encoder,
            tokenizer=components.tokenizer,
            unet=components.unet,
            scheduler=components.scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )


def run_txt2img(pipe, request, generator: torch.Generator, **extra):
    """One diffusers txt2img call from a request with A1111's field names (``prompt``,
    ``negative_prompt``, ``steps``, ``cfg_scale``, ``width``, ``height``)."""
    return pipe(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt or None,
        num_inference_steps=request.steps,
        guidance_scale=request.cfg_scale,
        width=request.width,
        height=request.height,
        generator=generator,
        **extra,
    )
