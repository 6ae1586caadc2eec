"""What the fast paths hold between calls: measured exactly, bounded by the fold limit (with the same
output beyond it), and let go when the model's weights leave their device.

Real ldm UNets (small configs, fixed seeds); "the same output" means equal to the unbounded fast
path and to the reference formula within float rounding, as for every fast path.
"""

from __future__ import annotations

import collections

import pytest
import torch

import hypernetwork_ext as hx
from hypernetwork_ext import fastpath
from hypernetwork_ext.attach import find_attention_sites
from hypernetwork_ext.families import FAMILIES, ModelFamily
from hypernetwork_ext.footprint import expected_bytes
from hypernetwork_ext.memory import FoldBudget, HeldMemory, fold_set_bytes, limit_from_mib
from tests.support import models as M
from tests.support.networks import perturbed
from tests.support.reference import reference_model

WIDTHS = (M.LDM_CONTEXT, *M.LDM_WIDTHS)
TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}


def make(activation="linear", seed=0):
    return perturbed(hx.create(WIDTHS, (1, 2, 1), activation, "XavierNormal", seed=seed), seed)


@pytest.fixture(scope="module")
def inputs():
    return M.ldm_inputs(1)


def step(model, inputs):
    return M.run_ldm(model, {**inputs, "context": inputs["context"].clone()})


def self_sites(model):
    return [site for site in find_attention_sites(model) if site.kind == "self"]


def one_fold_set(model) -> int:
    return sum(
        fastpath.fold_bytes(projection.weight)
        for site in self_sites(model)
        for projection in (site.key_projection, site.value_projection)
    )


def layout_of(model) -> ModelFamily:
    """The small UNet described as a family, for the figures worked out before running."""
    counts = collections.Counter(site.key_projection.in_features for site in self_sites(model))
    return ModelFamily("small", "small", M.LDM_CONTEXT, tuple(sorted(counts)), tuple(sorted(counts.items())))


# -- measured ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("activation", ["linear", "relu"])
def test_what_is_held_is_measured_and_matches_the_worked_out_figures(monkeypatch, inputs, activation):
    monkeypatch.setattr(fastpath.Engine, "batch_first_layers", True)  # as on a GPU, which footprint describes
    model = M.ldm_unet(20)
    net = make(activation)
    # float64 networks on a float32 UNet: copies are made, as on a GPU where networks come from the CPU
    with hx.apply(model, [(net, 0.8)], compute_dtype=torch.float64) as handle:
        step(model, inputs)
        step(model, inputs)
        held = handle.memory()
    kinds = held.kinds("cpu")
    expected = expected_bytes(net, layout_of(model), unet_element_size=4, compute_element_size=8)
    assert kinds["folds"] == (one_fold_set(model) if activation == "linear" else 0) == expected["folds"]
    for kind in ("network_copies", "composites", "paired_layers"):
        assert kinds[kind] == expected[kind], kind
    assert 0 < kinds["contexts"] < 64 * 1024 and kinds["old_unet_weights"] == 0
    assert held.total == sum(kinds.values()) == held.on("cpu") and held.folds == (14 if activation == "linear" else 0)


def test_shared_storage_counts_once():
    base = torch.zeros(1000)
    held = HeldMemory.measure([("folds", base), ("contexts", base[:10]), ("contexts", torch.zeros(5))])
    assert held.kinds() == {**held.kinds(), "folds": 4000, "contexts": 20} and held.total == 4020
    assert HeldMemory.measure([("folds", torch.zeros(3, device="meta"))]).total == 0


