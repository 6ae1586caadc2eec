"""What the trainer needs from a model, and how the host's model is put back exactly as it was.

A backend turns images into latents, captions into conditioning, and runs the denoiser; it also
names the module the network attaches to (the UNet), the noise schedule and the prediction type,
and says how the network is attached while it learns (hooks on to_k/to_v by default).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ...attach import apply

Conditioning = torch.Tensor | dict[str, torch.Tensor]


@dataclass
class PreviewRequest:
    """A txt2img request for a preview image; the network being trained is attached meanwhile."""

    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    sampler_name: str = ""
    cfg_scale: float = 7.0
    seed: int = -1
    width: int = 512
    height: int = 512


PreviewGenerator = Callable[[PreviewRequest], object]  # returns a PIL image or None
ENCODER_KINDS = ("text", "image")
OFFLOAD_DEVICE = torch.device("cpu")


class TrainingBackend:
    """The interface the engine drives. Subclasses set the attributes and implement the methods."""

    name: str = "backend"
    device: torch.device = torch.device("cpu")
    unet: nn.Module
    prediction_type: str = "epsilon"  # or "v_prediction"
    model_family: str | None = None
    checkpoint_name: str | None = None
    checkpoint_hash: str | None = None
    preview_generator: PreviewGenerator | None = None
    #: The host's memory manager decides where the weights live (Forge, reForge): the engine then
    #: leaves devices and dtypes to it instead of putting them back as it found them.
    host_places_weights: bool = False
    #: Set by the engine when the text encoder(s) and VAE rest off the device between their uses
    #: (``unload_models_when_training``); see :meth:`start_unloading`.
    unloading: bool = False
    #: Why the text encoder and VAE cannot be unloaded here (the host already does it), or None.
    unload_refusal: str | None = None
    #: The dtype the UNet computes in where the host casts its weights at each use (Forge's
    #: ``computation_dtype``, ldm_patched's ``manual_cast_dtype``); None: the weights' own dtype.
    compute_dtype: torch.dtype | None = None

    def session(self) -> contextlib.AbstractContextManager:
        """Around the whole run, before the host's model state is recorded (default: nothing)."""
        return contextlib.nullcontext()

    def attach(self, network: nn.Module) -> contextlib.AbstractContextManager:
        """The network acting on the UNet while it learns (and while previews are drawn)."""
        return apply(self.unet, [network])

    def alphas_cumprod(self) -> torch.Tensor:
        raise NotImplementedError

    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels (B, 3, H, W) in [-1, 1] -> scaled latent mean and standard deviation."""
        raise NotImplementedError

    def encode_text(self, texts: Sequence[str], size: tuple[int, int]) -> Conditioning:
        """Captions -> conditioning for a batch; ``size`` is the (width, height) of the images."""
        raise NotImplementedError

    def encode_unconditional(self, count: int, size: tuple[int, int]) -> Conditioning:
        """The conditioning the host samples an empty negative prompt with: the pass that
        classifier-free guidance subtracts (default: the empty caption, encoded)."""
        return self.encode_text([""] * count, size)

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        raise NotImplementedError

    def host_modules(self) -> list[nn.Module]:
        """Every module of the host's model whose state the session must leave as it found it."""
        raise NotImplementedError

    @property
    def computes_off_host(self) -> bool:
        """Whether the model computes on a device of its own (a GPU): moving modules off it saves
        that device's memory; on a CPU there is nowhere else to put them."""
        return self.device.type != OFFLOAD_DEVICE.type

    def encoder_modules(self, kind: str) -> list[nn.Module]:
        """The modules that turn captions (``"text"``) or images (``"image"``) into the UNet's
        inputs: what unloading moves, and what a float32 recomputation converts (default: none)."""
        return []

    def start_unloading(self) -> bool:
        """Move the text encoder(s) and VAE off the compute device for the rest of the run; they
        come back for each call that needs them (:meth:`encoders_on_device`). False when nothing
        moves: a CPU, nothing to move, or a host that places them itself."""
        modules = [module for kind in ENCODER_KINDS for module in self.encoder_modules(kind)]
        if not self.computes_off_host or not modules or self.unload_refusal:
            return False
        for module in modules:
            module.to(OFFLOAD_DEVICE)
        self.unloading = True
        return True

    @contextlib.contextmanager
    def encoders_on_device(self, *kinds: str) -> Iterator[None]:
        """While unloading: these encoders on the compute device for the call, off it afterwards."""
        modules = [module for kind in kinds for module in self.encoder_modules(kind)] if self.unloading else []
        for module in modules:
            module.to(self.device)
        try:
            yield
        finally:
            for module in modules:
                module.to(OFFLOAD_DEVICE)


