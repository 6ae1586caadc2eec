"""Hashes that identify a network: the file's sha256 (A1111's) and a format-free content hash."""

from __future__ import annotations

import hashlib
import json
import os

import torch

from .regular_files import open_regular

SHORT_HASH_LENGTH = 10
_CHUNK = 1 << 20


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, as A1111 computes it for hypernetworks (a FIFO or a device put
    in a file's place is refused, not waited on or read forever)."""
    digest = hashlib.sha256()
    with open_regular(path) as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def short_hash(sha256: str) -> str:
    """A1111's 10-character short hash."""
    return sha256[:SHORT_HASH_LENGTH]


def content_hash(network) -> str:
    """sha256 over what decides the network's behaviour, the same for its .pt and .safetensors files.

    Covers the architecture (structure, activation, layer norm, dropout, output activation) and
    every tensor with its width, role, key, dtype and shape; not the name, step or other notes.
    """
    arch = network.architecture
    header = {
        "layer_structure": [float(f) for f in arch.layer_structure],
        "activation": arch.activation,
        "layer_norm": bool(arch.is_layer_norm),
        "activate_output": bool(arch.activate_output),
        "dropout_structure": [float(p) for p in arch.dropout_structure[: len(arch.layer_structure)]],
    }
    digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    for width, (key_state, value_state) in sorted(network.module_state_dicts().items()):
        for role, state in (("key", key_state), ("value", value_state)):
            for name in sorted(state):
                tensor = state[name].detach().to("cpu").contiguous()
                digest.update(f"{width}.{role}.{name}:{tensor.dtype}:{list(tensor.shape)}".encode())
                digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
