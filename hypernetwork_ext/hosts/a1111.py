"""AUTOMATIC1111: networks act through forward pre-hooks on every attention module's to_k/to_v.

Every attention kernel A1111 offers (None, Doggettx, V1, InvokeAI, sub-quadratic, xformers, sdp,
sdp-no-mem) replaces ``CrossAttention.forward`` of ldm and sgm, and each one computes
``self.to_k(context_k)`` and ``self.to_v(context_v)`` by calling those modules, so a pre-hook on the
modules runs under all of them. The built-in Lora extension changes the projections' weights, not
their inputs, so both act together. One more pre-hook on the UNet tells, per call, which batch rows
are the negative (unconditional) pass, from the layout the CFG denoiser reports each step.
"""

from __future__ import annotations

import torch
from torch import nn

from ..attach import Attachment
from ..fastpath import autocast_state
from ..memory import DEFAULT_FOLD_LIMIT, HeldMemory


def unet_of(sd_model) -> nn.Module | None:
    """The diffusion UNet of an A1111 model (ldm ``LatentDiffusion`` or sgm ``DiffusionEngine``)."""
    wrapper = getattr(sd_model, "model", None)
    unet = getattr(wrapper, "diffusion_model", None)
    return unet if isinstance(unet, nn.Module) else None


def linear_projection_hint(lora_functional: bool) -> bool | None:
    """Whether the process-wide ``nn.Linear.forward`` ends in ``F.linear`` with the module's weights.

    Torch's own forward does; A1111's Lora forward (``networks.network_Linear_forward``) does after
    merging its deltas into the weights, except in its functional mode, which adds them on the fly
    (folding a network into the weights would then lose them). Another extension's forward is
    unknown: the fast path then checks it on one row.
    """
    forward = torch.nn.Linear.forward
    if getattr(forward, "__module__", "") == "torch.nn.modules.linear":
        return True
    if getattr(forward, "__name__", "") == "network_Linear_forward":
        return not lora_functional
    return None


def lower_precision_now(device: torch.device) -> bool:
    """Whether A1111 computes in lower precision now, so that its own hypernetworks round as it does:
    under torch's autocast (``devices.autocast()``: float16 on CUDA, bfloat16 on the CPU with FP8
    weights) or under its ``manual_cast`` (MPS, XPU, GPUs without autocast, FP8 weights with
    ``--precision full``), which replaces the layer classes' forward and keeps the original as
    ``org_forward`` on the class while it is active."""
    return bool(autocast_state(device)[0]) or hasattr(torch.nn.Linear, "org_forward")


class RowLayout:
    """Which rows of the batched UNet calls of one CFG step belong to the negative prompt.

    A1111 batches ``[cond rows..., uncond rows...]`` and then runs the UNet once on all rows, or
    in consecutive chunks (``batch_cond_uncond`` off, different prompt lengths, skipped uncond);
    each call takes the next rows, so an offset into the step's layout finds each call's rows.
    """

    def __init__(self) -> None:
        self.flags: torch.Tensor | None = None
        self.offset = 0

    def start_step(self, cond_rows: int, total_rows: int) -> None:
        self.flags = torch.arange(total_rows) >= cond_rows
        self.offset = 0

    def take(self, rows: int) -> torch.Tensor | None:
        if self.flags is None or self.offset + rows > self.flags.shape[0]:
            return None
        taken = self.flags[self.offset : self.offset + rows]
        self.offset += rows
        return taken

    def clear(self) -> None:
        self.flags = None
        self.offset = 0


class LdmApplier:
    """Attaches the current networks to one A1111 UNet at a time; ``clear()`` restores it exactly."""

    kind = "a1111"

    def __init__(self) -> None:
        self.attachment: Attachment | None = None
        self.layout = RowLayout()
        self._unet_hook = None
        self.entries: list = []
        self.compute_dtype: torch.dtype | None = None
        self.fold_limit: int | None = DEFAULT_FOLD_LIMIT

    def unet(self, sd_model) -> nn.Module | None:
        return unet_of(sd_model)

    @property
    def attached_unet(self) -> nn.Module | None:
        return self.attachment.model if self.attachment is not None else None

    def apply(
        self, sd_model, entries: list, compute_dtype: torch.dtype | None, *, lora_functional: bool = False
    ) -> None:
        self.entries = list(entries)
        self.compute_dtype = compute_dtype
        unet = self.unet(sd_model)
        if not self.entries or unet is None:
            self.detach()
            return
        if self.attachment is not None and (self.attachment.model is not unet or self._dtype_changed(compute_dtype)):
            self.clear(keep_entries=True)
        if self.attachment is None:
            self.attachment = Attachment(unet, compute_dtype=compute_dtype, fold_limit=self.fold_limit)
            self.attachment.runtime.lower_precision = lower_precision_now
        self.attachment.fold_limit = self.fold_limit
        if self._unet_hook is None:
            self._unet_hook = unet.register_forward_pre_hook(self._before_unet, with_kwargs=True)
        self.attachment.runtime.linear_projections = linear_projection_hint(lora_functional)
        self.attachment.update(self.entries)  # the same networks as last time keep their folds

    def _dtype_changed(self, compute_dtype) -> bool:
        return self.attachment is not None and self.attachment.rewriter.compute_dtype != compute_dtype

    def _before_unet(self, module, args, kwargs):
        x = args[0] if args else kwargs.get("x")
        if self.attachment is not None and isinstance(x, torch.Tensor):
            self.attachment.runtime.uncond_rows = self.layout.take(x.shape[0])
        return None

    def step(self, progress: float | None, cond_rows: int | None, total_rows: int | None) -> None:
        """Called by the CFG denoiser callback before each step's UNet calls."""
        if self.attachment is None:
            return
        self.attachment.runtime.progress = progress
        if cond_rows is None or total_rows is None:
            self.layout.clear()
        else:
            self.layout.start_step(cond_rows, total_rows)

    def before_sampling(self, p) -> None:
        """Forge's hook; nothing to do on A1111, where the hooks are already in place."""

    def detach(self) -> None:
        """After a generation: every hook comes off, so the model computes exactly as before, but
        the attachment stays with what it computed (folded weights, rewritten contexts): the next
        generation with the same networks on the same weights starts without redoing them. Other
        networks, a dtype change or another model replace it."""
        if self.attachment is not None:
            self.attachment.remove()
        self._remove_unet_hook()
        self.layout.clear()
        self.entries = []

    def memory(self) -> HeldMemory:
        if self.attachment is None:
            return HeldMemory(fold_limit=self.fold_limit)
        return self.attachment.memory()

    def release(self) -> int:
        """Let go of the folds and caches (the host is about to move the UNet off its device);
        the networks stay attached and rebuild what they need at the next call."""
        return self.attachment.release() if self.attachment is not None else 0

    def clear(self, *, keep_entries: bool = False) -> None:
        """Drop the attachment and everything it kept (checkpoint switch, unload)."""
        if self.attachment is not None:
            self.attachment.remove()
            self.attachment.release()  # now, not when the garbage collector meets the folds' cycle
            self.attachment = None
        self._remove_unet_hook()
        self.layout.clear()
        if not keep_entries:
            self.entries = []

    def _remove_unet_hook(self) -> None:
        if self._unet_hook is not None:
            self._unet_hook.remove()
            self._unet_hook = None

    @property
    def active(self) -> bool:
        return self.attachment is not None and self.attachment.attached
