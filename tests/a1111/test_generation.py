"""The real entry script against the A1111 1.10.1 stand-in: registration, tags to hooks on real ldm
attention, every named argument, messages, Reload UI, checkpoint switch, hires fix, Lora and kernels."""

import pytest
import torch

import hypernetwork_ext as hx
from hypernetwork_ext.strength import Strength
from tests.support import models as M
from tests.support.networks import webui_network as network
from tests.support.reference import reference_model
from tests.support.webui_generation import LatentDiffusion, SamplingInputs, generate, sample
from tests.support.webui_standin import StableDiffusionProcessing


def p_for(host, prompt, **kwargs):
    return StableDiffusionProcessing(sd_model=host.shared.sd_model, prompt=prompt, **kwargs)


def unet_of(host):
    return host.shared.sd_model.model.diffusion_model


def run_model(p):
    unet = p.sd_model.model.diffusion_model
    return lambda x, t, context: unet(x, t, context=context)


def hook_count(unet):
    return sum(len(m._forward_pre_hooks) for m in unet.modules())


def expected(host, inputs, entries, *, steps=4, rows=None, active_steps=None):
    """The same sampling with the reference formula; ``rows``/``active_steps`` limit where it acts."""
    unet = unet_of(host)
    twin = reference_model(unet, entries) if entries else unet
    counter = {"step": 0, "calls": 0}

    def run(x, t, context):
        plain = unet(x, t, context=context)
        changed = twin(x, t, context=context)
        step = counter["calls"]
        counter["calls"] += 1
        if active_steps is not None and step not in active_steps:
            return plain
        if rows is None:
            return changed
        mask = rows.reshape(-1, 1, 1, 1)
        return torch.where(mask, changed, plain)

    return sample(host, p_for(host, ""), inputs, steps, run)


def load(host, name):
    return hx.load(host.hypernetwork_dir / name)


def test_registration_in_before_ui(host):
    webui = __import__("hypernetwork_ext.hosts.webui", fromlist=["x"])
    handler = host.extra_networks.extra_network_registry["hypernet"]
    assert isinstance(handler, webui.HypernetExtraNetwork)
    pages = [page for page in host.ui_extra_networks.extra_pages if page.name == "hypernetworks"]
    assert len(pages) == 1 and isinstance(pages[0], webui.HypernetworksPage)
    assert [a.label for a in host.xyz.axis_options].count("[Hypernet] Strength") == 1
    keys = [k for k in host.shared.opts.data_labels if k.startswith("hypernetwork_")]
    assert len(keys) == 12 and all(  # eleven of generation (the fold limit, the builtin handler), one of training
        host.shared.opts.data_labels[k].section == ("hypernetworks", "Hypernetworks") for k in keys
    )
    assert any(type(s).__name__ == "HypernetworkScript" for s in host.script_instances)


def test_tag_to_hooks_matches_the_reference(host, inputs):
    p = p_for(host, "a cat <hypernet:anime:0.8> <lora:x:1>")
    seen = []
    unet = unet_of(host)

    def runner(p):
        def run(x, t, context):
            seen.append(hook_count(unet))
            return unet(x, t, context=context)

        return run

    (got,) = generate(host, p, inputs, runner)
    torch.testing.assert_close(got, expected(host, inputs, [(load(host, "anime.pt"), 0.8)]), rtol=1e-4, atol=1e-5)
    sites = len(hx.find_attention_sites(unet))
    assert seen == [2 * sites + 1] * 4  # one pre-hook on each to_k/to_v, one on the UNet
    assert hook_count(unet) == 0  # taken off after the generation
    assert host.shared.loaded_hypernetworks == []  # the host's own handler never ran


def test_no_tag_attaches_nothing(host, inputs):
    unet = unet_of(host)
    seen = []

    def runner(p):
        def run(x, t, context):
            seen.append(hook_count(unet))
            return unet(x, t, context=context)

        return run

    (got,) = generate(host, p_for(host, "a cat"), inputs, runner)
    assert seen == [0] * 4
    assert torch.equal(got, expected(host, inputs, []))


