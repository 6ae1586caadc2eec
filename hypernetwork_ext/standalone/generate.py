"""txt2img with hypernetworks on a diffusers pipeline (the standalone tools' generation path).

Networks are attached to the UNet for the duration of one call and removed afterwards; the
sampler's progress and the layout of the classifier-free-guidance batch are fed to the networks'
step windows and negative-pass factors exactly as the WebUI adapters do.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..attach import Attachment, NetworkSpec
from ..diffusers_pipeline import run_txt2img
from ..errors import InvalidConfigError
from ..memory import DEFAULT_FOLD_LIMIT
from .samplers import using_sampler


@dataclass
class GenerationSettings:
    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    cfg_scale: float = 7.0
    width: int | None = None
    height: int | None = None
    seed: int = 0
    batch_size: int = 1
    sampler: str = ""  # an A1111 name of hypernetwork_ext.standalone.samplers.SAMPLERS; empty: the model's own
    fold_limit: int | None = DEFAULT_FOLD_LIMIT  # bytes of folded weights (None: no bound; see memory.py)

    def check(self) -> None:
        from .samplers import SAMPLERS

        if self.sampler and self.sampler not in SAMPLERS:
            raise InvalidConfigError(f"unknown sampler {self.sampler!r}; known: {', '.join(SAMPLERS)}")
        if self.steps < 1:
            raise InvalidConfigError(f"steps must be at least 1, found {self.steps}")
        if self.batch_size < 1:
            raise InvalidConfigError(f"batch size must be at least 1, found {self.batch_size}")
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None and (value < 8 or value % 8):
                raise InvalidConfigError(f"{name} must be a multiple of 8, found {value}")


def generate(
    source,
    settings: GenerationSettings,
    networks: Sequence[NetworkSpec] = (),
    *,
    compute_dtype: torch.dtype | None = None,
    on_step: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> list:
    """Images (PIL) for one prompt; ``on_step(done, total)`` reports progress."""
    settings.check()
    pipe = source.pipe
    attachment = Attachment(pipe.unet, networks, compute_dtype=compute_dtype, fold_limit=settings.fold_limit).attach()
    runtime = attachment.runtime
    guided = settings.cfg_scale > 1.0
    rows = settings.batch_size
    runtime.uncond_rows = torch.tensor([True] * rows + [False] * rows) if guided else None
    runtime.progress = 0.0

    def step_end(pipeline, step, timestep, callback_kwargs):
        runtime.progress = (step + 1) / settings.steps
        if on_step:
            on_step(step + 1, settings.steps)
        if should_stop and should_stop():
            pipeline._interrupt = True
        return callback_kwargs

    generator = torch.Generator(device="cpu").manual_seed(int(settings.seed))
    try:
        with using_sampler(pipe, settings.sampler):
            result = run_txt2img(pipe, settings, generator, num_images_per_prompt=rows, callback_on_step_end=step_end)
    finally:
        attachment.remove()
    return list(result.images)
