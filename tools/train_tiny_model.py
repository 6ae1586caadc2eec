"""Train the embedded tiny model (hypernetwork_ext/standalone/tiny-sd.safetensors) from a seed, on CPU.

    python tools/train_tiny_model.py [--work tiny-model-work] [--threads 1] [--output PATH]

Everything it learns from is drawn by hypernetwork_ext/standalone/procedural.py: one shape (circle, square,
triangle, diamond) in one of six colours on one of four plain backgrounds, centred or on a named
side, with its caption ("a red circle on the left on a white background"). A tenth of the 480
possible captions (chosen by SEED) is never shown to the UNet: the evaluation draws those.

Stages, each checkpointed in --work (a rerun continues where the last one stopped):
 1. vae     AutoencoderKL 64x64 -> 8x8x4, L1 reconstruction + a small KL term, on the base pictures
            and on pictures of any colours with outlines (so that it can also draw what the UNet
            never saw: the demo's styles); then the latent scaling factor (1 / std).
 2. latents the UNet's training set: TRAIN_SCENES pictures of the training captions, encoded once.
 3. sd1     UNet + CLIP text encoder from scratch: epsilon prediction, min-SNR-5 weighting, 10% empty
            captions (classifier-free guidance), AdamW with warm-up and cosine decay, EMA weights.
 3b. sd1-refine  the same, continued at a lower rate (the corners of squares, triangles and
            diamonds: drawn rounded, they were read as circles).
 4. v       the v-prediction variant: the sd1 UNet fine-tuned on the v objective (text encoder kept).
 5. sdxl    the SDXL-shaped variant: a UNet with added text/time conditioning and an 80-wide context
            (the first encoder's penultimate states beside a second, new encoder's), started from
            the sd1 UNet (new key/value columns and added embedding at zero) and fine-tuned.
 6. pack    each variant drawn on the held-out captions (2 seeds, 20 Euler steps, CFG 5) and judged
            by hypernetwork_ext/standalone/recognise.py; the weights written in half precision with the recipe,
            the scores and the wall times in the file's metadata.

The seed, recipe and the time it took here are in docs/tiny-model.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
import zlib
from pathlib import Path

import numpy
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hypernetwork_ext.standalone import procedural  # noqa: E402
from hypernetwork_ext.standalone import tiny as T  # noqa: E402
from hypernetwork_ext.standalone.recognise import judge, score  # noqa: E402

SEED = 1234
HELD_OUT_FRACTION = 0.1
VAE = {"varied_share": 0.2, "pool_weight": 4.0, "kl_weight": 1e-4, "initial_logvar": -8.0}
VAE_PHASES = [
    {"name": "vae-crops", "crop": 32, "batch": 32, "steps": 4000, "lr": 1e-3, "warmup": 50},
    {"name": "vae", "crop": 64, "batch": 16, "steps": 400, "lr": 3e-4, "warmup": 20},
]
DECODER = {"steps": 3000, "batch": 16, "lr": 3e-4, "warmup": 20, "edge_weight": 1.0}
TRAIN_SCENES = 24000
SD1 = {"steps": 4000, "batch": 32, "lr": 6e-4, "warmup": 200, "ema": 0.999, "empty_caption": 0.1, "min_snr": 5.0}
# More steps at a lower rate: the shapes' corners (a square drawn rounded was the commonest miss)
SD1_REFINE = {"steps": 1200, "batch": 32, "lr": 3e-4, "warmup": 50, "ema": 0.998, "empty_caption": 0.1, "min_snr": 5.0}
V = {"steps": 600, "batch": 32, "lr": 3e-4, "warmup": 50, "ema": 0.998, "min_snr": 5.0}
XL = {"steps": 1000, "batch": 32, "lr": 5e-4, "warmup": 100, "ema": 0.998, "empty_caption": 0.1, "min_snr": 5.0}
EVALUATION = {"seeds": (1, 2), "steps": 20, "cfg": 5.0}
CHECKPOINT_EVERY = 250


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


# -- data -------------------------------------------------------------------------------------------
def held_out_captions() -> list[str]:
    captions = procedural.all_captions()
    return sorted(random.Random(SEED).sample(captions, round(len(captions) * HELD_OUT_FRACTION)))


def to_tensor(images) -> torch.Tensor:
    array = numpy.stack([numpy.asarray(image, dtype=numpy.float32) for image in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1.0


def varied_picture(rng: random.Random):
    """Any colours, anywhere, sometimes outlined or two shapes: what the VAE must also draw."""
    from PIL import Image, ImageDraw

    size = T.TINY_IMAGE_SIZE * procedural.SUPERSAMPLING

    def colour():
        return tuple(rng.randrange(256) for _ in range(3))

    image = Image.new("RGB", (size, size), colour())
    draw = ImageDraw.Draw(image)
    for _ in range(1 + (rng.random() < 0.3)):
        side = rng.uniform(0.2, 0.6) * size
        left, top = rng.uniform(-0.1, 1.0) * size - side / 2, rng.uniform(-0.1, 1.0) * size - side / 2
        shape = rng.choice(procedural.SHAPES)
        if rng.random() < 0.4:
            rim = rng.uniform(0.015, 0.07) * size
            procedural.draw_shape(draw, shape, (left - rim, top - rim, left + side + rim, top + side + rim), colour())
        procedural.draw_shape(draw, shape, (left, top, left + side, top + side), colour())
    return image.resize((T.TINY_IMAGE_SIZE, T.TINY_IMAGE_SIZE), Image.Resampling.LANCZOS)


def training_scenes(count: int, seed: int) -> list[procedural.Scene]:
    held_out = set(held_out_captions())
    rng = random.Random(seed)
    found = []
    while len(found) < count:
        scene = procedural.random_scene(rng)
        if scene.caption not in held_out:
            found.append(scene)
    return found


# -- checkpoints ------------------------------------------------------------------------------------
def save_atomic(value, path: Path) -> None:
    temporary = path.with_suffix(path.suffix + ".tmp")
    torch.save(value, temporary)
    os.replace(temporary, path)


def cosine_rate(step: int, settings: dict) -> float:
    if step < settings["warmup"]:
        return settings["lr"] * (step + 1) / settings["warmup"]
    progress = (step - settings["warmup"]) / max(settings["steps"] - settings["warmup"], 1)
    return settings["lr"] * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


class Ema:
    def __init__(self, modules: dict[str, torch.nn.Module], decay: float):
        self.decay = decay
        self.shadow = {name: {k: v.detach().clone() for k, v in m.state_dict().items()} for name, m in modules.items()}

    @torch.no_grad()
    def update(self, modules: dict[str, torch.nn.Module], step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for name, module in modules.items():
            for key, value in module.state_dict().items():
                if value.dtype.is_floating_point:
                    self.shadow[name][key].lerp_(value, 1 - decay)
                else:
                    self.shadow[name][key].copy_(value)


class Stage:
    """A resumable training loop: modules, their optimizer and EMA, checkpointed every few steps."""

    def __init__(self, name: str, work: Path, modules: dict[str, torch.nn.Module], settings: dict):
        self.name, self.work, self.modules, self.settings = name, work, modules, settings
        parameters = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
        self.parameters = parameters
        self.optimizer = torch.optim.AdamW(parameters, lr=settings["lr"], weight_decay=0.01)
        self.ema = Ema(modules, settings["ema"]) if settings.get("ema") else None
        self.step = 0
        self.seconds = 0.0
        self.checkpoint = work / f"{name}.checkpoint.pt"
        if self.checkpoint.exists():
            state = torch.load(self.checkpoint, weights_only=False)
            for key, module in modules.items():
                module.load_state_dict(state["modules"][key])
            self.optimizer.load_state_dict(state["optimizer"])
            if self.ema is not None:
                self.ema.shadow = state["ema"]
            self.step, self.seconds = state["step"], state["seconds"]
            torch.set_rng_state(state["torch_rng"])
            log(f"{name}: resumed at step {self.step}")

    def save(self) -> None:
        save_atomic(
            {
                "modules": {k: m.state_dict() for k, m in self.modules.items()},
                "optimizer": self.optimizer.state_dict(),
                "ema": self.ema.shadow if self.ema is not None else None,
                "step": self.step,
                "seconds": self.seconds,
                "torch_rng": torch.get_rng_state(),
            },
            self.checkpoint,
        )

    def run(self, loss_at, probe=None) -> dict[str, dict]:
        """Train until the stage's step count; returns the final (EMA) state of each module."""
        settings = self.settings
        for module in self.modules.values():
            module.train()
        window = []
        started = time.monotonic() - self.seconds
        while self.step < settings["steps"]:
            for group in self.optimizer.param_groups:
                group["lr"] = cosine_rate(self.step, settings)
            generator = torch.Generator().manual_seed(SEED * 1_000_003 + zlib.crc32(self.name.encode()) + self.step)
            loss = loss_at(self.step, generator)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.parameters, 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            if self.ema is not None:
                self.ema.update(self.modules, self.step)
            window.append(loss.item())
            if self.step % 50 == 0:
                elapsed = time.monotonic() - started
                log(
                    f"{self.name} step {self.step}/{settings['steps']} loss {sum(window) / len(window):.4f} "
                    f"({elapsed / 60:.1f} min, {elapsed / self.step:.2f} s/step)"
                )
                window.clear()
            if self.step % CHECKPOINT_EVERY == 0 or self.step == settings["steps"]:
                self.seconds = time.monotonic() - started
                self.save()
            if probe is not None and self.step % 1000 == 0:
                probe(self.final_state())
        self.seconds = time.monotonic() - started
        for module in self.modules.values():
            module.eval()
        return self.final_state()

    def final_state(self) -> dict[str, dict]:
        if self.ema is not None:
            return {name: dict(shadow) for name, shadow in self.ema.shadow.items()}
        return {name: module.state_dict() for name, module in self.modules.items()}


