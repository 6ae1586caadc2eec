"""Gradient checkpointing that keeps the network's gradients.

ldm's own ``checkpoint()`` recomputes a block with only that block's parameters handed to
autograd, so the hypernetwork's parameters, used inside the block through the to_k/to_v hooks,
would silently get no gradient. Here each transformer block and each residual block of the UNet
is wrapped with torch's non-reentrant checkpoint instead, which recomputes through saved-tensor
hooks and reaches every parameter used. A wrapped block keeps only its inputs for the backward
pass and recomputes the rest there: about one more forward pass of the blocks the gradient goes
through, for most of their activation memory (measured in docs/speed.md#training).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..attach import find_attention_sites, unshared_contexts

# ldm, sgm, Forge and diffusers share the transformer block's name; the residual blocks are
# ResBlock (ldm, sgm, Forge) and ResnetBlock2D (diffusers).
_BLOCK_CLASSES = ("BasicTransformerBlock", "ResBlock", "ResnetBlock2D")


def checkpoint_targets(root: nn.Module) -> list[nn.Module]:
    """The transformer and residual blocks of a UNet, and its attention modules themselves when it
    has no transformer blocks."""
    blocks = [module for module in root.modules() if type(module).__name__ in _BLOCK_CLASSES]
    if not any(type(module).__name__ == "BasicTransformerBlock" for module in blocks):
        blocks += [site.module for site in find_attention_sites(root)]
    return blocks


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
    def unshared(*args, **kwargs):
        # Forge's and Forge Classic's transformer blocks add into their input in place (x += n): the
        # block works on a copy, so the input the checkpoint keeps to recompute it stays as it was.
        args = tuple(arg.clone() if isinstance(arg, torch.Tensor) else arg for arg in args)
        with unshared_contexts():  # the recomputation must save what the forward pass saved
            return forward(*args, **kwargs)

    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(unshared, *args, use_reentrant=False, **kwargs)

    return run
