"""Fixture files in every layout users have, written by the tests themselves."""

from __future__ import annotations

import io
import pickle
import zipfile
from collections import OrderedDict

import torch


def novelai_state(width: int, generator: torch.Generator) -> OrderedDict:
    """The 2022 NovelAI two-layer layout: linear1/linear2, width -> 2*width -> width."""
    return OrderedDict(
        [
            ("linear1.weight", torch.randn(width * 2, width, generator=generator) * 0.1),
            ("linear1.bias", torch.randn(width * 2, generator=generator) * 0.1),
            ("linear2.weight", torch.randn(width, width * 2, generator=generator) * 0.1),
            ("linear2.bias", torch.randn(width, generator=generator) * 0.1),
        ]
    )


def novelai_dict(widths=(768, 320, 640, 1280), seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {w: (novelai_state(w, generator), novelai_state(w, generator)) for w in widths}


def sequential_state(sizes, *, activation_slots, layer_norm_slots=(), generator) -> OrderedDict:
    """A state dict for ``linear.<i>`` Linear layers at given indices (the rest are parameterless)."""
    state = OrderedDict()
    for index, (n_in, n_out) in sizes.items():
        state[f"linear.{index}.weight"] = torch.randn(n_out, n_in, generator=generator) * 0.1
        state[f"linear.{index}.bias"] = torch.randn(n_out, generator=generator) * 0.1
    for index, width in layer_norm_slots:
        state[f"linear.{index}.weight"] = 1 + torch.randn(width, generator=generator) * 0.1
        state[f"linear.{index}.bias"] = torch.randn(width, generator=generator) * 0.1
    return state


def torch_bytes(obj, *, legacy: bool = False) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=not legacy)
    return buffer.getvalue()


class _Marker:
    """Unpickling this would run a shell command that creates a marker file."""

    def __init__(self, marker_path: str):
        self.marker_path = marker_path

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker_path}",))


def hostile_torch_file(marker_path: str, *, legacy: bool = False) -> bytes:
    """A torch file (zip or legacy) whose pickle would call os.system; written by torch.save."""
    return torch_bytes({768: _Marker(marker_path), "name": "innocent"}, legacy=legacy)


def hostile_zip(pickle_bytes: bytes) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("archive/data.pkl", pickle_bytes)
        archive.writestr("archive/version", "3\n")
    return out.getvalue()


def protocol4_pickle(marker_path: str) -> bytes:
    """Protocol 4 names globals with STACK_GLOBAL over memoised strings."""
    return pickle.dumps({"x": _Marker(marker_path)}, protocol=4)


def inst_opcode_pickle(marker_path: str) -> bytes:
    """Protocol 0's INST opcode: builds an instance of a named class with arguments."""
    return f"(S'touch {marker_path}'\nios\nsystem\n.".encode()