def timestep_weights(alphas: torch.Tensor, timesteps: torch.Tensor, gamma: float, v: bool) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023)."""
    snr = alphas[timesteps] / (1 - alphas[timesteps])
    return torch.clamp(snr, max=gamma) / (snr + 1 if v else snr)


def diffusion_loss(unet, latents, context, generator, alphas, settings, *, v=False, added=None):
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(0, alphas.shape[0], (latents.shape[0],), generator=generator)
    ab = alphas[timesteps].view(-1, 1, 1, 1)
    noisy = ab.sqrt() * latents + (1 - ab).sqrt() * noise
    target = ab.sqrt() * noise - (1 - ab).sqrt() * latents if v else noise
    kwargs = {"added_cond_kwargs": added} if added is not None else {}
    prediction = unet(noisy, timesteps, context, **kwargs).sample
    per_sample = (prediction - target).pow(2).mean(dim=(1, 2, 3))
    return (per_sample * timestep_weights(alphas, timesteps, settings["min_snr"], v)).mean()


# -- stages -----------------------------------------------------------------------------------------
def train_vae(work: Path, components: T.TinyComponents) -> None:
    """The VAE in two phases (:data:`VAE_PHASES`): many cheap steps on 32x32 crops, then a few on
    whole pictures. The loss is L1, plus the squared error of the picture blurred to 16x16 so that
    the shapes' colours weigh as much as their edges (with L1 alone hue came last, barely), plus a
    small KL term."""
    vae = components.vae
    done = work / f"{VAE_PHASES[-1]['name']}.pt"
    if done.exists():
        state = torch.load(done)
        vae.load_state_dict(state["state"])
        vae.register_to_config(scaling_factor=state["scaling_factor"])
        return
    with torch.no_grad():  # start with a narrow posterior: sampling noise of std 1 hides the signal at first
        vae.quant_conv.bias[vae.config.latent_channels :] = VAE["initial_logvar"]
    for index, phase in enumerate(VAE_PHASES):
        finished = work / f"{phase['name']}.pt"
        if finished.exists():
            vae.load_state_dict(torch.load(finished)["state"])
            continue
        vae.requires_grad_(True)
        stage = Stage(phase["name"], work, {"vae": vae}, {**phase, "ema": None})

        def loss_at(step: int, generator: torch.Generator, phase=phase, index=index) -> torch.Tensor:
            rng = random.Random(SEED * 7919 + step + 1_000_000 * index)
            pixels = crop(vae_batch(rng, phase["batch"]), phase["crop"], rng)
            posterior = vae.encode(pixels).latent_dist
            latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
            error = vae.decode(latents).sample - pixels
            blurred = torch.nn.functional.avg_pool2d(error, 4).pow(2).mean()
            kl = posterior.kl().mean() / latents[0].numel()
            return error.abs().mean() + VAE["pool_weight"] * blurred + VAE["kl_weight"] * kl

        state = stage.run(loss_at)["vae"]
        vae.load_state_dict(state)
        vae.requires_grad_(False).eval()
        scaling = latent_scaling(vae)
        torch.save({"state": state, "scaling_factor": scaling, "seconds": stage.seconds}, finished)
        log(f"{phase['name']}: done in {stage.seconds / 60:.1f} min, scaling factor {scaling:.4f}")
        reconstruction_check(vae)


def refine_decoder(work: Path, components: T.TinyComponents) -> None:
    """The VAE's decoder alone, sharpened on whole pictures (:data:`DECODER`): the latents the UNet
    learns from stay as they are. The loss adds the L1 of the pictures' horizontal and vertical
    differences to the VAE's, so that corners (a diamond's above all) stop melting into discs."""
    vae = components.vae
    done = work / "vae-decoder.pt"
    if done.exists():
        vae.decoder.load_state_dict(torch.load(done)["state"])
        return
    decoder = vae.decoder.requires_grad_(True)
    stage = Stage("vae-decoder", work, {"decoder": decoder}, {**DECODER, "ema": None})

    def loss_at(step: int, generator: torch.Generator) -> torch.Tensor:
        pixels = vae_batch(random.Random(SEED * 7877 + step), DECODER["batch"])
        with torch.no_grad():
            posterior = vae.encode(pixels).latent_dist
            latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        error = vae.decode(latents).sample - pixels
        blurred = torch.nn.functional.avg_pool2d(error, 4).pow(2).mean()
        edges = (error[..., 1:, :] - error[..., :-1, :]).abs().mean() + (error[..., 1:] - error[..., :-1]).abs().mean()
        return error.abs().mean() + VAE["pool_weight"] * blurred + DECODER["edge_weight"] * edges

    decoder.load_state_dict(stage.run(loss_at)["decoder"])
    vae.requires_grad_(False).eval()
    torch.save({"state": decoder.state_dict(), "seconds": stage.seconds}, done)
    log(f"vae decoder: done in {stage.seconds / 60:.1f} min")
    reconstruction_check(vae)


def crop(pixels: torch.Tensor, size: int, rng: random.Random) -> torch.Tensor:
    if size >= pixels.shape[-1]:
        return pixels
    top, left = rng.randrange(pixels.shape[-2] - size + 1), rng.randrange(pixels.shape[-1] - size + 1)
    return pixels[..., top : top + size, left : left + size]


def vae_batch(rng: random.Random, count: int) -> torch.Tensor:
    return to_tensor(
        [
            varied_picture(rng)
            if rng.random() < VAE["varied_share"]
            else procedural.draw_scene(procedural.random_scene(rng), T.TINY_IMAGE_SIZE)
            for _ in range(count)
        ]
    )


def reconstruction_check(vae) -> None:
    """How much of the caption survives encoding and decoding (the ceiling for the UNet)."""
    scenes = training_scenes(128, SEED + 3)
    with torch.no_grad():
        pixels = to_tensor([procedural.draw_scene(s) for s in scenes])
        decoded = vae.decode(vae.encode(pixels).latent_dist.mean).sample
    images = [to_image(x) for x in decoded]
    log(f"vae reconstructions: {score([judge(i, s.caption) for i, s in zip(images, scenes, strict=True)]).line()}")


def to_image(tensor: torch.Tensor):
    from PIL import Image

    array = ((tensor.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(array)


def latent_scaling(vae) -> float:
    """SD's scaling factor: 1 / the standard deviation of the training pictures' latents."""
    scenes = training_scenes(512, SEED + 1)
    with torch.no_grad():
        means = torch.cat([vae.encode(to_tensor([procedural.draw_scene(s) for s in scenes[i : i + 64]])).latent_dist.mean
                           for i in range(0, len(scenes), 64)])  # fmt: skip
    scaling = float(1.0 / means.std())
    vae.register_to_config(scaling_factor=scaling)
    return scaling


def encode_training_set(work: Path, components: T.TinyComponents) -> dict:
    done = work / "latents.pt"
    if done.exists():
        return torch.load(done)
    started = time.monotonic()
    scenes = training_scenes(TRAIN_SCENES, SEED + 2)
    means, stds = [], []
    with torch.no_grad():
        for index in range(0, len(scenes), 128):
            pixels = to_tensor([procedural.draw_scene(s) for s in scenes[index : index + 128]])
            posterior = components.vae.encode(pixels).latent_dist
            means.append(posterior.mean.half())
            stds.append(posterior.std.half())
    captions = [scene.caption for scene in scenes]
    data = {"means": torch.cat(means), "stds": torch.cat(stds), "ids": token_ids(components.tokenizer, captions)}
    data["empty"] = token_ids(components.tokenizer, [""])[0]
    data["seconds"] = time.monotonic() - started
    save_atomic(data, done)
    log(f"latents: {len(scenes)} pictures encoded in {data['seconds']:.0f} s")
    return data


def token_ids(tokenizer, texts: list[str]) -> torch.Tensor:
    return tokenizer(
        texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def latent_batch(data: dict, indices: torch.Tensor, generator, scaling: float) -> torch.Tensor:
    mean, std = data["means"][indices].float(), data["stds"][indices].float()
    return (mean + std * torch.randn(mean.shape, generator=generator)) * scaling


def caption_batch(
    data: dict, indices: torch.Tensor, generator, empty_share: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of the batch, a share of them replaced by the empty caption; and which were."""
    ids = data["ids"][indices].clone()
    empty = torch.rand(len(indices), generator=generator) < empty_share
    ids[empty] = data["empty"]
    return ids, empty


