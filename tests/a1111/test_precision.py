"""A tag computes as A1111 computes its own hypernetworks in the precision the host samples in.

With FP8 weights (Settings -> Optimizations) A1111 stores every Linear and Conv2d of the model in
float8 and samples under ``devices.autocast()``: torch's bfloat16 autocast on the CPU (float16 on
CUDA), its own ``manual_cast`` on MPS/XPU or with ``--precision full``. Its networks, float32
modules, then compute ``x + linear(x) * m`` under that casting. Any other order of the same
arithmetic rounds differently, and sampling grows bfloat16 rounding differences into visible ones
(5-6/255 in the real A1111 1.10.1 before this was matched), so these are compared bit for bit with
the reference formula sampled under the same casting. Without lower precision nothing changes.
"""

import pytest
import torch

import hypernetwork_ext as hx
from tests.support import models as M
from tests.support.networks import perturbed, visible
from tests.support.reference import reference_model
from tests.support.webui_generation import generate, sample
from tests.support.webui_standin import StableDiffusionProcessing

WIDTHS = (M.LDM_CONTEXT, *M.LDM_WIDTHS)
NETWORKS = {  # name: (activation, layer norm)
    "relu-ln": ("relu", True),
    "linear": ("linear", False),
    "swish": ("swish", False),
}
CASES = {
    "relu-ln": "<hypernet:relu-ln:0.8>",
    "linear": "<hypernet:linear:1.2>",  # the fold path without lower precision
    "stacked": "<hypernet:relu-ln:0.8> <hypernet:swish:0.7> <hypernet:linear:-0.5>",
}


@pytest.fixture
def host(host):
    for seed, (name, (activation, layer_norm)) in enumerate(NETWORKS.items(), start=3):
        net = hx.create(WIDTHS, (1, 2, 1), activation, "XavierNormal", layer_norm=layer_norm, seed=seed, name=name)
        hx.save(perturbed(visible(net, seed, 0.2), seed), host.hypernetwork_dir / f"{name}.pt")
    return host


def fp8_weights(host) -> None:
    """What ``sd_models.load_model_weights`` does with FP8 storage on: every Conv2d and Linear of the
    model (the first stage apart) in float8_e4m3fn, and ``devices.fp8`` set."""
    for module in host.shared.sd_model.model.diffusion_model.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            module.to(torch.float8_e4m3fn)
    host.devices.fp8 = True


def entries_of(host, prompt: str) -> list:
    from hypernetwork_ext.syntax import find_tags

    return [(hx.load(host.hypernetwork_dir / f"{name}.pt"), float(value)) for name, value in find_tags(prompt)]


def run_model(p):
    unet = p.sd_model.model.diffusion_model
    return lambda x, t, context: unet(x, t, context=context)


def render(host, inputs, prompt: str) -> torch.Tensor:
    p = StableDiffusionProcessing(sd_model=host.shared.sd_model, prompt=prompt)
    (latent,) = generate(host, p, inputs, run_model)
    assert not p.comments, p.comments
    return latent


def builtin(host, inputs, prompt: str, *, modules: bool = False) -> torch.Tensor:
    """A1111's own hypernetworks: the reference formula in the to_k/to_v inputs, sampled under the
    host's ``devices.autocast()``."""
    twin = reference_model(host.shared.sd_model.model.diffusion_model, entries_of(host, prompt), modules=modules)
    p = StableDiffusionProcessing(sd_model=host.shared.sd_model, prompt="")
    with torch.no_grad(), host.devices.autocast():
        return sample(host, p, inputs, p.steps, lambda x, t, context: twin(x, t, context=context))


def no_tag(host, inputs) -> torch.Tensor:
    return render(host, inputs, "a cat")


