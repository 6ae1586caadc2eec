"""Hostile and broken files, one builder per kind: code-executing pickles, bombs, lies in headers,
files that are not files. Each builder writes into a folder and returns the path to load.

Pickles and zip archives are assembled here byte by byte where ``pickle``/``torch.save``/``zipfile``
would refuse to write them (a persistent id naming ``os.system``, a deflate stream that inflates
1,000-fold, an entry listed twice).
"""

from __future__ import annotations

import functools
import io
import json
import os
import pickle
import pickletools
import shutil
import socket
import struct
import subprocess
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

import hypernetwork_ext as hx
from hypernetwork_ext.errors import NonFiniteWeightsError, UnsafeFileError
from hypernetwork_ext.formats import to_bytes
from hypernetwork_ext.formats.pt import network_to_dict
from tests.support import files

# -- pickle opcodes (protocol 2) ----------------------------------------------------------------
MARK, STOP, TUPLE, REDUCE, BINPERSID = b"(", b".", b"t", b"R", b"Q"
EMPTY_DICT, EMPTY_LIST, EMPTY_TUPLE, SETITEM, APPEND, NEWFALSE = b"}", b"]", b")", b"s", b"a", b"\x89"
PROTO2 = b"\x80\x02"


def text(value: str) -> bytes:
    data = value.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def number(value: int) -> bytes:
    data = value.to_bytes((value.bit_length() + 8) // 8 or 1, "little", signed=True)
    return b"\x8a" + bytes([len(data)]) + data


def global_(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def call(module: str, name: str, *args: bytes) -> bytes:
    return global_(module, name) + MARK + b"".join(args) + TUPLE + REDUCE


def tensor_ops(key: str, numel: int, shape, stride, storage: str = "FloatStorage", storage_type: bytes = b"") -> bytes:
    """``torch._utils._rebuild_tensor_v2`` over the persistent id torch writes for a storage."""
    pid = MARK + text("storage") + (storage_type or global_("torch", storage)) + text(key) + text("cpu")
    pid += number(numel) + TUPLE
    return call(
        "torch._utils",
        "_rebuild_tensor_v2",
        pid + BINPERSID,
        number(0),
        MARK + b"".join(number(n) for n in shape) + TUPLE,
        MARK + b"".join(number(n) for n in stride) + TUPLE,
        NEWFALSE,
        call("collections", "OrderedDict"),
    )


def dict_pickle(*items: tuple[bytes, bytes]) -> bytes:
    body = b"".join(key + value + SETITEM for key, value in items)
    return PROTO2 + EMPTY_DICT + body + STOP


# -- zip archives -------------------------------------------------------------------------------
@dataclass
class Entry:
    name: str
    data: bytes  # as stored: deflated already when ``deflated``
    size: int  # unpacked
    crc: int
    deflated: bool = False


def stored(name: str, data: bytes) -> Entry:
    return Entry(name, data, len(data), zlib.crc32(data))


def zip_bytes(entries: list[Entry]) -> bytes:
    """A zip archive written field by field, so that it may repeat names or hold a bomb."""
    out, directory = bytearray(), bytearray()
    for entry in entries:
        name = entry.name.encode()
        method = 8 if entry.deflated else 0
        fields = (20, 0, method, 0, 0x21, entry.crc, len(entry.data), entry.size, len(name), 0)
        directory += struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, *fields[:-1], 0, 0, 0, 0, 0, len(out))
        directory += name
        out += struct.pack("<4s5H3L2H", b"PK\x03\x04", *fields) + name + entry.data
    offset = len(out)
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(entries), len(entries), len(directory), offset, 0)
    return bytes(out + directory + end)


def torch_archive(pickle_bytes: bytes, records: dict[str, bytes] | None = None, *extra: Entry) -> bytes:
    entries = [stored("archive/data.pkl", pickle_bytes), stored("archive/version", b"3\n")]
    entries += [stored(f"archive/data/{key}", data) for key, data in (records or {}).items()]
    return zip_bytes(entries + list(extra))


@functools.lru_cache(maxsize=1)
def _zero_deflate_gib() -> tuple[bytes, int]:
    """A raw deflate stream of 1 GiB of zeros, about 1 MiB long, and its CRC: 1,024 copies of a
    fully flushed 1 MiB segment (each starts afresh, so copies chain) and a final empty block."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    segment = compressor.compress(bytes(1 << 20)) + compressor.flush(zlib.Z_FULL_FLUSH)
    crc, chunk = 0, bytes(1 << 20)
    for _ in range(1024):
        crc = zlib.crc32(chunk, crc)
    return segment * 1024 + b"\x03\x00", crc


def bomb_entry(name: str) -> Entry:
    stream, crc = _zero_deflate_gib()
    return Entry(name, stream, 1 << 30, crc, deflated=True)


# -- builders -------------------------------------------------------------------------------------
class _Call:
    """Unpickling this calls ``function(*args)``."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def _network_dict(**changes) -> dict:
    return {**network_to_dict(hx.create([16], (1, 2, 1), seed=0, name="victim")), **changes}