def train_sd1(
    work: Path, components: T.TinyComponents, data: dict, alphas: torch.Tensor, name: str = "sd1", settings=SD1
) -> None:
    """The UNet and text encoder on captions (``settings``), from whatever weights they hold: the
    seed's for "sd1", the sd1 stage's for "sd1-refine"."""
    done = work / f"{name}.pt"
    if done.exists():
        state = torch.load(done)
        components.unet.load_state_dict(state["unet"])
        components.text_encoder.load_state_dict(state["text_encoder"])
        return
    unet, text_encoder = components.unet, components.text_encoder
    unet.requires_grad_(True)
    text_encoder.requires_grad_(True)
    scaling = components.vae.config.scaling_factor
    stage = Stage(name, work, {"unet": unet, "text_encoder": text_encoder}, settings)

    def loss_at(step: int, generator: torch.Generator) -> torch.Tensor:
        indices = torch.randint(0, len(data["ids"]), (settings["batch"],), generator=generator)
        latents = latent_batch(data, indices, generator, scaling)
        ids, _ = caption_batch(data, indices, generator, settings["empty_caption"])
        context = text_encoder(ids)[0]
        return diffusion_loss(unet, latents, context, generator, alphas, settings)

    def probe(state):
        trial = T.build_tiny_components(0)
        trial.vae.load_state_dict(components.vae.state_dict())
        trial.vae.register_to_config(scaling_factor=scaling)
        trial.unet.load_state_dict(state["unet"])
        trial.text_encoder.load_state_dict(state["text_encoder"])
        log(f"{name} probe: {evaluate(trial, held_out_captions()[::4], seeds=(1,), steps=12).line()}")

    state = stage.run(loss_at, probe)
    unet.load_state_dict(state["unet"])
    text_encoder.load_state_dict(state["text_encoder"])
    torch.save({**state, "seconds": stage.seconds}, done)