def test_several_tags_apply_in_order_with_subfolder_names(host, inputs):
    p = p_for(host, "<hypernet:styles/ink:-0.5> x <hypernet:anime>")
    (got,) = generate(host, p, inputs, run_model)
    want = expected(host, inputs, [(load(host, "styles/ink.safetensors"), -0.5), (load(host, "anime.pt"), 1.0)])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("batch_cond_uncond", [True, False])
def test_negative_pass_switch(host, inputs, batch_cond_uncond):
    p = p_for(host, "<hypernet:anime:1:neg=off>")
    (got,) = generate(host, p, inputs, run_model, batch_cond_uncond=batch_cond_uncond)
    entries = [(load(host, "anime.pt"), 1.0)]
    want = expected(host, inputs, entries, rows=torch.tensor([True, False]))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_step_window(host, inputs):
    (got,) = generate(host, p_for(host, "<hypernet:anime:1:start=0.5>"), inputs, run_model)
    want = expected(host, inputs, [(load(host, "anime.pt"), 1.0)], active_steps={2, 3})
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    (got,) = generate(host, p_for(host, "<hypernet:anime:1:stop=0.5>"), inputs, run_model)
    want = expected(host, inputs, [(load(host, "anime.pt"), 1.0)], active_steps={0, 1})
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_fade_in_scales_the_multiplier(host, inputs):
    (got,) = generate(host, p_for(host, "<hypernet:anime:1:fadein=0.5>"), inputs, run_model)
    net = load(host, "anime.pt")
    unet = unet_of(host)
    twins = {m: reference_model(unet, [(net, m)]) for m in (0.0, 0.5, 1.0)}
    factors = iter([0.0, 0.5, 1.0, 1.0])  # progress 0, .25, .5, .75 with a 0.5 ramp
    want = sample(host, p_for(host, ""), inputs, 4, lambda x, t, c: twins[next(factors)](x, t, context=c))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "args,strength",
    [
        ("k=0", Strength(key=0.0)),
        ("v=2:k=0.5", Strength(key=0.5, value=2.0)),
        ("self=0", Strength(self_attn=0.0)),
        ("cross=0:m=0.5", Strength(multiplier=0.5, cross_attn=0.0)),
        ("in=0:mid=2", Strength(blocks=(("in", 0.0), ("mid", 2.0)))),
        ("OUT01=0", Strength(blocks=(("OUT01", 0.0),))),
    ],
)
def test_site_arguments_match_the_core_strength(host, inputs, args, strength):
    (got,) = generate(host, p_for(host, f"<hypernet:anime:{args}>"), inputs, run_model)
    net = load(host, "anime.pt")
    unet = unet_of(host)
    with hx.apply(unet, [(net, strength)]):
        want = sample(host, p_for(host, ""), inputs, 4, run_model(p_for(host, "")))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, expected(host, inputs, [(net, 1.0)]), atol=1e-5)


def test_block_vector_for_the_loaded_model(host, inputs):
    from hypernetwork_ext.shape import model_shape

    blocks = model_shape(unet_of(host)).blocks
    vector = ",".join("0" if i % 2 else "1" for i in range(len(blocks)))
    (got,) = generate(host, p_for(host, f"<hypernet:anime:bw={vector}>"), inputs, run_model)
    strength = Strength(blocks=tuple((b, 0.0 if i % 2 else 1.0) for i, b in enumerate(blocks)))
    with hx.apply(unet_of(host), [(load(host, "anime.pt"), strength)]):
        want = sample(host, p_for(host, ""), inputs, 4, run_model(p_for(host, "")))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_unknown_and_malformed_tags_are_reported_and_the_rest_applies(host, inputs, capsys):
    p = p_for(host, "<hypernet:nosuch:1> <hypernet:anime:0.8> <hypernet:styles/ink:k=zz> <hypernet:../../etc/x>")
    (got,) = generate(host, p, inputs, run_model)
    torch.testing.assert_close(got, expected(host, inputs, [(load(host, "anime.pt"), 0.8)]), rtol=1e-4, atol=1e-5)
    comments = list(p.comments)
    assert any("<hypernet:nosuch:1>: no hypernetwork named 'nosuch'" in c for c in comments)
    assert any("k must be a number, found 'zz'" in c for c in comments)
    assert any("climbs out of the hypernetwork folders" in c for c in comments)
    assert "no hypernetwork named 'nosuch'" in capsys.readouterr().err
    assert not host.shared.state.interrupted


