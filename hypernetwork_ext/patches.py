"""Attention patches in the convention of the UNet patchers of Forge and reForge (ComfyUI's).

Both hosts, and ComfyUI whose patcher theirs descend from, call ``attn1_patch``/``attn2_patch``
functions as ``patch(n, context, value, extra_options)`` with the inputs of to_k (``context``) and
to_v (``value``) and expect them back, rewritten; exactly where A1111 applies hypernetworks.
``extra_options`` says which UNet block runs (``block``) and which batch chunks are the negative
prompt (``cond_or_uncond``); ComfyUI's also carries the sigma of the call (``sigmas``) and the
sampling's schedule (``sample_sigmas``), from which :class:`SamplingProgress` tells the step.
Generation (``hosts/forge.py``, ``hosts/comfyui.py``) and training (``training/backends/forge.py``)
use the same patches.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from .attach import KVRewriter


def block_id(block) -> str | None:
    """Forge's ``("input", 4)`` / ``("middle", 0)`` / ``("output", 3)`` as IN04 / M00 / OUT03."""
    if not isinstance(block, (tuple, list)) or len(block) < 2:
        return None
    prefix = {"input": "IN", "middle": "M", "output": "OUT"}.get(block[0])
    if prefix is None:
        return None
    try:
        return f"{prefix}{int(block[1]):02d}"
    except (TypeError, ValueError):
        return None


def uncond_rows(extra_options: dict, rows: int) -> torch.Tensor | None:
    """Per row, whether it belongs to the negative prompt (chunks listed in ``cond_or_uncond``).

    The same layout gives the same tensor object: the rewriter keeps what it derives from the
    rows per object, and the patch runs at every attention call of every step."""
    chunks = extra_options.get("cond_or_uncond")
    if not chunks or rows % len(chunks):
        return None
    return _row_flags(tuple(int(chunk) == 1 for chunk in chunks), rows // len(chunks))


@functools.lru_cache(maxsize=16)
def _row_flags(flags: tuple[bool, ...], per_chunk: int) -> torch.Tensor:
    # Made outside inference mode, where Forge samples: a normal tensor keeps its version counter,
    # so the rewriter's memo of it works, and it stays usable in every later generation.
    with torch.inference_mode(False):
        return torch.tensor(flags).repeat_interleave(per_chunk)


class SamplingProgress:
    """How far sampling is (0 = first step), from the sigma of this call and the sampling's schedule
    (ComfyUI's ``sigmas`` and ``sample_sigmas``): A1111's ``step / steps`` for the step whose sigma
    this is; a sigma between two of the schedule (DPM2's midpoints) counts as the step it falls in.
    None when the options do not say.

    Reading a sigma waits for the device, so each is read once per tensor object: the host passes
    the same tensor to every attention call of one model call."""

    def __init__(self) -> None:
        self._schedule: tuple = (None, [])
        self._last: tuple = (None, None)

    def __call__(self, extra_options: dict) -> float | None:
        schedule, sigma = extra_options.get("sample_sigmas"), extra_options.get("sigmas")
        if not isinstance(schedule, torch.Tensor) or not isinstance(sigma, torch.Tensor):
            return None
        if self._last[0] is sigma and self._schedule[0] is schedule:
            return self._last[1]
        if self._schedule[0] is not schedule:
            self._schedule = (schedule, [float(v) for v in schedule.detach().reshape(-1).float().cpu()])
        values = self._schedule[1]
        steps = len(values) - 1
        if steps < 1 or sigma.numel() == 0:
            return None
        current = float(sigma.detach().reshape(-1)[0])
        tolerance = abs(current) * 1e-5 + 1e-12
        above = sum(1 for value in values[:steps] if value > current + tolerance)
        on_schedule = any(abs(value - current) <= tolerance for value in values[:steps])
        step = above if on_schedule else above - 1
        progress = min(max(step, 0), steps - 1) / steps
        self._last = (sigma, progress)
        return progress


class AttentionPatch:
    """An attn1 (``kind`` self) or attn2 (cross) patch that rewrites through ``rewriter``.

    The patcher deep-copies its options on ``clone()``: the patch copies as itself, or the copy
    would carry copies of the networks. The memory managers of Forge and reForge call ``to(device)``
    on every patch that has one when they load the UNet onto its device or unload it
    (``model_patches_to``); the rewriter then lets go of what it keeps on other devices, so it
    follows the UNet, and ``on_move(device, released_bytes)`` is told.

    ``progress`` reads the sampling step from ``extra_options`` (ComfyUI, :class:`SamplingProgress`);
    without it the host sets ``rewriter.runtime.progress`` itself (Forge, reForge: from their step
    callback).
    """

    hnx_patch = True

    def __init__(
        self,
        rewriter: KVRewriter,
        kind: str,
        on_move: Callable[[torch.device, int], None] | None = None,
        *,
        progress: Callable[[dict], float | None] | None = None,
    ):
        self.rewriter = rewriter
        self.kind = kind
        self.on_move = on_move
        self.progress = progress

    def __call__(self, n, context, value, extra_options):
        rewriter = self.rewriter
        if self.progress is not None:
            rewriter.runtime.progress = self.progress(extra_options)
        rewriter.runtime.uncond_rows = uncond_rows(extra_options, n.shape[0]) if n is not None else None
        block = block_id(extra_options.get("block"))
        context, value = rewriter.rewrite_pair(context, value, kind=self.kind, block=block)
        return n, context, value

    def to(self, target) -> AttentionPatch:
        """``model_patches_to(device)``; also called with the model's dtype, which changes nothing here."""
        if isinstance(target, (torch.device, str)):
            device = torch.device(target)
            before = self.rewriter.memory().total
            self.rewriter.release(keep={device, *_same_devices(device)})
            if self.on_move is not None:
                self.on_move(device, before - self.rewriter.memory().total)
        return self

    def __deepcopy__(self, memo) -> AttentionPatch:
        return self

    def __copy__(self) -> AttentionPatch:
        return self


def _same_devices(device: torch.device) -> tuple[torch.device, ...]:
    """``cuda`` and ``cuda:0`` name one device when 0 is the current one."""
    if device.type == "cuda" and torch.cuda.is_available():
        index = torch.cuda.current_device() if device.index is None else device.index
        return (torch.device("cuda", index),)
    return ()


def attention_patch(
    rewriter: KVRewriter, kind: str, *, progress: Callable[[dict], float | None] | None = None
) -> AttentionPatch:
    """An attn1 (``kind`` self) or attn2 (cross) patch (see :class:`AttentionPatch`)."""
    return AttentionPatch(rewriter, kind, progress=progress)
