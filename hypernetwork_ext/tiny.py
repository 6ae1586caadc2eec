"""The embedded default: a tiny Stable-Diffusion-architecture model built in code, and images to train on.

Nothing is downloaded. A UNet, a VAE, a CLIP text encoder and a byte-level BPE tokenizer with
the same classes and data flow as Stable Diffusion, shrunk to run on two CPU cores, with weights
drawn from a fixed seed. The attention widths are 48 (the text context) and 32/64 (self-attention),
so a network for it has widths 48, 32 and 64. Images come from :func:`procedural_images`:
coloured shapes with captions, drawn from a seed.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

TINY_CONTEXT_WIDTH = 48
TINY_SELF_WIDTHS = (32, 64)
TINY_WIDTHS = (TINY_CONTEXT_WIDTH, *TINY_SELF_WIDTHS)
TINY_IMAGE_SIZE = 64
TINY_MODEL_NAME = "tiny-sd (embedded default)"
_TOKENIZER_MERGES = ("a r", "r e", "e d</w>", "i n", "o n", "c i", "s q", "u a", "t h", "l e</w>", "e s</w>", "a n")

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {
    "red": (220, 40, 40),
    "blue": (40, 70, 220),
    "green": (40, 170, 60),
    "yellow": (230, 200, 40),
    "purple": (150, 60, 190),
}


@dataclass
class TinyComponents:
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object

    def pipeline(self):
        """A diffusers StableDiffusionPipeline over these components (no safety checker)."""
        from .generate import pipeline_from_components

        return pipeline_from_components(self)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def tokenizer_files(directory: str | os.PathLike) -> Path:
    """Write a CLIP-style byte-level BPE vocabulary (every byte, a few merges) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols]
    vocab_list += ["".join(m.split()) for m in _TOKENIZER_MERGES]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(vocab_list))}
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(_TOKENIZER_MERGES) + "\n")
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    }
    (directory / "special_tokens_map.json").write_text(json.dumps(special))
    (directory / "tokenizer_config.json").write_text(
        json.dumps({**special, "model_max_length": 77, "tokenizer_class": "CLIPTokenizer"})
    )
    return directory


def build_tokenizer():
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as folder:
        tokenizer_files(folder)
        return CLIPTokenizer.from_pretrained(folder, local_files_only=True)


def build_tiny_components(seed: int = 0) -> TinyComponents:
    """Every component of the tiny model, with weights drawn from ``seed``."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=TINY_IMAGE_SIZE // 4,
            in_channels=4,
            out_channels=4,
            block_out_channels=TINY_SELF_WIDTHS,
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=TINY_CONTEXT_WIDTH,
            attention_head_dim=8,
            norm_num_groups=8,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=(16, 32, 32),
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=8,
            sample_size=TINY_IMAGE_SIZE,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=TINY_CONTEXT_WIDTH,
                intermediate_size=TINY_CONTEXT_WIDTH * 2,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
    )
    for module in (unet, vae, text_encoder):
        module.eval().requires_grad_(False)
    return TinyComponents(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def procedural_images(
    folder: str | os.PathLike, count: int = 8, *, seed: int = 0, size: int = TINY_IMAGE_SIZE, colour: str | None = None
) -> list[Path]:
    """Draw ``count`` images of coloured shapes with ``<image>.txt`` captions into ``folder``.

    With ``colour`` every shape has that colour (a "style" to learn); otherwise colours vary.
    """
    from PIL import Image, ImageDraw

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    written = []
    for index in range(count):
        shape = SHAPES[index % len(SHAPES)]
        name = colour or rng.choice(sorted(COLOURS))
        background = tuple(rng.randint(200, 255) for _ in range(3))
        image = Image.new("RGB", (size, size), background)
        draw = ImageDraw.Draw(image)
        margin = rng.randint(size // 8, size // 4)
        box = (margin, margin, size - margin, size - margin)
        fill = COLOURS[name]
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        elif shape == "triangle":
            draw.polygon([(size // 2, box[1]), (box[0], box[3]), (box[2], box[3])], fill=fill)
        else:
            draw.polygon(
                [(size // 2, box[1]), (box[2], size // 2), (size // 2, box[3]), (box[0], size // 2)], fill=fill
            )
        path = folder / f"{index:03d}-{name}-{shape}.png"
        image.save(path)
        path.with_suffix(".txt").write_text(f"a {name} {shape}")
        written.append(path)
    return written