def test_a_network_with_nan_weights_is_reported_and_never_applied(host, inputs, capsys):
    """It used to load silently and turn every output of the UNet into NaN."""
    broken = network(seed=3)
    with torch.no_grad():
        broken.layers[M.LDM_CONTEXT][1].linear[0].weight.view(-1)[:7] = float("nan")
    path = hx.save(broken, host.hypernetwork_dir / "nan.pt")
    p = p_for(host, "<hypernet:nan:1> <hypernet:anime:0.8>")
    (got,) = generate(host, p, inputs, run_model)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected(host, inputs, [(load(host, "anime.pt"), 0.8)]), rtol=1e-4, atol=1e-5)
    (comment,) = [c for c in p.comments if "nan.pt" in c]
    assert path in comment and f"7 of {broken.parameter_count():,} weights are NaN or infinite" in comment
    assert path in capsys.readouterr().err


def test_console_only_and_stop_behaviours(host, inputs, capsys):
    host.shared.opts.data["hypernetwork_unknown_name"] = "Console only"
    p = p_for(host, "<hypernet:nosuch>")
    generate(host, p, inputs, run_model)
    assert p.comments == {} and "nosuch" in capsys.readouterr().err
    host.shared.opts.data["hypernetwork_unknown_name"] = "Stop the generation"
    generate(host, p_for(host, "<hypernet:nosuch>"), inputs, run_model)
    assert host.shared.state.interrupted


def test_new_file_is_found_without_refresh(host, inputs):
    generate(host, p_for(host, "<hypernet:anime>"), inputs, run_model)
    hx.save(network(seed=7), host.hypernetwork_dir / "fresh.pt")
    p = p_for(host, "<hypernet:fresh>")
    (got,) = generate(host, p, inputs, run_model)
    assert p.comments == {}
    torch.testing.assert_close(got, expected(host, inputs, [(load(host, "fresh.pt"), 1.0)]), rtol=1e-4, atol=1e-5)


def test_reload_ui_cycles_leave_one_patch(host, inputs):
    for _ in range(3):
        host.reload_ui()
    handler = host.extra_networks.extra_network_registry["hypernet"]
    assert type(handler).__name__ == "HypernetExtraNetwork"
    assert [page.name for page in host.ui_extra_networks.extra_pages].count("hypernetworks") == 1
    assert [a.label for a in host.xyz.axis_options].count("[Hypernet] Strength") == 1
    assert len(host.script_callbacks.callback_map["callbacks_before_ui"]) == 1
    (got,) = generate(host, p_for(host, "<hypernet:anime:0.8>"), inputs, run_model)
    torch.testing.assert_close(got, expected(host, inputs, [(load(host, "anime.pt"), 0.8)]), rtol=1e-4, atol=1e-5)


def test_unload_undoes_everything_symmetrically(host):
    builtin_page = next(p for p in host.ui_extra_networks.extra_pages if p.name == "checkpoints")
    webui = __import__("hypernetwork_ext.hosts.webui", fromlist=["x"])
    webui.PATCH.apply()  # applying twice changes nothing
    assert [a.label for a in host.xyz.axis_options].count("[Hypernet] Strength") == 1
    host.script_callbacks.script_unloaded_callback()
    assert type(host.extra_networks.extra_network_registry["hypernet"]).__name__ == "BuiltinExtraNetworkHypernet"
    names = [type(page).__name__ for page in host.ui_extra_networks.extra_pages]
    assert "ExtraNetworksPageHypernetworks" in names and "HypernetworksPage" not in names
    assert builtin_page in host.ui_extra_networks.extra_pages
    assert "[Hypernet] Strength" not in [a.label for a in host.xyz.axis_options]