def _write(folder: Path, name: str, data: bytes) -> str:
    path = folder / name
    path.write_bytes(data)
    return str(path)


def _torch_file(folder: Path, content, name: str = "x.pt", legacy: bool = False) -> str:
    return _write(folder, name, files.torch_bytes(content, legacy=legacy))


def _evil(folder: Path, marker: str, function, *args) -> str:
    return _torch_file(folder, _network_dict(optional_info=_Call(function, *args)))


def _touch_script(marker: str) -> str:
    return f"open({marker!r}, 'w').close()"


def _nested_pickle(folder: Path, marker: str) -> str:
    """A clean network with a second pickle beside its data.pkl."""
    clean = files.torch_bytes(_network_dict())
    evil = pickle.dumps(_Call(os.system, f"touch {marker}"), protocol=2)
    return _write(folder, "x.pt", _with_entry(clean, "archive/extra.pkl", evil))


def _with_entry(archive_bytes: bytes, name: str, data: bytes) -> bytes:
    source = zipfile.ZipFile(io.BytesIO(archive_bytes))
    entries = [stored(info.filename, source.read(info)) for info in source.infolist()]
    return zip_bytes([*entries, stored(name, data)])


def _pickle_inside_pickle(folder: Path, marker: str) -> str:
    inner = pickle.dumps(_Call(os.system, f"touch {marker}"), protocol=2)
    return _evil(folder, marker, pickle.loads, inner)


def _persistent_id_naming_a_function(folder: Path, marker: str) -> str:
    ops = tensor_ops("0", 4, (4,), (1,), storage_type=global_("os", "system"))
    return _write(folder, "x.pt", torch_archive(dict_pickle((text("w"), ops)), {"0": bytes(16)}))


def _persistent_id_key_outside(folder: Path, marker: str) -> str:
    ops = tensor_ops("../../../../etc/passwd", 4, (4,), (1,))
    return _write(folder, "x.pt", torch_archive(dict_pickle((text("w"), ops)), {"0": bytes(16)}))


def _storage_larger_than_the_file(folder: Path, marker: str) -> str:
    ops = tensor_ops("0", 1 << 40, (4,), (1,))
    return _write(folder, "x.pt", torch_archive(dict_pickle((text("w"), ops)), {"0": bytes(16)}))


def _zero_stride_tensor(folder: Path, marker: str) -> str:
    ops = tensor_ops("0", 1, (1 << 20, 1 << 20), (0, 0))
    return _write(folder, "x.pt", torch_archive(dict_pickle((text("w"), ops)), {"0": bytes(4)}))


def _legacy_huge_storage(folder: Path, marker: str) -> str:
    """A legacy (non-zip) file whose pickle declares 2**36 floats: torch would allocate them first."""
    data = files.torch_bytes({"w": torch.zeros(2)}, legacy=True)
    stream = io.BytesIO(data)
    for _ in range(3):  # magic number, protocol version, system info
        for _opcode in pickletools.genops(stream):
            pass
    header = data[: stream.tell()]
    obj = dict_pickle((text("w"), tensor_ops("0", 1 << 36, (2,), (1,))))
    keys = PROTO2 + EMPTY_LIST + text("0") + APPEND + STOP
    return _write(folder, "x.pt", header + obj + keys + struct.pack("<q", 2) + bytes(8))


def _pickle_bomb(folder: Path, marker: str) -> str:
    return _write(folder, "x.pt", zip_bytes([bomb_entry("archive/data.pkl"), stored("archive/version", b"3\n")]))


def _tensor_data_bomb(folder: Path, marker: str) -> str:
    ops = tensor_ops("0", 1 << 28, (1 << 28,), (1,))
    pickle_bytes = dict_pickle((text("w"), ops))
    return _write(folder, "x.pt", torch_archive(pickle_bytes, None, bomb_entry("archive/data/0")))


def _duplicate_zip_entries(folder: Path, marker: str) -> str:
    """Two data.pkl entries: one reader may take the first (hostile), another the last (clean)."""
    evil = pickle.dumps(_Call(os.system, f"touch {marker}"), protocol=2)
    clean = files.torch_bytes(_network_dict())
    return _write(folder, "x.pt", _with_entry(clean, "archive/data.pkl", evil))


