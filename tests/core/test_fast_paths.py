"""The fast paths give what the plain computation gives.

Each test runs real ldm/diffusers UNets (small configs, fixed seeds) several times, since folds
and cached contexts only serve from the second call on, and compares with the independent
reference formula (tests/support/reference.py) or with ``fast=False``. ``stats`` proves the fast
path under test was really taken.
"""

from __future__ import annotations

import pytest
import torch

import hypernetwork_ext as hx
from hypernetwork_ext import fastpath
from hypernetwork_ext.attach import KVRewriter, find_attention_sites
from hypernetwork_ext.fastpath import fold_weights
from hypernetwork_ext.strength import Strength
from tests.support import models as M
from tests.support.a1111_lora import A1111Lora, LoraNetwork
from tests.support.networks import perturbed as visible
from tests.support.reference import reference_model

WIDTHS = (M.LDM_CONTEXT, *M.LDM_WIDTHS)
TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}


def make(widths=WIDTHS, activation="linear", seed=0, **kwargs):
    return visible(hx.create(widths, (1, 2, 1), activation, "XavierNormal", seed=seed, **kwargs), seed)


@pytest.fixture(scope="module")
def ldm():
    return M.ldm_unet(0)


@pytest.fixture(scope="module")
def ldm_inputs():
    return M.ldm_inputs(1)


def run_fresh(model, inputs):
    """One step as samplers run it: the conditioning is a new tensor with the same values."""
    return M.run_ldm(model, {**inputs, "context": inputs["context"].clone()})


def steps(model, inputs, count=3):
    return [run_fresh(model, inputs) for _ in range(count)]


def assert_all_close(outputs, expected):
    for output in outputs:
        torch.testing.assert_close(output, expected, **TOLERANCE)


def reference(model, inputs, entries, **kwargs):
    return M.run_ldm(reference_model(model, entries, **kwargs), inputs)


# -- affine networks: folded into self-attention projections ---------------------------------------
def test_affine_network_is_folded_and_exact(ldm, ldm_inputs):
    net = make()
    expected = reference(ldm, ldm_inputs, [(net, 0.8)])
    with hx.apply(ldm, [(net, 0.8)]) as handle:
        outputs = steps(ldm, ldm_inputs)
        stats = dict(handle.stats)
    assert_all_close(outputs, expected)
    self_projections = 2 * sum(site.kind == "self" for site in find_attention_sites(ldm))
    assert stats["folds"] == self_projections  # once, at the first step
    assert stats["folded_calls"] == 3 * self_projections
    assert stats.get("computed_calls", 0) == 0  # no network ran on hidden states
    assert stats["context_computed"] == 2 and stats["context_hits"] == 3 * 2 * 7 - 2


def test_fold_false_keeps_the_weights_unfolded(ldm, ldm_inputs):
    net = make()
    expected = reference(ldm, ldm_inputs, [(net, 0.8)])
    with hx.apply(ldm, [(net, 0.8)], fold=False) as handle:
        assert all("forward" not in projection.__dict__ for projection in _projections(ldm))
        assert_all_close(steps(ldm, ldm_inputs, 2), expected)
        assert handle.stats.get("folds", 0) == 0 and handle.stats["paired_calls"] == 2 * 7


@pytest.mark.parametrize("model_name", ["diffusers-sd1", "diffusers-sdxl"])
def test_affine_folding_on_diffusers(model_name):
    if model_name == "diffusers-sd1":
        model, inputs, context, widths = M.diffusers_sd1_unet(4), M.diffusers_inputs(5), M.LDM_CONTEXT, M.LDM_WIDTHS
    else:
        model = M.diffusers_sdxl_unet(6)
        inputs = M.diffusers_inputs(7, context_dim=M.SDXL_CONTEXT, sdxl=True)
        context, widths = M.SDXL_CONTEXT, M.SDXL_WIDTHS
    net = make((context, *widths))
    expected = M.run_diffusers(reference_model(model, [(net, 0.7)]), inputs)
    with hx.apply(model, [(net, 0.7)]) as handle:
        outputs = [M.run_diffusers(model, inputs) for _ in range(2)]
        assert handle.stats["folded_calls"] > 0
    assert_all_close(outputs, expected)


