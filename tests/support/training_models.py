"""Small real models for the training tests: A1111's ldm ``LatentDiffusion`` built from a config,
an sgm-shaped ``DiffusionEngine`` stand-in, and datasets drawn in code.

``ldm.models.diffusion.ddpm`` imports ``torchvision.utils.make_grid`` at module level (for image
logging the training path never calls). PyPI's torchvision wheels are CUDA builds that do not
load beside the CPU torch of the test environments ("operator torchvision::nms does not exist"),
so when the real one cannot be imported, :func:`import_ldm` registers a ``torchvision`` module
holding only ``utils.make_grid``, which raises if anything ever calls it. Nothing else is faked:
the LatentDiffusion, its UNet, its AutoencoderKL and the CLIP text model are the real classes.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from .models import LDM_CONTEXT, LDM_WIDTHS, randomise


def _torchvision_importable() -> bool:
    try:
        import torchvision.utils  # noqa: F401

        return True
    except Exception:
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        return False


def import_ldm():
    """``ldm.models.diffusion.ddpm``, importable beside a CPU torch (see the module docstring)."""
    import warnings

    if "ldm.models.diffusion.ddpm" in sys.modules:
        return sys.modules["ldm.models.diffusion.ddpm"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pytorch_lightning  # noqa: F401  (first, while torchvision is absent: it probes for it)

        if _torchvision_importable():
            from ldm.models.diffusion import ddpm

            return ddpm

        def make_grid(*args, **kwargs):
            raise RuntimeError("torchvision is not available in this test environment (image-grid logging only)")

        package = types.ModuleType("torchvision")
        utils = types.ModuleType("torchvision.utils")
        utils.make_grid = make_grid
        package.utils = utils
        sys.modules["torchvision"], sys.modules["torchvision.utils"] = package, utils
        try:
            from ldm.models.diffusion import ddpm
        finally:  # the placeholder only served that import
            del sys.modules["torchvision"], sys.modules["torchvision.utils"]
    return ddpm


class TinyTextEncoder(nn.Module):
    """A cond-stage model with the interface LatentDiffusion expects (``encode(texts)``): a real
    transformers CLIP text model, built small from a config with the embedded tokenizer."""

    def __init__(self, width: int = LDM_CONTEXT, seed: int = 7, *, layers: int = 1, heads: int = 4, tokens: int = 16):
        """``layers=12, heads=12, tokens=77`` at width 768 is CLIP ViT-L/14's text model (SD1.5's)."""
        super().__init__()
        from transformers import CLIPTextConfig, CLIPTextModel

        from hypernetwork_ext.standalone.tiny import build_tokenizer

        self.tokenizer = build_tokenizer()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.transformer = CLIPTextModel(
                CLIPTextConfig(
                    vocab_size=len(self.tokenizer),
                    hidden_size=width,
                    intermediate_size=width * (4 if layers > 1 else 2),
                    num_hidden_layers=layers,
                    num_attention_heads=heads,
                    max_position_embeddings=77,
                    bos_token_id=self.tokenizer.bos_token_id,
                    eos_token_id=self.tokenizer.eos_token_id,
                    pad_token_id=self.tokenizer.pad_token_id,
                )
            )
        self.max_length = tokens
        self.eval().requires_grad_(False)

    def forward(self, texts):
        tokens = self.tokenizer(
            list(texts), padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(self.transformer.device)
        return self.transformer(input_ids=tokens).last_hidden_state

    def encode(self, texts):
        return self(texts)


def unet_config(*, context_dim: int = LDM_CONTEXT, use_checkpoint: bool = False) -> dict:
    return {
        "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
        "params": {
            "image_size": 8,
            "in_channels": 4,
            "out_channels": 4,
            "model_channels": LDM_WIDTHS[0],
            "attention_resolutions": [1, 2],
            "num_res_blocks": 1,
            "channel_mult": [1, 2],
            "num_head_channels": 8,
            "use_spatial_transformer": True,
            "transformer_depth": 1,
            "context_dim": context_dim,
            "legacy": False,
            "use_checkpoint": use_checkpoint,
        },
    }


def autoencoder_config() -> dict:
    return {
        "target": "ldm.models.autoencoder.AutoencoderKL",
        "params": {
            "embed_dim": 4,
            "lossconfig": {"target": "torch.nn.Identity"},
            "ddconfig": {
                "double_z": True,
                "z_channels": 4,
                "resolution": 64,
                "in_channels": 3,
                "out_ch": 3,
                "ch": 32,
                "ch_mult": [1, 1, 1, 1],
                "num_res_blocks": 1,
                "attn_resolutions": [],
                "dropout": 0.0,
            },
        },
    }


def tiny_latent_diffusion(seed: int = 0, *, parameterization: str = "eps", use_checkpoint: bool = False) -> nn.Module:
    """A real ldm ``LatentDiffusion`` (as A1111 loads SD1/SD2), small enough for CPU tests."""
    import contextlib
    import io

    ddpm = import_ldm()
    torch.manual_seed(seed)
    with contextlib.redirect_stdout(io.StringIO()):
        model = ddpm.LatentDiffusion(
            first_stage_config=autoencoder_config(),
            cond_stage_config={"target": "tests.support.training_models.TinyTextEncoder"},
            unet_config=unet_config(use_checkpoint=use_checkpoint),
            conditioning_key="crossattn",
            cond_stage_key="txt",
            timesteps=1000,
            linear_start=0.00085,
            linear_end=0.012,
            scale_factor=0.18215,
            use_ema=False,
            parameterization=parameterization,
            image_size=8,
            channels=4,
        )
    randomise(model.model.diffusion_model, seed + 1)
    return model.eval()


# --- an sgm DiffusionEngine stand-in ------------------------------------------------------------
# No package on PyPI carries Stability-AI's ``sgm``. These classes repeat the names, attributes and
# call signatures of sgm (generative-models at the commit A1111 1.10 pins, 45c443b) that the SDXL
# backend relies on: DiffusionEngine.{model, conditioner, first_stage_model, denoiser,
# scale_factor, encode_first_stage}, OpenAIWrapper.forward(x, t, c) with c["crossattn"] and
# c["vector"], GeneralConditioner.forward(batch, force_zero_embeddings) returning
# {"crossattn", "vector"}, AutoencoderKL's encoder/quant_conv and a DiscreteDenoiser's scaling.
# The UNet inside is the real ldm UNetModel given sgm's "sequential" label embedding (SDXL's
# adm_in_channels path), the autoencoder the real ldm AutoencoderKL.
class EpsScaling:
    def __call__(self, sigma):
        return torch.ones_like(sigma), -sigma, 1 / (sigma**2 + 1.0) ** 0.5, sigma.clone()


class VScaling:
    def __call__(self, sigma):
        return 1.0 / (sigma**2 + 1.0), -sigma / (sigma**2 + 1.0) ** 0.5, 1.0 / (sigma**2 + 1.0) ** 0.5, sigma.clone()


class DiscreteDenoiser(nn.Module):
    def __init__(self, scaling):
        super().__init__()
        self.scaling = scaling


class OpenAIWrapper(nn.Module):
    def __init__(self, diffusion_model: nn.Module):
        super().__init__()
        self.diffusion_model = diffusion_model

    def forward(self, x, t, c, **kwargs):
        x = torch.cat((x, c.get("concat", torch.Tensor([]).type_as(x))), dim=1)
        return self.diffusion_model(x, timesteps=t, context=c.get("crossattn"), y=c.get("vector"), **kwargs)


class TextEmbedder(nn.Module):
    """Cross-attention context plus a pooled vector, like SDXL's second text embedder."""

    def __init__(self, width: int, *, pooled: bool = True, **encoder):
        super().__init__()
        self.encoder = TinyTextEncoder(width, **encoder)
        self.pooled = pooled  # SDXL's first embedder (CLIP ViT-L) gives only the context
        self.input_key = "txt"
        self.ucg_rate = 0.0
        self.legacy_ucg_val = None
        self.is_trainable = False

    def forward(self, texts):
        hidden = self.encoder(texts)
        return (hidden, hidden[:, -1]) if self.pooled else hidden