def test_family_layouts_are_the_real_unets():
    """The attention layouts behind ``inspect``'s figures are those of SD1.5's ldm UNet (built on
    the meta device from its configuration) and of diffusers' SDXL UNet."""
    from diffusers import UNet2DConditionModel
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    with torch.device("meta"):
        sd15 = UNetModel(
            image_size=64, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
            num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
            transformer_depth=1, context_dim=768, legacy=False,
        )  # fmt: skip
        sdxl = UNet2DConditionModel(
            block_out_channels=(320, 640, 1280), down_block_types=(
                "DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )  # fmt: skip
    for model, family in ((sd15, FAMILIES["sd1"]), (sdxl, FAMILIES["sdxl"])):
        counts = collections.Counter(site.key_projection.in_features for site in self_sites(model))
        assert tuple(sorted(counts.items())) == family.self_attention_layers
        set_bytes = fold_set_bytes(family.self_attention_layers, family.widths, 2)
        assert set_bytes == sum(
            2 * (p.weight.numel() + p.out_features)
            for s in self_sites(model)
            for p in (s.key_projection, s.value_projection)
        )
    assert fold_set_bytes(FAMILIES["sd1"].self_attention_layers, (320, 640, 1280), 2) == 49_611_520  # ~50 MB
    assert fold_set_bytes(FAMILIES["sdxl"].self_attention_layers, (640, 1280), 2) == 409_932_800  # ~410 MB


# -- bounded ----------------------------------------------------------------------------------------------
def test_the_limit_bounds_the_folds_and_the_output_stays_the_same(inputs):
    model = M.ldm_unet(21)
    net = make()
    expected = M.run_ldm(reference_model(model, [(net, 0.8)]), inputs)
    full = one_fold_set(model)
    results = {}
    for limit in (None, full // 2, 0):
        with hx.apply(model, [(net, 0.8)], fold_limit=limit) as handle:
            outputs = [step(model, inputs) for _ in range(3)]
            held, stats = handle.memory(), dict(handle.stats)
        for output in outputs:
            torch.testing.assert_close(output, expected, **TOLERANCE)
        results[limit] = outputs[-1]
        assert held.kinds()["folds"] <= (full if limit is None else limit)
        if limit is None:
            assert held.kinds()["folds"] == full and not stats.get("unfolded_over_limit")
        else:  # some projections or all compute unfolded, at every call, without refolding
            assert stats["unfolded_over_limit"] > 0 and stats.get("folds", 0) == held.folds
            assert stats.get("folds", 0) == (0 if limit == 0 else held.folds) and held.folds < 14
    torch.testing.assert_close(results[full // 2], results[None], **TOLERANCE)
    torch.testing.assert_close(results[0], results[None], **TOLERANCE)


def test_a_lower_limit_evicts_at_once_least_recently_used_first(inputs):
    model = M.ldm_unet(22)
    net = make()
    handle = hx.apply(model, [(net, 0.8)], fold_limit=None)
    first = step(model, inputs)
    handle.remove()
    full = handle.memory().kinds()["folds"]
    handle.fold_limit = full // 3
    assert 0 < handle.memory().kinds()["folds"] <= full // 3 and handle.budget.evicted > 0
    with handle:  # the next generation: the folds left serve, the others compute unfolded
        torch.testing.assert_close(step(model, inputs), first, **TOLERANCE)
        assert handle.memory().kinds()["folds"] <= full // 3
    handle.fold_limit = 0
    assert handle.memory().kinds()["folds"] == 0 and handle.memory().folds == 0
    handle.update([])


def test_budget_evicts_only_what_an_earlier_epoch_used():
    budget = FoldBudget(300)
    states = {name: fastpath.FoldState(budget) for name in "abcd"}

    def fold(name):
        assert budget.admit(100)
        states[name].store(("m",), torch.zeros(10, 2), torch.zeros(10), ())  # 120 bytes counted as stored
        return states[name]

    for name in "ab":
        fold(name)
    budget.new_epoch()
    states["a"].lookup(("m",))  # used again in the new epoch; "b" is not
    fold("c")  # 360 > 300 would not fit: "b", least recently used and from the last epoch, goes
    assert not states["b"].folds and states["a"].folds and states["c"].folds and budget.evicted == 1
    assert not budget.admit(100)  # "a" and "c" are in use in this epoch: nothing is evicted for "d"
    assert budget.used == 240 and len(budget) == 2
    states["a"].clear()
    assert budget.used == 120 and budget.admit(100)
    assert not FoldBudget(50).admit(100) and FoldBudget(None).admit(10**12)


def test_limits_as_users_type_them():
    assert limit_from_mib(256) == 256 << 20 and limit_from_mib("0") == 0 and limit_from_mib(-1) is None
    assert limit_from_mib("lots") == 256 << 20 and limit_from_mib(float("nan"), 5) == 5


# -- released ------------------------------------------------------------------------------------------
def unet_storages(model) -> set[int]:
    return {p.untyped_storage().data_ptr() for p in model.parameters()}


def test_weights_moved_off_leave_nothing_of_theirs_held(inputs):
    """The host moves the UNet (here: new tensors for every weight, as ``.to(device)`` makes): at the
    end of the generation no fold, and no reference to the old weights, is kept."""
    model = M.ldm_unet(23)
    net = make("linear")
    handle = hx.apply(model, [(make("relu", 1), 0.5), (net, 0.8)])
    first = step(model, inputs)
    old = unet_storages(model)
    assert handle.memory().kinds()["folds"] > 0
    for parameter in model.parameters():
        parameter.data = parameter.data.clone()  # the host's move; the old storages would be freed
    assert handle.memory().kinds()["old_unet_weights"] > 0  # what a fold state still references
    handle.remove()
    held = handle.memory()
    assert held.kinds()["folds"] == 0 and held.kinds()["old_unet_weights"] == 0
    assert not {t.untyped_storage().data_ptr() for _, t in handle.held_tensors()} & old
    assert held.total > 0  # the networks' own caches are on the device the model still uses
    with handle:
        torch.testing.assert_close(step(model, inputs), first, **TOLERANCE)


def test_a_model_sent_away_leaves_nothing_held(inputs):
    """``model.to("meta")`` as A1111 discards a model: the model uses no device any more, so at
    ``remove()`` everything held goes."""
    model = M.ldm_unet(24)
    handle = hx.apply(model, [(make("relu", 1), 0.5), (make(), 0.8)])
    step(model, inputs)
    assert handle.memory().kinds()["folds"] > 0
    model.to("meta")
    handle.remove()
    assert handle.memory().total == 0 and handle.held_tensors() == []


def test_release_lets_go_of_everything_and_the_networks_keep_working(inputs):
    model = M.ldm_unet(25)
    net = make()
    with hx.apply(model, [(make("relu", 1), 0.5), (net, 0.8)]) as handle:
        first = step(model, inputs)
        before = handle.memory().total
        assert handle.release() == before > 0 and handle.memory().total == 0
        torch.testing.assert_close(step(model, inputs), first, **TOLERANCE)
        assert handle.memory().total == before


def test_release_keeps_what_is_on_the_kept_device(inputs):
    model = M.ldm_unet(26)
    with hx.apply(model, [(make(), 0.8)]) as handle:
        step(model, inputs)
        before = handle.memory().total
        assert handle.release(keep={torch.device("cpu")}) == 0 and handle.memory().total == before
        assert handle.release(keep={torch.device("meta")}) == before


def test_console_line_names_every_device_and_kind():
    held = HeldMemory({("cuda:0", "folds"): 3 << 20, ("cuda:0", "contexts"): 1 << 19}, folds=4, fold_limit=256 << 20)
    line = held.line()
    assert "3.5 MiB on cuda:0" in line and "3.0 MiB folded weights" in line and "0.5 MiB text contexts" in line
    assert "4 folds, limit 256.0 MiB" in line
    assert "holding nothing" in HeldMemory(fold_limit=None).line()
    assert held.as_dict()["devices"]["cuda:0"]["folds"] == 3 << 20


def test_the_measuring_script_runs_and_its_figures_agree(capsys):
    """benchmarks/fold_memory.py on the small UNet (seconds): both hosts' paths, the limit compared."""
    import importlib.util
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "fold_memory.py"
    spec = importlib.util.spec_from_file_location("bench_fold_memory", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    threads = torch.get_num_threads()
    try:
        spec.loader.exec_module(module)
        rows = module.main(["--families", "tiny", "--threads", "1", "--limit-mib", "0"])
    finally:
        del sys.modules[spec.name]
        torch.set_num_threads(threads)
    assert fastpath.Engine.batch_first_layers is None
    by = {(r["dtype"], r["network"], r["host"]): r for r in rows}
    linear = by[("float32", "linear", "a1111")]
    assert linear["kinds"]["folds"] == linear["limited_folds"] + one_fold_set(M.ldm_unet(0)) > 0
    assert linear["unfolded_calls"] == 14 and linear["limited_diff"] < 1e-5
    assert all(r["kinds"]["folds"] == 0 for r in rows if r["host"] == "forge" or r["network"] == "relu")
    assert "| tiny (script check) | float16 | linear | a1111 |" in capsys.readouterr().out
