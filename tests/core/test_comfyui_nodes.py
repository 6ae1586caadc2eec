"""The ComfyUI node pack against a stand-in of the ComfyUI calls it makes (tests/support/comfyui_standin.py):
A1111's formula through the model patcher, on a clone, stacking in order, with every control; the
prompt node; training; the root ``__init__.py`` as ComfyUI and pytest import it. The real ComfyUI
runs in tests/comfyui."""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import hypernetwork_ext as hx
from hypernetwork_ext.errors import HypernetworkError, IncompatibleNetworkError
from hypernetwork_ext.hosts import comfyui, comfyui_nodes
from hypernetwork_ext.patches import SamplingProgress
from tests.support import comfyui_standin as standin
from tests.support import models as M
from tests.support.fixtures import one_torch_thread  # noqa: F401 (autouse fixture)
from tests.support.networks import webui_network
from tests.support.reference import reference_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def host(monkeypatch, tmp_path):
    host = standin.Host(monkeypatch, tmp_path)
    monkeypatch.setattr(comfyui_nodes, "_library", None)
    hx.save(webui_network(seed=1), host.hypernetwork_dir / "anime.pt")
    hx.save(webui_network(seed=2, activation="tanh"), host.hypernetwork_dir / "styles" / "ink.safetensors")
    return host


@pytest.fixture
def model():
    return standin.model_of(M.ldm_unet(0))


@pytest.fixture
def inputs():
    return M.ldm_inputs(3, batch=2)


def denoise(patcher, inputs, **kwargs):
    with torch.no_grad():
        return standin.denoise(patcher, inputs["x"], inputs["timesteps"], inputs["context"], **kwargs)


def a1111(inputs, entries):
    """A1111's formula (tests/support/reference.py) on the ldm UNet with its own blocks."""
    return M.run_ldm(reference_model(M.ldm_unet(0), entries), inputs)


def plain(inputs):
    return M.run_ldm(M.ldm_unet(0), inputs)


def load(model, name, strength=1.0, **controls):
    return comfyui_nodes.LoadHypernetwork().load(model, name, strength, **controls)


def test_the_loader_lists_both_formats_and_nothing_else(host):
    (host.hypernetwork_dir / "notes.bin").write_bytes(b"x")
    names = comfyui_nodes.LoadHypernetwork.INPUT_TYPES()["required"]["hypernetwork_name"][0]
    assert names == ["anime.pt", "styles/ink.safetensors"]


@pytest.mark.parametrize("name,seed,activation", [("anime.pt", 1, "relu"), ("styles/ink.safetensors", 2, "tanh")])
def test_loader_applies_a1111s_formula_on_a_clone(host, model, inputs, name, seed, activation):
    before = copy.deepcopy(model.model_options)
    patched, info = load(model, name, 0.8)
    got = denoise(patched, inputs, cond_or_uncond=[0, 1])
    want = a1111(inputs, [(webui_network(seed=seed, activation=activation), 0.8)])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert model.model_options == before  # the MODEL given stays as it was
    assert patched is not model and patched.model is model.model
    assert f"name: {name}" in info and "widths: 48, 32, 64" in info and "hash: " in info


def test_chained_loaders_stack_in_order(host, model, inputs):
    first, _ = load(model, "anime.pt", 0.8)
    second, _ = load(first, "styles/ink.safetensors", -0.5)
    got = denoise(second, inputs)
    want = a1111(inputs, [(webui_network(seed=1), 0.8), (webui_network(seed=2, activation="tanh"), -0.5)])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert len(comfyui.our_patches(second)) == 2 and len(comfyui.our_patches(first)) == 1