def test_stacked_affine_with_negative_zero_and_site_factors(ldm, ldm_inputs):
    a, b, c = make(seed=1), make(seed=2), make(WIDTHS[1:], seed=3)
    strength = Strength(multiplier=0.9, key=0.5, value=1.5, self_attn=0.7, blocks=(("IN01", 0.0), ("OUT02", 2.0)))
    entries = [(a, strength), (b, -0.6), (c, 0.0), (a, 0.3)]
    with hx.apply(ldm, entries, fast=False):
        plain = run_fresh(ldm, ldm_inputs)
    with hx.apply(ldm, entries) as handle:
        outputs = steps(ldm, ldm_inputs)
        assert handle.stats["folds"] > 0 and handle.stats.get("computed_calls", 0) == 0
    assert_all_close(outputs, plain)
    expected_without_factors = reference(ldm, ldm_inputs, [(a, 0.9), (b, -0.6), (a, 0.3)])
    assert not torch.allclose(plain, expected_without_factors)  # the factors really matter


def test_nonlinear_then_affine_folds_the_affine_tail(ldm, ldm_inputs):
    relu, linear = make(activation="relu", layer_norm=True, seed=4), make(seed=5)
    entries = [(relu, 0.7), (linear, 0.5)]
    expected = reference(ldm, ldm_inputs, entries[:1])
    with hx.apply(ldm, entries, fast=False):
        plain = run_fresh(ldm, ldm_inputs)
    with hx.apply(ldm, entries) as handle:
        outputs = steps(ldm, ldm_inputs)
        stats = dict(handle.stats)
    assert_all_close(outputs, plain)
    assert not torch.allclose(plain, expected)  # the affine tail really acts
    assert stats["folded_calls"] > 0 and stats["paired_calls"] > 0  # relu part computed for k and v at once


def test_affine_then_nonlinear_is_computed_not_folded(ldm, ldm_inputs):
    entries = [(make(seed=6), 0.7), (make(activation="tanh", seed=7), 0.5)]
    with hx.apply(ldm, entries, fast=False):
        plain = run_fresh(ldm, ldm_inputs)
    with hx.apply(ldm, entries) as handle:
        outputs = steps(ldm, ldm_inputs)
        assert handle.stats.get("folds", 0) == 0 and handle.stats["computed_calls"] > 0
    assert_all_close(outputs, plain)


def test_fold_math_equals_projection_of_rewritten_input():
    torch.manual_seed(0)
    weight, bias, x = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, dtype=torch.float64), torch.randn(3, 5)
    affines = [(torch.randn(5, 5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)) for _ in range(3)]
    multipliers = (0.5, -1.25, 2.0)
    y = x.double()
    for (matrix, vector), m in zip(affines, multipliers, strict=True):
        y = y + m * (y @ matrix.T + vector)
    folded, folded_bias = fold_weights(weight, bias, affines, multipliers)
    torch.testing.assert_close(x.double() @ folded.T + folded_bias, y @ weight.T + bias)
    folded, folded_bias = fold_weights(weight, None, affines, multipliers)
    torch.testing.assert_close(x.double() @ folded.T + folded_bias, y @ weight.T)


def test_folds_and_contexts_are_exact_under_the_hosts_autocast(ldm, ldm_inputs):
    net = make(activation="linear")
    expected = reference(ldm, ldm_inputs, [(net, 0.8)])
    with hx.apply(ldm, [(net, 0.8)]) as handle:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            run_fresh(ldm, ldm_inputs)  # folds and composes inside the host's autocast
        outputs = steps(ldm, ldm_inputs, 2)  # then runs without it
        assert handle.stats["folds"] == 2 * 7 and handle.stats["folded_calls"] == 3 * 2 * 7
        assert handle.stats["context_computed"] == 2 * 2  # a bfloat16 context does not serve float32
    assert_all_close(outputs, expected)


