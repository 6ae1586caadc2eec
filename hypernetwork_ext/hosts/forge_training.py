"""Training on Forge, reForge and Forge Classic: the backend over the loaded model, its memory
manager, previews drawn by the host's txt2img with the network being trained, and a Train tab
where the host has none.

Forge removed its Train tab ("remove everything related to training"), and so did Forge Classic;
the extension adds a top-level *Train* tab among the extensions' tabs (on Forge after *Checkpoint
Merger*, where A1111 has its Train tab; Forge Classic has no merger: after *PNG Info*), holding the
same sub-tabs, options, progress, loss chart, previews and Interrupt as on A1111. reForge kept
A1111's Train tab, so there the sub-tab goes in as on A1111 (``webui_training``).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

import gradio as gr
import torch

from ..training.backends.forge import ForgeBackend
from ..training.jobs import TrainingJobs
from ..ui.training import HostHooks, build_training_tab
from .forge import FORGE_PATCHER_MODULES, detect_patcher_host, is_forge_classic

MEMORY_MODULES = {
    FORGE_PATCHER_MODULES[0]: "backend.memory_management",  # Forge
    FORGE_PATCHER_MODULES[1]: "ldm_patched.modules.model_management",  # reForge, Forge Classic
}
TAB_LABEL = "Train"
TAB_ID = "hnx_train"
# The txt2img components A1111 hands to Train tabs (UiTrainTabParams.txt2img_preview_params), by the
# elem_id both hosts give them, in the order of the preview options.
TXT2IMG_PREVIEW_IDS = (
    "txt2img_prompt",
    "txt2img_neg_prompt",
    "txt2img_steps",
    "txt2img_sampling",
    "txt2img_cfg_scale",
    "txt2img_seed",
    "txt2img_width",
    "txt2img_height",
)


def is_forge() -> bool:
    """Forge itself (no Train tab), not reForge (which kept A1111's)."""
    return detect_patcher_host() == FORGE_PATCHER_MODULES[0]


def host_has_train_tab() -> bool:
    """A1111 and reForge build A1111's Train tab (our sub-tab joins it); Forge and Forge Classic removed it."""
    return not (is_forge() or is_forge_classic())


class HostMemory:
    """Forge's ``backend.memory_management`` or reForge's ``ldm_patched.modules.model_management``:
    both load patchers with ``load_models_gpu`` and list them in ``current_loaded_models``."""

    def __init__(self, module) -> None:
        self.module = module

    def load(self, patchers: Sequence) -> None:
        with torch.inference_mode():  # as the host calls it: its moves and LoRA merges make what they always make
            self.module.load_models_gpu(list(patchers))

    def fully_loaded(self, patcher) -> bool:
        if getattr(patcher.model, "model_lowvram", False):  # reForge's split of the weights
            return False
        for loaded in self.module.current_loaded_models:
            if loaded.model is patcher:
                return not getattr(loaded, "model_accelerated", False)  # Forge's CPU swap
        return False

    def unload_others(self, patcher) -> None:
        device = torch.device(patcher.load_device)
        if device.type == "cpu":
            return
        keep = [loaded for loaded in self.module.current_loaded_models if loaded.model is patcher]
        with torch.inference_mode():
            self.module.free_memory(1e30, device, keep_loaded=keep)


def host_memory() -> HostMemory:
    return HostMemory(importlib.import_module(MEMORY_MODULES[detect_patcher_host()]))


def load_selected_checkpoint(sd_models) -> None:
    """Forge loads the chosen checkpoint at the first generation; training may come first."""
    reload = getattr(sd_models, "forge_model_reload", None)
    if callable(reload):
        reload()


def make_backend(sd_model, render_preview, **names) -> ForgeBackend:
    return ForgeBackend(sd_model, host_memory(), render_preview=render_preview, **names)


class Txt2imgSources:
    """The txt2img components the preview options can be read from (``on_after_component``)."""

    def __init__(self) -> None:
        self.found: dict = {}

    def collect(self, component, **kwargs) -> None:
        elem_id = kwargs.get("elem_id")
        if elem_id in TXT2IMG_PREVIEW_IDS:
            self.found[elem_id] = component

    def components(self) -> list:
        """All of them in order, or none (a host that renamed one cannot fill the options)."""
        if any(elem_id not in self.found for elem_id in TXT2IMG_PREVIEW_IDS):
            return []
        return [self.found[elem_id] for elem_id in TXT2IMG_PREVIEW_IDS]


def train_tab(jobs: TrainingJobs, sources: Txt2imgSources) -> list[tuple]:
    """``on_ui_tabs`` on Forge and Forge Classic: a top-level Train tab with the same content as A1111's sub-tab."""
    with gr.Blocks(analytics_enabled=False) as blocks, gr.Column(elem_id="hnx_train_tab"):
        build_training_tab(
            jobs, blocks=blocks, host=HostHooks(preview_sources=sources.components(), start_js="hnxStartTraining")
        )
    return [(blocks, TAB_LABEL, TAB_ID)]
