"""Loading and writing torch pickle files without ever running code from them.

A ``.pt`` file is a pickle, and a pickle can name any importable function and call it. Before
anything is unpickled, every pickle in the file is read opcode by opcode (nothing is executed)
and every global it names is checked against a short list of plain-data constructors; a single
other name refuses the file. Only then is it loaded, with torch's ``weights_only`` unpickler (or,
on torch before 2.5, an unpickler that resolves only the same list) as a second, independent
guard. Both torch layouts are covered: the zip archive (torch >= 1.6) and the legacy sequence of
raw pickles.

Nothing is unpacked or unpickled beyond :class:`~.limits.ReadLimits`: the zip's table of contents,
entry count and unpacked sizes are checked before any entry is inflated (a 1 MiB deflate bomb
would otherwise become 1 GiB before the scan), a pickle is read at most to its limit, the storages
it declares must fit in the data the file holds, and the unpickled content is checked for depth,
self-reference, shared-reference blow-up and tensors larger than their storage.
"""

from __future__ import annotations

import importlib
import io
import os
import pickle
import re
import types
import zipfile
import zlib
from collections import Counter

import torch

from ..errors import FileFormatError, UnsafeFileError
from .limits import TORCH_FILE_LIMITS, MiB, ReadLimits, read_file, refuse_size, size_text
from .pickle_scan import PickleScan, scan_pickle
from .structure import check_structure

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

_LEGACY_PICKLE_COUNT = 5  # magic number, protocol, system info, the object, the storage keys
_ZIP_MAGIC = b"PK\x03\x04"
_ZIP_END = b"PK\x05\x06"
_ZIP64_LOCATOR = b"PK\x06\x07"
_ZIP64_END = b"PK\x06\x06"
_DIRECTORY_BYTES_PER_ENTRY = 512  # a central-directory record with a long name and zip64 fields
_DATA_PKL = re.compile(r"^([^/]+)/data\.pkl$")
_A1111_ZIP_NAMES = re.compile(r"^archive/(data\.pkl|version|data/\d+)$")
_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError, ValueError, OSError)


def _refuse_unsafe(globals_found: set[tuple[str, str]], path: str) -> None:
    unsafe = sorted(g for g in globals_found if g not in SAFE_GLOBALS)
    if unsafe:
        names = ", ".join(f"{module}.{name}" for module, name in unsafe)
        raise UnsafeFileError(
            f"refused: the file asks to import or call {names}, which a hypernetwork never needs; "
            "it may be malicious, so nothing in it was run",
            path,
        )


def _central_directory_size(data: bytes) -> int:
    """The size the archive's end record gives its central directory, which ``zipfile`` reads whole
    and turns into one object per entry; 0 when there is no end record (zipfile then says why)."""
    end = data.rfind(_ZIP_END, max(0, len(data) - 22 - 0xFFFF))
    if end < 0 or end + 22 > len(data):
        return 0
    size = int.from_bytes(data[end + 12 : end + 16], "little")
    locator = end - 20
    if size == 0xFFFFFFFF and locator >= 0 and data[locator : locator + 4] == _ZIP64_LOCATOR:
        record = int.from_bytes(data[locator + 8 : locator + 16], "little")
        if data[record : record + 4] == _ZIP64_END:
            size = int.from_bytes(data[record + 40 : record + 48], "little")
    return size


def _open_archive(data: bytes, path: str, limits: ReadLimits) -> tuple[zipfile.ZipFile, list[zipfile.ZipInfo]]:
    """The archive and its entries, refused when it is too big to list or to unpack, a zip bomb, or
    ambiguous (an entry listed twice, so that one reader could pick one copy and another the other)."""
    refuse_size(
        _central_directory_size(data),
        limits.max_zip_entries * _DIRECTORY_BYTES_PER_ENTRY,
        "the zip archive's table of contents",
        path,
        allowed_for=f"{limits.max_zip_entries:,} entries",
    )
    archive = zipfile.ZipFile(io.BytesIO(data))
    infos = archive.infolist()
    if len(infos) > limits.max_zip_entries:
        raise FileFormatError(
            f"the zip archive has {len(infos):,} entries, more than the {limits.max_zip_entries:,} allowed; refused",
            path,
        )
    repeated = sorted(name for name, count in Counter(info.filename for info in infos).items() if count > 1)
    if repeated:
        raise FileFormatError(
            f"the zip archive lists {', '.join(repeated[:3])} more than once, so it could be read two ways; refused",
            path,
        )
    unpacked = sum(info.file_size for info in infos)
    refuse_size(unpacked, limits.max_file_bytes, "unpacked, the zip archive", path, allowed_for=limits.what)
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED and info.file_size > max(
            limits.max_inflation * info.compress_size, MiB
        ):
            raise FileFormatError(
                f"the zip entry {info.filename} would unpack from {size_text(info.compress_size)} to "
                f"{size_text(info.file_size)} (a zip bomb); refused without unpacking it",
                path,
            )
    return archive, infos