def test_a_file_written_again_is_loaded_again(host):
    before = comfyui_nodes.LoadHypernetwork.IS_CHANGED(hypernetwork_name="anime.pt")
    hx.save(webui_network(seed=9), host.hypernetwork_dir / "anime.pt", overwrite=True)
    assert comfyui_nodes.LoadHypernetwork.IS_CHANGED(hypernetwork_name="anime.pt") != before
    assert comfyui_nodes.LoadHypernetwork.IS_CHANGED(hypernetwork_name="gone.pt") == ""


def test_strength_zero_is_the_model_itself(host, model, inputs):
    patched, _ = load(model, "anime.pt", 0.0)
    assert torch.equal(denoise(patched, inputs), denoise(model, inputs))


def test_clones_share_the_networks_and_patches_follow_the_device(host, model, inputs):
    patched, _ = load(model, "anime.pt", 0.8)
    clone = patched.clone()  # what every later node and the sampler do
    (patch,) = comfyui.our_patches(clone)
    assert patch is comfyui.our_patches(patched)[0]
    before = denoise(clone, inputs)
    clone.load()  # the memory manager: .to(load device), then .to(the model's dtype)
    assert comfyui.our_patches(clone) == [patch]
    # What a copy on the GPU would be; unloading the model to the CPU drops what was made for another device.
    patch.rewriter._copies[(0, torch.device("meta"), torch.float32)] = torch.nn.Linear(2, 2, device="meta")
    clone.model_patches_to(torch.device("cpu"))
    assert not [key for key in patch.rewriter._copies if key[1] != torch.device("cpu")]
    torch.testing.assert_close(denoise(clone, inputs), before, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_activations(host, model, inputs, dtype):
    """Weights stored in fp16/bf16 (or fp8, cast at use) give the blocks activations in that dtype:
    the networks compute in float32 and hand back the activations' dtype."""
    patched, _ = load(model, "anime.pt", 0.8)
    (patch,) = comfyui.our_patches(patched)
    context = inputs["context"].to(dtype)
    _, k, v = patch(None, context, context, {"cond_or_uncond": [0, 1]})
    assert k.dtype == v.dtype == dtype
    net_k = webui_network(seed=1).layers[48][0].eval()
    with torch.no_grad():
        want = context.float() + 0.8 * net_k.linear(context.float())
    torch.testing.assert_close(k.float(), want.to(dtype).float(), rtol=0, atol=float(torch.finfo(dtype).eps) * 8)


def test_controls_match_the_core(host, model, inputs):
    network = webui_network(seed=1)
    cases = {
        "key/value/self/cross": (
            {"key": 0.5, "value": 1.5, "self_attn": 0.0, "cross_attn": 2.0},
            hx.Strength(0.8, key=0.5, value=1.5, self_attn=0.0, cross_attn=2.0),
        ),
        "blocks pairs": ({"blocks": "in=0, OUT03=2"}, hx.Strength(0.8, blocks=(("in", 0.0), ("OUT03", 2.0)))),
        "blocks preset": ({"blocks": "OUT"}, hx.Strength(0.8, blocks=(("in", 0.0), ("mid", 0.0), ("out", 1.0)))),
    }
    unet = M.ldm_unet(0)
    for label, (controls, strength) in cases.items():
        patched, _ = load(model, "anime.pt", 0.8, **controls)
        with hx.apply(unet, [(network, strength)]):
            want = M.run_ldm(unet, inputs)
        torch.testing.assert_close(denoise(patched, inputs), want, rtol=1e-4, atol=1e-5, msg=label)


def test_negative_factor_acts_on_the_negative_rows(host, model, inputs):
    patched, _ = load(model, "anime.pt", 1.0, negative=0.0)
    got = denoise(patched, inputs, cond_or_uncond=[0, 1])
    changed = a1111(inputs, [(webui_network(seed=1), 1.0)])
    torch.testing.assert_close(got[0], changed[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[1], plain(inputs)[1], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got[1], changed[1], rtol=1e-4, atol=1e-5)


def test_step_window_from_the_samplers_sigmas(host, model, inputs):
    schedule = torch.tensor([14.6, 6.0, 2.5, 0.9, 0.0])  # 4 steps
    patched, _ = load(model, "anime.pt", 1.0, start=0.5)
    changed = a1111(inputs, [(webui_network(seed=1), 1.0)])
    for step in range(4):
        got = denoise(patched, inputs, sigma=schedule[step : step + 1].clone(), schedule=schedule)
        want = changed if step >= 2 else plain(inputs)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=f"step {step}")


def test_sampling_progress():
    schedule = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.0])
    progress = SamplingProgress()
    assert [progress({"sigmas": schedule[i : i + 1].clone(), "sample_sigmas": schedule}) for i in range(4)] == [
        0.0,
        0.25,
        0.5,
        0.75,
    ]
    assert progress({"sigmas": torch.tensor([3.0]), "sample_sigmas": schedule}) == 0.25  # DPM2's midpoint of step 1
    assert progress({"sigmas": torch.tensor([1.0])}) is None  # no schedule: the window cannot be placed


