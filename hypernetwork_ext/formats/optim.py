"""Optimizer-state sidecars (``<network file>.optim``), bound to the network file by its hash.

As in A1111, the sidecar stores the short hash of the network file it belongs to, and its state
is used only when that hash still matches: a network edited or replaced since is never resumed
with a stale optimizer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..atomic import atomic_write_bytes
from ..errors import FileFormatError
from ..hashing import file_sha256, short_hash
from .safe_pickle import dump_a1111_pt, load_torch_file

SIDECAR_SUFFIX = ".optim"


@dataclass
class OptimizerSidecar:
    optimizer_name: str
    state_dict: dict
    extra: dict


def sidecar_path(network_path: str | os.PathLike) -> str:
    return os.fspath(network_path) + SIDECAR_SUFFIX


def write_optimizer_sidecar(
    network_path: str | os.PathLike, optimizer_name: str, state_dict: dict, extra: dict | None = None
) -> str:
    """Write the sidecar of a network file that already exists (its hash is taken now)."""
    content = {
        "optimizer_name": optimizer_name,
        "hash": short_hash(file_sha256(network_path)),
        "optimizer_state_dict": state_dict,
    }
    content.update(extra or {})
    path = sidecar_path(network_path)
    atomic_write_bytes(path, dump_a1111_pt(content), overwrite=True)
    return path


def read_optimizer_sidecar(network_path: str | os.PathLike) -> tuple[OptimizerSidecar | None, str]:
    """The sidecar of a network file, or None with the reason it cannot be used."""
    path = sidecar_path(network_path)
    if not os.path.exists(path):
        return None, "no optimizer state saved next to the network"
    try:
        content = load_torch_file(path)
    except FileFormatError as exc:
        return None, str(exc)
    if not isinstance(content, dict) or "optimizer_state_dict" not in content:
        return None, f"{path}: not an optimizer-state file"
    expected = short_hash(file_sha256(network_path))
    if content.get("hash") != expected:
        return None, f"{path}: belongs to another version of the network (hash {content.get('hash')} != {expected})"
    extra = {k: v for k, v in content.items() if k not in ("optimizer_name", "hash", "optimizer_state_dict")}
    return OptimizerSidecar(str(content.get("optimizer_name", "AdamW")), content["optimizer_state_dict"], extra), ""