def _network_archive(extra_items: bytes = b"", extra_entries: tuple[Entry, ...] = ()) -> bytes:
    """A valid network's torch archive with pickle ops for more dict items injected before its STOP
    (the network's dict is then alone on the stack) and more zip entries appended."""
    source = zipfile.ZipFile(io.BytesIO(files.torch_bytes(_network_dict())))
    entries = []
    for info in source.infolist():
        payload = source.read(info)
        if info.filename.endswith("/data.pkl"):
            payload = payload[:-1] + extra_items + STOP
        entries.append(stored(info.filename, payload))
    return zip_bytes([*entries, *extra_entries])


def _many_zip_entries(folder: Path, marker: str) -> str:
    entries = tuple(stored(f"archive/extra/{i}", b"") for i in range(5000))
    return _write(folder, "x.pt", _network_archive(extra_entries=entries))


def _deep_nesting(folder: Path, marker: str) -> str:
    depth = 100_000
    nested = EMPTY_LIST * depth + APPEND * (depth - 1)
    return _write(folder, "x.pt", _network_archive(text("notes") + nested + SETITEM))


def _billion_laughs(folder: Path, marker: str) -> str:
    """A dict of 40 lists, each holding the previous one twice through the memo: 2**40 items once
    expanded. (Memo slots 0-39 are reused: the network's pickle is done with them.)"""
    ops = EMPTY_DICT + number(0) + EMPTY_LIST + b"q\x00" + SETITEM  # BINPUT 0
    for level in range(1, 40):
        previous = b"h" + bytes([level - 1])  # BINGET
        ops += number(level) + EMPTY_LIST + previous + APPEND + previous + APPEND + b"q" + bytes([level]) + SETITEM
    return _write(folder, "x.pt", _network_archive(text("notes") + ops + SETITEM))


def _self_reference(folder: Path, marker: str) -> str:
    loop: list = []
    loop.append(loop)
    return _torch_file(folder, _network_dict(optional_info=loop))


def _memo_index_bomb(folder: Path, marker: str) -> str:
    ops = EMPTY_LIST + b"r" + struct.pack("<I", 0xFFFFFFF0)  # LONG_BINPUT: the unpickler sizes its memo to it
    return _write(folder, "x.pt", _network_archive(text("notes") + ops + SETITEM))


def _too_many_opcodes(folder: Path, marker: str) -> str:
    ops = EMPTY_LIST + MARK + b"N" * 300_000 + b"e"  # APPENDS
    return _write(folder, "x.pt", _network_archive(text("notes") + ops + SETITEM))


def _state(width: int, make: Callable) -> dict:
    """A 1,2,1 module's state dict with each tensor from ``make(shape)``."""
    shapes = {"linear.0.weight": (2 * width, width), "linear.0.bias": (2 * width,)}
    shapes.update({"linear.1.weight": (width, 2 * width), "linear.1.bias": (width,)})
    return {key: make(shape) for key, shape in shapes.items()}


def _zero_stride_widths(folder: Path, marker: str) -> str:
    """400 widths whose weights are all views of one 4-byte storage with zero strides: a small
    file that builds 800 modules and whose first use would allocate 685 MB."""
    one = torch.zeros(1)
    content = {width: (_state(width, one.expand), _state(width, one.expand)) for width in range(1, 401)}
    return _torch_file(folder, content)


def _extension_registry(folder: Path, marker: str) -> str:
    return _write(folder, "x.pt", torch_archive(PROTO2 + b"\x82\x01" + STOP))  # EXT1 1


def _safetensors(header: dict | bytes, body: bytes, length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + body


def _f32(shape, begin, end, dtype="F32") -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}


def _our_header(**tensors) -> dict:
    """Our metadata header (a 16-wide 1,2,1 network) with the given tensor entries."""
    metadata = {"hypernetwork.format_version": "1", "layer_structure": "[1, 2, 1]", "widths": "[16]"}
    return {"__metadata__": metadata, **tensors}