# -- nonlinear networks: context once, key and value together --------------------------------------
@pytest.mark.parametrize(
    "activation,layer_norm", [("relu", True), ("gelu", False), ("prelu", False), ("softmax", False)]
)
def test_nonlinear_networks_match_reference(ldm, ldm_inputs, activation, layer_norm):
    net = make(activation=activation, layer_norm=layer_norm, activate_output=activation == "softmax")
    expected = reference(ldm, ldm_inputs, [(net, 0.8)])
    with hx.apply(ldm, [(net, 0.8)]) as handle:
        outputs = steps(ldm, ldm_inputs)
        stats = dict(handle.stats)
    assert_all_close(outputs, expected)
    assert stats["context_computed"] == 2  # key and value context once, then cached
    assert stats["paired_calls"] == stats["computed_calls"] == 3 * 7  # every self-attention call paired


def test_three_stacked_nonlinear_networks(ldm, ldm_inputs):
    entries = [
        (make(activation="relu", layer_norm=True, seed=1), 0.8),
        (make(activation="elu", seed=2), -0.5),
        (make(activation="swish", seed=3), 0.6),
    ]
    with hx.apply(ldm, entries, fast=False):
        plain = run_fresh(ldm, ldm_inputs)
    with hx.apply(ldm, entries):
        outputs = steps(ldm, ldm_inputs)
    assert_all_close(outputs, plain)


def _deep_and_stacked():
    return {
        "deep-negative": [
            (visible(hx.create(WIDTHS, (1, 1.5, 1.5, 1), "elu", "XavierNormal", seed=4, layer_norm=True), 4), -0.7)
        ],
        "stacked": [(make(activation="relu", layer_norm=True, seed=1), 0.8), (make(activation="elu", seed=2), -0.5)],
    }


@pytest.mark.parametrize("case", ["deep-negative", "stacked"])
@pytest.mark.parametrize("unet", ["ldm", "diffusers"])
def test_nonlinear_networks_round_as_a1111s_formula(unet, case):
    """Bit for bit what A1111's ``x + linear(x) * m`` gives: the real SD.Next rendered a
    ``<hypernet:...:-0.7>`` image 6/255 away from the formula when the sum was fused (one rounding)."""
    if unet == "ldm":
        model, inputs, run, context = M.ldm_unet(0), M.ldm_inputs(1), M.run_ldm, "context"
    else:
        model, inputs, run, context = (
            M.diffusers_sd1_unet(0),
            M.diffusers_inputs(1),
            M.run_diffusers,
            "encoder_hidden_states",
        )
    entries = _deep_and_stacked()[case]
    expected = run(reference_model(model, entries), inputs)
    with hx.apply(model, entries, fast=False):
        assert torch.equal(run(model, inputs), expected)
    with hx.apply(model, entries) as handle:
        outputs = [run(model, {**inputs, context: inputs[context].clone()}) for _ in range(3)]
        stats = dict(handle.stats)
    assert all(torch.equal(output, expected) for output in outputs)
    assert stats["context_hits"] > 0 and stats["paired_calls"] > 0  # the fast paths served it
    assert stats["paired_first_layers"] > 0  # on CPU the batched GEMM gives the same bits


def test_a_batched_gemm_that_rounds_otherwise_is_not_used(ldm, ldm_inputs, monkeypatch):
    """Where a batched first-layer GEMM gives other bits than two separate ones (a kernel chosen per
    shape), the two paths keep their own GEMMs."""
    original = fastpath._PairPlan._first_layers

    def other_rounding(self, x):
        return tuple(torch.nextafter(out, torch.full_like(out, float("inf"))) for out in original(self, x))

    monkeypatch.setattr(fastpath._PairPlan, "_first_layers", other_rounding)
    entries = _deep_and_stacked()["stacked"]
    expected = M.run_ldm(reference_model(ldm, entries), ldm_inputs)
    with hx.apply(ldm, entries) as handle:
        outputs = steps(ldm, ldm_inputs)
        stats = dict(handle.stats)
    assert all(torch.equal(output, expected) for output in outputs)
    assert stats["pairs_unlike_apart"] > 0 and stats.get("paired_first_layers", 0) == 0
    assert stats["paired_calls"] > 0  # to_v still takes what the to_k call computed


