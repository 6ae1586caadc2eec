"""Samplers by their A1111 names, as diffusers schedulers made from the model's own scheduler config
(so the noise schedule and prediction type stay the model's)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from ..errors import InvalidConfigError

# A1111 name -> (diffusers scheduler class, options)
SAMPLERS: dict[str, tuple[str, dict]] = {
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "DPM2": ("KDPM2DiscreteScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "DDIM": ("DDIMScheduler", {}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "PLMS": ("PNDMScheduler", {"skip_prk_steps": True}),
}


def make_scheduler(name: str, base):
    """The sampler ``name`` on ``base``'s noise schedule."""
    if name not in SAMPLERS:
        raise InvalidConfigError(f"unknown sampler {name!r}; known: {', '.join(SAMPLERS)}")
    import diffusers

    class_name, options = SAMPLERS[name]
    return getattr(diffusers, class_name).from_config(base.config, **options)


def sampler_name(scheduler) -> str:
    """The A1111 name of a scheduler (its class name when it has none)."""
    class_name = type(scheduler).__name__
    karras = bool(getattr(scheduler.config, "use_karras_sigmas", False))
    for name, (candidate, options) in SAMPLERS.items():
        if candidate == class_name and bool(options.get("use_karras_sigmas", False)) == karras:
            return name
    return class_name


@contextlib.contextmanager
def using_sampler(pipe, name: str) -> Iterator[None]:
    """``pipe`` samples with ``name`` meanwhile (an empty name keeps its own sampler)."""
    if not name:
        yield
        return
    original = pipe.scheduler
    pipe.scheduler = make_scheduler(name, original)
    try:
        yield
    finally:
        pipe.scheduler = original
