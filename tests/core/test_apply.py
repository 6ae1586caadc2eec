"""hx.apply on real models: ldm UNetModel (A1111's classes) and diffusers UNets (SD1- and SDXL-like),
compared with the reference formula applied by wrapping each to_k/to_v of a model copy."""

import pytest
import torch

import hypernetwork_ext as hx
from hypernetwork_ext.attach import KVRewriter, find_attention_sites
from hypernetwork_ext.strength import Strength
from tests.support import models as M
from tests.support.networks import perturbed as visible
from tests.support.reference import FUNCTIONS, reference_model

MODELS = {
    "ldm": (lambda: M.ldm_unet(0), lambda: M.ldm_inputs(1), M.run_ldm, M.LDM_CONTEXT, M.LDM_WIDTHS),
    "ldm-linear": (
        lambda: M.ldm_unet(2, use_linear=True),
        lambda: M.ldm_inputs(3),
        M.run_ldm,
        M.LDM_CONTEXT,
        M.LDM_WIDTHS,
    ),
    "diffusers-sd1": (
        lambda: M.diffusers_sd1_unet(4),
        lambda: M.diffusers_inputs(5),
        M.run_diffusers,
        M.LDM_CONTEXT,
        M.LDM_WIDTHS,
    ),
    "diffusers-sdxl": (
        lambda: M.diffusers_sdxl_unet(6),
        lambda: M.diffusers_inputs(7, context_dim=M.SDXL_CONTEXT, sdxl=True),
        M.run_diffusers,
        M.SDXL_CONTEXT,
        M.SDXL_WIDTHS,
    ),
}


@pytest.fixture(scope="module")
def built():
    cache = {}

    def get(name):
        if name not in cache:
            make, inputs, run, context, widths = MODELS[name]
            cache[name] = (make(), inputs(), run, context, widths)
        return cache[name]

    return get


def make(widths, activation="relu", structure=(1, 2, 1), seed=0, **kwargs):
    return visible(hx.create(widths, structure, activation, "XavierNormal", seed=seed, **kwargs), seed)


def assert_matches_reference(model, inputs, run, entries):
    plain = run(model, inputs)
    expected = run(reference_model(model, entries), inputs)
    with hx.apply(model, entries):
        got = run(model, inputs)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    return plain, got


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("activation,layer_norm", [("linear", False), ("relu", True), ("swish", False)])
def test_single_network_matches_reference(built, model_name, activation, layer_norm):
    model, inputs, run, context, widths = built(model_name)
    net = make([context, *widths], activation, layer_norm=layer_norm)
    plain, got = assert_matches_reference(model, inputs, run, [(net, 0.8)])
    assert (got - plain).abs().max() > 1e-2  # the network really acts


@pytest.mark.parametrize("activation", [*sorted(FUNCTIONS), "prelu"])
def test_every_activation_family_on_ldm(built, activation):
    model, inputs, run, context, widths = built("ldm")
    net = make([context, *widths], activation, activate_output=True, layer_norm=activation in ("relu", "gelu"))
    assert_matches_reference(model, inputs, run, [(net, 1.0)])


@pytest.mark.parametrize("structure,dropout", [((1, 2, 2, 1), (0, 0.3, 0.1, 0)), ((1, 1.5, 0.5, 1), (0, 0, 0.2, 0.1))])
def test_dropout_structures_and_float_structures(built, structure, dropout):
    model, inputs, run, context, widths = built("diffusers-sd1")
    net = make([context, *widths], "elu", structure, dropout_structure=dropout)
    _, first = assert_matches_reference(model, inputs, run, [(net, 1.0)])
    with hx.apply(model, [(net, 1.0)]):
        assert torch.equal(run(model, inputs), first)  # dropout is off at inference: deterministic


@pytest.mark.parametrize("model_name", ["ldm", "diffusers-sdxl"])
def test_stacked_networks_with_negative_and_zero_multipliers(built, model_name):
    model, inputs, run, context, widths = built(model_name)
    a = make([context, *widths], "relu", seed=1)
    b = make([context, widths[0]], "tanh", layer_norm=True, seed=2)
    c = make([widths[1]], "linear", seed=3)
    entries = [(a, 0.7), (b, -0.5), (c, 0.0), (a, 0.3)]
    assert_matches_reference(model, inputs, run, entries)


def test_order_matters(built):
    model, inputs, run, context, widths = built("ldm")
    a, b = make([context, *widths], "relu", seed=1), make([context, *widths], "tanh", seed=2)
    with hx.apply(model, [(a, 1.0), (b, 1.0)]):
        ab = run(model, inputs)
    with hx.apply(model, [(b, 1.0), (a, 1.0)]):
        ba = run(model, inputs)
    assert (ab - ba).abs().max() > 1e-4


