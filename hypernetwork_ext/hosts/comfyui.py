"""ComfyUI (and SwarmUI, which runs ComfyUI): networks act through the model patcher's attention patches.

ComfyUI's transformer blocks call ``attn1_patch``/``attn2_patch`` exactly as Forge's do (Forge's
backend descends from ComfyUI; :mod:`hypernetwork_ext.patches`), and ``extra_options`` also carries
the sigma of the call and the sampling's schedule, from which start/stop windows get their step.
:func:`patched_model` puts one attn1 and one attn2 patch on a *clone* of the MODEL it is given, never
on that MODEL: chaining nodes stacks networks in order, and nothing is global.

With ComfyUI's memory manager:
- ``ModelPatcher.clone()`` deep-copies the model options: a patch copies as itself, so clones share
  the networks instead of copying them.
- Before sampling the manager calls ``patch.to(load_device)`` and ``patch.to(model_dtype)``, after
  it ``patch.to(offload_device)`` when it unloads the model. The networks stay where they were
  loaded; what the rewriter made of them for a device (copies on the GPU, rewritten text contexts)
  is dropped when the model leaves that device, so nothing of ours stays there with it. The dtype
  call is ignored: networks compute in float32 (as A1111 does without autocast) whatever the UNet's
  weights are stored in (fp16, bf16, fp8), and the result goes back in the dtype of the activations.
- Networks act on activations, never on weights, so partly offloaded (low-VRAM) UNets and weights
  cast at every call need nothing more.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..attach import KVRewriter, NetworkSpec, normalise_networks
from ..errors import IncompatibleNetworkError
from ..patches import AttentionPatch as SharedAttentionPatch
from ..patches import SamplingProgress
from ..shape import ModelShape, model_shape
from ..strength import CROSS, SELF


class AttentionPatch(SharedAttentionPatch):
    """One attn1 (``kind`` self) or attn2 (cross) patch in ComfyUI's patch list: Forge's and reForge's
    patch (it copies as itself and follows the model's device through ``model_patches_to``, letting go
    of what it kept on other devices), reading the step from the sampler's sigmas."""

    @property
    def networks(self) -> list:
        return [network for network, _strength in self.rewriter.entries]


def diffusion_model(model) -> nn.Module:
    """The UNet of a ComfyUI MODEL (a ``ModelPatcher``)."""
    unet = getattr(getattr(model, "model", None), "diffusion_model", None)
    if not isinstance(unet, nn.Module):
        raise IncompatibleNetworkError(f"{type(model).__name__} is not a ComfyUI MODEL with a diffusion model")
    return unet


def shape_of(model) -> ModelShape:
    """Widths and attention blocks of a MODEL's UNet (which networks fit, how block vectors map)."""
    return model_shape(diffusion_model(model))


def patched_model(model, networks: Sequence[NetworkSpec], *, compute_dtype: torch.dtype | None = None):
    """A clone of ``model`` on which ``networks`` act after whatever it already has; ``model`` is
    left as it is. No networks: a plain clone."""
    clone = model.clone()
    entries = normalise_networks(networks)
    if not entries:
        return clone
    rewriter = KVRewriter(entries, compute_dtype)
    progress = SamplingProgress() if any(strength.is_scheduled for _net, strength in entries) else None
    clone.set_model_attn1_patch(AttentionPatch(rewriter, SELF, progress=progress))
    clone.set_model_attn2_patch(AttentionPatch(rewriter, CROSS, progress=progress))
    return clone


def our_patches(model) -> list[AttentionPatch]:
    """The patches of this package on a MODEL, in order (attn2 ones: one per applied node)."""
    patches = model.model_options.get("transformer_options", {}).get("patches", {})
    return [patch for patch in patches.get("attn2_patch", []) if isinstance(patch, AttentionPatch)]