SAFETENSORS_CASES: dict[str, Callable[[], bytes]] = {
    "huge-declared-header-length": lambda: _safetensors(b'{"__metadata__": {}}', b"", length=1 << 62),
    "header-not-json": lambda: _safetensors(b"{not json at all", b""),
    "header-not-an-object": lambda: _safetensors(b"[1, 2, 3]", b""),
    "overlapping-offsets": lambda: _safetensors(
        _our_header(**{"hypernetwork.16.key.linear.0.weight": _f32([2], 0, 8), "x": _f32([2], 0, 8)}), bytes(8)
    ),
    "out-of-range-offsets": lambda: _safetensors(_our_header(w=_f32([2], 0, 8000)), bytes(8)),
    "negative-shape": lambda: _safetensors(_our_header(w=_f32([-2], 0, 8)), bytes(8)),
    "huge-shape": lambda: _safetensors(_our_header(w=_f32([1 << 40, 1 << 40], 0, 8)), bytes(8)),
    "dtype-mismatch": lambda: _safetensors(_our_header(w=_f32([2], 0, 8, dtype="F16")), bytes(8)),
    "unknown-dtype": lambda: _safetensors(_our_header(w=_f32([2], 0, 8, dtype="F128")), bytes(8)),
    "duplicate-tensor-names": lambda: _safetensors(
        b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
        b'"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}',
        bytes(8),
    ),
    "duplicate-metadata-names": lambda: _safetensors_network_text(
        '"__metadata__":{', '"__metadata__":{"layer_structure":"[1, 3, 1]",'
    ),
    "too-many-tensors": lambda: _safetensors({f"t{i}": _f32([0], 0, 0) for i in range(5000)}, b""),
    "huge-metadata-string": lambda: _safetensors_network(optional_info=json.dumps("x" * (5 << 20))),
    "metadata-not-strings": lambda: _safetensors({"__metadata__": {"step": 3}}, b""),
    "strings-for-numbers": lambda: _safetensors_network(step='"many"'),
}


def _safetensors_network(**metadata: str) -> bytes:
    data = to_bytes(hx.create([16], seed=0), "safetensors")
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + length])
    header["__metadata__"].update(metadata)
    return _safetensors(header, data[8 + length :])


def _safetensors_network_text(old: str, new: str) -> bytes:
    """A valid network's safetensors file with its header text edited."""
    data = to_bytes(hx.create([16], seed=0), "safetensors")
    length = struct.unpack("<Q", data[:8])[0]
    header = data[8 : 8 + length].decode()
    assert old in header
    return _safetensors(header.replace(old, new, 1).encode(), data[8 + length :])


def _non_finite(folder: Path, marker: str, value: float, suffix: str) -> str:
    network = hx.create([16], seed=0)
    with torch.no_grad():
        network.layers[16][1].linear[0].weight[0, :3] = value
    return hx.save(network, folder / f"x.{suffix}")


def _fifo(folder: Path, marker: str) -> str:
    path = folder / "x.pt"
    os.mkfifo(path)
    return str(path)


def _socket(folder: Path, marker: str) -> str:
    path = folder / "x.pt"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.close()  # the socket file stays
    return str(path)


def _link(folder: Path, target: str, name: str = "x.pt") -> str:
    path = folder / name
    path.symlink_to(target)
    return str(path)


def _symlink_loop(folder: Path, marker: str) -> str:
    _link(folder, str(folder / "x.pt"), "y.pt")
    return _link(folder, str(folder / "y.pt"), "x.pt")


def _sparse_huge_file(folder: Path, marker: str) -> str:
    path = folder / "x.pt"
    with open(path, "wb") as handle:
        handle.truncate(3 << 30)  # 3 GiB that take no disk and would take 3 GiB of memory
    return str(path)


def _directory(folder: Path, marker: str) -> str:
    path = folder / "x.pt"
    path.mkdir()
    return str(path)


@dataclass(frozen=True)
class HostileCase:
    id: str
    build: Callable[[Path, str], str]
    error: type = hx.FileFormatError


def _bytes_case(name: str, data: Callable[[], bytes], suffix: str = "safetensors") -> Callable[[Path, str], str]:
    return lambda folder, marker: _write(folder, f"x.{suffix}", data())


