"""The hooks under A1111's attention kernels and with a Lora-style Linear patch on the same layers.

Every kernel of A1111 1.10.1's ``sd_hijack_optimizations`` (None, Doggettx, V1, InvokeAI,
sub-quadratic, xformers, sdp, sdp-no-mem) replaces ``CrossAttention.forward`` and computes
``context = default(context, x)``, ``context_k, context_v = apply_hypernetworks(loaded, context)``
(identity here: the host's list stays empty), ``self.to_k(context_k)``, ``self.to_v(context_v)``.
The kernels below follow that call pattern with the three attention computations those kernels
use (whole-matrix softmax, sliced over heads, chunked over queries, fused SDPA).
"""

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

import hypernetwork_ext as hx
from tests.a1111.test_generation import expected, load, p_for, run_model
from tests.support import models as M
from tests.support.a1111_lora import A1111Lora, LoraNetwork
from tests.support.reference import reference_model
from tests.support.webui_generation import LatentDiffusion, generate, sample


def _project(self, x, context):
    context = x if context is None else context
    context_k, context_v = context, context  # apply_hypernetworks(shared.loaded_hypernetworks=[], context)
    q, k, v = self.to_q(x), self.to_k(context_k), self.to_v(context_v)
    return (rearrange(t, "b n (h d) -> (b h) n d", h=self.heads) for t in (q, k, v))


def _finish(self, out):
    return self.to_out(rearrange(out, "(b h) n d -> b n (h d)", h=self.heads))


def sliced_heads(self, x, context=None, mask=None, **kwargs):  # Doggettx / V1 / InvokeAI
    q, k, v = _project(self, x, context)
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[2], dtype=q.dtype)
    for i in range(0, q.shape[0], 2):
        sim = torch.einsum("b i d, b j d -> b i j", q[i : i + 2], k[i : i + 2]) * self.scale
        out[i : i + 2] = torch.einsum("b i j, b j d -> b i d", sim.softmax(dim=-1), v[i : i + 2])
    return _finish(self, out)


def chunked_queries(self, x, context=None, mask=None, **kwargs):  # sub-quadratic
    q, k, v = _project(self, x, context)
    chunks = [
        torch.einsum(
            "b i j, b j d -> b i d", (torch.einsum("b i d, b j d -> b i j", qc, k) * self.scale).softmax(-1), v
        )
        for qc in q.split(5, dim=1)
    ]
    return _finish(self, torch.cat(chunks, dim=1))


def fused(self, x, context=None, mask=None, **kwargs):  # sdp / sdp-no-mem / xformers
    q, k, v = _project(self, x, context)
    return _finish(self, F.scaled_dot_product_attention(q, k, v))


@pytest.mark.parametrize("kernel", [sliced_heads, chunked_queries, fused])
def test_hooks_act_under_every_kernel_pattern(host, inputs, monkeypatch, kernel):
    import ldm.modules.attention

    default = generate(host, p_for(host, "<hypernet:anime:0.8>"), inputs, run_model)[0]
    monkeypatch.setattr(ldm.modules.attention.CrossAttention, "forward", kernel)
    (got,) = generate(host, p_for(host, "<hypernet:anime:0.8>"), inputs, run_model)
    want = expected(host, inputs, [(load(host, "anime.pt"), 0.8)])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got, default, rtol=1e-4, atol=1e-4)  # the kernel computes the same attention
    assert not torch.allclose(got, expected(host, inputs, []), atol=1e-4)


def test_lora_style_weight_patch_on_the_same_layers(host, inputs, monkeypatch):
    """Lora replaces ``torch.nn.Linear.forward`` for the whole class and adds its delta to the weight of
    layers it targets; the hypernetwork rewrites those layers' inputs, so both act."""
    unet = host.shared.sd_model.model.diffusion_model
    targets = {id(m.to_k) for m in unet.modules() if hasattr(m, "to_k")}
    generator = torch.Generator().manual_seed(3)
    deltas = {}
    original_forward = torch.nn.Linear.forward

    def lora_linear_forward(self, input):
        if id(self) not in targets:
            return original_forward(self, input)
        if id(self) not in deltas:
            deltas[id(self)] = torch.randn(self.weight.shape, generator=generator) * 0.05
        return F.linear(input, self.weight + deltas[id(self)], self.bias)

    monkeypatch.setattr(torch.nn.Linear, "forward", lora_linear_forward)
    plain_lora = expected(host, inputs, [])
    (got,) = generate(host, p_for(host, "<hypernet:anime:0.8>"), inputs, run_model)
    # the reference twin is a deep copy: give its projections the same deltas, in module order
    net = load(host, "anime.pt")
    twin = reference_model(unet, [(net, 0.8)])
    originals = [m.to_k for m in unet.modules() if hasattr(m, "to_k")]
    copies = [m.to_k.projection for m in twin.modules() if hasattr(m, "to_k")]
    for source, target in zip(originals, copies, strict=True):
        targets.add(id(target))
        deltas[id(target)] = deltas[id(source)]
    want = sample(host, p_for(host, ""), inputs, 4, lambda x, t, c: twin(x, t, context=c))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    monkeypatch.setattr(torch.nn.Linear, "forward", original_forward)
    without_lora = generate(host, p_for(host, "<hypernet:anime:0.8>"), inputs, run_model)[0]
    assert not torch.allclose(got, without_lora, atol=1e-4) and not torch.allclose(got, plain_lora, atol=1e-4)


@pytest.mark.parametrize("functional", [False, True])
def test_lora_mode_reaches_the_fast_path(host, inputs, functional):
    """The host's ``lora_functional`` option decides whether folds may follow Lora's merged weights;
    in either mode the generation equals the reference with Lora's deltas."""
    unet = host.shared.sd_model.model.diffusion_model
    lora = A1111Lora()
    lora.functional = functional
    lora.assign_names(unet)
    network = LoraNetwork("style")
    for name, module in unet.named_modules():
        if name.endswith(("to_k", "to_v")):
            network.add(
                name.replace(".", "_"), module.out_features, module.in_features, rank=2, seed=len(network.modules)
            )
    lora.loaded_networks = [network]
    host.shared.opts.data["lora_functional"] = functional
    hx.save(
        hx.create((M.LDM_CONTEXT, *M.LDM_WIDTHS), (1, 2, 1), "linear", "XavierNormal", seed=4),
        host.hypernetwork_dir / "flat.pt",
    )
    host.extension.library.refresh()
    lora.apply()
    try:
        (got,) = generate(host, p_for(host, "<hypernet:flat:0.8>"), inputs, run_model)
        host.extension.activate(p_for(host, ""), [["flat", "0.8"]])
        assert host.extension.applier.attachment.runtime.linear_projections is (not functional)
        host.set_model(LatentDiffusion(M.ldm_unet(4)))  # a checkpoint switch re-applies the networks
        assert host.extension.applier.attachment.runtime.linear_projections is (not functional)
        host.extension.finish()
        twin = reference_model(unet, [(load(host, "flat.pt"), 0.8)])
        lora.assign_names(twin)
        for name, module in twin.named_modules():  # the twin's projections sit one level deeper
            if name.endswith(("to_k.projection", "to_v.projection")):
                module.network_layer_name = name.removesuffix(".projection").replace(".", "_")
        want = sample(host, p_for(host, ""), inputs, 4, lambda x, t, c: twin(x, t, context=c))
    finally:
        lora.undo()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
