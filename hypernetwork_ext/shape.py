"""What a UNet's attention layers look like to a hypernetwork: widths and block order."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .attach import find_attention_sites
from .strength import attention_block_order


@dataclass(frozen=True)
class ModelShape:
    """What decides which networks fit a UNet and how block vectors map onto it."""

    context_width: int | None
    self_widths: tuple[int, ...]
    blocks: tuple[str, ...]

    @property
    def default_widths(self) -> list[int]:
        """The widths of a new network for this model: its context width, then its self-attention widths."""
        return ([self.context_width] if self.context_width else []) + list(self.self_widths)


def model_shape(unet: nn.Module | None) -> ModelShape:
    if unet is None:
        return ModelShape(None, (), ())
    sites = find_attention_sites(unet)
    context = {site.key_projection.in_features for site in sites if site.kind == "cross"}
    selfs = sorted({site.key_projection.in_features for site in sites if site.kind == "self"})
    return ModelShape(
        next(iter(context)) if len(context) == 1 else None,
        tuple(selfs),
        tuple(attention_block_order(site.block for site in sites)),
    )