def train_v(work: Path, base: T.TinyComponents, data: dict, alphas: torch.Tensor) -> T.TinyComponents:
    components = T.build_tiny_components(0, variant="v")
    for name in ("vae", "text_encoder", "unet"):
        getattr(components, name).load_state_dict(getattr(base, name).state_dict())
    components.vae.register_to_config(scaling_factor=base.vae.config.scaling_factor)
    done = work / "v.pt"
    if done.exists():
        components.unet.load_state_dict(torch.load(done)["unet"])
        return components
    unet = components.unet.requires_grad_(True)
    scaling = components.vae.config.scaling_factor
    stage = Stage("v", work, {"unet": unet}, V)

    def loss_at(step: int, generator: torch.Generator) -> torch.Tensor:
        indices = torch.randint(0, len(data["ids"]), (V["batch"],), generator=generator)
        latents = latent_batch(data, indices, generator, scaling)
        ids, _ = caption_batch(data, indices, generator, SD1["empty_caption"])
        with torch.no_grad():
            context = components.text_encoder(ids)[0]
        return diffusion_loss(unet, latents, context, generator, alphas, V, v=True)

    state = stage.run(loss_at)
    unet.load_state_dict(state["unet"])
    torch.save({**state, "seconds": stage.seconds}, done)
    return components