def _read_pickle_entry(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: str, limits: ReadLimits) -> bytes:
    subject = f"unpacked, {info.filename}"
    refuse_size(info.file_size, limits.max_pickle_bytes, subject, path)
    with archive.open(info) as member:
        payload = member.read(limits.max_pickle_bytes + 1)  # never more, whatever the entry claims
    refuse_size(len(payload), limits.max_pickle_bytes, subject, path)
    return payload


def _check_archive(data: bytes, path: str, limits: ReadLimits) -> None:
    try:
        archive, infos = _open_archive(data, path, limits)
        pickles = [info for info in infos if info.filename.endswith(".pkl")]
        data_pickles = [info for info in pickles if _DATA_PKL.match(info.filename)]
        if len(data_pickles) != 1:
            raise FileFormatError(f"a torch archive must hold exactly one data.pkl, found {len(data_pickles)}", path)
        scans = []
        for info in pickles:
            payload = _read_pickle_entry(archive, info, path, limits)
            scans.append(scan_pickle(io.BytesIO(payload), f"{path} ({info.filename})", limits))
            _refuse_unsafe(scans[-1].globals, path)
    except _ZIP_ERRORS as exc:
        raise FileFormatError(f"the zip archive is truncated or damaged ({exc})", path) from None
    stored = sum(info.file_size for info in infos if "/data/" in info.filename)
    _refuse_storages(scans, stored, path, limits)


def _check_legacy(data: bytes, path: str, limits: ReadLimits) -> None:
    scans, offset = [], 0
    for index in range(_LEGACY_PICKLE_COUNT):
        if offset >= len(data):
            raise FileFormatError(f"the legacy torch file ends after {index} of its {_LEGACY_PICKLE_COUNT} parts", path)
        window = data[offset : offset + limits.max_pickle_bytes]
        stream = io.BytesIO(window)
        where = f"{path} (legacy part {index + 1})"
        try:
            scans.append(scan_pickle(stream, where, limits))
        except FileFormatError:
            if len(window) == limits.max_pickle_bytes and stream.tell() >= len(window):
                refuse_size(len(window) + 1, limits.max_pickle_bytes, where, path)
            raise
        _refuse_unsafe(scans[-1].globals, path)
        offset += stream.tell()
    _refuse_storages(scans, len(data) - offset, path, limits)


def _refuse_storages(scans: list[PickleScan], stored: int, path: str, limits: ReadLimits) -> None:
    """torch allocates each storage at the size the pickle declares: more than the file holds is a lie."""
    count = sum(scan.storages for scan in scans)
    if count > limits.max_tensors:
        raise FileFormatError(
            f"declares {count:,} tensor storages, more than the {limits.max_tensors:,} allowed for {limits.what}; "
            "refused",
            path,
        )
    declared = sum(scan.storage_bytes for scan in scans)
    if declared > stored:
        raise FileFormatError(
            f"its tensors declare {size_text(declared)} of data but the file holds {size_text(stored)}; refused",
            path,
        )


def check_torch_bytes(data: bytes, path: str, limits: ReadLimits = TORCH_FILE_LIMITS) -> None:
    """Refuse a torch file whose pickles name anything but plain-data constructors or exceed ``limits``."""
    if not data:
        raise FileFormatError("the file is empty", path)
    refuse_size(len(data), limits.max_file_bytes, "the file", path, allowed_for=limits.what)
    if data.startswith(_ZIP_MAGIC):
        _check_archive(data, path, limits)
    elif data[:1] == b"\x80":
        _check_legacy(data, path, limits)
    else:
        raise FileFormatError("not a torch file (neither a zip archive nor a pickle)", path)


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


def load_torch_bytes(data: bytes, path: str, limits: ReadLimits = TORCH_FILE_LIMITS) -> object:
    """Check, then load, a torch pickle file held in memory."""
    check_torch_bytes(data, path, limits)
    try:
        content = _second_guard_load(data)
    except pickle.UnpicklingError as exc:
        raise UnsafeFileError(f"refused by the restricted unpickler: {exc}", path) from None
    except Exception as exc:
        raise FileFormatError(f"the torch file could not be read; it is truncated or damaged ({exc})", path) from None
    check_structure(content, path, limits)
    return content


def load_torch_file(path: str | os.PathLike, limits: ReadLimits = TORCH_FILE_LIMITS) -> object:
    path = os.fspath(path)
    return load_torch_bytes(read_file(path, limits), path, limits)


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
