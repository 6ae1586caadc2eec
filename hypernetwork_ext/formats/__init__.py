"""Reading and writing hypernetwork files: A1111/NovelAI ``.pt`` and the project's ``.safetensors``.

The layout is told by the file's content, not its name, so a renamed file still loads (or is
refused with the right reason). Only regular files within :data:`HYPERNETWORK_LIMITS` are read,
and a network whose weights hold NaN or infinity is refused: applied, it would turn every image
it touches into NaN.
"""

from __future__ import annotations

import os

from ..atomic import atomic_write_bytes
from ..errors import FileFormatError, HypernetworkError, NonFiniteWeightsError
from ..network import Hypernetwork
from .limits import HYPERNETWORK_LIMITS, read_file
from .pt import pt_bytes, read_pt_bytes
from .safetensors_format import looks_like_safetensors, read_safetensors_bytes, safetensors_bytes

SUPPORTED_SUFFIXES = (".pt", ".safetensors")


def load(path: str | os.PathLike) -> Hypernetwork:
    """Load a hypernetwork from an A1111/NovelAI ``.pt`` or one of our ``.safetensors`` files."""
    path = os.fspath(path)
    return load_bytes(read_file(path, HYPERNETWORK_LIMITS), path)


def load_bytes(data: bytes, path: str = "<memory>") -> Hypernetwork:
    if not data:
        raise FileFormatError("the file is empty", path)
    if looks_like_safetensors(data):
        network = read_safetensors_bytes(data, path, HYPERNETWORK_LIMITS)
    elif path.lower().endswith(".safetensors"):
        raise FileFormatError("named .safetensors but not a safetensors file (or its header is damaged)", path)
    else:
        network = read_pt_bytes(data, path, HYPERNETWORK_LIMITS)
    count = network.non_finite_count()
    if count:
        raise NonFiniteWeightsError(count, network.parameter_count(), path)
    return network


def format_for_path(path: str | os.PathLike) -> str:
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise HypernetworkError(f"unknown file type {suffix or '(none)'}; use .pt (A1111) or .safetensors", path)
    return suffix[1:]


def to_bytes(network: Hypernetwork, file_format: str) -> bytes:
    if file_format == "pt":
        return pt_bytes(network)
    if file_format == "safetensors":
        return safetensors_bytes(network)
    raise HypernetworkError(f"unknown format {file_format!r}; use 'pt' or 'safetensors'")


def save(network: Hypernetwork, path: str | os.PathLike, *, overwrite: bool = False) -> str:
    """Write ``network`` to ``path``; the format follows the suffix. The write is atomic, and an
    existing file is replaced only with ``overwrite=True``."""
    path = os.fspath(path)
    atomic_write_bytes(path, to_bytes(network, format_for_path(path)), overwrite=overwrite)
    return path
