"""Checkpoints written one tensor at a time, and read as views of the file (bake on SDXL-sized files)."""

from __future__ import annotations

import struct
import sys
import tracemalloc

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hypernetwork_ext.errors import FileFormatError
from hypernetwork_ext.ops.checkpoints import LDM_PREFIX, read_unet, write_unet
from hypernetwork_ext.ops.safetensors_files import write_streaming


def every_kind() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "a.f32": torch.randn(3, 5, generator=generator),
        "b.f16": torch.randn(7, generator=generator).half(),
        "c.bf16": torch.randn(2, 2, generator=generator).bfloat16(),
        "d.i64": torch.arange(5),
        "e.bool": torch.tensor([True, False, True]),
        "f.u8-odd-length": torch.arange(3, dtype=torch.uint8),
        "g.empty": torch.zeros(0, 4),
        "h.scalar": torch.tensor(2.5),
        "i.transposed": torch.arange(6.0).reshape(2, 3).t(),
    }


def test_the_written_file_reads_back_in_the_safetensors_library(tmp_path):
    tensors = every_kind()
    path = tmp_path / "x.safetensors"
    write_streaming(str(path), tensors, {"origin": "test"})
    with safe_open(str(path), "pt") as handle:
        assert handle.metadata() == {"origin": "test"} and set(handle.keys()) == set(tensors)
        for name, tensor in tensors.items():
            read = handle.get_tensor(name)
            assert read.dtype == tensor.dtype and torch.equal(read, tensor), name


def big_checkpoint(path, mib: int = 256) -> None:
    count = mib // 32
    save_file({f"{LDM_PREFIX}w{i}": torch.zeros(16, 1024, 1024, dtype=torch.float16) for i in range(count)}, str(path))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads VmRSS from /proc")
def test_reading_a_checkpoint_does_not_copy_it_into_memory(tmp_path):
    path = tmp_path / "big.safetensors"
    big_checkpoint(path)
    before = resident_mib()
    weights = read_unet(path)
    grew = resident_mib() - before
    assert len(weights.tensors) == 8 and grew < 64, f"reading 256 MiB grew resident memory by {grew:.0f} MiB"


def resident_mib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


def test_writing_a_baked_copy_does_not_build_the_file_in_memory(tmp_path):
    """safetensors.torch.save made the whole file a bytes object first (256 MiB here, 6.9 GB for SDXL)."""
    source, copy = tmp_path / "big.safetensors", tmp_path / "copy.safetensors"
    big_checkpoint(source)
    weights = read_unet(source)
    changed = {"w0": torch.ones(16, 1024, 1024, dtype=torch.float16)}
    tracemalloc.start()
    try:
        write_unet(weights, changed, copy, {"note": "baked"})
        peak = tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()
    assert peak < 16, f"{peak:.0f} MiB of Python objects while writing"
    with safe_open(str(copy), "pt") as handle:
        assert handle.metadata()["note"] == "baked"
        assert torch.equal(handle.get_tensor(f"{LDM_PREFIX}w0"), changed["w0"])
        assert not handle.get_tensor(f"{LDM_PREFIX}w1").any()


def test_a_broken_file_is_named_with_the_problem(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(struct.pack("<Q", 1000) + b"{not json")
    with pytest.raises(FileFormatError, match="not a readable safetensors file") as raised:
        read_unet(path)
    assert str(path) in str(raised.value)
