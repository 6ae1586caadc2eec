"""The command line's offline tools: inspect, convert, merge, bake, export-lora."""

import json

import pytest
import torch

import hypernetwork_ext as hx
from hypernetwork_ext.ops.checkpoints import LDM_PREFIX, read_unet
from hypernetwork_ext.standalone.cli import main
from tests.support import models as M


def run_cli(*args, capsys=None):
    code = main([str(a) for a in args])
    out = capsys.readouterr() if capsys else None
    return code, out


def visible(net, seed=0, value_bias=True):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pair in net.layers.values():
            for index, module in enumerate(pair):
                for layer in module.linear:
                    if isinstance(layer, torch.nn.Linear):
                        layer.weight.normal_(0.0, 0.2, generator=generator)
                        if value_bias or index == 0:
                            layer.bias.normal_(0.0, 0.1, generator=generator)
    return net


@pytest.fixture
def files(tmp_path):
    a = visible(hx.create([16, 8], (1, 2, 1), "relu", seed=1, name="alpha"), 1)
    b = visible(hx.create([16, 8], (1, 2, 1), "relu", seed=2, name="beta"), 2)
    c = visible(hx.create([16, 8], (1, 2, 1), "relu", seed=3, name="gamma"), 3)
    paths = {n: hx.save(net, tmp_path / f"{n}.pt") for n, net in (("a", a), ("b", b), ("c", c))}
    return paths


def test_inspect_text_and_json(files, capsys):
    code, out = run_cli("inspect", files["a"], capsys=capsys)
    assert code == 0
    assert "widths: 16, 8" in out.out and "activation: relu" in out.out and "hash: " in out.out
    code, out = run_cli("inspect", "--json", files["a"], files["b"], capsys=capsys)
    records = json.loads(out.out)
    assert code == 0 and [r["name"] for r in records] == ["alpha", "beta"]
    record = records[0]
    assert record["widths"] == [16, 8] and record["parameters"] == hx.load(files["a"]).parameter_count()
    assert record["short_hash"] == hx.file_sha256(files["a"])[:10] and record["model_family"] is None
    for key in (
        "layer_structure",
        "activation",
        "layer_norm",
        "dropout_structure",
        "step",
        "trained_on",
        "content_hash",
    ):
        assert key in record


def test_inspect_exit_codes(files, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"nope")
    code, out = run_cli("inspect", files["a"], bad, capsys=capsys)
    assert code == 1 and str(bad) in out.err
    code, out = run_cli("inspect", bad, capsys=capsys)
    assert code == 2


def test_convert_file_and_folder(files, tmp_path, capsys):
    out_file = tmp_path / "alpha.safetensors"
    assert run_cli("convert", files["a"], out_file)[0] == 0
    assert hx.content_hash(hx.load(out_file)) == hx.content_hash(hx.load(files["a"]))
    assert run_cli("convert", files["a"], out_file, capsys=capsys)[0] == 2  # never overwrites silently
    assert run_cli("convert", files["a"], out_file, "--overwrite")[0] == 0
    source = tmp_path / "lib"
    (source / "sub").mkdir(parents=True)
    hx.save(hx.load(files["b"]), source / "sub" / "beta.pt")
    hx.save(hx.load(files["c"]), source / "gamma.pt")
    code, _ = run_cli("convert", source, tmp_path / "converted", "--to", "safetensors", capsys=capsys)
    assert code == 0
    assert (tmp_path / "converted" / "sub" / "beta.safetensors").exists()
    assert (tmp_path / "converted" / "gamma.safetensors").exists()
    assert run_cli("convert", source, tmp_path / "x", capsys=capsys)[0] == 2  # folder needs --to


def _tensor(path, width, index, key):
    return hx.load(path).layers[width][index].state_dict()[key]


def test_merge_weighted_sum_and_width_override(files, tmp_path, capsys):
    out = tmp_path / "blend.safetensors"
    assert run_cli("merge", out, f"{files['a']}:0.25", f"{files['b']}:0.75", "--width", "8=1,0", capsys=capsys)[0] == 0
    key = "linear.0.weight"
    expected16 = 0.25 * _tensor(files["a"], 16, 0, key) + 0.75 * _tensor(files["b"], 16, 0, key)
    torch.testing.assert_close(_tensor(out, 16, 0, key), expected16)
    torch.testing.assert_close(_tensor(out, 8, 1, key), _tensor(files["a"], 8, 1, key))
    assert hx.load(out).name == "blend"


def test_merge_add_difference(files, tmp_path, capsys):
    out = tmp_path / "diff.pt"
    assert (
        run_cli(
            "merge", out, "--add-difference", files["a"], files["b"], files["c"], "--multiplier", "0.5", capsys=capsys
        )[0]
        == 0
    )
    key = "linear.2.bias"
    expected = _tensor(files["a"], 16, 1, key) + 0.5 * (
        _tensor(files["b"], 16, 1, key) - _tensor(files["c"], 16, 1, key)
    )
    torch.testing.assert_close(_tensor(out, 16, 1, key), expected)