def test_context_cache_follows_context_values(ldm, ldm_inputs):
    net = make(activation="relu", layer_norm=True)
    other_inputs = {**ldm_inputs, "context": torch.randn_like(ldm_inputs["context"])}
    expected = reference(ldm, ldm_inputs, [(net, 1.0)])
    expected_other = reference(ldm, other_inputs, [(net, 1.0)])
    with hx.apply(ldm, [(net, 1.0)]) as handle:
        torch.testing.assert_close(run_fresh(ldm, ldm_inputs), expected, **TOLERANCE)
        torch.testing.assert_close(run_fresh(ldm, other_inputs), expected_other, **TOLERANCE)
        torch.testing.assert_close(run_fresh(ldm, ldm_inputs), expected, **TOLERANCE)  # both kept
        assert handle.stats["context_misses"] == 2
        mutable = ldm_inputs["context"].clone()
        torch.testing.assert_close(M.run_ldm(ldm, {**ldm_inputs, "context": mutable}), expected, **TOLERANCE)
        mutable.copy_(other_inputs["context"])  # same tensor object, new values
        torch.testing.assert_close(M.run_ldm(ldm, {**ldm_inputs, "context": mutable}), expected_other, **TOLERANCE)


@pytest.mark.parametrize(
    ("batched", "limit", "expected"),
    [(None, fastpath.CPU_BATCHED_OUTPUT_LIMIT, 2), (None, 10, 0), (True, 10, 2), (False, 1 << 30, 0)],
    ids=["auto-small", "auto-large", "forced", "off"],
)
def test_rewrite_pair_of_one_tensor_equals_two_plain_rewrites(monkeypatch, batched, limit, expected):
    """The value path is computed along with the key path; its first layer shares one batched GEMM
    where that pays (GPUs; on CPU while the joint output stays cache-sized)."""
    monkeypatch.setattr(fastpath, "CPU_BATCHED_OUTPUT_LIMIT", limit)
    net = make((8,), activation="relu", layer_norm=True)
    strength = Strength(key=0.5, value=2.0)
    fast, plain = KVRewriter([(net, strength)]), KVRewriter([(net, strength)], fast=False)
    fast._engine.batch_first_layers = batched
    for kind in ("self", "cross"):
        x = torch.randn(2, 5, 8)
        k, v = fast.rewrite_pair(x, x, kind=kind)
        torch.testing.assert_close(k, plain.rewrite(x, "key", kind=kind))
        torch.testing.assert_close(v, plain.rewrite(x, "value", kind=kind))
    assert fast.stats["paired_calls"] == 1
    assert fast.stats["paired_first_layers"] == expected


def test_pairing_stops_where_the_host_never_reuses_the_tensor():
    net = make((8, 16), activation="relu")
    rewriter = KVRewriter([(net, Strength())])
    for _ in range(6):
        rewriter.rewrite(torch.randn(2, 3, 8), "key", kind="self")
        rewriter.rewrite(torch.randn(2, 3, 8), "value", kind="self")  # another tensor: no use
        x = torch.randn(2, 3, 16)
        rewriter.rewrite(x, "key", kind="self")
        rewriter.rewrite(x, "value", kind="self")
    assert not rewriter._engine.pairs(("key", "self", None, 8, False))
    assert rewriter._engine.pairs(("key", "self", None, 16, False)) and rewriter.stats["paired_calls"] == 6


# -- multipliers that change: schedules, negative pass, zero ---------------------------------------
def test_fade_in_uses_no_fold_until_the_plateau(ldm, ldm_inputs):
    net = make()
    strength = Strength(multiplier=0.8, fade_in=0.5)
    fast = hx.apply(ldm, [(net, strength)])
    fast.remove()
    plain = hx.apply(ldm, [(net, strength)], fast=False)
    plain.remove()
    progress_values = [0.0, 0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9]
    folds_seen = []
    for progress in progress_values:
        fast.runtime.progress = plain.runtime.progress = progress
        with plain:
            expected = run_fresh(ldm, ldm_inputs)
        with fast:
            got = run_fresh(ldm, ldm_inputs)
        torch.testing.assert_close(got, expected, **TOLERANCE)
        folds_seen.append(fast.stats["folds"])
    self_projections = 2 * 7
    assert folds_seen[:6] == [0] * 6  # fading (and the first plateau step): composite matrices
    assert folds_seen[6:] == [self_projections] * 3  # plateau seen twice: folded once
    assert fast.stats["composite_calls"] == 5 * self_projections  # progress 0 costs nothing at all


