"""Helpers for test networks."""

import torch


def visible(net, seed: int = 0, std: float = 0.3):
    """Redraw every Linear weight large enough that the network's effect cannot hide in rounding
    (a freshly created network starts close to the identity)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in net.modules():
            if isinstance(layer, torch.nn.Linear):
                layer.weight.normal_(0.0, std, generator=generator)
    return net
