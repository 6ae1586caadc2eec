"""Hypernetworks for Stable Diffusion: load, save, create and apply them on any torch UNet.

The public contract::

    import hypernetwork_ext as hx
    net = hx.load("path.pt")             # A1111/NovelAI .pt or our .safetensors
    hx.save(net, "out.safetensors")      # format chosen by the extension of the path
    with hx.apply(unet, [(net, 0.8), (other, -0.5)]):
        ...

This package's core imports neither the WebUI's ``modules`` nor ``gradio``.
"""

from .attach import Attachment, apply, find_attention_sites
from .errors import (
    FileExistsRefusedError,
    FileFormatError,
    HypernetworkError,
    IncompatibleNetworkError,
    InvalidConfigError,
    UnsafeFileError,
)
from .formats import load, save
from .hashing import content_hash, file_sha256, short_hash
from .network import Architecture, Hypernetwork, HypernetworkModule, create
from .strength import Strength
from .version import __version__

__all__ = [
    "Architecture",
    "Attachment",
    "FileExistsRefusedError",
    "FileFormatError",
    "Hypernetwork",
    "HypernetworkError",
    "HypernetworkModule",
    "IncompatibleNetworkError",
    "InvalidConfigError",
    "Strength",
    "UnsafeFileError",
    "__version__",
    "apply",
    "content_hash",
    "create",
    "file_sha256",
    "find_attention_sites",
    "load",
    "save",
    "short_hash",
]
