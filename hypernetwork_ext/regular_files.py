"""Opening a file for reading only when it is a regular file (or a symlink to one).

A FIFO named ``x.pt`` blocks ``open()`` until something writes to it (forever), ``/dev/zero``
never ends, a socket or a folder cannot be read: each is refused by name, without waiting. The
type is checked before opening and again on the open descriptor, so a file swapped for a FIFO in
between is refused too; ``O_NONBLOCK`` makes that open return at once.
"""

from __future__ import annotations

import io
import os
import stat

from .errors import FileFormatError

_KINDS = (
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)


def _refuse_non_regular(mode: int, path: str) -> None:
    if stat.S_ISDIR(mode):
        raise FileFormatError("is a folder, not a file", path)
    if stat.S_ISREG(mode):
        return
    kind = next((label for test, label in _KINDS if test(mode)), "not a regular file")
    raise FileFormatError(f"is {kind}, not a regular file; refused without reading it", path)


def open_regular(path: str | os.PathLike) -> io.BufferedReader:
    """``path`` opened for reading when it is a regular file; anything else raises FileFormatError."""
    path = os.fspath(path)
    try:
        _refuse_non_regular(os.stat(path).st_mode, path)
        descriptor = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        raise FileFormatError("no such file", path) from None
    except IsADirectoryError:
        raise FileFormatError("is a folder, not a file", path) from None
    except OSError as exc:  # a symlink loop, no permission
        raise FileFormatError(f"cannot be read ({exc.strerror or exc})", path) from None
    try:
        _refuse_non_regular(os.fstat(descriptor).st_mode, path)  # swapped for a FIFO since the check
    except BaseException:
        os.close(descriptor)
        raise
    return open(descriptor, "rb")