@pytest.mark.parametrize("activation", ["linear", "relu"])
@pytest.mark.parametrize("uncond", [0.0, 0.5])
def test_negative_pass_factor(ldm, ldm_inputs, activation, uncond):
    entries = [(make(activation=activation, seed=8), Strength(multiplier=0.9, uncond=uncond))]
    rows = torch.tensor([True, False])
    fast = hx.apply(ldm, entries)
    plain = hx.apply(ldm, entries, fast=False)
    plain.remove()
    fast.runtime.uncond_rows = plain.runtime.uncond_rows = rows
    outputs = steps(ldm, ldm_inputs)
    fast.remove()
    with plain:
        expected = run_fresh(ldm, ldm_inputs)
    assert_all_close(outputs, expected)
    if uncond == 0.0 and activation == "relu":
        assert fast.stats["zero_rows_skipped"] > 0
    if activation == "linear":
        assert fast.stats["folds"] == (1 if uncond == 0.0 else 2) * 2 * 7  # cond and uncond folds


def test_zero_multiplier_attaches_nothing(ldm, ldm_inputs):
    plain = run_fresh(ldm, ldm_inputs)
    with hx.apply(ldm, [(make(activation="relu"), 0.0)]) as handle:
        assert not handle.attached
        assert all(not m._forward_pre_hooks and "forward" not in m.__dict__ for m in _projections(ldm))
        assert torch.equal(run_fresh(ldm, ldm_inputs), plain)
    with hx.apply(ldm, [(make(activation="relu"), Strength(self_attn=0.0))]):
        assert all(not site.key_projection._forward_pre_hooks for site in _sites(ldm, "self"))


# -- dtypes ---------------------------------------------------------------------------------------------
def test_double_model_and_bfloat16_compute():
    model = M.diffusers_sd1_unet(3).double()
    inputs = M.diffusers_inputs(4)
    inputs = {key: value.double() if value.is_floating_point() else value for key, value in inputs.items()}
    cases = (
        ([(make(), 0.8)], None, TOLERANCE),
        ([(make(activation="relu", layer_norm=True), 0.8)], None, TOLERANCE),
        ([(make(), 0.8), (make(activation="relu", seed=2), 0.5)], torch.bfloat16, {"rtol": 0.05, "atol": 0.05}),
    )
    for entries, compute_dtype, tolerance in cases:
        with hx.apply(model, entries, compute_dtype=compute_dtype, fast=False):
            expected = M.run_diffusers(model, inputs)
        with hx.apply(model, entries, compute_dtype=compute_dtype) as handle:
            outputs = [M.run_diffusers(model, inputs) for _ in range(2)]
            assert handle.stats.get("plain_calls", 0) == 0
        for output in outputs:
            assert output.dtype == torch.float64
            torch.testing.assert_close(output, expected, **tolerance)


# -- the model is left as it was ---------------------------------------------------------------------
def test_remove_after_folding_restores_the_model_bit_for_bit(ldm, ldm_inputs):
    before = {key: value.clone() for key, value in ldm.state_dict().items()}
    plain = run_fresh(ldm, ldm_inputs)
    handle = hx.apply(ldm, [(make(), 1.0), (make(activation="relu", seed=1), 0.5), (make(seed=2), 0.3)])
    steps(ldm, ldm_inputs, 2)
    assert any("forward" in m.__dict__ for m in _projections(ldm))
    handle.remove()
    assert torch.equal(run_fresh(ldm, ldm_inputs), plain)
    after = ldm.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert all(not m._forward_pre_hooks and not m._forward_hooks and "forward" not in m.__dict__ for m in ldm.modules())