@pytest.mark.parametrize("model_name", ["ldm", "diffusers-sd1"])
def test_cross_attention_only_network(built, model_name):
    model, inputs, run, context, _widths = built(model_name)
    net = make([context], "relu")
    plain, got = assert_matches_reference(model, inputs, run, [(net, 1.0)])
    assert (got - plain).abs().max() > 1e-3
    changed = []
    hooks = [
        s.module.to_k.register_forward_pre_hook(lambda m, a, s=s: changed.append((s.kind, a[0].shape[-1])))
        for s in find_attention_sites(model)
    ]
    with hx.apply(model, [(net, 1.0)]):
        run(model, inputs)
    for h in hooks:
        h.remove()
    assert {kind for kind, width in changed if width == context} == {"cross"}


def test_widths_without_a_module_pass_unchanged(built):
    model, inputs, run, *_ = built("ldm")
    plain = run(model, inputs)
    with hx.apply(model, [(make([999, 123]), 1.0)]):
        assert torch.equal(run(model, inputs), plain)


def test_query_is_untouched_and_keys_values_change():
    from ldm.modules.attention import CrossAttention

    torch.manual_seed(0)
    attention = M.randomise(CrossAttention(query_dim=32, context_dim=48, heads=4, dim_head=8), 1)
    x, context = torch.randn(2, 16, 32), torch.randn(2, 7, 48)
    seen = {}
    for name in ("to_q", "to_k", "to_v"):
        getattr(attention, name).register_forward_hook(
            lambda m, args, out, n=name: seen.__setitem__(n, args[0].clone())
        )
    with torch.no_grad():
        attention(x, context)
        plain = dict(seen)
        net = make([48, 32])
        with hx.apply(attention, [(net, 1.0)]):
            attention(x, context)
    assert torch.equal(seen["to_q"], plain["to_q"])
    k_module, v_module = net.layers[48]
    torch.testing.assert_close(seen["to_k"], k_module(context, 1.0))
    torch.testing.assert_close(seen["to_v"], v_module(context, 1.0))
    assert not torch.allclose(seen["to_k"], seen["to_v"])


@pytest.mark.parametrize("model_name", list(MODELS))
def test_remove_restores_the_model_bit_for_bit(built, model_name):
    model, inputs, run, context, widths = built(model_name)
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    plain = run(model, inputs)
    handle = hx.apply(model, [(make([context, *widths]), 1.0)])
    assert handle.attached and not torch.equal(run(model, inputs), plain)
    handle.remove()
    handle.remove()  # idempotent
    assert torch.equal(run(model, inputs), plain)
    after_state = model.state_dict()
    assert list(after_state) == list(before_state)
    assert all(torch.equal(after_state[k], before_state[k]) for k in before_state)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_attaching_the_same_handle_twice_applies_once(built):
    model, inputs, run, context, widths = built("ldm")
    net = make([context, *widths])
    with hx.apply(model, [(net, 1.0)]):
        once = run(model, inputs)
    handle = hx.apply(model, [(net, 1.0)])
    handle.attach()
    with handle:
        assert torch.equal(run(model, inputs), once)
    assert not handle.attached
    sites = find_attention_sites(model)
    handle.attach().attach()
    assert all(len(s.key_projection._forward_pre_hooks) == 1 for s in sites)
    handle.remove()


def test_empty_list_changes_nothing(built):
    model, inputs, run, *_ = built("diffusers-sd1")
    plain = run(model, inputs)
    with hx.apply(model, []) as handle:
        assert not handle.attached
        assert all(not m._forward_pre_hooks for m in model.modules())
        assert torch.equal(run(model, inputs), plain)


def test_update_swaps_networks_and_detaches_when_empty(built):
    model, inputs, run, context, widths = built("ldm")
    a, b = make([context, *widths], seed=1), make([context, *widths], seed=2)
    with hx.apply(model, [(b, 0.5)]):
        only_b = run(model, inputs)
    handle = hx.apply(model, [(a, 1.0)])
    handle.update([(b, 0.5)])
    assert torch.equal(run(model, inputs), only_b)
    handle.update([])
    assert not handle.attached and all(not m._forward_pre_hooks for m in model.modules())


