"""Model sources (embedded tiny model, diffusers folder, single-file checkpoint) and generation."""

import pytest
import torch
from safetensors.torch import save_file

import hypernetwork_ext as hx
from hypernetwork_ext.standalone.generate import GenerationSettings, generate
from hypernetwork_ext.standalone.images import grid, line_chart
from hypernetwork_ext.standalone.pipelines import attention_widths, load_model
from hypernetwork_ext.standalone.tiny import TINY_WIDTHS, build_tiny_components, procedural_images
from tests.support.ldm_checkpoint import components_to_ldm
from tests.support.networks import visible


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    components = build_tiny_components(0)
    components.pipeline().save_pretrained(root / "tiny")
    save_file(components_to_ldm(components.unet, components.vae, components.text_encoder), root / "tiny.safetensors")
    return root


def test_tiny_model_is_deterministic_and_has_the_documented_widths():
    a, b = build_tiny_components(0), build_tiny_components(0)
    assert attention_widths(a.unet) == sorted(TINY_WIDTHS)
    assert all(
        torch.equal(x, y) for x, y in zip(a.unet.state_dict().values(), b.unet.state_dict().values(), strict=True)
    )
    assert not any(p.requires_grad for p in a.unet.parameters())


def test_folder_and_single_file_sources_load_the_same_weights(sources):
    folder = load_model(sources / "tiny")
    single = load_model(sources / "tiny.safetensors", config=str(sources / "tiny"))
    reference = build_tiny_components(0)
    for loaded in (folder, single):
        state = loaded.unet.state_dict()
        assert all(torch.equal(state[k], v) for k, v in reference.unet.state_dict().items())
    assert single.name == "tiny" and single.checkpoint_hash() == hx.file_sha256(sources / "tiny.safetensors")[:10]
    assert folder.checkpoint_hash() is None and not folder.is_sdxl


def test_single_file_without_config_offline_explains_what_is_missing(sources):
    with pytest.raises(hx.HypernetworkError) as caught:
        load_model(sources / "tiny.safetensors")
    assert "--config" in str(caught.value) and str(sources / "tiny.safetensors") in str(caught.value)


def test_bad_model_sources(tmp_path):
    with pytest.raises(hx.FileFormatError, match="no such model"):
        load_model(tmp_path / "nope.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(hx.FileFormatError, match=r"model_index\.json"):
        load_model(tmp_path / "empty")
    save_file({"lora_unet_x.lora_up.weight": torch.zeros(2, 2)}, tmp_path / "lora.safetensors")
    with pytest.raises(hx.FileFormatError, match="not a Stable Diffusion checkpoint"):
        load_model(tmp_path / "lora.safetensors")


def test_a_pipeline_without_unet_is_refused_by_name(tmp_path):
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        num_layers=1,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(8,),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
    )
    DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler()).save_pretrained(tmp_path / "dit")
    with pytest.raises(hx.FileFormatError, match="DiTPipeline pipeline has no UNet") as raised:
        load_model(tmp_path / "dit")
    assert str(tmp_path / "dit") in str(raised.value)


def test_malicious_ckpt_is_refused_before_diffusers_sees_it(tmp_path):
    from tests.support.files import hostile_torch_file

    marker = tmp_path / "pwned"
    path = tmp_path / "model.ckpt"
    path.write_bytes(hostile_torch_file(str(marker)))
    with pytest.raises(hx.UnsafeFileError):
        load_model(path)
    assert not marker.exists()


@pytest.fixture(scope="module")
def tiny():
    return load_model(None)


def test_generation_is_deterministic_and_networks_change_it(tiny):
    settings = GenerationSettings("a red circle", steps=4, seed=3, width=64, height=64)
    plain = generate(tiny, settings)
    assert plain[0].size == (64, 64)
    again = generate(tiny, settings)
    assert plain[0].tobytes() == again[0].tobytes()
    net = visible(hx.create(TINY_WIDTHS, seed=1, activation="relu"))
    changed = generate(tiny, settings, [(net, 1.0)])
    assert changed[0].tobytes() != plain[0].tobytes()
    assert all(not m._forward_pre_hooks for m in tiny.unet.modules())  # detached afterwards
    assert generate(tiny, settings)[0].tobytes() == plain[0].tobytes()


def test_negative_pass_rows_and_step_window_reach_the_networks(tiny):
    net = visible(hx.create([48], seed=2, activation="relu"))
    site = next(s for s in hx.find_attention_sites(tiny.unet) if s.kind == "cross")
    seen = []
    before = site.key_projection.register_forward_pre_hook(lambda m, args: seen.append(["in", args[0].clone()]))
    after = site.key_projection.register_forward_hook(lambda m, args, out: seen[-1].append(args[0].clone()))
    try:
        settings = GenerationSettings("a blue square", steps=4, seed=1, width=64, height=64, batch_size=2)
        generate(tiny, settings, [(net, hx.Strength(uncond=0.0, start=0.5))])
    finally:
        before.remove()
        after.remove()
    assert len(seen) == 4
    for step, (_, original, rewritten) in enumerate(seen):
        uncond, cond = slice(0, 2), slice(2, 4)  # diffusers batches [negative, positive]
        assert torch.equal(original[uncond], rewritten[uncond])
        assert torch.equal(original[cond], rewritten[cond]) == (step < 2)


def test_grid_and_line_chart(tmp_path):
    from PIL import Image

    tiles = [Image.new("RGB", (16, 16), c) for c in ("red", "green", "blue", "white")]
    out = grid(tiles, 2, column_labels=["a", "b"], row_labels=["x", "y"])
    assert out.size[0] > 32 and out.size[1] > 32
    chart = line_chart({"train": [(0, 1.0), (1, 0.5), (2, 0.25)], "validation": [(2, 0.4)]}, title="loss")
    assert chart.size == (640, 360) and len(set(chart.tobytes())) > 2


def test_procedural_images(tmp_path):
    paths = procedural_images(tmp_path, 5, seed=2, colour="red")
    assert len(paths) == 5 and all(p.exists() and p.with_suffix(".txt").read_text().startswith("a red ") for p in paths)