def test_reattaching_the_same_handle_reuses_folds(ldm, ldm_inputs):
    handle = hx.apply(ldm, [(make(), 0.8)])
    first = run_fresh(ldm, ldm_inputs)
    folds = handle.stats["folds"]
    handle.remove()
    with handle:
        assert torch.equal(run_fresh(ldm, ldm_inputs), first)
    assert handle.stats["folds"] == folds
    handle.update([(make(), 0.8)])  # other networks: everything is recomputed
    run_fresh(ldm, ldm_inputs)
    assert handle.stats["folds"] == folds + 2 * 7
    handle.remove()


def test_projection_with_its_own_instance_forward_keeps_it(ldm, ldm_inputs):
    site = _sites(ldm, "self")[0]
    projection = site.key_projection
    calls = []

    def wrapper(x, _original=projection.forward):
        calls.append(1)
        return _original(x)

    projection.forward = wrapper
    try:
        net = make()
        expected = reference(ldm, ldm_inputs, [(net, 0.8)])
        with hx.apply(ldm, [(net, 0.8)]):
            assert projection.__dict__["forward"] is wrapper and len(projection._forward_pre_hooks) == 1
            assert_all_close(steps(ldm, ldm_inputs, 2), expected)
        assert projection.__dict__["forward"] is wrapper and calls
    finally:
        del projection.forward


# -- weights that change under the fold ---------------------------------------------------------------
def test_checkpoint_switch_in_place_and_by_replacing_tensors(ldm_inputs):
    model = M.ldm_unet(10)
    other = M.ldm_unet(11).state_dict()
    net = make()
    handle = hx.apply(model, [(net, 0.8)])

    def check():
        handle.remove()  # the reference deep-copies the model: without our forwards and hooks
        expected = reference(model, ldm_inputs, [(net, 0.8)])
        with handle:
            assert_all_close(steps(model, ldm_inputs, 2), expected)

    check()
    model.load_state_dict(other)  # A1111 and Forge copy into the existing tensors
    check()
    for site in _sites(model, "self"):
        projection = site.key_projection
        projection.weight.data = projection.weight.data * 1.5  # a new tensor at a new address
    check()
    assert handle.stats["folds"] == 2 * 7 + 2 * 7 + 7


def test_a_new_model_object_gets_its_own_folds(ldm_inputs):
    net = make()
    for seed in (12, 13):
        model = M.ldm_unet(seed)
        expected = reference(model, ldm_inputs, [(net, 0.8)])
        with hx.apply(model, [(net, 0.8)]):
            assert_all_close(steps(model, ldm_inputs, 2), expected)


def test_weights_that_move_before_every_call_stop_the_folding(ldm_inputs):
    model = M.ldm_unet(14)
    net = make()
    projection = _sites(model, "self")[0].value_projection
    expected = reference(model, ldm_inputs, [(net, 0.8)])
    with hx.apply(model, [(net, 0.8)]) as handle:
        for _ in range(6):
            projection.weight.data = projection.weight.data.clone()  # like offloading between devices
            torch.testing.assert_close(run_fresh(model, ldm_inputs), expected, **TOLERANCE)
        assert handle.stats["folds"] == 2 * 7 + 2  # that projection refolded twice, then gave up
        assert handle.stats["composite_calls"] == 1 and handle.stats["computed_calls"] == 2


