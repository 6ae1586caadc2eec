"""What the node pack hands ComfyUI (through the repository's root ``__init__.py``): its nodes and their names."""

from __future__ import annotations

from .comfyui_nodes import HypernetworksFromPrompt, LoadHypernetwork
from .comfyui_training import TrainHypernetwork

NODE_CLASS_MAPPINGS = {
    "HypernetworkLoaderA1111": LoadHypernetwork,
    "HypernetworksFromPrompt": HypernetworksFromPrompt,
    "TrainHypernetwork": TrainHypernetwork,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "HypernetworkLoaderA1111": "Load Hypernetwork (A1111)",
    "HypernetworksFromPrompt": "Hypernetworks from Prompt",
    "TrainHypernetwork": "Train Hypernetwork",
}
