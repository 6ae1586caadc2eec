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


def webui_network(widths: tuple | None = None, seed: int = 0, activation: str = "relu"):
    """A network for the small ldm UNet of the WebUI tests, with biases drawn so that the key and
    value paths differ visibly from the identity."""
    import hypernetwork_ext as hx
    from tests.support import models as M

    widths = widths or (M.LDM_CONTEXT, *M.LDM_WIDTHS)
    return perturbed(hx.create(widths, (1, 2, 1), activation, "XavierNormal", seed=seed, name=f"net{seed}"), seed)


def perturbed(net, seed: int = 0):
    """Biases and layer norms away from their neutral initial values, so that a wrong formula
    cannot hide in rounding."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.normal_(1.0, 0.3, generator=generator)
                module.bias.normal_(0.0, 0.3, generator=generator)
            elif isinstance(module, torch.nn.Linear):
                module.bias.normal_(0.0, 0.1, generator=generator)
    return net