class SizeEmbedder(nn.Module):
    """sgm's ConcatTimestepEmbedderND: a sinusoidal embedding of each number of a size tuple."""

    def __init__(self, input_key: str, outdim: int = 8):
        super().__init__()
        self.input_key = input_key
        self.outdim = outdim
        self.ucg_rate = 0.0
        self.legacy_ucg_val = None
        self.is_trainable = False

    def forward(self, x):
        from ldm.modules.diffusionmodules.util import timestep_embedding

        batch, dims = x.shape
        embedded = timestep_embedding(x.reshape(-1), dim=self.outdim)
        return embedded.reshape(batch, dims * self.outdim)


class GeneralConditioner(nn.Module):
    OUTPUT_DIM2KEYS: ClassVar[dict] = {2: "vector", 3: "crossattn", 4: "concat", 5: "concat"}
    KEY2CATDIM: ClassVar[dict] = {"vector": 1, "crossattn": 2, "concat": 1}

    def __init__(self, embedders):
        super().__init__()
        self.embedders = nn.ModuleList(embedders)

    def forward(self, batch, force_zero_embeddings=None):
        output = {}
        force_zero_embeddings = force_zero_embeddings or []
        for embedder in self.embedders:
            with torch.no_grad():
                out = embedder(batch[embedder.input_key])
            for emb in out if isinstance(out, (list, tuple)) else [out]:
                key = self.OUTPUT_DIM2KEYS[emb.dim()]
                if embedder.input_key in force_zero_embeddings:
                    emb = torch.zeros_like(emb)
                output[key] = torch.cat((output[key], emb), self.KEY2CATDIM[key]) if key in output else emb
        return output