def test_a_network_for_another_model_is_refused(host, model):
    hx.save(webui_network(widths=(1024, 320)), host.hypernetwork_dir / "sd2.pt")
    with pytest.raises(IncompatibleNetworkError, match=r"sd2\.pt .*does not fit"):
        load(model, "sd2.pt")


def test_prompt_node_equals_the_loader_chain(host, model, inputs):
    text = "a red circle <hypernet:anime:0.8> <hypernet:styles/ink:-0.5:neg=0>"
    patched, stripped, info = comfyui_nodes.HypernetworksFromPrompt().apply(model, text)
    assert stripped == "a red circle  "
    assert "anime: anime.pt [" in info
    chain, _ = load(load(model, "anime.pt", 0.8)[0], "styles/ink.safetensors", -0.5, negative=0.0)
    torch.testing.assert_close(
        denoise(patched, inputs, cond_or_uncond=[0, 1]),
        denoise(chain, inputs, cond_or_uncond=[0, 1]),
        rtol=1e-4,
        atol=1e-5,
    )


def test_prompt_node_without_tags_returns_the_model(host, model):
    assert comfyui_nodes.HypernetworksFromPrompt().apply(model, "a red circle")[:2] == (model, "a red circle")


def test_prompt_node_names_what_is_wrong_and_finds_new_files(host, model):
    node = comfyui_nodes.HypernetworksFromPrompt()
    with pytest.raises(HypernetworkError, match="no hypernetwork named 'fresh'"):
        node.apply(model, "x <hypernet:fresh:1>")
    with pytest.raises(HypernetworkError, match="multiplier must be a number"):
        node.apply(model, "x <hypernet:anime:lots>")
    hx.save(webui_network(seed=4), host.hypernetwork_dir / "fresh.pt")  # e.g. just trained
    assert len(comfyui.our_patches(node.apply(model, "x <hypernet:fresh:1>")[0])) == 1


# -- training --------------------------------------------------------------------------------------------
@pytest.fixture
def engine_parts(host):
    from hypernetwork_ext.standalone.tiny import procedural_images

    built = forge_engine_build()
    procedural_images(host.input_dir / "shapes", 4, seed=1, colour="blue", size=64)
    unet_patcher = standin.ModelPatcher(standin.BaseModel(built.forge_objects.unet.model.diffusion_model))
    clip = standin.Clip(built.forge_objects.clip.cond_stage_model)
    return unet_patcher, clip, built.forge_objects.vae


def forge_engine_build():
    from tests.support import forge_engine

    return forge_engine.build(1, reforge=True)


def train(model, clip, vae, **overrides):
    arguments = {
        "folder": "shapes",
        "name": "trained",
        "hypernetwork": "[new]",
        "steps": 6,
        "learning_rate": "0.001",
        "batch_size": 2,
        "width": 64,
        "height": 64,
        "seed": 3,
        "activation": "relu",
        **overrides,
    }
    return comfyui_training().TrainHypernetwork().train(model, clip, vae, **arguments)


