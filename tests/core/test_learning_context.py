"""While a network learns, the text context is rewritten once per forward pass and shared by every
cross-attention layer: the gradients equal those of running the networks at every layer (A1111's
way), to float32 rounding."""

from __future__ import annotations

import torch

import hypernetwork_ext as hx
from tests.support.fixtures import one_torch_thread  # noqa: F401 (autouse fixture)
from tests.support.models import LDM_CONTEXT, LDM_WIDTHS, ldm_inputs, ldm_unet


def gradients(fast: bool, *, dropout: bool = False):
    unet = ldm_unet(0)
    network = hx.create(
        (LDM_CONTEXT, *LDM_WIDTHS),
        (1, 2, 1),
        "relu",
        seed=1,
        use_dropout=dropout,
        dropout_structure=(0, 0.3, 0) if dropout else None,
    ).train()
    inputs = ldm_inputs(0)
    with hx.apply(unet, [network], fast=fast) as handle:
        torch.manual_seed(0)
        unet(inputs["x"], inputs["timesteps"], context=inputs["context"]).square().mean().backward()
    return {name: p.grad.clone() for name, p in network.named_parameters()}, handle.stats


def test_the_shared_context_gives_the_gradients_of_every_layer_computing_it():
    shared, stats = gradients(True)
    per_layer, _ = gradients(False)
    assert stats["shared_learning_contexts"] > 0
    for name, grad in per_layer.items():
        torch.testing.assert_close(shared[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_a_network_with_dropout_draws_a_mask_at_every_layer():
    _grads, stats = gradients(True, dropout=True)
    assert stats["shared_learning_contexts"] == 0
