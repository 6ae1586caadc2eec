"""Attention patches in the convention of the UNet patchers of Forge and reForge (ComfyUI's).

Both hosts call ``attn1_patch``/``attn2_patch`` functions as ``patch(n, context, value, extra_options)``
with the inputs of to_k (``context``) and to_v (``value``) and expect them back, rewritten; exactly
where A1111 applies hypernetworks. ``extra_options`` says which UNet block runs (``block``) and
which batch chunks are the negative prompt (``cond_or_uncond``). Generation (``hosts/forge.py``)
and training (``training/backends/forge.py``) use the same patches.
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


class AttentionPatch:
    """An attn1 (``kind`` self) or attn2 (cross) patch that rewrites through ``rewriter``.

    The patcher deep-copies its options on ``clone()``: the patch copies as itself, or the copy
    would carry copies of the networks. The memory managers of Forge and reForge call ``to(device)``
    on every patch that has one when they load the UNet onto its device or unload it
    (``model_patches_to``); the rewriter then lets go of what it keeps on other devices, so it
    follows the UNet, and ``on_move(device, released_bytes)`` is told.
    """

    hnx_patch = True

    def __init__(self, rewriter: KVRewriter, kind: str, on_move: Callable[[torch.device, int], None] | None = None):
        self.rewriter = rewriter
        self.kind = kind
        self.on_move = on_move

    def __call__(self, n, context, value, extra_options):
        rewriter = self.rewriter
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


def attention_patch(rewriter: KVRewriter, kind: str) -> AttentionPatch:
    """An attn1 (``kind`` self) or attn2 (cross) patch (see :class:`AttentionPatch`)."""
    return AttentionPatch(rewriter, kind)
