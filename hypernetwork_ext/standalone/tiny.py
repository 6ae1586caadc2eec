"""The embedded default: a tiny Stable-Diffusion-architecture model that draws coloured shapes.

Nothing is downloaded. A UNet, a VAE, a CLIP text encoder and a byte-level BPE tokenizer with the
same classes and data flow as Stable Diffusion, shrunk to run on two CPU cores, and trained by
``tools/train_tiny_model.py`` on the pictures of :mod:`hypernetwork_ext.standalone.procedural`
("a red circle on a white background"); the weights ship beside this file
(``tiny-sd.safetensors``, half precision). docs/tiny-model.md tells how it was made.

64x64 pictures, 8x8x4 latents, captions of up to 16 tokens. The attention widths are 48 (the text context) and 32/64
(self-attention), so a network for it has widths 48, 32 and 64. Two variants share its VAE and
first text encoder: ``"v"`` predicts v instead of the noise (as SD2-768 does) and ``"sdxl"`` is
SDXL-shaped (a second text encoder with projection, the two encoders' penultimate states side by
side as an 80-wide context, pooled text and size ids as added conditioning).

``build_tiny_components(seed)`` with a seed builds the same architecture with weights drawn from
that seed instead (the untrained model: fast, deterministic, what the training script starts from).
"""

from __future__ import annotations

import itertools
import json
import os
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

TINY_CONTEXT_WIDTH = 48
TINY_SELF_WIDTHS = (32, 64)
TINY_WIDTHS = (TINY_CONTEXT_WIDTH, *TINY_SELF_WIDTHS)
TINY_XL_CONTEXT_WIDTH = 80  # the first encoder's 48 beside the second's 32
TINY_XL_POOLED_WIDTH = 32
TINY_XL_TIME_ID_WIDTH = 8
TINY_IMAGE_SIZE = 64
TINY_LATENT_SIZE = 8
TINY_MODEL_NAME = "tiny-sd (embedded default)"
TINY_VARIANTS = {"sd1": TINY_MODEL_NAME, "v": "tiny-sd-v (embedded, v-prediction)", "sdxl": "tiny-sdxl (embedded)"}
TOKEN_LENGTH = 16  # the longest caption of the data is 12 tokens; SD's 77 would only cost time
WEIGHTS_PATH = Path(__file__).with_name("tiny-sd.safetensors")
# Key prefixes in the weights file: the UNet of each variant, the shared parts once.
_PREFIXES = {"sd1": "unet.", "v": "unet_v.", "sdxl": "unet_xl."}


@dataclass
class TinyComponents:
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object
    text_encoder_2: torch.nn.Module | None = None
    tokenizer_2: object = None

    def modules(self) -> list[torch.nn.Module]:
        return [m for m in (self.unet, self.vae, self.text_encoder, self.text_encoder_2) if m is not None]

    def pipeline(self):
        """A diffusers pipeline over these components: StableDiffusionPipeline, or
        StableDiffusionXLPipeline for the SDXL-shaped variant (no safety checker)."""
        from ..diffusers_pipeline import pipeline_from_components, quiet_transformers

        if self.text_encoder_2 is None:
            return pipeline_from_components(self)
        with quiet_transformers():
            from diffusers import StableDiffusionXLPipeline

            return StableDiffusionXLPipeline(
                vae=self.vae,
                text_encoder=self.text_encoder,
                text_encoder_2=self.text_encoder_2,
                tokenizer=self.tokenizer,
                tokenizer_2=self.tokenizer_2,
                unet=self.unet,
                scheduler=self.scheduler,
                add_watermarker=False,
            )


# -- tokenizer --------------------------------------------------------------------------------------
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


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Byte-pair merges learned from ``words`` until each is one token (most frequent pair first,
    ties by the pair itself, so the result is the same everywhere)."""
    pieces = [[*word[:-1], word[-1] + "</w>"] for word in words if word]
    merges = []
    while True:
        counts = Counter(pair for symbols in pieces for pair in itertools.pairwise(symbols))
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        for symbols in pieces:
            index = 0
            while index < len(symbols) - 1:
                if (symbols[index], symbols[index + 1]) == best:
                    symbols[index : index + 2] = [symbols[index] + symbols[index + 1]]
                index += 1


def tokenizer_files(directory: str | os.PathLike) -> Path:
    """Write a CLIP-style byte-level BPE vocabulary into ``directory``: every byte, and merges that
    make each word of the tiny model's captions one token."""
    from .procedural import vocabulary

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    merges = learn_merges(vocabulary())
    symbols = list(_bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols]
    vocab_list += [a + b for a, b in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(vocab_list))}
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    }
    (directory / "special_tokens_map.json").write_text(json.dumps(special))
    (directory / "tokenizer_config.json").write_text(
        json.dumps({**special, "model_max_length": TOKEN_LENGTH, "tokenizer_class": "CLIPTokenizer"})
    )
    return directory


