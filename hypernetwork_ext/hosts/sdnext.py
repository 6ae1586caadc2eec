"""SD.Next (diffusers backend): networks act through to_k/to_v pre-hooks on the loaded pipeline's UNet.

SD.Next's ``shared.sd_model`` is a diffusers pipeline (``StableDiffusionPipeline``,
``StableDiffusionXLPipeline``, ...). Its attention processors call ``attn.to_k``/``attn.to_v`` under
every kernel SD.Next offers, so the same hooks as on A1111 act there. The k-diffusion CFG denoiser
callbacks that tell A1111's hooks the step and the negative rows never run in diffusers
pipelines; a pre-hook on the UNet reads them from the pipeline itself: the step from its
scheduler, the negative rows from classifier-free guidance, which diffusers batches as
``[negative rows..., positive rows...]``.
"""

from __future__ import annotations

import importlib.util
import sys
import weakref

import torch
from torch import nn

from .a1111 import LdmApplier

SDNEXT_MODULE = "modules.processing_diffusers"  # SD.Next's diffusers processing; no other WebUI has it


def running_in_sdnext() -> bool:
    """Whether the host is SD.Next, by the module only it has (never by version strings)."""
    if SDNEXT_MODULE in sys.modules:
        return True
    try:
        return importlib.util.find_spec(SDNEXT_MODULE) is not None
    except (ImportError, ValueError):  # no ``modules`` package, or a stand-in without a spec
        return False


def pipeline_unet(pipeline) -> nn.Module | None:
    unet = getattr(pipeline, "unet", None)
    return unet if isinstance(unet, nn.Module) else None


def sampling_progress(scheduler, timestep) -> float | None:
    """How far sampling is when the UNet is called at ``timestep`` (A1111's ``step / steps``).

    Schedulers that count their steps (Euler, DPM++, UniPC, ...) say it directly; for the others
    the timestep's place in the schedule does. Img2img and hires passes start later in the schedule
    (``begin_index``): their progress counts from there, as A1111's does.
    """
    timesteps = getattr(scheduler, "timesteps", None)
    if not isinstance(timesteps, torch.Tensor) or timesteps.numel() == 0:
        return None
    total = timesteps.numel()
    index = getattr(scheduler, "step_index", None)
    if not isinstance(index, int):
        index = _schedule_index(timesteps, timestep)
        if index is None:
            return None
    begin = getattr(scheduler, "begin_index", None)
    begin = begin if isinstance(begin, int) and 0 <= begin < total else 0
    return min(1.0, max(0.0, (index - begin) / (total - begin)))


def _schedule_index(timesteps: torch.Tensor, timestep) -> int | None:
    if isinstance(timestep, torch.Tensor):
        if timestep.numel() == 0:
            return None
        timestep = timestep.flatten()[0].item()
    if not isinstance(timestep, (int, float)):
        return None
    matches = (timesteps.to(torch.float64) == float(timestep)).nonzero()
    return int(matches[0, 0]) if matches.numel() else None


def negative_rows(pipeline, rows: int) -> torch.Tensor | None:
    """The negative prompt's rows of a UNet call: the first half under classifier-free guidance."""
    try:
        guided = bool(getattr(pipeline, "do_classifier_free_guidance", False))
    except (AttributeError, TypeError):  # the property reads attributes set only inside a call
        guided = False
    if not guided or rows % 2:
        return None
    return torch.arange(rows) < rows // 2


class DiffusersApplier(LdmApplier):
    """Attaches the current networks to the UNet of SD.Next's loaded pipeline; ``clear()`` restores it."""

    kind = "sdnext"

    def __init__(self) -> None:
        super().__init__()
        self._pipeline: weakref.ref | None = None

    def unet(self, sd_model) -> nn.Module | None:
        return pipeline_unet(sd_model)

    def apply(self, sd_model, entries: list, compute_dtype, *, lora_functional: bool = False) -> None:
        self._pipeline = weakref.ref(sd_model) if sd_model is not None else None
        super().apply(sd_model, entries, compute_dtype, lora_functional=lora_functional)

    def _before_unet(self, module, args, kwargs):
        if self.attachment is None:
            return None
        sample = args[0] if args else kwargs.get("sample")
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        pipeline = self._pipeline() if self._pipeline is not None else None
        runtime = self.attachment.runtime
        runtime.progress = sampling_progress(getattr(pipeline, "scheduler", None), timestep)
        runtime.uncond_rows = negative_rows(pipeline, sample.shape[0]) if isinstance(sample, torch.Tensor) else None
        return None

    def step(self, progress: float | None, cond_rows: int | None, total_rows: int | None) -> None:
        """The k-diffusion callback; diffusers pipelines never call it (the UNet's pre-hook does its work)."""

    def detach(self) -> None:
        super().detach()
        self._pipeline = None
