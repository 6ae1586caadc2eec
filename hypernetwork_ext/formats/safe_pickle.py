"""Loading and writing torch pickle files without ever running code from them.

A ``.pt`` file is a pickle, and a pickle can name any importable function and call it. Before
anything is unpickled, every pickle in the file is read opcode by opcode (nothing is executed)
and every global it names is checked against a short list of plain-data constructors; a single
other name refuses the file. Only then is it loaded, with torch's ``weights_only`` unpickler (or,
on torch before 2.5, an unpickler that resolves only the same list) as a second, independent
guard. Both torch layouts are covered: the zip archive (torch >= 1.6) and the legacy sequence of
raw pickles.
"""

from __future__ import annotations

import importlib
import io
import os
import pickle
import pickletools
import re
import types
import zipfile
from collections.abc import Iterator

import torch

from ..errors import FileFormatError, UnsafeFileError

_STORAGES = (
    "FloatStorage",
    "HalfStorage",
    "BFloat16Storage",
    "DoubleStorage",
    "IntStorage",
    "LongStorage",
    "ShortStorage",
    "CharStorage",
    "ByteStorage",
    "BoolStorage",
)
_DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")
_NUMPY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray")

SAFE_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        ("collections", "OrderedDict"),
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_tensor"),
        ("torch._utils", "_rebuild_parameter"),
        ("torch", "Size"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("__builtin__", "set"),
        ("_codecs", "encode"),
        ("numpy", "dtype"),
        ("numpy", "ndarray"),
        *(("torch", name) for name in _STORAGES + _DTYPES),
        *((module, name) for module in _NUMPY_MODULES for name in ("scalar", "_reconstruct")),
    }
)

_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}
_MEMO_PUT_OPS = {"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"}
_MEMO_GET_OPS = {"GET", "BINGET", "LONG_BINGET"}
_NEUTRAL_OPS = {"PROTO", "FRAME"}  # framing: pushes nothing, may sit anywhere
_REFUSED_OPS = {"EXT1", "EXT2", "EXT4"}
_LEGACY_PICKLE_COUNT = 5  # magic number, protocol, system info, the object, the storage keys
_ZIP_MAGIC = b"PK\x03\x04"
_DATA_PKL = re.compile(r"^([^/]+)/data\.pkl$")
_A1111_ZIP_NAMES = re.compile(r"^archive/(data\.pkl|version|data/\d+)$")


def scan_pickle(stream: io.BufferedIOBase, where: str) -> set[tuple[str, str]]:
    """The globals one pickle names, read without executing it.

    Raises UnsafeFileError for constructs a plain-data pickle never uses (extension codes, a
    global whose name is computed rather than written out) and FileFormatError when the pickle
    ends early.
    """
    found: set[tuple[str, str]] = set()
    memo: dict[int, object] = {}
    pushed: list[object] = []  # values of recent value-producing opcodes; non-strings as None
    try:
        for opcode, arg, _pos in pickletools.genops(stream):
            name = opcode.name
            if name in _REFUSED_OPS:
                raise UnsafeFileError(f"{where} uses the pickle extension registry ({name}); refused", None)
            if name in ("GLOBAL", "INST"):
                module, _, attr = str(arg).partition(" ")
                found.add((module, attr))
                pushed.append(None)
            elif name == "STACK_GLOBAL":
                if len(pushed) < 2 or not all(isinstance(v, str) for v in pushed[-2:]):
                    raise UnsafeFileError(f"{where} names a global through computed values; refused", None)
                found.add((pushed[-2], pushed[-1]))
                pushed.append(None)
            elif name in _STRING_OPS:
                pushed.append(arg.decode("latin-1") if isinstance(arg, bytes) else arg)
            elif name in _MEMO_GET_OPS:
                pushed.append(memo.get(arg))
            elif name in _MEMO_PUT_OPS:
                index = len(memo) if name == "MEMOIZE" else arg
                memo[index] = pushed[-1] if pushed else None
            elif name == "STOP":
                break
            elif name in _NEUTRAL_OPS:
                continue
            else:
                pushed.append(None)
            del pushed[:-4]
    except UnsafeFileError:
        raise
    except Exception as exc:  # genops raises ValueError/EOFError on truncated or garbled input
        raise FileFormatError(f"{where} is truncated or damaged ({exc})") from None
    return found


def _refuse_unsafe(globals_found: set[tuple[str, str]], path: str) -> None:
    unsafe = sorted(g for g in globals_found if g not in SAFE_GLOBALS)
    if unsafe:
        names = ", ".join(f"{module}.{name}" for module, name in unsafe)
        raise UnsafeFileError(
            f"refused: the file asks to import or call {names}, which a hypernetwork never needs; "
            "it may be malicious, so nothing in it was run",
            path,
        )


def _zip_pickles(data: bytes, path: str) -> Iterator[tuple[str, bytes]]:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        names = archive.namelist()
        pickles = [name for name in names if name.endswith(".pkl")]
        data_pickles = [name for name in pickles if _DATA_PKL.match(name)]
        if len(data_pickles) != 1:
            raise FileFormatError(f"a torch archive must hold exactly one data.pkl, found {len(data_pickles)}", path)
        for name in pickles:
            yield name, archive.read(name)
    except zipfile.BadZipFile as exc:
        raise FileFormatError(f"the zip archive is truncated or damaged ({exc})", path) from None