def test_float8_weights_cast_by_the_host_are_never_folded():
    from ldm.modules.attention import CrossAttention

    torch.manual_seed(0)
    attention = M.randomise(CrossAttention(query_dim=32, heads=4, dim_head=8), 1)  # self-attention
    x = torch.randn(2, 16, 32)
    net = make((32,))
    original_forward = torch.nn.Linear.forward

    def manual_cast_forward(self, input):  # how hosts run float8-stored weights
        return torch.nn.functional.linear(input, self.weight.to(input.dtype), self.bias)

    with torch.no_grad():
        expected = reference_model(attention, [(net, 0.8)])(x)
        handle = hx.apply(attention, [(net, 0.8)])
        assert "forward" in attention.to_k.__dict__  # bound for folding while still float32
        for projection in (attention.to_q, attention.to_k, attention.to_v):
            projection.weight.data = projection.weight.data.to(torch.float8_e4m3fn)
        torch.nn.Linear.forward = manual_cast_forward
        try:
            got = [attention(x) for _ in range(2)]
            handle.remove()
            rounded = reference_model(attention, [(net, 0.8)])(x)
            with hx.apply(attention, [(net, 0.8)]):  # bound while float8: a plain hook from the start
                assert "forward" not in attention.to_k.__dict__
                got.append(attention(x))
        finally:
            torch.nn.Linear.forward = original_forward
        assert handle.stats.get("folds", 0) == 0
    assert not torch.allclose(rounded, expected)  # float8 really rounds
    for output in got:
        torch.testing.assert_close(output, rounded, **TOLERANCE)


# -- A1111's Lora on the same layers -----------------------------------------------------------------
@pytest.fixture
def lora_model():
    model = M.ldm_unet(20)
    lora = A1111Lora()
    lora.assign_names(model)
    lora.apply()
    try:
        yield model, lora
    finally:
        lora.undo()


def lora_on_attention(model, seed, multiplier=1.0, name="style") -> LoraNetwork:
    network = LoraNetwork(name, unet_multiplier=multiplier)
    for index, (name_, module) in enumerate(model.named_modules()):
        if name_.endswith(("to_k", "to_v", "to_q")):
            network.add(module.network_layer_name, module.out_features, module.in_features, rank=4, seed=seed + index)
    return network


@pytest.mark.parametrize(
    "functional,hint",
    [(False, None), (False, True), (False, False), (True, None), (True, False)],
    ids=["merge-probe", "merge-trusted", "merge-no-fold", "functional-probe", "functional-no-fold"],
)
def test_lora_on_the_same_layers(lora_model, ldm_inputs, functional, hint):
    model, lora = lora_model
    lora.functional = functional
    net = make()
    pristine = {name: p.detach().clone() for name, p in model.named_parameters()}
    handle = hx.apply(model, [(net, 0.8)])
    handle.runtime.linear_projections = hint
    handle.remove()
    for lora_network in (lora_on_attention(model, 1), lora_on_attention(model, 1, 0.5), None):
        lora.loaded_networks = [lora_network] if lora_network else []
        with handle:
            outputs = steps(model, ldm_inputs, 2)
        expected = reference(model, ldm_inputs, [(net, 0.8)])  # through the patched Linear too
        assert_all_close(outputs, expected)
        assert not torch.allclose(outputs[0], run_fresh(model, ldm_inputs))  # the hypernetwork acts too
    for name, parameter in model.named_parameters():  # Lora restored its backup: nothing else wrote
        assert torch.equal(parameter, pristine[name]), name
    stats = handle.stats
    if hint is False:
        assert stats.get("folded_calls", 0) == 0 and stats["fold_refused"] > 0
    elif functional:  # refused while Lora adds its deltas on the fly, folded once none is loaded
        assert stats["fold_refused"] == 2 * 2 * 2 * 7 and stats["folded_calls"] == 2 * 2 * 7
    else:  # merged Lora: folded from the merged weights, refolded when the set changes
        assert stats.get("fold_refused", 0) == 0 and stats["folds"] == 3 * 2 * 7


def test_lora_backup_is_taken_from_unmodified_weights(lora_model, ldm_inputs):
    model, lora = lora_model
    projection = _sites(model, "self")[0].key_projection
    original = projection.weight.detach().clone()
    with hx.apply(model, [(make(), 0.8)]):
        run_fresh(model, ldm_inputs)  # folds while no Lora is loaded
        lora.loaded_networks = [lora_on_attention(model, 2)]
        run_fresh(model, ldm_inputs)  # Lora backs up and merges now
    assert torch.equal(projection.network_weights_backup, original)