def xl_unet_from(base_unet: torch.nn.Module, unet: torch.nn.Module) -> None:
    """Start the SDXL-shaped UNet from the SD1 one: shared weights copied, the key/value columns of
    the second encoder and the added embedding's output at zero (so it starts as the SD1 model)."""
    source = base_unet.state_dict()
    with torch.no_grad():
        for key, value in unet.state_dict().items():
            if key.startswith("add_embedding.linear_2"):
                value.zero_()
            elif key in source and source[key].numel() == value.numel():
                value.copy_(source[key].reshape(value.shape))
            elif key in source and key.endswith(("attn2.to_k.weight", "attn2.to_v.weight")):
                value.zero_()
                value[:, : source[key].shape[1]] = source[key]


def xl_conditioning(components, ids: torch.Tensor, empty: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """What StableDiffusionXLPipeline feeds the UNet, with an empty caption as zeros (as the
    pipeline's force_zeros_for_empty_prompt does for the negative pass)."""
    with torch.no_grad():
        first = components.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
    second = components.text_encoder_2(ids, output_hidden_states=True)
    context = torch.cat([first, second.hidden_states[-2]], dim=-1)
    pooled = second.text_embeds
    keep = (~empty).float()
    context, pooled = context * keep.view(-1, 1, 1), pooled * keep.view(-1, 1)
    size = T.TINY_IMAGE_SIZE
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=context.dtype).repeat(len(ids), 1)
    return context, {"text_embeds": pooled, "time_ids": time_ids}


