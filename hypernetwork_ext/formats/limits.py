"""How much a file may hold before it is refused, and reading one without ever blocking or overrunning.

Every limit is far above what a real file needs (a default SDXL network, 1,2,1, is 191 MiB with a
5 KB pickle of about 1,600 opcodes and 24 tensors; a 1,4,4,1 one is 1.1 GiB) and far below what
would exhaust memory, so a hostile or broken file is refused, naming the file and the limit, before it costs
more than its own size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import FileFormatError
from ..regular_files import open_regular

MiB = 1 << 20
GiB = 1 << 30


@dataclass(frozen=True)
class ReadLimits:
    what: str  # what the file should be, for messages: "a hypernetwork file"
    max_file_bytes: int
    max_tensors: int
    max_pickle_opcodes: int  # each makes at most one object (real files: about 30 per tensor)
    max_header_bytes: int  # a safetensors JSON header, parsed whole (real ones: about 100 bytes per tensor)
    max_pickle_bytes: int = 16 * MiB  # one pickle, unpacked (real ones: a few KB)
    max_inflation: int = 100  # how many times a compressed zip entry may grow (torch stores them uncompressed)
    max_nesting: int = 64  # containers inside containers (real files: under 6)

    @property
    def max_zip_entries(self) -> int:
        return self.max_tensors + 16  # one per tensor storage, plus torch's few bookkeeping entries


# Real networks have 1 to 5 widths and at most a few hundred tensors.
HYPERNETWORK_LIMITS = ReadLimits(
    "a hypernetwork file",
    max_file_bytes=2 * GiB,
    max_tensors=4096,
    max_pickle_opcodes=250_000,
    max_header_bytes=4 * MiB,
)
# Checkpoints (a few GB, ~2,500 tensors) and optimizer sidecars (a few times their network).
TORCH_FILE_LIMITS = ReadLimits(
    "a torch file",
    max_file_bytes=64 * GiB,
    max_tensors=100_000,
    max_pickle_opcodes=5_000_000,
    max_header_bytes=100 * MiB,
)


def size_text(size: int) -> str:
    if size >= GiB:
        return f"{size / GiB:,.1f} GiB"
    if size >= MiB:
        return f"{size / MiB:,.1f} MiB"
    return f"{size:,} bytes"


def refuse_size(size: int, limit: int, subject: str, path: str, *, allowed_for: str = "") -> None:
    if size > limit:
        allowed = f"the {size_text(limit)} allowed" + (f" for {allowed_for}" if allowed_for else "")
        raise FileFormatError(f"{subject} is {size_text(size)}, more than {allowed}; refused", path)


def read_file(path: str, limits: ReadLimits) -> bytes:
    """The bytes of a regular file of at most ``limits.max_file_bytes``."""
    with open_regular(path) as handle:
        try:
            size = os.fstat(handle.fileno()).st_size
            refuse_size(size, limits.max_file_bytes, "the file", path, allowed_for=limits.what)
            data = handle.read(size)
            if handle.read(1):
                raise FileFormatError("the file grew while it was being read; try again once it is complete", path)
        except OSError as exc:
            raise FileFormatError(f"cannot be read ({exc.strerror or exc})", path) from None
    return data
