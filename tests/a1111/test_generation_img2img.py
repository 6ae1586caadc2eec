"""img2img through the host's processing (the A1111 1.10.1 stand-in) on a real ldm LatentDiffusion:
the init image is encoded, noised and sampled over the last steps only, and the tag still applies
exactly as the reference formula says, with the step window counted over the steps img2img runs."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import hypernetwork_ext as hx
from tests.support.models import LDM_CONTEXT, LDM_WIDTHS
from tests.support.reference import reference_model
from tests.support.training_models import tiny_latent_diffusion
from tests.support.webui_standin import Host


@pytest.fixture
def host(monkeypatch, tmp_path):
    host = Host(monkeypatch, tmp_path)
    network = hx.create((LDM_CONTEXT, *LDM_WIDTHS), (1, 2, 1), "relu", "XavierNormal", seed=4, name="style")
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, torch.nn.Linear):
                module.bias.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(5))
    hx.save(network, host.hypernetwork_dir / "style.pt")
    host.start()
    host.load_checkpoint(tiny_latent_diffusion(0), "tiny.safetensors", "sd1")
    yield host
    assert host.errors.reported == []


def init_image() -> Image.Image:
    generator = torch.Generator().manual_seed(9)
    pixels = (torch.rand(64, 64, 3, generator=generator) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels)


def img2img(host, prompt: str, *, scripts=True):
    p = host.processing.StableDiffusionProcessingImg2Img(
        sd_model=host.shared.sd_model, prompt=prompt, negative_prompt="blurry", steps=8, init_images=[init_image()]
    )
    p.denoising_strength, p.seed, p.cfg_scale, p.width, p.height = 0.5, 21, 4.0, 64, 64
    p.scripts = host if scripts else None
    seen = []
    unet = host.shared.sd_model.model.diffusion_model
    counter = unet.register_forward_pre_hook(
        lambda module, args: seen.append(sum(len(m._forward_pre_hooks) for m in unet.modules()))
    )
    try:
        image = host.processing.process_images(p).images[0]
    finally:
        counter.remove()
    return torch.tensor(list(image.getdata()), dtype=torch.float32), seen, p


def with_reference(host, entries, prompt: str):
    """The same img2img job with the UNet swapped for the reference twin (no tag, no extension)."""
    model = host.shared.sd_model
    plain = model.model.diffusion_model
    model.model.diffusion_model = reference_model(plain, entries)
    try:
        return img2img(host, prompt, scripts=False)[0]
    finally:
        model.model.diffusion_model = plain


def test_img2img_applies_the_tag_as_the_reference_and_takes_it_off_after(host):
    got, seen, p = img2img(host, "a red cube <hypernet:style:0.8>")
    network = hx.load(host.hypernetwork_dir / "style.pt")
    want = with_reference(host, [(network, 0.8)], "a red cube")
    plain = img2img(host, "a red cube")[0]
    assert (got - want).abs().max() <= 1.0  # pixels of the same latents, up to rounding
    assert (got - plain).abs().mean() > 1.0
    unet = host.shared.sd_model.model.diffusion_model
    sites = len(hx.find_attention_sites(unet))
    assert len(seen) == int(0.5 * 8) + 1  # img2img runs the last t_enc + 1 of the 8 steps
    assert set(seen) == {2 * sites + 2}  # our hooks (to_k/to_v and the row layout) and the counter
    assert sum(len(m._forward_pre_hooks) for m in unet.modules()) == 0
    assert "<hypernet" not in p.prompts[0]  # the tag left the conditioning prompt


def test_img2img_step_window_counts_the_steps_img2img_runs(host):
    """start=0.5 acts from the middle of the 5 steps img2img runs (steps 3..5), not of all 8."""
    got, _seen, _p = img2img(host, "a red cube <hypernet:style:1:start=0.5>")
    network = hx.load(host.hypernetwork_dir / "style.pt")
    model = host.shared.sd_model
    plain_unet = model.model.diffusion_model
    twin = reference_model(plain_unet, [(network, 1.0)])
    calls = []

    class Windowed(torch.nn.Module):
        def forward(self, x, timesteps=None, context=None, **kwargs):
            calls.append(1)
            chosen = twin if (len(calls) - 1) / 5 >= 0.5 else plain_unet
            return chosen(x, timesteps, context=context, **kwargs)

    model.model.diffusion_model = Windowed()
    try:
        want = img2img(host, "a red cube", scripts=False)[0]
    finally:
        model.model.diffusion_model = plain_unet
    assert len(calls) == 5
    assert (got - want).abs().max() <= 1.0
    assert (got - img2img(host, "a red cube <hypernet:style:1>")[0]).abs().mean() > 0.5