def build_tokenizer():
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as folder:
        tokenizer_files(folder)
        return CLIPTokenizer.from_pretrained(folder, local_files_only=True)


# -- architecture -----------------------------------------------------------------------------------
def _unet(variant: str):
    from diffusers import UNet2DConditionModel

    extra = {}
    context = TINY_CONTEXT_WIDTH
    if variant == "sdxl":
        context = TINY_XL_CONTEXT_WIDTH
        extra = {
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": TINY_XL_TIME_ID_WIDTH,
            "projection_class_embeddings_input_dim": TINY_XL_POOLED_WIDTH + 6 * TINY_XL_TIME_ID_WIDTH,
            "use_linear_projection": True,
        }
    return UNet2DConditionModel(
        sample_size=TINY_LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        block_out_channels=TINY_SELF_WIDTHS,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=context,
        attention_head_dim=8,
        norm_num_groups=8,
        **extra,
    )


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        # Groups of one channel would be instance norms: the decoder's last one would wipe out
        # every flat colour (a background) before the output layer.
        norm_num_groups=2,
        sample_size=TINY_IMAGE_SIZE,
    )


def _text_encoder(tokenizer, width: int, *, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=width * 4,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=TINY_XL_POOLED_WIDTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def scheduler_for(variant: str):
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
        prediction_type="v_prediction" if variant == "v" else "epsilon",
    )


def _check_variant(variant: str) -> None:
    if variant not in TINY_VARIANTS:
        from ..errors import InvalidConfigError

        raise InvalidConfigError(f"no tiny model variant {variant!r}; known: {', '.join(TINY_VARIANTS)}")


def build_tiny_components(seed: int | None = None, *, variant: str = "sd1") -> TinyComponents:
    """Every component of the tiny model: the trained weights, or with ``seed`` weights drawn from it."""
    _check_variant(variant)
    tokenizer = build_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0 if seed is None else seed)
        unet, vae = _unet(variant), _vae()
        text_encoder = _text_encoder(tokenizer, TINY_CONTEXT_WIDTH)
        text_encoder_2 = (
            _text_encoder(tokenizer, TINY_XL_CONTEXT_WIDTH - TINY_CONTEXT_WIDTH, projection=True)
            if variant == "sdxl"
            else None
        )
    components = TinyComponents(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler_for(variant),
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer if text_encoder_2 is not None else None,
    )
    if seed is None:
        load_weights(components, variant)
    for module in components.modules():
        module.eval().requires_grad_(False)
    return components


def _modules(components: TinyComponents, variant: str) -> dict[str, torch.nn.Module]:
    modules = {_PREFIXES[variant]: components.unet, "vae.": components.vae, "text_encoder.": components.text_encoder}
    if components.text_encoder_2 is not None:
        modules["text_encoder_2."] = components.text_encoder_2
    return modules


def load_weights(components: TinyComponents, variant: str, path: str | os.PathLike = WEIGHTS_PATH) -> None:
    """Load a variant's trained weights (stored in half precision) into ``components``."""
    from safetensors import safe_open

    from ..errors import FileFormatError

    if not os.path.isfile(path):
        raise FileFormatError("the tiny model's weights are missing (run tools/train_tiny_model.py)", str(path))
    with safe_open(os.fspath(path), "pt") as handle:
        keys = set(handle.keys())
        scaling = float(json.loads((handle.metadata() or {}).get("vae_scaling_factor", "null")) or 1.0)
        for prefix, module in _modules(components, variant).items():
            state = {key[len(prefix) :]: handle.get_tensor(key).float() for key in keys if key.startswith(prefix)}
            missing, unexpected = module.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise FileFormatError(
                    f"the tiny model's {prefix.rstrip('.')} weights do not fit its architecture "
                    f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})",
                    str(path),
                )
    components.vae.register_to_config(scaling_factor=scaling)


def state_for_file(components: TinyComponents, variant: str) -> dict[str, torch.Tensor]:
    """The tensors of one variant as the weights file holds them (half precision, prefixed keys)."""
    return {
        prefix + key: value.detach().to(torch.float16).contiguous()
        for prefix, module in _modules(components, variant).items()
        for key, value in module.state_dict().items()
    }


def procedural_images(
    folder: str | os.PathLike, count: int = 8, *, seed: int = 0, size: int = TINY_IMAGE_SIZE, colour: str | None = None
) -> list[Path]:
    """Draw ``count`` captioned pictures of coloured shapes into ``folder`` (see :mod:`.procedural`).

    With ``colour`` every shape has that colour; otherwise colours vary.
    """
    from .procedural import COLOURS, write_dataset

    colours = (colour,) if colour else tuple(COLOURS)
    return write_dataset(folder, count, seed=seed, size=size, colours=colours)
