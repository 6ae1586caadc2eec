"""Writes that either complete or leave the destination untouched."""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
from collections.abc import Callable, Iterator
from typing import BinaryIO

from .errors import FileExistsRefusedError, OutputNotWritableError


# -- can it be written? (asked before any work, so a render or a run is not lost at its end) -----
def check_writable_folder(folder: str | os.PathLike, *, output: str | os.PathLike | None = None) -> None:
    """Raise :class:`OutputNotWritableError` unless files can be created in ``folder`` (made first
    when missing): the folder, or the nearest part of its path that exists, must be a folder this
    process may write into. ``output`` names what was to be written there, for the message.
    Nothing is written to find out."""
    folder = os.path.abspath(os.fspath(folder))
    existing = folder
    while not os.path.lexists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    what = f", so {os.fspath(output)} cannot be written" if output is not None else ""
    if not os.path.isdir(existing):
        problem = "is not a folder" if existing == folder else f"cannot be made: {existing} is not a folder"
        raise OutputNotWritableError(f"{problem}{what}; nothing was written", folder)
    if not _may_write(existing):
        reason = "the disk is read-only" if _read_only(existing) else "permission denied"
        problem = "cannot write into this folder" if existing == folder else f"cannot be made in {existing}"
        raise OutputNotWritableError(f"{problem} ({reason}){what}; nothing was written", folder)


def check_writable_file(path: str | os.PathLike) -> None:
    """Raise :class:`OutputNotWritableError` unless ``path`` could be written as a file (its
    folder made if needed); whether it exists already is for the caller's overwrite rule."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise OutputNotWritableError("is a folder; give a file name to write", path)
    check_writable_folder(os.path.dirname(os.path.abspath(path)), output=path)


def _may_write(folder: str) -> bool:
    mode = os.W_OK | os.X_OK
    if os.access in os.supports_effective_ids:
        return os.access(folder, mode, effective_ids=True)
    return os.access(folder, mode)


def _read_only(folder: str) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def _not_written(path: str, exc: OSError) -> OutputNotWritableError:
    reason = exc.strerror or str(exc)
    folder = os.path.dirname(os.path.abspath(path))
    return OutputNotWritableError(f"cannot write {path} here ({reason}); nothing was written", folder)


# -- atomic writes --------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[BinaryIO]:
    """Yield a file to write; on success it replaces ``path`` in one rename, on failure it is removed.

    The temporary file sits next to the destination so the final rename never crosses file
    systems; it is flushed to disk before the rename so a crash cannot leave a half-written file
    under the final name. A destination that cannot be written raises :class:`OutputNotWritableError`
    (which names it and why), not a bare ``OSError`` about the temporary file.
    """
    path = os.fspath(path)
    if not overwrite and os.path.exists(path):
        raise FileExistsRefusedError("the file exists; refusing to overwrite it (ask for overwrite explicitly)", path)
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
        fd, temp_path = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".partial", dir=directory)
    except OSError as exc:
        raise _not_written(path, exc) from exc
    try:
        os.chmod(temp_path, _mode_for(path))  # mkstemp makes 0600; a user's files get their usual mode
        with os.fdopen(fd, "wb") as handle:
            yield handle
            try:
                handle.flush()
                os.fsync(handle.fileno())
            except OSError as exc:  # a full disk shows here at the latest
                raise _not_written(path, exc) from exc
        if not overwrite and os.path.exists(path):
            raise FileExistsRefusedError("the file appeared while writing; refusing to overwrite it", path)
        try:
            os.replace(temp_path, path)
        except OSError as exc:
            raise _not_written(path, exc) from exc
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_path)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, overwrite: bool = False) -> None:
    with atomic_output(path, overwrite=overwrite) as handle:
        try:
            handle.write(data)
        except OSError as exc:
            raise _not_written(os.fspath(path), exc) from exc


def atomic_write_with(path: str | os.PathLike, writer: Callable[[BinaryIO], None], *, overwrite: bool = False) -> None:
    """``writer(handle)`` writes the file; a failed write (a full disk) names ``path``, as above."""
    with atomic_output(path, overwrite=overwrite) as handle:
        try:
            writer(handle)
        except OSError as exc:
            raise _not_written(os.fspath(path), exc) from exc


def _mode_for(path: str) -> int:
    """The permissions the file would get from a plain ``open``: an overwritten file keeps its own."""
    try:
        return os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        return 0o666 & ~_umask()


@functools.cache
def _umask() -> int:
    # Reading the umask means setting it; done once, at the first write.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
