"""API-format ComfyUI workflows: a checkpoint, a chain of MODEL nodes, txt2img at 64x64, SaveImage.

A workflow is ``{node_id: {"class_type": ..., "inputs": {...}}}``; an input linked to another node's
output is ``[node_id, output_index]``.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field

# Small and quick on a CPU (SD1.5 took 20-25 s a step at 64x64 on the loaded 2-core machine); Euler is
# deterministic; two steps are enough for start/stop windows to leave one step out.
SETTINGS = {"seed": 1234, "steps": 2, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "size": 64}
PROMPT = "a red circle"
_prefixes = itertools.count()


@dataclass(frozen=True)
class Workflow:
    checkpoint: str
    prompt: str = PROMPT
    model_nodes: tuple[tuple[str, dict], ...] = ()  # (class_type, inputs besides model), in order
    unet_dtype: str | None = None  # load the UNet with UNETLoader in this weight_dtype (fp8_e4m3fn...)
    compute_dtype: str | None = None  # ComfyUI's ModelComputeDtype (fp32, fp16, bf16) before the chain
    settings: dict = field(default_factory=dict)
    unet_name: str | None = None  # the checkpoint as models/diffusion_models lists it (for UNETLoader)
    # Sampling in two KSamplerAdvanced passes: steps [0, split_at) with model_nodes, the rest with
    # late_model_nodes (how ComfyUI users hand a model over mid-sampling).
    split_at: int | None = None
    late_model_nodes: tuple[tuple[str, dict], ...] = ()

    def then(self, class_type: str, **inputs) -> Workflow:
        return dataclasses.replace(self, model_nodes=(*self.model_nodes, (class_type, inputs)))

    def build(self) -> dict:
        s = {**SETTINGS, **self.settings}
        graph: dict = {"ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": self.checkpoint}}}
        base = ["ckpt", 0]
        if self.unet_dtype:
            graph["unet"] = {
                "class_type": "UNETLoader",
                "inputs": {"unet_name": self.unet_name or self.checkpoint, "weight_dtype": self.unet_dtype},
            }
            base = ["unet", 0]
        if self.compute_dtype:
            graph["dtype"] = {"class_type": "ModelComputeDtype", "inputs": {"model": base, "dtype": self.compute_dtype}}
            base = ["dtype", 0]
        model, text = _chain(graph, "m", base, self.model_nodes, self.prompt)
        graph["pos"] = {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["ckpt", 1]}}
        graph["neg"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["ckpt", 1]}}
        graph["latent"] = {
            "class_type": "EmptyLatentImage",
            "inputs": {"width": s["size"], "height": s["size"], "batch_size": 1},
        }
        common = {
            "cfg": s["cfg"],
            "sampler_name": s["sampler_name"],
            "scheduler": s["scheduler"],
            "positive": ["pos", 0],
            "negative": ["neg", 0],
        }
        if self.split_at is None:
            graph["sample"] = {
                "class_type": "KSampler",
                "inputs": {
                    "model": model,
                    "seed": s["seed"],
                    "steps": s["steps"],
                    "latent_image": ["latent", 0],
                    "denoise": 1.0,
                    **common,
                },
            }
        else:
            late, _text = _chain(graph, "late", base, self.late_model_nodes, self.prompt)
            graph["early_sample"] = _advanced(model, ["latent", 0], s, common, 0, self.split_at, first=True)
            graph["sample"] = _advanced(late, ["early_sample", 0], s, common, self.split_at, 10000, first=False)
        graph["decode"] = {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["ckpt", 2]}}
        # A new prefix every time: SaveImage runs again even where ComfyUI's cache serves the rest.
        graph["save"] = {
            "class_type": "SaveImage",
            "inputs": {"images": ["decode", 0], "filename_prefix": f"hnx-suite/{next(_prefixes):04d}"},
        }
        return graph


def _chain(graph: dict, prefix: str, model: list, nodes, prompt: str) -> tuple[list, str | list]:
    """The MODEL nodes one after the other from ``model``; the last MODEL and the positive text (a prompt
    node's output when there is one)."""
    text: str | list = prompt
    for index, (class_type, inputs) in enumerate(nodes):
        node = f"{prefix}{index}"
        graph[node] = {"class_type": class_type, "inputs": {"model": model, **inputs}}
        model = [node, 0]
        if class_type == "HypernetworksFromPrompt":
            text = [node, 1]
    return model, text


def _advanced(model: list, latent: list, s: dict, common: dict, start: int, end: int, *, first: bool) -> dict:
    return {
        "class_type": "KSamplerAdvanced",
        "inputs": {
            "model": model,
            "add_noise": "enable" if first else "disable",
            "noise_seed": s["seed"],
            "steps": s["steps"],
            "latent_image": latent,
            "start_at_step": start,
            "end_at_step": end,
            "return_with_leftover_noise": "enable" if first else "disable",
            **common,
        },
    }


def ours(name: str, strength: float, **controls) -> tuple[str, dict]:
    return ("HypernetworkLoaderA1111", {"hypernetwork_name": name, "strength": strength, **controls})


def comfy_builtin(name: str, strength: float) -> tuple[str, dict]:
    return ("HypernetworkLoader", {"hypernetwork_name": name, "strength": strength})


def reference(path: str, strength: float, precision: str = "float32") -> tuple[str, dict]:
    return ("HnxSuiteReferenceHypernetwork", {"path": path, "strength": strength, "precision": precision})


def with_nodes(base: Workflow, *nodes: tuple[str, dict]) -> Workflow:
    return dataclasses.replace(base, model_nodes=(*base.model_nodes, *nodes))