def test_merge_refuses_mismatched_structures(files, tmp_path, capsys):
    other = hx.save(hx.create([16, 8], (1, 2, 1), "tanh", seed=4, name="tanhy"), tmp_path / "t.pt")
    code, out = run_cli("merge", tmp_path / "m.pt", files["a"], other, capsys=capsys)
    assert code == 2 and "differ in activation" in out.err
    wider = hx.save(hx.create([16], (1, 2, 1), "relu", seed=4, name="w"), tmp_path / "w.pt")
    code, out = run_cli("merge", tmp_path / "m.pt", files["a"], wider, capsys=capsys)
    assert code == 2 and "widths" in out.err


# -- bake and export-lora on real models -------------------------------------------------------------
def _affine_stack(context, widths):
    a = visible(hx.create([context, *widths], (1, 2, 1), "linear", seed=5, name="lin-a"), 5)
    b = visible(hx.create([context, widths[0]], (1, 1.5, 0.5, 1), "linear", seed=6, name="lin-b"), 6)
    return a, b


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from hypernetwork_ext.standalone.tiny import build_tiny_components

    folder = tmp_path_factory.mktemp("tiny") / "model"
    components = build_tiny_components(0)
    M.randomise(components.unet, 3)
    components.pipeline().save_pretrained(folder)
    return folder


def _tiny_unet(folder):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()


def _tiny_inputs():
    return M.diffusers_inputs(3, context_dim=48, tokens=9) | {
        "sample": torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    }


def test_bake_diffusers_folder_is_exact(tiny_folder, tmp_path, capsys):
    a, b = _affine_stack(48, (32, 64))
    paths = [hx.save(a, tmp_path / "a.pt"), hx.save(b, tmp_path / "b.safetensors")]
    out = tmp_path / "baked"
    code, printed = run_cli("bake", tiny_folder, f"{paths[0]}:0.8", f"{paths[1]}:-0.6", "-o", out, capsys=capsys)
    assert code == 0 and "exact" in printed.out
    inputs = _tiny_inputs()
    original = _tiny_unet(tiny_folder)
    with hx.apply(original, [(a, 0.8), (b, -0.6)]):
        expected = M.run_diffusers(original, inputs)
    plain = M.run_diffusers(original, inputs)
    got = M.run_diffusers(_tiny_unet(out), inputs)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert (expected - plain).abs().max() > 1e-2
    assert (out / "vae").exists() and (out / "text_encoder").exists()
    assert run_cli("bake", tiny_folder, paths[0], "-o", out, capsys=capsys)[0] == 2  # never overwrites


def test_bake_single_file_ldm_checkpoint_is_exact(tmp_path, capsys):
    from safetensors.torch import save_file

    model = M.ldm_unet(0)
    state = {LDM_PREFIX + k: v.contiguous() for k, v in model.state_dict().items()}
    state["cond_stage_model.transformer.dummy"] = torch.zeros(3)
    checkpoint = tmp_path / "sd.safetensors"
    save_file(state, checkpoint, metadata={"origin": "test"})
    a, _ = _affine_stack(M.LDM_CONTEXT, M.LDM_WIDTHS)
    network = hx.save(a, tmp_path / "a.pt")
    out = tmp_path / "baked.safetensors"
    assert run_cli("bake", checkpoint, f"{network}:1.3", "-o", out, capsys=capsys)[0] == 0
    inputs = M.ldm_inputs(1)
    with hx.apply(model, [(a, 1.3)]):
        expected = M.run_ldm(model, inputs)
    baked = M.ldm_unet(0)
    weights = read_unet(out)
    baked.load_state_dict(weights.tensors)
    torch.testing.assert_close(M.run_ldm(baked, inputs), expected, rtol=1e-4, atol=1e-5)
    assert "cond_stage_model.transformer.dummy" in weights.everything and weights.metadata["origin"] == "test"


def test_bake_refuses_nonlinear_unless_approximate(tiny_folder, tmp_path, capsys):
    network = hx.save(visible(hx.create([48, 32, 64], (1, 2, 1), "relu", seed=2), 2), tmp_path / "relu.pt")
    code, out = run_cli("bake", tiny_folder, network, "-o", tmp_path / "x", capsys=capsys)
    assert code == 2 and "not affine" in out.err and "--approximate" in out.err
    code, out = run_cli("bake", tiny_folder, network, "-o", tmp_path / "x", "--approximate", capsys=capsys)
    assert code == 0 and "affine fit of nonlinear modules: worst relative error" in out.out
    worst_fit = float(out.out.split("worst relative error ")[1].split()[0])
    # every layer's figure measures the fitted map against the network itself: none is 0, the mean is no outlier
    largest, mean = _max_error(out.out), _mean_error(out.out)
    assert 0 < mean <= largest and worst_fit / 3 < largest < worst_fit * 3