CASES: list[HostileCase] = [
    # code that would run
    HostileCase("reduce-os-system", lambda f, m: _write(f, "x.pt", files.hostile_torch_file(m)), UnsafeFileError),
    HostileCase(
        "reduce-os-system-legacy",
        lambda f, m: _write(f, "x.pt", files.hostile_torch_file(m, legacy=True)),
        UnsafeFileError,
    ),
    HostileCase("plain-pickle-not-torch", lambda f, m: _write(f, "x.pt", files.protocol4_pickle(m)), UnsafeFileError),
    HostileCase("builtins-eval", lambda f, m: _evil(f, m, eval, _touch_script(m)), UnsafeFileError),
    HostileCase("builtins-exec", lambda f, m: _evil(f, m, exec, _touch_script(m)), UnsafeFileError),
    HostileCase("subprocess", lambda f, m: _evil(f, m, subprocess.call, ["touch", m]), UnsafeFileError),
    HostileCase("unexpected-module", lambda f, m: _evil(f, m, shutil.copyfile, __file__, m), UnsafeFileError),
    HostileCase(
        "inst-opcode", lambda f, m: _write(f, "x.pt", files.hostile_zip(files.inst_opcode_pickle(m))), UnsafeFileError
    ),
    HostileCase("nested-pickle-in-zip", _nested_pickle, UnsafeFileError),
    HostileCase("pickle-inside-pickle", _pickle_inside_pickle, UnsafeFileError),
    HostileCase("persistent-id-naming-a-function", _persistent_id_naming_a_function, UnsafeFileError),
    HostileCase("persistent-id-key-outside", _persistent_id_key_outside),
    HostileCase("extension-registry-opcode", _extension_registry, UnsafeFileError),
    HostileCase("duplicate-zip-entries", _duplicate_zip_entries),
    # memory and time
    HostileCase("zip-bomb-pickle", _pickle_bomb),
    HostileCase("zip-bomb-tensor-data", _tensor_data_bomb),
    HostileCase("storage-larger-than-the-file", _storage_larger_than_the_file),
    HostileCase("legacy-storage-larger-than-the-file", _legacy_huge_storage),
    HostileCase("zero-stride-tensor", _zero_stride_tensor),
    HostileCase("400-widths-of-zero-stride-views", _zero_stride_widths),
    HostileCase("too-many-zip-entries", _many_zip_entries),
    HostileCase("too-many-opcodes", _too_many_opcodes),
    HostileCase("deeply-nested-containers", _deep_nesting),
    HostileCase("billion-laughs", _billion_laughs),
    HostileCase("container-holding-itself", _self_reference),
    HostileCase("memo-index-bomb", _memo_index_bomb),
    HostileCase("sparse-3-gib-file", _sparse_huge_file),
    HostileCase(
        "extremely-long-metadata-string", lambda f, m: _torch_file(f, _network_dict(optional_info="x" * (20 << 20)))
    ),
    HostileCase(
        "layer-structure-of-100000-entries",
        lambda f, m: _torch_file(f, _network_dict(layer_structure=[1] * 100_000, dropout_structure=[0] * 100_000)),
    ),
    HostileCase(
        "65-widths",
        lambda f, m: _torch_file(f, {w: (_state(w, torch.zeros), _state(w, torch.zeros)) for w in range(1, 66)}),
    ),
    # broken
    HostileCase("truncated-zip", lambda f, m: _write(f, "x.pt", files.torch_bytes(_network_dict())[:2000])),
    HostileCase("wrong-magic", lambda f, m: _write(f, "x.pt", b"GIF89a" + bytes(100))),
    HostileCase("empty-pt", lambda f, m: _write(f, "x.pt", b"")),
    HostileCase("empty-safetensors", lambda f, m: _write(f, "x.safetensors", b"")),
    *(HostileCase(f"safetensors-{name}", _bytes_case(name, data)) for name, data in SAFETENSORS_CASES.items()),
    HostileCase(
        "wrong-state-dict-structure",
        lambda f, m: _torch_file(f, {16: ({"linear.0.weight": torch.zeros(32, 16)}, {}), "name": "x"}),
    ),
    HostileCase("width-not-a-pair", lambda f, m: _torch_file(f, {768: torch.zeros(3), "name": "x"})),
    HostileCase(
        "non-tensor-values",
        lambda f, m: _torch_file(f, {16: ({"linear.0.weight": "weights"}, {"linear.0.weight": 3}), "name": "x"}),
    ),
    HostileCase("integer-weights", lambda f, m: _torch_file(f, _int_weights())),
    HostileCase("strings-for-numbers", lambda f, m: _torch_file(f, _network_dict(layer_structure="1, 2, 1"))),
    HostileCase("string-step", lambda f, m: _torch_file(f, _network_dict(step="many"))),
    HostileCase("nan-weights", lambda f, m: _non_finite(f, m, float("nan"), "pt"), NonFiniteWeightsError),
    HostileCase("inf-weights", lambda f, m: _non_finite(f, m, float("inf"), "safetensors"), NonFiniteWeightsError),
    # not regular files
    HostileCase("fifo", _fifo),
    HostileCase("socket", _socket),
    HostileCase("dev-zero-linked-as-x-pt", lambda f, m: _link(f, "/dev/zero")),
    HostileCase("dev-zero-itself", lambda f, m: "/dev/zero"),
    HostileCase("directory-named-x-pt", _directory),
    HostileCase("symlink-loop", _symlink_loop),
]


def _int_weights() -> dict:
    content = _network_dict()
    key_state = content[16][0]
    key_state["linear.0.weight"] = key_state["linear.0.weight"].to(torch.int32)
    return content
