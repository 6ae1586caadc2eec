"""Training hypernetworks: a host-free engine driving small backends (ldm, sgm, diffusers).

from hypernetwork_ext.training import TrainingConfig, train, DiffusersBackend
result = train(network, DiffusersBackend.from_components(components), TrainingConfig(...))
"""

from .backends import DiffusersBackend, LdmBackend, ModelGuard, PreviewRequest, SgmBackend, TrainingBackend
from .config import TrainingConfig, load_preset, save_preset
from .engine import TrainingCallbacks, TrainingProgress, TrainingResult, train

__all__ = [
    "DiffusersBackend",
    "LdmBackend",
    "ModelGuard",
    "PreviewRequest",
    "SgmBackend",
    "TrainingBackend",
    "TrainingCallbacks",
    "TrainingConfig",
    "TrainingProgress",
    "TrainingResult",
    "load_preset",
    "save_preset",
    "train",
]
