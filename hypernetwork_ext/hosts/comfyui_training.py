"""Train Hypernetwork, the ComfyUI node: the engine users run everywhere, on ComfyUI's MODEL, CLIP and VAE.

It follows ComfyUI's own training nodes (``comfy_extras/nodes_train.py``, "Train LoRA"): category
``training``; the dataset is a folder of ComfyUI's input directory (as "Load Image and Text Dataset
from Folder" lists them), each image with its caption in ``<image>.txt``; outputs are the MODEL with
the result acting, the result's file name, the loss history as a ``LOSS_MAP`` ("Plot Loss Graph"
draws it) and the step count. Progress goes to ComfyUI's progress bar, Cancel stops at the next step
(the steps done are saved), and the result lands in ``models/hypernetworks`` as ``.safetensors``,
listed at once for the loader and for ``<hypernet:...>`` tags.

The backend (:class:`ComfyBackend`) drives the UNet as Forge's does (ComfyUI's patcher is Forge's
ancestor): latents from the VAE's encoder, conditioning from CLIP (and SDXL's size vector from the
model's ``encode_adm``), the model's memory manager loading everything whole.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch

from .. import formats
from ..errors import HypernetworkError, InvalidConfigError
from ..families import infer_family
from ..network import WEIGHT_INITS, activation_names, create
from ..training import TrainingCallbacks, TrainingConfig, train
from ..training.backends.base import Conditioning, cat_conditioning
from ..training.backends.forge import PatcherBackend
from ..training.data import list_templates
from .comfyui import patched_model, shape_of
from .comfyui_nodes import FOLDER, entry_named, file_names, folder_paths, library

LOG = logging.getLogger("hypernetworks")
NEW = "[new]"


class ComfyMemory:
    """ComfyUI's memory manager, as the backend uses it: models loaded whole (as Train LoRA does)."""

    def load(self, patchers: Sequence) -> None:
        import comfy.model_management as mm

        mm.load_models_gpu(list(patchers), memory_required=0, force_full_load=True)

    def fully_loaded(self, patcher) -> bool:
        return not getattr(patcher.model, "model_lowvram", False)


class ComfyBackend(PatcherBackend):
    name = "comfyui"

    def __init__(self, model, clip, vae, *, memory=None, checkpoint_name: str | None = None):
        super().__init__(model, memory or ComfyMemory(), checkpoint_name=checkpoint_name)
        self.clip = clip
        self._vae = vae
        self.model_family = infer_family(shape_of(model).default_widths)

    def vae(self):
        return self._vae

    def encode_text(self, texts: Sequence[str], size: tuple[int, int]) -> Conditioning:
        return cat_conditioning([self._encode_one(text, size) for text in texts])

    def _encode_one(self, text: str, size: tuple[int, int]) -> Conditioning:
        with self._host_call(), torch.no_grad():
            encoded = self.clip.encode_from_tokens(self.clip.tokenize(text), return_pooled=True, return_dict=True)
            width, height = size
            vector = self.patcher.model.encode_adm(
                pooled_output=encoded.get("pooled_output"),
                width=width,
                height=height,
                crop_w=0,
                crop_h=0,
                target_width=width,
                target_height=height,
                device=self.device,
            )
        context = encoded["cond"].detach().clone()
        if vector is None:
            return context
        return {"crossattn": context, "vector": vector.detach().clone()}


def training_dataset_folders() -> list[str]:
    """Folders of ComfyUI's input directory, as its dataset nodes list them."""
    return folder_paths().get_input_subfolders()


def free_name(folder: str, name: str) -> str:
    """``name``, or ``name_2``, ``name_3``... whichever has no file yet: nothing is overwritten."""
    candidate, number = name, 1
    while any(os.path.exists(os.path.join(folder, candidate + suffix)) for suffix in (".safetensors", ".pt")):
        number += 1
        candidate = f"{name}_{number}"
    return candidate


