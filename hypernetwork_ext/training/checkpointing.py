"""Gradient checkpointing that keeps the network's gradients.

ldm's own ``checkpoint()`` recomputes a block with only that block's parameters handed to
autograd, so the hypernetwork's parameters, used inside the block through the to_k/to_v hooks,
would silently get no gradient. Here each transformer block is wrapped with torch's non-reentrant
checkpoint instead, which recomputes through saved-tensor hooks and reaches every parameter used.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..attach import find_attention_sites

_BLOCK_CLASSES = ("BasicTransformerBlock",)


def checkpoint_targets(root: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a UNet (ldm, sgm and diffusers share the class name), or the
    attention modules themselves when a model has no such blocks."""
    blocks = [module for module in root.modules() if type(module).__name__ in _BLOCK_CLASSES]
    return blocks or [site.module for site in find_attention_sites(root)]


@contextlib.contextmanager
def gradient_checkpointing(root: nn.Module, enabled: bool = True) -> Iterator[list[nn.Module]]:
    if not enabled:
        yield []
        return
    targets = checkpoint_targets(root)
    previous = []
    for module in targets:
        previous.append(module.__dict__.get("forward"))
        module.forward = _checkpointed(module.forward)
    try:
        yield targets
    finally:
        for module, before in zip(targets, previous, strict=True):
            if before is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = before


def _checkpointed(forward):
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run
