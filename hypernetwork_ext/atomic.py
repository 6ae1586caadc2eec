"""Writes that either complete or leave the destination untouched."""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
from collections.abc import Callable, Iterator
from typing import BinaryIO

from .errors import FileExistsRefusedError


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[BinaryIO]:
    """Yield a file to write; on success it replaces ``path`` in one rename, on failure it is removed.

    The temporary file sits next to the destination so the final rename never crosses file
    systems; it is flushed to disk before the rename so a crash cannot leave a half-written file
    under the final name.
    """
    path = os.fspath(path)
    if not overwrite and os.path.exists(path):
        raise FileExistsRefusedError("the file exists; refusing to overwrite it (ask for overwrite explicitly)", path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, temp_path = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".partial", dir=directory)
    try:
        os.chmod(temp_path, _mode_for(path))  # mkstemp makes 0600; a user's files get their usual mode
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        if not overwrite and os.path.exists(path):
            raise FileExistsRefusedError("the file appeared while writing; refusing to overwrite it", path)
        os.replace(temp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_path)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, overwrite: bool = False) -> None:
    with atomic_output(path, overwrite=overwrite) as handle:
        handle.write(data)


def atomic_write_with(path: str | os.PathLike, writer: Callable[[BinaryIO], None], *, overwrite: bool = False) -> None:
    with atomic_output(path, overwrite=overwrite) as handle:
        writer(handle)


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