def train_xl(work: Path, base: T.TinyComponents, data: dict, alphas: torch.Tensor) -> T.TinyComponents:
    components = T.build_tiny_components(0, variant="sdxl")
    for name in ("vae", "text_encoder"):
        getattr(components, name).load_state_dict(getattr(base, name).state_dict())
    components.vae.register_to_config(scaling_factor=base.vae.config.scaling_factor)
    done = work / "sdxl.pt"
    if done.exists():
        state = torch.load(done)
        components.unet.load_state_dict(state["unet"])
        components.text_encoder_2.load_state_dict(state["text_encoder_2"])
        return components
    xl_unet_from(base.unet, components.unet)
    unet = components.unet.requires_grad_(True)
    text_encoder_2 = components.text_encoder_2.requires_grad_(True)
    scaling = components.vae.config.scaling_factor
    stage = Stage("sdxl", work, {"unet": unet, "text_encoder_2": text_encoder_2}, XL)

    def loss_at(step: int, generator: torch.Generator) -> torch.Tensor:
        indices = torch.randint(0, len(data["ids"]), (XL["batch"],), generator=generator)
        latents = latent_batch(data, indices, generator, scaling)
        ids, empty = caption_batch(data, indices, generator, XL["empty_caption"])
        context, added = xl_conditioning(components, ids, empty)
        return diffusion_loss(unet, latents, context, generator, alphas, XL, added=added)

    state = stage.run(loss_at)
    unet.load_state_dict(state["unet"])
    text_encoder_2.load_state_dict(state["text_encoder_2"])
    torch.save({**state, "seconds": stage.seconds}, done)
    return components