def test_checkpoint_switch_during_generation_leaves_nothing_on_the_old_model(host, inputs):
    old = unet_of(host)
    new_model = LatentDiffusion(M.ldm_unet(3))
    switched = {}

    def runner(p):
        def run(x, t, context):
            if not switched:
                switched["done"] = True
                host.set_model(new_model)  # as the refiner switch does mid-sampling
                p.sd_model = new_model
            return p.sd_model.model.diffusion_model(x, t, context=context)

        return run

    p = p_for(host, "<hypernet:anime>")
    generate(host, p, inputs, runner)
    assert hook_count(old) == 0 and hook_count(new_model.model.diffusion_model) == 0
    host.extension.activate(p_for(host, "x"), [["anime"]])
    assert hook_count(new_model.model.diffusion_model) > 0
    newest = LatentDiffusion(M.ldm_unet(4))
    host.set_model(newest)  # active networks follow the switch; nothing stays on the previous model
    assert hook_count(new_model.model.diffusion_model) == 0
    assert hook_count(newest.model.diffusion_model) > 0
    host.extension.finish()
    assert hook_count(newest.model.diffusion_model) == 0


def test_family_mismatch_is_skipped_unless_forced(host, inputs):
    hx.save(hx.create((768, 320, 640, 1280), seed=0), host.hypernetwork_dir / "sd1.pt")
    host.set_model(LatentDiffusion(M.ldm_unet(1, context_dim=2048)))
    xl_inputs = SamplingInputs(torch.randn(1, 7, 2048), torch.randn(1, 7, 2048), inputs.x)
    p = p_for(host, "<hypernet:sd1>")
    seen = []
    unet = unet_of(host)

    def runner(p):
        return lambda x, t, c: seen.append(hook_count(unet)) or unet(x, t, context=c)

    generate(host, p, xl_inputs, runner)
    assert seen == [0] * 4 and any("is made for SD1" in c for c in p.comments)
    host.shared.opts.data["hypernetwork_family_mismatch"] = "Apply anyway"
    seen.clear()
    p = p_for(host, "<hypernet:sd1>")
    generate(host, p, xl_inputs, runner)
    assert all(n > 0 for n in seen) and any("applied although" in c for c in p.comments)


@pytest.mark.parametrize("context,linear", [(1024, True), (2048, True)])
def test_sd2_and_sdxl_context_widths(host, context, linear):
    folder = host.hypernetwork_dir
    hx.save(network(widths=(context, *M.LDM_WIDTHS), seed=4), folder / f"w{context}.pt")
    host.set_model(LatentDiffusion(M.ldm_unet(2, context_dim=context, use_linear=linear)))
    generator = torch.Generator().manual_seed(1)
    wide = SamplingInputs(*(torch.randn(1, 7, context, generator=generator) for _ in range(2)), torch.randn(1, 4, 8, 8))
    (got,) = generate(host, p_for(host, f"<hypernet:w{context}:0.7>"), wide, run_model)
    want = expected(host, wide, [(hx.load(folder / f"w{context}.pt"), 0.7)])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_hires_pass_uses_its_own_prompt_and_records_both_hashes(host, inputs):
    p = p_for(host, "<hypernet:anime:0.8>", enable_hr=True, hr_prompt="<hypernet:styles/ink:0.5>")
    first, second = generate(host, p, inputs, run_model)
    torch.testing.assert_close(first, expected(host, inputs, [(load(host, "anime.pt"), 0.8)]), rtol=1e-4, atol=1e-5)
    want = expected(host, inputs, [(load(host, "styles/ink.safetensors"), 0.5)])
    torch.testing.assert_close(second, want, rtol=1e-4, atol=1e-5)
    hashes = p.extra_generation_params["Hypernet hashes"]
    assert hashes.startswith("anime: ") and "styles/ink: " in hashes