# -- training ---------------------------------------------------------------------------------------------
def test_training_mode_keeps_the_plain_differentiable_path(ldm, ldm_inputs):
    net = make()
    with hx.apply(ldm, [(net, 0.25)]) as handle:
        run_fresh(ldm, ldm_inputs)  # folded while in eval mode
        net.train()
        try:
            out = ldm(ldm_inputs["x"], ldm_inputs["timesteps"], context=ldm_inputs["context"].clone())
            out.square().mean().backward()
            assert handle.stats["plain_calls"] > 0
        finally:
            net.eval()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    with torch.no_grad(), hx.apply(ldm, [(net, 1.0)], fast=False):  # training ignores the multiplier
        expected = ldm(ldm_inputs["x"], ldm_inputs["timesteps"], context=ldm_inputs["context"])
    torch.testing.assert_close(out.detach(), expected, **TOLERANCE)
    net.zero_grad(set_to_none=True)
    ldm.zero_grad(set_to_none=True)


def test_gradients_to_the_input_keep_the_plain_path():
    net = make((8,), activation="relu")
    rewriter = KVRewriter([(net, Strength(multiplier=0.5))])
    x = torch.randn(2, 3, 8, requires_grad=True)
    rewriter.rewrite(x, "key", kind="cross").sum().backward()
    assert x.grad is not None and rewriter.stats["plain_calls"] == 1


# -- helpers -------------------------------------------------------------------------------------------------
def _sites(model, kind):
    return [site for site in find_attention_sites(model) if site.kind == kind]


def _projections(model):
    for site in find_attention_sites(model):
        yield site.key_projection
        yield site.value_projection


# -- Forge and reForge sample inside torch.inference_mode() -------------------------------------------
# Every tensor made there is an inference tensor, which has no version counter: reading
# ``_version`` raises. Found in the real Forge and reForge, where every tagged generation failed.
INFERENCE_CASES = {
    "affine-folded": lambda: [(make(seed=30), 0.8)],
    "nonlinear-paired": lambda: [(make(activation="relu", layer_norm=True, seed=31), 0.8)],
    "stacked": lambda: [(make(activation="relu", seed=32), 0.7), (make(seed=33), -0.5), (make(seed=34), 0.3)],
    "negative-pass": lambda: [(make(activation="relu", seed=35), Strength(multiplier=0.9, uncond=0.0))],
    "negative-pass-affine": lambda: [(make(seed=36), Strength(multiplier=0.9, uncond=0.5))],
}


@pytest.mark.parametrize("case", sorted(INFERENCE_CASES))
@pytest.mark.parametrize("compute_dtype", [None, torch.float64], ids=["same-dtype", "converted-copies"])
def test_every_fast_path_runs_under_inference_mode(ldm, ldm_inputs, case, compute_dtype):
    entries = INFERENCE_CASES[case]()
    with hx.apply(ldm, entries, compute_dtype=compute_dtype, fast=False) as plain:
        plain.runtime.uncond_rows = torch.tensor([True, False])
        expected = run_fresh(ldm, ldm_inputs)
    with hx.apply(ldm, entries, compute_dtype=compute_dtype) as handle:
        outputs = []
        for _ in range(3):
            with torch.inference_mode():
                handle.runtime.uncond_rows = torch.tensor([True, False])  # made while sampling, as Forge does
                outputs.append(run_fresh(ldm, ldm_inputs))
        outputs.append(run_fresh(ldm, ldm_inputs))  # and outside it again, with what was kept
    assert_all_close(outputs, expected)


def test_network_moved_and_cached_inside_inference_mode(ldm, ldm_inputs):
    """A network first used (moved, copied, composed, folded) inside inference mode, then outside."""
    net = make(seed=37)
    expected = reference(ldm, ldm_inputs, [(net, 0.6)])
    with torch.inference_mode():
        moved = net.to(torch.float64).to(torch.float32)  # parameters replaced by inference tensors
    with hx.apply(ldm, [(moved, 0.6)]) as handle:
        with torch.inference_mode():
            outputs = steps(ldm, ldm_inputs, 2)
        outputs += steps(ldm, ldm_inputs, 1)
        assert handle.stats["folded_calls"] > 0 or handle.stats["composite_calls"] > 0
    assert_all_close(outputs, expected)