@contextlib.contextmanager
def in_float32(modules: Sequence[nn.Module], device_type: str) -> Iterator[bool]:
    """These modules' half-precision weights in float32, autocast off, for one recomputation
    (A1111 re-runs its VAE in float32 when half precision gave NaN); yields False, changing
    nothing, when they already compute in float32 (a recomputation could not help)."""
    tensors = []
    seen: set[int] = set()
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            if id(tensor) not in seen and tensor.is_floating_point() and tensor.dtype != torch.float32:
                seen.add(id(tensor))
                tensors.append((tensor, tensor.dtype))
    if not tensors:
        yield False
        return
    for tensor, _dtype in tensors:
        tensor.data = tensor.data.float()
    try:
        with torch.autocast(device_type, enabled=False):
            yield True
    finally:
        for tensor, dtype in tensors:
            tensor.data = tensor.data.to(dtype)


def cat_conditioning(parts: Sequence[Conditioning]) -> Conditioning:
    if isinstance(parts[0], dict):
        return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
    return torch.cat(list(parts))


def text_part(cond: Conditioning) -> torch.Tensor:
    """The per-token text conditioning (the cross-attention context) of any backend's conditioning."""
    if isinstance(cond, dict):
        for key in ("encoder_hidden_states", "crossattn", "c_crossattn"):
            if key in cond:
                return cond[key]
        raise KeyError(f"no cross-attention context among {sorted(cond)}")
    return cond


def stored_dtype(module: nn.Module) -> torch.dtype:
    reference = first_parameter(module)
    return reference.dtype if reference is not None else torch.float32


def unet_compute_dtype(backend: TrainingBackend) -> torch.dtype:
    """What the UNet computes in: the host's cast where it casts weights at use, else its weights' dtype."""
    if isinstance(backend.compute_dtype, torch.dtype):
        return backend.compute_dtype
    return stored_dtype(backend.unet)


def first_parameter(module: nn.Module) -> torch.Tensor | None:
    return next(module.parameters(), None)


class ModelGuard:
    """Records the state of modules (train/eval, requires_grad, devices, dtypes, ldm checkpoint
    flags) and puts every bit of it back, whatever happened in between."""

    _CHECKPOINT_FLAGS = ("checkpoint", "use_checkpoint")

    def __init__(self, modules: Sequence[nn.Module], *, placement: bool = True):
        """``placement``: also put devices and dtypes back (off where the host's memory manager owns them)."""
        self.placement = placement
        seen: dict[int, nn.Module] = {}
        for root in modules:
            for module in root.modules():
                seen.setdefault(id(module), module)
        self.modules = list(seen.values())
        self._training = [(module, module.training) for module in self.modules]
        self._tensors = []
        for module in self.modules:
            for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                self._tensors.append((module, name, tensor, tensor.device, tensor.dtype, tensor.requires_grad))
        self._flags = [
            (module, flag, getattr(module, flag))
            for module in self.modules
            for flag in self._CHECKPOINT_FLAGS
            if isinstance(getattr(module, flag, None), bool)
        ]

    def freeze(self) -> None:
        """No gradient for the host's weights (only the network learns), and ldm's own gradient
        checkpointing off: it hands only the block's parameters to autograd, so the network's
        parameters would get no gradient through it."""
        for _module, _name, tensor, *_ in self._tensors:
            if isinstance(tensor, nn.Parameter):
                _set_requires_grad(tensor, False)
        for module, flag, _value in self._flags:
            setattr(module, flag, False)

    def restore(self) -> None:
        for module, mode in self._training:
            # Only this module's own flag: children are restored from their own records, and some
            # hosts replace ``train`` with a no-op (ldm's disabled_train) that must not stop this.
            module.training = mode
        for module, name, tensor, device, dtype, requires_grad in self._tensors:
            current = module._parameters.get(name) if name in module._parameters else module._buffers.get(name)
            if current is not None and current is not tensor:
                # something replaced the tensor object; put the original back
                if name in module._parameters:
                    module._parameters[name] = tensor
                else:
                    module._buffers[name] = tensor
            if self.placement and (tensor.device != device or tensor.dtype != dtype):
                tensor.data = tensor.data.to(device=device, dtype=dtype)
            if isinstance(tensor, nn.Parameter) and tensor.requires_grad != requires_grad:
                _set_requires_grad(tensor, requires_grad)
        for module, flag, value in self._flags:
            setattr(module, flag, value)

    @contextlib.contextmanager
    def session(self) -> Iterator[ModelGuard]:
        self.freeze()
        try:
            yield self
        finally:
            self.restore()


def _set_requires_grad(tensor: torch.Tensor, flag: bool) -> None:
    """Forge and reForge load and move weights inside inference mode: the flag of such a tensor
    may only be set there."""
    with torch.inference_mode(tensor.is_inference()):
        tensor.requires_grad_(flag)