def stats(host):
    return host.extension.applier.attachment.stats


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_fp8_weights_on_the_cpu_compute_as_a1111_bit_for_bit(host, inputs, case):
    fp8_weights(host)
    prompt = CASES[case]
    want = builtin(host, inputs, prompt)
    got = render(host, inputs, prompt)
    again = render(host, inputs, prompt)  # the second generation, from what the first kept
    assert isinstance(host.devices.autocast(), torch.autocast)  # the host's bfloat16 autocast
    assert (want.float() - no_tag(host, inputs).float()).abs().max() > 0.1  # the networks act
    assert torch.equal(got, want) and torch.equal(again, want)
    counted = stats(host)
    assert counted["host_arithmetic_calls"] > 0 and counted["context_hits"] > 0  # the context computed once
    assert counted["folds"] == counted["paired_first_layers"] == 0


def test_the_same_arithmetic_rounded_otherwise_would_differ_from_a1111(host, inputs, monkeypatch):
    """What the test above guards against: the fast paths (a chosen compute dtype keeps them) with
    ``x + m * g`` fused into one rounding, as they once computed it, differ from A1111 under FP8,
    and sampling shows it; rounded as A1111 rounds it (the product, then the sum) they do not."""
    from hypernetwork_ext import attach, fastpath

    fp8_weights(host)
    prompt = CASES["relu-ln"]
    want = builtin(host, inputs, prompt)
    host.shared.opts.data["hypernetwork_compute_dtype"] = "float32"
    assert torch.equal(render(host, inputs, prompt), want) and stats(host)["host_arithmetic_calls"] == 0

    def fused(x, g, mult):
        value = mult.value_for(x)
        return torch.add(x, g, alpha=value) if isinstance(value, float) else torch.addcmul(x, g, value)

    monkeypatch.setattr(attach, "combine", fused)
    monkeypatch.setattr(fastpath, "combine", fused)
    got = render(host, inputs, prompt)
    assert stats(host)["host_arithmetic_calls"] == 0
    assert (got.float() - want.float()).abs().max() > 0


def test_a1111s_manual_cast_computes_as_a1111(host, inputs, monkeypatch):
    """MPS, XPU, GPUs without autocast: A1111 replaces the layer classes' forward to cast each call
    (its networks' layers included); the extension's layers go through it the same way."""
    import ldm.modules.attention

    # A1111 replaces ldm's attention forward with kernels that keep the input's dtype; ldm's own
    # upcasts the scores alone to float32, which then meet bfloat16 values.
    monkeypatch.setattr(ldm.modules.attention, "_ATTN_PRECISION", "default")
    monkeypatch.setattr(host.devices, "has_mps", lambda: True)
    host.devices.dtype = host.devices.dtype_inference = torch.bfloat16
    host.shared.sd_model.model.diffusion_model.to(torch.bfloat16)  # model.half(), as bfloat16 on this CPU
    for case in ("relu-ln", "stacked"):
        want = builtin(host, inputs, CASES[case], modules=True)
        got = render(host, inputs, CASES[case])
        assert torch.equal(got, want), case
        assert stats(host)["host_arithmetic_calls"] > 0
    assert not hasattr(torch.nn.Linear, "org_forward")  # the host's casting ended with the sampling


def test_without_lower_precision_the_fast_paths_stay(host, inputs):
    """A1111 on a CPU (--no-half, float32) samples without autocast: folds and batched first layers as before."""
    prompt = CASES["stacked"]
    got = render(host, inputs, prompt)
    counted = stats(host)
    assert counted["host_arithmetic_calls"] == 0 and counted["folds"] > 0
    torch.testing.assert_close(got, builtin(host, inputs, prompt), rtol=1e-4, atol=1e-5)


def test_forge_never_follows_a1111s_arithmetic():
    """Forge and reForge sample without autocast (their ``devices.autocast()`` is a null context) and
    have no built-in hypernetworks to match: their rewriter is told nothing about precision."""
    from hypernetwork_ext.hosts.forge import PatcherApplier

    assert PatcherApplier().rewriter.runtime.lower_precision is None
