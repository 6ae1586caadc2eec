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
from ..memory import HeldMemory
from ..patches import AttentionPatch
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
        self.fold_limit: int | None = None  # nothing is folded here: the patches rewrite inputs
        self.on_move = None  # called with (device, released bytes) when the memory manager moves the UNet
        self.attn1_patch = AttentionPatch(self.rewriter, SELF, self._moved)
        self.attn2_patch = AttentionPatch(self.rewriter, CROSS, self._moved)
        self._last_held = 0

    def _moved(self, device: torch.device, released: int) -> None:
        if self.on_move is not None:
            self.on_move(device, released)

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
            self._last_held = 0

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
        preserve = getattr(clone, "add_extra_preserved_memory_during_sampling", None)
        if callable(preserve):
            preserve(self.expected_bytes(getattr(clone, "load_device", None)))
        forge_objects.unet = clone

    def expected_bytes(self, device) -> int:
        """What the sampling will add on ``device`` for the fast paths, for the memory manager to
        keep free (it plans with the memory it sees free, where what is already held is not):
        what the last generation with these networks held, or before any, the networks' own size
        in their compute dtype; less what is still held there."""
        dtype = self.rewriter.compute_dtype
        expected = self._last_held or sum(
            p.numel() * (p.element_size() if dtype is None else torch.empty((), dtype=dtype).element_size())
            for network, _ in self.entries
            for p in network.parameters()
        )
        held = self.memory().on(str(torch.device(device))) if device is not None else 0
        return max(0, expected - held)

    def installed_on(self, patcher) -> bool:
        patches = patcher.model_options.get("transformer_options", {}).get("patches", {})
        return any(patch is self.attn2_patch for patch in patches.get("attn2_patch", []))

    def detach(self) -> None:
        """After a generation: no patch goes on the next sampling's patcher until networks are
        applied again; what the rewriter computed stays for the same networks."""
        if self.entries:
            self._last_held = self.memory().total
        self.entries = []
        self.rewriter.runtime.progress = None
        self.rewriter.runtime.uncond_rows = None

    def memory(self) -> HeldMemory:
        return self.rewriter.memory()

    def release(self) -> int:
        """Let go of what the rewriter keeps (a checkpoint switch, an unload); rebuilt when needed."""
        before = self.rewriter.memory().total
        self.rewriter.release()
        return before - self.rewriter.memory().total

    def clear(self, *, keep_entries: bool = False) -> None:
        if not keep_entries:
            self.entries = []
            self.rewriter.reset([])
            self._last_held = 0
        self.rewriter.runtime.progress = None
        self.rewriter.runtime.uncond_rows = None

    @property
    def active(self) -> bool:
        return bool(self.entries)
