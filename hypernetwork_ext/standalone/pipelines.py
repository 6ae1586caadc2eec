"""Model sources for the standalone tools: the embedded tiny model, a diffusers folder, or a
single-file Stable Diffusion checkpoint (``.safetensors``/``.ckpt``), loaded through diffusers.

Nothing is downloaded unless the user allows it: single files need their architecture's configs
(diffusers fetches them from the Hugging Face hub, or reads them from a local ``--config``
folder); with the hub unreachable and no config given the error says exactly that.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import FileFormatError, HypernetworkError
from ..families import infer_family
from ..hashing import file_sha256, short_hash
from .tiny import TINY_MODEL_NAME, build_tiny_components

_XL_PIPELINES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline")


@dataclass
class ModelSource:
    """A loaded diffusers pipeline and what to record about it in a trained network."""

    pipe: object
    name: str
    path: str | None
    is_sdxl: bool

    @property
    def unet(self) -> torch.nn.Module:
        return self.pipe.unet

    @property
    def family(self) -> str | None:
        return infer_family(attention_widths(self.unet))

    @property
    def image_size(self) -> int:
        """The side the model was trained at, in pixels (its UNet's sample size times the VAE's
        downscaling): 64 for the embedded model, 512 for SD1.5, 768 for SD2-v, 1024 for SDXL."""
        return native_image_size(self.pipe)

    def checkpoint_hash(self) -> str | None:
        """A1111's short hash of a single-file checkpoint (None for folders and the tiny model)."""
        if self.path and os.path.isfile(self.path):
            return short_hash(file_sha256(self.path))
        return None


def native_image_size(pipe) -> int:
    sample = getattr(getattr(pipe.unet, "config", None), "sample_size", None)
    if isinstance(sample, (tuple, list)):
        sample = sample[0]
    vae_blocks = getattr(getattr(getattr(pipe, "vae", None), "config", None), "block_out_channels", None)
    factor = 2 ** (len(vae_blocks) - 1) if vae_blocks else 8
    return int(sample) * factor if isinstance(sample, int) and sample > 0 else 512


def attention_widths(unet: torch.nn.Module) -> list[int]:
    from ..attach import find_attention_sites

    return sorted({site.key_projection.in_features for site in find_attention_sites(unet)})


def load_model(
    path: str | os.PathLike | None = None, *, config: str | None = None, allow_download: bool = False
) -> ModelSource:
    """Load a model source; ``None`` is the embedded tiny model (its trained weights)."""
    if path is None:
        components = build_tiny_components()
        source = ModelSource(components.pipeline(), TINY_MODEL_NAME, None, False)
    else:
        path = os.fspath(path)
        if os.path.isdir(path):
            source = _load_folder(path)
        elif not os.path.isfile(path):
            raise FileFormatError("no such model file or folder", path)
        else:
            source = _load_single_file(path, config, allow_download)
    # Every caller shows its own progress (a described bar with the time left, or the app's):
    # diffusers' anonymous bar per image would only add one line per picture.
    source.pipe.set_progress_bar_config(disable=True)
    return source


def _load_folder(path: str) -> ModelSource:
    index = Path(path) / "model_index.json"
    if not index.exists():
        raise FileFormatError("a folder without model_index.json (not a diffusers pipeline)", path)
    class_name = json.loads(index.read_text()).get("_class_name", "")
    from diffusers import DiffusionPipeline

    try:
        pipe = DiffusionPipeline.from_pretrained(
            path, local_files_only=True, safety_checker=None, requires_safety_checker=False
        )
    except TypeError:
        pipe = DiffusionPipeline.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise FileFormatError(f"diffusers could not load the folder ({exc})", path) from None
    if not isinstance(getattr(pipe, "unet", None), torch.nn.Module):
        raise FileFormatError(
            f"a {class_name or type(pipe).__name__} pipeline has no UNet; hypernetworks act on the attention "
            "of SD1, SD2 and SDXL UNets (SD3, Flux and other transformer models are not supported)",
            path,
        )
    return ModelSource(pipe, Path(path).name, path, class_name in _XL_PIPELINES)


def _load_single_file(path: str, config: str | None, allow_download: bool) -> ModelSource:
    from safetensors import safe_open

    if path.lower().endswith(".safetensors"):
        try:
            with safe_open(path, "pt") as handle:
                keys = list(handle.keys())
        except Exception as exc:
            raise FileFormatError(f"not a readable safetensors file ({exc})", path) from None
    else:
        from ..ops.checkpoints import pickled_state_dict

        keys = list(pickled_state_dict(path))
    is_sdxl = any(key.startswith("conditioner.embedders.1") for key in keys)
    if not any(key.startswith("model.diffusion_model.") for key in keys):
        raise FileFormatError("not a Stable Diffusion checkpoint (no model.diffusion_model.* weights)", path)
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if is_sdxl else StableDiffusionPipeline
    kwargs = {"local_files_only": not allow_download}
    if config:
        kwargs["config"] = config
    if not is_sdxl:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        pipe = cls.from_single_file(path, **kwargs)
    except Exception as exc:
        hint = (
            ""
            if config or allow_download
            else "; single files need their architecture's diffusers configs: pass --config with a diffusers folder "
            "of the same architecture, or allow downloading them (--allow-download)"
        )
        raise HypernetworkError(f"diffusers could not load the checkpoint ({exc}){hint}", path) from None
    return ModelSource(pipe, Path(path).stem, path, is_sdxl)