def test_export_lora_of_a_fitted_network_reports_its_error_against_the_network(tiny_folder, tmp_path, capsys):
    network = hx.save(visible(hx.create([48, 32, 64], (1, 2, 1), "relu", seed=2), 2), tmp_path / "relu.pt")
    output = tmp_path / "relu-lora.safetensors"
    code, out = run_cli("export-lora", network, "--model", tiny_folder, "-o", output, "--approximate", capsys=capsys)
    code_bake, baked = run_cli("bake", tiny_folder, network, "-o", tmp_path / "b", "--approximate", capsys=capsys)
    assert code == code_bake == 0
    assert 0 < _mean_error(out.out) <= _max_error(out.out)
    # full rank carries what the fold carries except the value-side shift: never closer to the network
    assert _max_error(out.out) >= 0.9 * _max_error(baked.out) and _mean_error(out.out) >= 0.9 * _mean_error(baked.out)


def _per_layer(printed: str) -> str:
    return next(line for line in printed.splitlines() if "per layer" in line)


def _max_error(printed: str) -> float:
    return float(_per_layer(printed).split("max ")[1].split(",")[0])


def _mean_error(printed: str) -> float:
    return float(_per_layer(printed).split("mean ")[1])


def test_export_lora_loads_in_diffusers_and_matches(tiny_folder, tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    a = visible(hx.create([48, 32, 64], (1, 2, 1), "linear", seed=7, name="lin"), 7, value_bias=False)
    network = hx.save(a, tmp_path / "lin.pt")
    lora = tmp_path / "lin-lora.safetensors"
    code, out = run_cli(
        "export-lora", f"{network}:0.9", "--model", tiny_folder, "-o", lora, "--dtype", "fp32", capsys=capsys
    )
    assert code == 0 and _max_error(out.out) < 1e-6  # full rank, no value shift: exact up to rounding
    from safetensors import safe_open

    with safe_open(lora, "pt") as handle:
        keys = set(handle.keys())
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k.lora_up.weight" in keys
    assert "lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_attn2_to_v.alpha" in keys

    inputs = _tiny_inputs()
    unet = _tiny_unet(tiny_folder)
    with hx.apply(unet, [(a, 0.9)]):
        expected = M.run_diffusers(unet, inputs)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_folder, safety_checker=None)
    pipe.load_lora_weights(str(lora))
    got = M.run_diffusers(pipe.unet, inputs)
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4)


def test_export_lora_reports_rank_truncation_and_value_shift(tiny_folder, tmp_path, capsys):
    a = visible(hx.create([48, 32, 64], (1, 2, 1), "linear", seed=8), 8)
    network = hx.save(a, tmp_path / "lin.pt")
    errors = {}
    for rank in ("2", "16"):
        code, out = run_cli(
            "export-lora",
            network,
            "--model",
            tiny_folder,
            "-o",
            tmp_path / f"r{rank}.safetensors",
            "--rank",
            rank,
            capsys=capsys,
        )
        assert code == 0
        errors[rank] = _max_error(out.out)
    assert errors["2"] > errors["16"] > 0


def test_export_lora_refuses_nonlinear(tiny_folder, tmp_path, capsys):
    network = hx.save(hx.create([48], (1, 2, 1), "gelu", seed=1), tmp_path / "g.pt")
    code, out = run_cli("export-lora", network, "--model", tiny_folder, "-o", tmp_path / "g.safetensors", capsys=capsys)
    assert code == 2 and "not affine" in out.err


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["merge", "--help"])
    assert exited.value.code == 0
    assert "--add-difference" in capsys.readouterr().out


def test_inspect_shows_what_generating_keeps_on_the_gpu(tmp_path, capsys):
    """Worked out for the family's full-size layout (SD1 here), split as A1111 and Forge keep it."""
    affine = hx.save(hx.create([768, 320, 640, 1280], (1, 0.5, 1), "linear", name="flat"), tmp_path / "flat.pt")
    code, out = run_cli("inspect", affine, capsys=capsys)
    assert code == 0 and "GPU memory while in use on SD1 (float16 UNet)" in out.out
    assert "47.3 MiB of folded weights per set of multipliers (at most 2, limited to 256.0 MiB by default)" in out.out
    code, out = run_cli("inspect", "--json", affine, capsys=capsys)
    memory = json.loads(out.out)[0]["device_memory"]
    assert memory["a1111"]["folds"] == 49_611_520 and memory["forge"]["folds"] == 0
    assert memory["fold_limit_bytes"] == 256 << 20 and memory["family"] == "SD1"


def test_inspect_without_a_family_says_so(files, capsys):
    code, out = run_cli("inspect", files["a"], capsys=capsys)
    assert code == 0 and "GPU memory while in use: unknown" in out.out
