"""API-format ComfyUI workflows: a checkpoint, a chain of MODEL nodes, txt2img at 64x64, SaveImage.

A workflow is ``{node_id: {"class_type": ..., "inputs": {...}}}``; an input linked to another node's
output is ``[node_id, output_index]``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

# Small and quick on a CPU (SD1.5 took 20-25 s a step at 64x64 on the loaded 2-core machine); Euler is
# deterministic; two steps are enough for start/stop windows to leave one step out.
SETTINGS = {"seed": 1234, "steps": 2, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "size": 64}
PROMPT = "a red circle"
_prefixes = itertools.count()


@dataclass
class Workflow:
    checkpoint: str
    prompt: str = PROMPT
    model_nodes: list[tuple[str, dict]] = field(default_factory=list)  # (class_type, inputs besides model)
    text_from_prompt_node: bool = False
    unet_dtype: str | None = None  # load the UNet with UNETLoader in this weight_dtype (fp8_e4m3fn...)
    settings: dict = field(default_factory=dict)
    unet_name: str | None = None  # the checkpoint as models/diffusion_models lists it (for UNETLoader)

    def then(self, class_type: str, **inputs) -> Workflow:
        return Workflow(
            self.checkpoint,
            self.prompt,
            [*self.model_nodes, (class_type, inputs)],
            self.text_from_prompt_node,
            self.unet_dtype,
            self.settings,
            self.unet_name,
        )

    def build(self) -> dict:
        s = {**SETTINGS, **self.settings}
        graph: dict = {"ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": self.checkpoint}}}
        model = ["ckpt", 0]
        if self.unet_dtype:
            graph["unet"] = {
                "class_type": "UNETLoader",
                "inputs": {"unet_name": self.unet_name or self.checkpoint, "weight_dtype": self.unet_dtype},
            }
            model = ["unet", 0]
        text: str | list = self.prompt
        for index, (class_type, inputs) in enumerate(self.model_nodes):
            node = f"m{index}"
            graph[node] = {"class_type": class_type, "inputs": {"model": model, **inputs}}
            model = [node, 0]
            if class_type == "HypernetworksFromPrompt":
                text = [node, 1]
        graph["pos"] = {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["ckpt", 1]}}
        graph["neg"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["ckpt", 1]}}
        graph["latent"] = {
            "class_type": "EmptyLatentImage",
            "inputs": {"width": s["size"], "height": s["size"], "batch_size": 1},
        }
        graph["sample"] = {
            "class_type": "KSampler",
            "inputs": {
                "model": model,
                "seed": s["seed"],
                "steps": s["steps"],
                "cfg": s["cfg"],
                "sampler_name": s["sampler_name"],
                "scheduler": s["scheduler"],
                "positive": ["pos", 0],
                "negative": ["neg", 0],
                "latent_image": ["latent", 0],
                "denoise": 1.0,
            },
        }
        graph["decode"] = {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["ckpt", 2]}}
        # A new prefix every time: SaveImage runs again even where ComfyUI's cache serves the rest.
        graph["save"] = {
            "class_type": "SaveImage",
            "inputs": {"images": ["decode", 0], "filename_prefix": f"hnx-suite/{next(_prefixes):04d}"},
        }
        return graph


def ours(name: str, strength: float, **controls) -> tuple[str, dict]:
    return ("HypernetworkLoaderA1111", {"hypernetwork_name": name, "strength": strength, **controls})


def comfy_builtin(name: str, strength: float) -> tuple[str, dict]:
    return ("HypernetworkLoader", {"hypernetwork_name": name, "strength": strength})


def reference(path: str, strength: float) -> tuple[str, dict]:
    return ("HnxSuiteReferenceHypernetwork", {"path": path, "strength": strength})


def with_nodes(base: Workflow, *nodes: tuple[str, dict]) -> Workflow:
    workflow = base
    for class_type, inputs in nodes:
        workflow = workflow.then(class_type, **inputs)
    return workflow