class DiffusionEngine(nn.Module):
    def __init__(self, network, denoiser, conditioner, first_stage_model, scale_factor: float):
        super().__init__()
        self.model = OpenAIWrapper(network)
        self.denoiser = denoiser
        self.conditioner = conditioner
        self.first_stage_model = first_stage_model
        self.scale_factor = scale_factor

    @torch.no_grad()
    def encode_first_stage(self, x):
        return self.scale_factor * self.first_stage_model.encode(x).sample()


SGM_CONTEXT = 40


def tiny_diffusion_engine(seed: int = 0, *, v_prediction: bool = False) -> DiffusionEngine:
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    from ldm.util import instantiate_from_config

    import_ldm()
    torch.manual_seed(seed)
    params = dict(unet_config(context_dim=SGM_CONTEXT)["params"])
    params["use_linear_in_transformer"] = True
    unet = UNetModel(**params)
    size_keys = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")
    adm_in_channels = SGM_CONTEXT + 2 * 8 * len(size_keys)
    time_embed_dim = unet.model_channels * 4
    unet.num_classes = "sequential"
    unet.label_emb = nn.Sequential(
        nn.Sequential(nn.Linear(adm_in_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim))
    )
    randomise(unet, seed + 1)
    conditioner = GeneralConditioner([TextEmbedder(SGM_CONTEXT), *(SizeEmbedder(key) for key in size_keys)])
    first_stage = instantiate_from_config(autoencoder_config()).eval()
    denoiser = DiscreteDenoiser(VScaling() if v_prediction else EpsScaling())
    return DiffusionEngine(unet, denoiser, conditioner, first_stage, 0.13025).eval()


def dataset_folder(folder: Path, count: int = 4, *, seed: int = 0, colour: str | None = "red", size: int = 64) -> Path:
    from hypernetwork_ext.standalone.tiny import procedural_images

    procedural_images(folder, count, seed=seed, colour=colour, size=size)
    return folder


def training_config(tmp_path: Path, data: Path, **changes):
    """A short run's TrainingConfig on ``data`` (64x64, the captions as prompts, logs in ``tmp_path``)."""
    from hypernetwork_ext.training import TrainingConfig

    values = dict(
        hypernetwork_name="style",
        learn_rate="0.001",
        data_root=str(data),
        log_directory=str(tmp_path / "logs"),
        training_width=64,
        training_height=64,
        steps=4,
        create_image_every=0,
        save_hypernetwork_every=0,
        template_filename="filewords.txt",
        seed=11,
        training_write_csv_every=1,
    )
    values.update(changes)
    return TrainingConfig(**values)