def check_torch_bytes(data: bytes, path: str) -> None:
    """Refuse a torch file whose pickles name anything but plain-data constructors."""
    if not data:
        raise FileFormatError("the file is empty", path)
    if data.startswith(_ZIP_MAGIC):
        for name, payload in _zip_pickles(data, path):
            _refuse_unsafe(scan_pickle(io.BytesIO(payload), f"{path} ({name})"), path)
        return
    if data[:1] != b"\x80":
        raise FileFormatError("not a torch file (neither a zip archive nor a pickle)", path)
    stream = io.BytesIO(data)
    for index in range(_LEGACY_PICKLE_COUNT):
        if stream.tell() >= len(data):
            raise FileFormatError(f"the legacy torch file ends after {index} of its {_LEGACY_PICKLE_COUNT} parts", path)
        _refuse_unsafe(scan_pickle(stream, f"{path} (legacy part {index + 1})"), path)


def _numpy_safe_globals() -> list:
    try:
        import numpy
    except ImportError:
        return []
    multiarray = _numpy_multiarray()
    entries: list = [numpy.dtype, numpy.ndarray]
    for module in _NUMPY_MODULES:
        entries.append((multiarray.scalar, f"{module}.scalar"))
        entries.append((multiarray._reconstruct, f"{module}._reconstruct"))
    entries.extend(type(numpy.dtype(code)) for code in ("f4", "f8", "f2", "i8", "i4", "u1", "?"))
    return entries


def _numpy_multiarray():
    """numpy 2 keeps multiarray in numpy._core; numpy 1.26 has a bare numpy._core stub beside numpy.core."""
    for name in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "scalar"):
            return module
    raise ImportError("numpy's multiarray module was not found")


class _AllowListUnpickler(pickle.Unpickler):
    """Resolves only the plain-data constructors of ``SAFE_GLOBALS``."""

    def find_class(self, module: str, name: str):
        if (module, name) not in SAFE_GLOBALS:
            raise pickle.UnpicklingError(f"the global {module}.{name} is not allowed")
        return super().find_class(module, name)


def _allow_list_pickle_module() -> types.ModuleType:
    """What ``torch.load(pickle_module=...)`` needs: ``Unpickler`` (torch subclasses it to map
    storages) and ``load`` (the legacy format's header pickles)."""
    module = types.ModuleType("hypernetwork_ext_allow_list_pickle")
    module.Unpickler = _AllowListUnpickler
    module.load = lambda file, **kwargs: _AllowListUnpickler(file, **kwargs).load()
    return module


def _second_guard_load(data: bytes) -> object:
    """torch's ``weights_only`` unpickler with numpy's plain types allowed (torch >= 2.5); on older
    torch (A1111 1.10 ships 2.1.2, which has no ``safe_globals``), an unpickler that resolves only
    our allow-list.

    ``torch.serialization.load``, not ``torch.load``: A1111 replaces ``torch.load`` process-wide with
    its own check, which reads a file object to its end before handing it to torch (found in the real
    A1111: every network of ours was then reported as damaged)."""
    load = torch.serialization.load
    if hasattr(torch.serialization, "safe_globals"):
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return load(io.BytesIO(data), map_location="cpu", weights_only=True)
    return load(io.BytesIO(data), map_location="cpu", pickle_module=_allow_list_pickle_module(), weights_only=False)


def load_torch_bytes(data: bytes, path: str) -> object:
    """Check, then load, a torch pickle file held in memory."""
    check_torch_bytes(data, path)
    try:
        return _second_guard_load(data)
    except pickle.UnpicklingError as exc:
        raise UnsafeFileError(f"refused by the restricted unpickler: {exc}", path) from None
    except Exception as exc:
        raise FileFormatError(f"the torch file could not be read; it is truncated or damaged ({exc})", path) from None


def load_torch_file(path: str | os.PathLike) -> object:
    path = os.fspath(path)
    with open(path, "rb") as handle:
        data = handle.read()
    return load_torch_bytes(data, path)


def dump_a1111_pt(obj: object) -> bytes:
    """Serialise like ``torch.save``, keeping only the archive entries A1111 1.10.1 accepts.

    The host's safety check allows ``<dir>/data.pkl``, ``<dir>/version`` and ``<dir>/data/<n>``
    and rejects the ``byteorder``, ``.format_version`` and ``.storage_alignment`` entries that
    current torch adds; torch reads the archive fine without them.
    """
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    source = zipfile.ZipFile(io.BytesIO(buffer.getvalue()))
    names = [name for name in source.namelist() if _A1111_ZIP_NAMES.match(name)]
    names.sort(key=_archive_order)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as target:
        for name in names:
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            target.writestr(info, source.read(name))
    return out.getvalue()


def _archive_order(name: str) -> tuple[int, int]:
    if name.endswith("data.pkl"):
        return (0, 0)
    if "/data/" in name:
        return (1, int(name.rsplit("/", 1)[1]))
    return (2, 0)
