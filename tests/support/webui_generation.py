"""The host's order of calls for one generation, over a real ldm UNet (A1111) or a Forge patcher.

Follows ``processing.process_images_inner`` and ``StableDiffusionProcessingTxt2Img.sample_hr_pass``
(A1111 1.10.1): per batch the prompts are parsed, extra networks activated, Forge's
``process_before_every_sampling`` called, then sampling (activation and sampling under
``devices.autocast()``, the host's precision); the hires pass parses its own prompts, activates
again and calls scripts' ``before_hr``; ``post_sample`` follows all sampling, before the decode;
scripts' ``postprocess`` runs at the end. Sampling is ``CFGDenoiser.forward``'s
batch layout: rows ``[cond..., uncond...]``, the cfg_denoiser callback, then one UNet call on all
rows or one per chunk (``batch_cond_uncond`` off), and ``step`` counted per call.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn


class DiffusionWrapper(nn.Module):
    def __init__(self, diffusion_model: nn.Module):
        super().__init__()
        self.diffusion_model = diffusion_model


class LatentDiffusion(nn.Module):
    """What ``shared.sd_model`` exposes: ``model.diffusion_model`` is the UNet."""

    def __init__(self, unet: nn.Module, name: str = "model"):
        super().__init__()
        self.model = DiffusionWrapper(unet)
        self.name = name


@dataclass
class SamplingInputs:
    cond: torch.Tensor  # [batch, tokens, width]
    uncond: torch.Tensor
    x: torch.Tensor  # [batch, 4, h, w]


class Denoiser:
    """The fields of CFGDenoiser the extension reads: ``step`` and ``total_steps``."""

    def __init__(self, total_steps: int):
        self.step = 0
        self.total_steps = total_steps


def sample(host, p, inputs: SamplingInputs, steps: int, run_unet, *, batch_cond_uncond: bool = True) -> torch.Tensor:
    """A deterministic sampler over ``run_unet(x, t, context)``; returns the final latent."""
    denoiser = Denoiser(steps)
    host.shared.state.sampling_steps = steps
    x = inputs.x.clone()
    rows = x.shape[0]
    for step in range(steps):
        host.shared.state.sampling_step = step
        x_in = torch.cat([x, x])
        t = torch.full((x_in.shape[0],), 999 - step * (999 // max(1, steps)), dtype=torch.long)
        params = host.script_callbacks.CFGDenoiserParams(
            x_in, None, t, step, steps, inputs.cond, inputs.uncond, denoiser
        )
        host.script_callbacks.cfg_denoiser_callback(params)
        context = torch.cat([inputs.cond, inputs.uncond])
        with torch.no_grad():
            if batch_cond_uncond:
                out = run_unet(x_in, t, context)
            else:
                out = torch.cat(
                    [run_unet(x_in[a : a + rows], t[a : a + rows], context[a : a + rows]) for a in (0, rows)]
                )
        cond_out, uncond_out = out[:rows], out[rows:]
        x = x - 0.1 * (uncond_out + 3.0 * (cond_out - uncond_out))
        denoiser.step += 1
    return x


def generate(host, p, inputs: SamplingInputs, run_unet, *, hires_inputs: SamplingInputs | None = None, **kwargs):
    """One generation as the host runs it; returns the latents of the first pass (and hires pass).
    ``decode(p)``, when given, runs where the host decodes the latents (after ``post_sample``).

    Forge and reForge run all of it, from activating extra networks to the last step, inside
    ``torch.inference_mode()`` (``processing.process_images_inner``); A1111 under ``no_grad``.
    """
    mode = torch.inference_mode() if host.forge else torch.no_grad()
    with mode:
        results = _generate(host, p, inputs, run_unet, hires_inputs, **kwargs)
    return [result.clone() for result in results]  # usable outside, as the host's decoded images are


def _generate(host, p, inputs, run_unet, hires_inputs, decode=None, **kwargs):
    e = host.extra_networks
    p.scripts = host
    p.all_prompts = [p.prompt] * p.batch_size
    p.all_hr_prompts = [p.hr_prompt or p.prompt] * p.batch_size
    results = []
    p.iteration = 0
    p.prompts, p.extra_network_data = e.parse_prompts(p.all_prompts[: p.batch_size])
    if p.enable_hr:
        p.hr_prompts, p.hr_extra_network_data = e.parse_prompts(p.all_hr_prompts[: p.batch_size])
    if not p.disable_extra_networks:
        with host.devices.autocast():
            e.activate(p, p.extra_network_data)
    host.before_sampling(p, reset=True)
    with host.devices.autocast():
        results.append(sample(host, p, inputs, p.steps, run_unet(p), **kwargs))
    if p.enable_hr:
        p.is_hr_pass = True
        if not p.disable_extra_networks:
            with host.devices.autocast():
                e.activate(p, p.hr_extra_network_data)
        for script in host.script_instances:
            script.before_hr(p)
        host.before_sampling(p, reset=False)  # Forge calls it twice for the hires pass, resetting in between
        host.before_sampling(p, reset=True)
        with host.devices.autocast():
            results.append(sample(host, p, hires_inputs or inputs, p.steps, run_unet(p), **kwargs))
        p.is_hr_pass = False
    for script in host.script_instances:
        script.post_sample(p, None)  # after all sampling, before the VAE decodes
    if decode is not None:
        decode(p)
    if not p.disable_extra_networks and p.extra_network_data:
        e.deactivate(p, p.extra_network_data)
    for script in host.script_instances:
        script.postprocess(p, None)
    return results


@pytest.fixture
def sampling_inputs() -> SamplingInputs:
    """Conditioning and latents for the small ldm UNet of the WebUI tests."""
    from tests.support import models as M

    generator = torch.Generator().manual_seed(5)
    return SamplingInputs(
        cond=torch.randn(1, 7, M.LDM_CONTEXT, generator=generator),
        uncond=torch.randn(1, 7, M.LDM_CONTEXT, generator=generator),
        x=torch.randn(1, 4, 8, 8, generator=generator),
    )