def test_key_value_self_cross_and_block_factors_match_reference(built):
    model, inputs, run, context, widths = built("diffusers-sd1")
    net = make([context, *widths], "relu")
    strength = Strength(
        multiplier=0.9,
        key=0.5,
        value=1.5,
        self_attn=0.25,
        cross_attn=2.0,
        blocks=(("in", 0.0), ("OUT02", 3.0), ("mid", 0.5)),
    )
    sites = {s.name: s for s in find_attention_sites(model)}

    def factor(name, path):
        site = sites[name]
        return strength.site_factor(site.kind, site.block, path) / strength.multiplier

    expected = run(reference_model(model, [(net, 0.9)], key_factor=factor), inputs)
    with hx.apply(model, [(net, strength)]):
        got = run(model, inputs)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert factor("down_blocks.0.attentions.0.transformer_blocks.0.attn1", "key") == 0.0
    assert factor("up_blocks.1.attentions.0.transformer_blocks.0.attn2", "value") == pytest.approx(1.5 * 2.0 * 3.0)


def test_block_ids_agree_between_ldm_and_diffusers(built):
    ldm_blocks = [(s.kind, s.block) for s in find_attention_sites(built("ldm")[0])]
    diffusers_blocks = [(s.kind, s.block) for s in find_attention_sites(built("diffusers-sd1")[0])]
    assert sorted(ldm_blocks) == sorted(diffusers_blocks)
    assert {b for _, b in ldm_blocks} == {"IN01", "IN03", "M00", "OUT00", "OUT01", "OUT02", "OUT03"}


def test_schedule_and_negative_pass_factors():
    net = make([8], "relu")
    x = torch.randn(4, 3, 8)
    strength = Strength(multiplier=1.0, start=0.25, stop=0.75, fade_in=0.25, uncond=0.0)
    rewriter = KVRewriter([(net, strength)])
    k = net.layers[8][0]
    rewriter.runtime.progress = 0.1
    assert torch.equal(rewriter.rewrite(x, "key", kind="self"), x)  # before the window
    rewriter.runtime.progress = 0.375  # half-way through the fade-in
    torch.testing.assert_close(rewriter.rewrite(x, "key", kind="self"), k(x, 0.5))
    rewriter.runtime.progress = 0.8
    assert torch.equal(rewriter.rewrite(x, "key", kind="self"), x)  # after the window
    rewriter.runtime.progress = 0.6
    rewriter.runtime.uncond_rows = torch.tensor([False, False, True, True])
    got = rewriter.rewrite(x, "key", kind="self")
    torch.testing.assert_close(got[:2], k(x[:2], 1.0))
    assert torch.equal(got[2:], x[2:])


def test_training_mode_network_ignores_multiplier():
    net = make([8], "relu")
    x = torch.randn(2, 3, 8)
    rewriter = KVRewriter([(net, Strength(multiplier=0.25))])
    net.train()
    y = rewriter.rewrite(x, "value", kind="self")
    torch.testing.assert_close(y, x + net.layers[8][1].linear(x))
    y.sum().backward()
    assert net.layers[8][1].linear[0].weight.grad is not None


def test_other_input_dtypes_are_computed_in_float32_and_cast_back():
    net = make([8], "relu")
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    y = KVRewriter([(net, Strength())]).rewrite(x, "key", kind="self")
    assert y.dtype == torch.float64
    torch.testing.assert_close(y.float(), net.layers[8][0](x.float(), 1.0))
    bf16 = KVRewriter([(net, Strength())], compute_dtype=torch.bfloat16).rewrite(x.bfloat16(), "key", kind="self")
    assert bf16.dtype == torch.bfloat16


def test_models_without_attention_or_with_fused_projections_are_refused():
    with pytest.raises(hx.IncompatibleNetworkError, match="no attention modules"):
        hx.apply(torch.nn.Linear(4, 4), [hx.create([4])])
    model = M.diffusers_sd1_unet(0)
    model.fuse_qkv_projections()
    with pytest.raises(hx.IncompatibleNetworkError, match="fused"):
        hx.apply(model, [hx.create([8])])


def test_bad_network_list_is_explained(built):
    model = built("ldm")[0]
    with pytest.raises(hx.InvalidConfigError, match="expected a Hypernetwork"):
        hx.apply(model, [("name", 1.0)])
    with pytest.raises(hx.InvalidConfigError, match="finite"):
        hx.apply(model, [(hx.create([8]), float("nan"))])


def test_rewrite_pair_equals_two_rewrites():
    net = make([8], "relu")
    rewriter = KVRewriter([(net, Strength(key=0.5, value=2.0))])
    k_in, v_in = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    k, v = rewriter.rewrite_pair(k_in, v_in, kind="cross")
    torch.testing.assert_close(k, net.layers[8][0](k_in, 0.5))
    torch.testing.assert_close(v, net.layers[8][1](v_in, 2.0))
