"""Forge, reForge and Forge Classic: networks act through the UNet patcher's attention patch points.

The patches themselves are in :mod:`hypernetwork_ext.patches` (training uses them too). They go on
a clone of the patcher in ``process_before_every_sampling``, the only hook whose changes the host
keeps for the sampling that follows; the shared patcher itself is never modified.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

from ..attach import KVRewriter, same_entries
from ..patches import attention_patch
from ..strength import CROSS, SELF

FORGE_PATCHER_MODULES = ("backend.patcher.unet", "modules_forge.unet_patcher")
# A1111's own hypernetwork code: every host keeps it (Forge and reForge without effect) except
# Forge Classic, which removed it in January 2025 together with its Train tab and --hypernetwork-dir.
HOST_HYPERNETWORK_PACKAGE = "modules.hypernetworks"


def detect_patcher_host() -> str | None:
    """The importable module of a UNet patcher (Forge, then reForge and Forge Classic), or None on A1111."""
    for name in FORGE_PATCHER_MODULES:
        if _importable(name):
            return name
    return None


def host_has_hypernetwork_code() -> bool:
    """Whether the host still has A1111's ``modules.hypernetworks`` (all but Forge Classic)."""
    return _importable(HOST_HYPERNETWORK_PACKAGE)


def is_forge_classic() -> bool:
    """Forge Classic: reForge's ``ldm_patched`` patcher, without any hypernetwork code of its own."""
    return detect_patcher_host() == FORGE_PATCHER_MODULES[1] and not host_has_hypernetwork_code()


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


class PatcherApplier:
    """Holds the current networks and puts one attn1 and one attn2 patch on each sampling's patcher."""

    kind = "forge"

    def __init__(self) -> None:
        self.rewriter = KVRewriter([])
        self.entries: list = []
        self.attn1_patch = attention_patch(self.rewriter, SELF)
        self.attn2_patch = attention_patch(self.rewriter, CROSS)

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
