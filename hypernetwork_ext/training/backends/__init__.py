"""Backends: what the trainer needs from a model (ldm, sgm, diffusers)."""

from .base import Conditioning, ModelGuard, PreviewGenerator, PreviewRequest, TrainingBackend
from .diffusers import DiffusersBackend, PipelinePreviews
from .ldm import LdmBackend, SgmBackend

__all__ = [
    "Conditioning",
    "DiffusersBackend",
    "LdmBackend",
    "ModelGuard",
    "PipelinePreviews",
    "PreviewGenerator",
    "PreviewRequest",
    "SgmBackend",
    "TrainingBackend",
]