def comfyui_training():
    from hypernetwork_ext.hosts import comfyui_training

    return comfyui_training


def test_training_node_saves_a_usable_network(host, engine_parts):
    model, clip, vae = engine_parts
    patched, name, loss_map, steps = train(model, clip, vae)
    assert name == "trained.safetensors" and steps == 6 and len(loss_map["loss"]) == 6
    trained = hx.load(host.hypernetwork_dir / name)
    assert trained.step == 6 and trained.widths == [48, 32, 64]
    assert standin.ProgressBar.updates[-1] == (6, 6)
    assert host.loads and all(full for _patchers, full in host.loads)  # loaded whole, as Train LoRA does
    assert len(comfyui.our_patches(patched)) == 1 and comfyui.our_patches(model) == []
    assert name in comfyui_nodes.file_names()  # listed for the loader at once
    again = train(model, clip, vae)[1]
    assert again == "trained_2.safetensors"  # nothing overwritten
    further = train(model, clip, vae, hypernetwork=name, name="more", steps=2)
    assert further[3] == 8 and hx.load(host.hypernetwork_dir / "more.safetensors").step == 8


def test_training_node_stops_on_cancel_and_keeps_the_steps(host, engine_parts):
    model, clip, vae = engine_parts
    host.interrupt_after = 2
    with pytest.raises(standin.InterruptProcessingException):
        train(model, clip, vae)
    saved = hx.load(host.hypernetwork_dir / "trained.safetensors")
    assert 2 <= saved.step < 6


def test_training_node_refuses_bad_settings_by_name(host, engine_parts):
    model, clip, vae = engine_parts
    with pytest.raises(HypernetworkError, match="learn_rate"):
        train(model, clip, vae, learning_rate="fast")
    with pytest.raises(HypernetworkError, match="layer_structure"):
        train(model, clip, vae, layer_structure="1, two, 1")
    assert not list(host.hypernetwork_dir.glob("trained*"))


# -- the root __init__.py -----------------------------------------------------------------------------------
def import_as_comfyui_does(monkeypatch):
    """``nodes.load_custom_node``: the folder's ``__init__.py`` under a module name made from its path."""
    name = str(ROOT).replace(".", "_x_")
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


def test_comfyui_finds_the_nodes(host, monkeypatch):
    module = import_as_comfyui_does(monkeypatch)
    assert set(module.NODE_CLASS_MAPPINGS) == {
        "HypernetworkLoaderA1111",
        "HypernetworksFromPrompt",
        "TrainHypernetwork",
    }
    assert module.NODE_DISPLAY_NAME_MAPPINGS["HypernetworkLoaderA1111"] == "Load Hypernetwork (A1111)"
    for node in module.NODE_CLASS_MAPPINGS.values():
        assert callable(getattr(node(), node.FUNCTION)) and len(node.RETURN_TYPES) >= 1


def test_outside_comfyui_the_root_package_is_empty(monkeypatch):
    monkeypatch.delitem(sys.modules, "folder_paths", raising=False)
    path = list(sys.path)
    module = import_as_comfyui_does(monkeypatch)
    assert module.NODE_CLASS_MAPPINGS == {} and sys.path == path


def test_pytest_module_names_with_the_root_package():
    """pytest treats a checkout whose folder name is an identifier as a package (the root __init__.py):
    test modules then carry its name, the rest imports as before."""
    assert __name__.endswith("tests.core.test_comfyui_nodes")
    assert sys.modules["tests.support.reference"].reference_model is reference_model


def test_install_py_succeeds_outside_a_webui(tmp_path):
    """ComfyUI-Manager runs a node pack's install.py after cloning it."""
    import subprocess

    result = subprocess.run([sys.executable, str(ROOT / "install.py")], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0 and "nothing to install" in result.stdout