def test_infotext_round_trip_maps_hashes_to_local_names(host, inputs):
    p = p_for(host, "a cat <hypernet:anime:0.8:k=1.5>")
    generate(host, p, inputs, run_model)
    text = host.infotext(p)
    sha = hx.file_sha256(host.hypernetwork_dir / "anime.pt")
    assert f'Hypernet hashes: "anime: {sha[:10]}"' in text
    assert host.parse_generation_parameters(text)["Prompt"] == "a cat <hypernet:anime:0.8:k=1.5>"
    (host.hypernetwork_dir / "anime.pt").rename(host.hypernetwork_dir / "styles" / "renamed.pt")
    host.extension.library.refresh()
    params = host.parse_generation_parameters(text)
    assert params["Prompt"] == "a cat <hypernet:renamed:0.8:k=1.5>"
    assert params["Hypernet hashes"] == f"anime: {sha[:10]}"


def test_hashes_can_be_left_out(host, inputs):
    host.shared.opts.data["hypernetwork_add_hashes_to_infotext"] = False
    p = p_for(host, "<hypernet:anime>")
    generate(host, p, inputs, run_model)
    assert "Hypernet hashes" not in p.extra_generation_params


def test_host_add_hypernetwork_setting_is_honoured(host, inputs):
    host.shared.opts.data["sd_hypernetwork"] = "anime"
    p = p_for(host, "a cat")
    (got,) = generate(host, p, inputs, run_model)
    assert p.all_prompts == ["a cat<hypernet:anime:1>"]
    torch.testing.assert_close(got, expected(host, inputs, [(load(host, "anime.pt"), 1.0)]), rtol=1e-4, atol=1e-5)


def test_xyz_strength_axis(host):
    axis = next(a for a in host.xyz.axis_options if a.label == "[Hypernet] Strength")
    p = p_for(host, "a <hypernet:anime:0.8:k=2> b", hr_prompt="<hypernet:styles/ink>")
    axis.apply(p, 0.25, [0.25, 0.5])
    assert p.prompt == "a <hypernet:anime:0.25:k=2> b" and p.hr_prompt == "<hypernet:styles/ink:0.25>"
    with pytest.raises(RuntimeError, match=r"has no <hypernet:\.\.\.> tag"):
        axis.apply(p_for(host, "plain"), 0.5, [0.5])


def test_compute_dtype_setting(host, inputs):
    host.shared.opts.data["hypernetwork_compute_dtype"] = "bfloat16"
    host.extension.activate(p_for(host, ""), [["anime"]])
    assert host.extension.applier.attachment.rewriter.compute_dtype == torch.bfloat16
    host.extension.finish()


def test_next_generation_with_the_same_networks_reuses_the_folds(host, inputs):
    """Folding a linear network cost ~22% of a step at the start of every generation in the real
    A1111 (256x256, CPU): what was computed stays, detached, while the networks and weights are the same."""
    hx.save(network(seed=7, activation="linear"), host.hypernetwork_dir / "flat.pt")
    unet = unet_of(host)
    plain = expected(host, inputs, [])
    want = expected(host, inputs, [(load(host, "flat.pt"), 0.8)])
    results = []
    for prompt in ("<hypernet:flat:0.8>", "no tag", "<hypernet:flat:0.8>"):
        (got,) = generate(host, p_for(host, prompt), inputs, run_model)
        results.append(got)
        assert hook_count(unet) == 0 and all("forward" not in m.__dict__ for m in unet.modules())
    torch.testing.assert_close(results[0], want, rtol=1e-4, atol=1e-5)
    assert torch.equal(results[1], plain)  # nothing of the network acts between
    assert torch.equal(results[2], results[0])
    stats = host.extension.applier.attachment.stats
    folds = stats["folds"]
    assert folds > 0 and stats["folded_calls"] == 2 * 4 * folds  # folded once, served at 4 steps twice
    generate(host, p_for(host, "<hypernet:flat:0.5>"), inputs, run_model)  # another multiplier folds anew
    assert stats["folds"] == 2 * folds and stats["folded_calls"] == 3 * 4 * folds
