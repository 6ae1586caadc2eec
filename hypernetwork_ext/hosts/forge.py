"""Forge and reForge: networks act through the UNet patcher's attention patch points.

Both hosts call ``attn1_patch``/``attn2_patch`` functions as ``patch(n, context, value, extra_options)``
with the inputs of to_k (``context``) and to_v (``value``) and expect them back, rewritten; exactly
where A1111 applies hypernetworks. ``extra_options`` says which UNet block runs (``block``) and
which batch chunks are the negative prompt (``cond_or_uncond``). Patches go on a clone of the
patcher in ``process_before_every_sampling``, the only hook whose changes the host keeps for the
sampling that follows; the shared patcher itself is never modified.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..attach import KVRewriter, same_entries
from ..strength import CROSS, SELF

FORGE_PATCHER_MODULES = ("backend.patcher.unet", "modules_forge.unet_patcher")


def detect_patcher_host() -> str | None:
    """The importable module of a UNet patcher (Forge, then reForge), or None on A1111."""
    import importlib

    for name in FORGE_PATCHER_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            continue
        return name
    return None


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


class PatcherApplier:
    """Holds the current networks and puts one attn1 and one attn2 patch on each sampling's patcher."""

    kind = "forge"

    def __init__(self) -> None:
        self.rewriter = KVRewriter([])
        self.entries: list = []
        self.attn1_patch = self._make_patch(SELF)
        self.attn2_patch = self._make_patch(CROSS)

    def _make_patch(self, kind: str):
        # A plain function, not a bound method: the patcher deep-copies its options on clone(),
        # which keeps functions as they are but would copy a method's object (and its networks).
        rewriter = self.rewriter

        def patch(n, context, value, extra_options):
            rewriter.runtime.uncond_rows = uncond_rows(extra_options, n.shape[0]) if n is not None else None
            block = block_id(extra_options.get("block"))
            context, value = rewriter.rewrite_pair(context, value, kind=kind, block=block)
            return n, context, value

        patch.hnx_patch = True
        return patch

    def unet(self, sd_model) -> nn.Module | None:
        patcher = getattr(getattr(sd_model, "forge_objects", None), "unet", None)
        model = getattr(patcher, "model", None)
        unet = getattr(model, "diffusion_model", None)
        return unet if isinstance(unet, nn.Module) else None

    def apply(
        self, sd_model, entries: list, compute_dtype: torch.dtype | None, *, lora_functional: bool = False
    ) -> None:
        # Forge merges LoRA through its patcher and we act through attention patches: nothing to fold, nothing to tell.
        self.entries = list(entries)
        if compute_dtype != self.rewriter.compute_dtype or not same_entries(self.entries, self.rewriter.entries):
            self.rewriter.compute_dtype = compute_dtype
            self.rewriter.reset(self.entries)  # the same networks as last time keep what was computed

    def step(self, progress: float | None, cond_rows: int | None, total_rows: int | None) -> None:
        self.rewriter.runtime.progress = progress

    def before_sampling(self, p) -> None:
        """Install the patches on a clone of this sampling's UNet patcher, once."""
        if not self.entries:
            return
        forge_objects = getattr(getattr(p, "sd_model", None), "forge_objects", None)
        patcher = getattr(forge_objects, "unet", None)
        if patcher is None or self.installed_on(patcher):
            return
        clone = patcher.clone()
        clone.set_model_attn1_patch(self.attn1_patch)
        clone.set_model_attn2_patch(self.attn2_patch)
        forge_objects.unet = clone

    def installed_on(self, patcher) -> bool:
        patches = patcher.model_options.get("transformer_options", {}).get("patches", {})
        return any(patch is self.attn2_patch for patch in patches.get("attn2_patch", []))

    def detach(self) -> None:
        """After a generation: no patch goes on the next sampling's patcher until networks are
        applied again; what the rewriter computed stays for the same networks."""
        self.entries = []
        self.rewriter.runtime.progress = None
        self.rewriter.runtime.uncond_rows = None

    def clear(self, *, keep_entries: bool = False) -> None:
        if not keep_entries:
            self.entries = []
            self.rewriter.reset([])
        self.rewriter.runtime.progress = None
        self.rewriter.runtime.uncond_rows = None

    @property
    def active(self) -> bool:
        return bool(self.entries)