# -- evaluation and the file ------------------------------------------------------------------------
def generate_pictures(components: T.TinyComponents, captions: list[str], seed: int, steps: int, cfg: float):
    pipe = components.pipeline()
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return pipe(prompt=captions, num_inference_steps=steps, guidance_scale=cfg, generator=generator).images


def evaluate(components, captions: list[str], *, seeds=None, steps=None, sheet=None):
    seeds, steps = seeds or EVALUATION["seeds"], steps or EVALUATION["steps"]
    verdicts, pictures = [], []
    for seed in seeds:
        images = generate_pictures(components, captions, seed, steps, EVALUATION["cfg"])
        verdicts += [judge(image, caption) for image, caption in zip(images, captions, strict=True)]
        pictures += images
    if sheet is not None:
        from hypernetwork_ext.standalone.images import grid

        grid(pictures, 16).save(sheet)
    return score(verdicts)


def pack(work: Path, output: Path, variants: dict[str, T.TinyComponents], args) -> None:
    from safetensors.torch import save_file

    held_out = held_out_captions()
    scores, tensors = {}, {}
    for variant, components in variants.items():
        result = evaluate(components, held_out, sheet=work / f"held-out-{variant}.png")
        scores[variant] = result.__dict__
        log(f"{variant} on {len(held_out)} held-out captions x {len(EVALUATION['seeds'])} seeds: {result.line()}")
        tensors.update(T.state_for_file(components, variant))
    seconds = {name: round(torch.load(work / f"{name}.pt", weights_only=False)["seconds"]) for name in
               ("vae-crops", "vae", "latents", "vae-decoder", "sd1", "sd1-refine", "v", "sdxl")}  # fmt: skip
    recipe = {
        "seed": SEED,
        "held_out_fraction": HELD_OUT_FRACTION,
        "vae": VAE,
        "vae_phases": VAE_PHASES,
        "decoder": DECODER,
        "train_scenes": TRAIN_SCENES,
        "sd1": SD1,
        "sd1_refine": SD1_REFINE,
        "v": V,
        "sdxl": XL,
        "evaluation": EVALUATION,
    }
    metadata = {
        "format": "pt",
        "vae_scaling_factor": json.dumps(variants["sd1"].vae.config.scaling_factor),
        "recipe": json.dumps(recipe),
        "held_out_scores": json.dumps(scores),
        "train_seconds": json.dumps(seconds),
        "threads": str(args.threads),
        "torch": torch.__version__,
        "made_by": "tools/train_tiny_model.py",
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.with_suffix(".tmp")
    save_file(tensors, temporary, metadata=metadata)
    os.replace(temporary, output)
    log(f"wrote {output} ({output.stat().st_size / 1e6:.1f} MB); stage seconds {seconds}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="tiny-model-work", help="checkpoints and evaluation sheets")
    parser.add_argument("--output", default=str(T.WEIGHTS_PATH))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core machine)")
    parser.add_argument(
        "--stop-after",
        choices=("vae", "latents", "sd1", "v", "sdxl"),
        help="for trying a recipe (sd1: after its refinement)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    components = T.build_tiny_components(SEED)
    train_vae(work, components)
    if args.stop_after == "vae":
        return 0
    data = encode_training_set(work, components)
    refine_decoder(work, components)
    if args.stop_after == "latents":
        return 0
    alphas = torch.as_tensor(components.scheduler.alphas_cumprod, dtype=torch.float32)
    train_sd1(work, components, data, alphas)
    train_sd1(work, components, data, alphas, "sd1-refine", SD1_REFINE)
    if args.stop_after == "sd1":
        log(
            f"sd1 on the held-out captions: {evaluate(components, held_out_captions(), sheet=work / 'held-out-sd1.png').line()}"
        )
        return 0
    v_components = train_v(work, components, data, alphas)
    if args.stop_after == "v":
        return 0
    xl_components = train_xl(work, components, data, alphas)
    if args.stop_after == "sdxl":
        return 0
    pack(work, Path(args.output), {"sd1": components, "v": v_components, "sdxl": xl_components}, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
