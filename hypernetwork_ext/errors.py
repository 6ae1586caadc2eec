"""The project's own exception types.

Every problem with user input (a file, a parameter, a tag) is reported with one of these, and the
message always says which file or value is at fault and what is wrong with it.
"""

from __future__ import annotations

import os
import reprlib

_BRIEF = reprlib.Repr()
_BRIEF.maxstring = _BRIEF.maxother = 80


def brief(value: object) -> str:
    """``repr`` cut to a readable length: a value from a file may be megabytes long."""
    return _BRIEF.repr(value)


class HypernetworkError(Exception):
    """Base class of every error this package raises on purpose."""

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        self.path = os.fspath(path) if path is not None else None
        self.problem = message
        super().__init__(f"{self.path}: {message}" if self.path else message)


class InvalidConfigError(HypernetworkError, ValueError):
    """A hypernetwork cannot be built from the given parameters."""


class FileFormatError(HypernetworkError):
    """A file is empty, truncated, of an unknown layout, or not a hypernetwork."""


class UnsafeFileError(FileFormatError):
    """A pickled file asks the loader to call or import something that is not plain data."""


class NonFiniteWeightsError(FileFormatError):
    """A file's weights hold NaN or infinite values: applied, they would turn every image into NaN."""

    def __init__(self, count: int, total: int, path: str | os.PathLike | None = None):
        self.count = count
        self.total = total
        super().__init__(
            f"{count:,} of {total:,} weights are NaN or infinite; refused, since applying it would turn "
            "every image into NaN (black)",
            path,
        )


class FileExistsRefusedError(HypernetworkError, FileExistsError):
    """Saving would overwrite an existing file and overwriting was not asked for."""


class OutputNotWritableError(HypernetworkError, OSError):
    """An output cannot be written where it was asked for: a folder without write permission, a
    read-only disk, a file where a folder should be, a full disk."""


class IncompatibleNetworkError(HypernetworkError):
    """Two networks (or a network and a model) do not fit together."""


class TagError(HypernetworkError, ValueError):
    """A ``<hypernet:...>`` prompt tag or one of its arguments is malformed."""


class UnknownNetworkError(HypernetworkError, LookupError):
    """A name in a prompt matches no hypernetwork file in the configured folders."""


class NoSuchNetworkError(UnknownNetworkError):
    """No file answers to the name at all (one added since the last listing, perhaps)."""


class PathEscapeError(HypernetworkError, PermissionError):
    """A name would resolve to a file outside the configured folders."""