def parse_structure(text: str) -> list[float]:
    try:
        return [float(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise InvalidConfigError(f"layer_structure must be numbers separated by commas, found {text!r}") from None


class TrainHypernetwork:
    """A new or existing hypernetwork trained on the MODEL, CLIP and VAE from an image folder with captions."""

    DESCRIPTION = (
        "Trains a hypernetwork (A1111's trainer without its bugs) on the loaded model from a folder of ComfyUI's "
        "input directory: images with their captions in <image>.txt. Saves the result as .safetensors in "
        "models/hypernetworks and returns the model with it applied."
    )
    RETURN_TYPES = ("MODEL", "STRING", "LOSS_MAP", "INT")
    RETURN_NAMES = ("model", "hypernetwork_name", "loss_map", "steps")
    OUTPUT_TOOLTIPS = (
        "The model with the trained hypernetwork acting at strength 1.",
        "The saved file, as Load Hypernetwork and <hypernet:...> tags name it.",
        "Loss history (for Plot Loss Graph).",
        "The network's total training steps.",
    )
    FUNCTION = "train"
    CATEGORY = "training"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model to train on."}),
                "clip": ("CLIP", {"tooltip": "The text encoder for the captions."}),
                "vae": ("VAE", {"tooltip": "The VAE that encodes the images."}),
                "folder": (training_dataset_folders(), {"tooltip": "A folder of the input directory."}),
                "name": ("STRING", {"default": "hypernetwork", "tooltip": "The new file's name."}),
                "hypernetwork": ([NEW, *file_names()], {"tooltip": "A network to train further, or a new one."}),
                "steps": ("INT", {"default": 1000, "min": 1, "max": 1000000}),
                "learning_rate": (
                    "STRING",
                    {"default": "0.00001", "tooltip": "A rate, or A1111's schedule: 1e-4:100, 1e-5:1000, 1e-6"},
                ),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 64}),
                "width": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 64}),
                "height": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 64}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF}),
            },
            "optional": {
                "layer_structure": ("STRING", {"default": "1, 2, 1", "tooltip": "New networks: the layer sizes."}),
                "activation": (activation_names(), {"default": "relu", "tooltip": "New networks."}),
                "weight_init": (list(WEIGHT_INITS), {"default": "Normal", "tooltip": "New networks."}),
                "layer_norm": ("BOOLEAN", {"default": False, "tooltip": "New networks."}),
                "dropout": ("BOOLEAN", {"default": False, "tooltip": "New networks: dropout while training."}),
                "template": (sorted(list_templates()), {"default": "filewords.txt", "tooltip": "Caption template."}),
                "mixed_precision": (["auto", "no", "fp16", "bf16"], {"default": "auto"}),
            },
        }

    def train(
        self,
        model,
        clip,
        vae,
        folder: str,
        name: str,
        hypernetwork: str,
        steps: int,
        learning_rate: str,
        batch_size: int,
        width: int,
        height: int,
        seed: int,
        layer_structure: str = "1, 2, 1",
        activation: str = "relu",
        weight_init: str = "Normal",
        layer_norm: bool = False,
        dropout: bool = False,
        template: str = "filewords.txt",
        mixed_precision: str = "auto",
    ):
        import comfy.model_management as mm
        from comfy.utils import ProgressBar

        output_dir = folder_paths().get_folder_paths(FOLDER)[0]
        data_root = os.path.join(folder_paths().get_input_directory(), folder)
        clone = model.clone()
        with torch.inference_mode(False):
            if hypernetwork == NEW:
                shape = shape_of(clone)
                network = create(
                    shape.default_widths,
                    parse_structure(layer_structure),
                    activation,
                    weight_init,
                    layer_norm=layer_norm,
                    use_dropout=dropout,
                    seed=seed,
                    name=name,
                    model_family=infer_family(shape.default_widths),
                )
            else:
                network = formats.load(entry_named(hypernetwork).path)
            result_name = free_name(output_dir, name.strip() or "hypernetwork")
            config = TrainingConfig(
                hypernetwork_name=result_name,
                data_root=data_root,
                learn_rate=learning_rate,
                steps=network.step + steps,
                batch_size=batch_size,
                training_width=width,
                training_height=height,
                template_filename=template,
                create_image_every=0,
                save_hypernetwork_every=0,
                log_directory=os.path.join(folder_paths().get_output_directory(), "hypernetwork_training"),
                seed=seed,
                file_format="safetensors",
                output_name=result_name,
                mixed_precision=mixed_precision,
            )
            problems = config.problems()
            if problems:
                raise InvalidConfigError("; ".join(f"{field}: {problem}" for field, problem in problems.items()))
            bar = ProgressBar(steps)
            callbacks = TrainingCallbacks(
                on_progress=lambda progress: bar.update_absolute(progress.step - progress.start_step, steps),
                should_stop=mm.processing_interrupted,
                on_message=lambda text: LOG.info("[Hypernetworks] %s", text),
            )
            backend = ComfyBackend(clone, clip, vae)
            result = train(network, backend, config, callbacks, output_dir=output_dir)
        LOG.info("[Hypernetworks] %s: %s", result.stopped, result.message)
        if result.path is not None:
            library().refresh()
        mm.throw_exception_if_processing_interrupted()  # Cancel: the steps done are saved
        if result.path is None:
            raise HypernetworkError(f"training saved nothing: {result.message}")
        trained = formats.load(result.path)
        relative = os.path.relpath(result.path, output_dir).replace(os.sep, "/")
        loss_map = {"loss": [loss for _step, loss in result.losses]}
        return (patched_model(model, [trained]), relative, loss_map, result.step)
