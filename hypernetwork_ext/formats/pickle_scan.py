"""Reading a pickle opcode by opcode without running anything: which globals it names, which tensor
storages it declares and how large they are.

The scan keeps a model of the unpickler's stack (strings, integers, tuples and globals are followed;
everything else is an opaque placeholder), so a global named through ``STACK_GLOBAL`` and the
persistent ids torch writes for its storages (``('storage', torch.FloatStorage, key, location,
numel)``) are read exactly as the unpickler would read them. That lets the loader refuse, before
unpickling, a file that names anything but plain data, declares more tensor data than it holds
(torch allocates a legacy file's storages at the size the pickle declares, before reading them), or
is built to make the unpickler allocate without bound (a memo index in the billions, millions of
opcodes).
"""

from __future__ import annotations

import io
import pickletools
from dataclasses import dataclass, field

from ..errors import FileFormatError, UnsafeFileError
from .limits import ReadLimits

_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}
_INT_OPS = {"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4"}
_TUPLE_OPS = {"TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "EMPTY_TUPLE"}
_MEMO_PUT_OPS = {"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"}
_MEMO_GET_OPS = {"GET", "BINGET", "LONG_BINGET"}
_REFUSED_OPS = {"EXT1", "EXT2", "EXT4"}
_ELEMENT_SIZES = {
    "Float": 4,
    "Half": 2,
    "BFloat16": 2,
    "Double": 8,
    "Int": 4,
    "Long": 8,
    "Short": 2,
    "Char": 1,
    "Byte": 1,
    "Bool": 1,
    "Untyped": 1,
}
_MARK = pickletools.markobject
_OPAQUE = object()  # a value the scan does not follow (a list, a dict, an object being built)


@dataclass(frozen=True)
class _Global:
    module: str
    name: str


@dataclass
class PickleScan:
    """What one pickle names and declares."""

    globals: set[tuple[str, str]] = field(default_factory=set)
    storages: int = 0  # distinct tensor storages
    storage_bytes: int = 0  # the bytes they declare


def scan_pickle(stream: io.BufferedIOBase, where: str, limits: ReadLimits | None = None) -> PickleScan:
    """Read one pickle from ``stream`` (up to its STOP) without executing it.

    Raises UnsafeFileError for constructs a plain-data pickle never uses (extension codes, a global
    whose name is computed rather than written out) and FileFormatError when the pickle is damaged,
    ends early or exceeds ``limits``.
    """
    machine = _StackModel(where, limits)
    try:
        for opcode, arg, _pos in pickletools.genops(stream):
            machine.step(opcode, arg)
    except (UnsafeFileError, FileFormatError):
        raise
    except Exception as exc:  # genops raises ValueError/EOFError on truncated or garbled input
        raise FileFormatError(f"{where} is truncated or damaged ({exc})") from None
    return machine.scan


class _StackModel:
    def __init__(self, where: str, limits: ReadLimits | None):
        self.where = where
        self.max_opcodes = limits.max_pickle_opcodes if limits else None
        self.opcodes = 0
        self.stack: list[object] = []
        self.marks: list[int] = []
        self.memo: dict[int, object] = {}
        self.storage_keys: set[object] = set()
        self.scan = PickleScan()

    def _damaged(self, problem: str) -> FileFormatError:
        return FileFormatError(f"{self.where} is damaged: {problem}")

    def step(self, opcode: pickletools.OpcodeInfo, arg: object) -> None:
        self.opcodes += 1
        if self.max_opcodes is not None and self.opcodes > self.max_opcodes:
            raise FileFormatError(
                f"{self.where} has more than {self.max_opcodes:,} pickle opcodes (real files have a few "
                "thousand); refused before unpickling"
            )
        name = opcode.name
        if name in _REFUSED_OPS:
            raise UnsafeFileError(f"{self.where} uses the pickle extension registry ({name}); refused")
        if name in _MEMO_PUT_OPS:
            self._memo_put(len(self.memo) if name == "MEMOIZE" else arg)
            return
        popped = self._pop(opcode.stack_before, name)
        after = opcode.stack_after
        if after and after[0] is _MARK:
            self.marks.append(len(self.stack))
            return
        if name == "DUP":
            self.stack.extend(popped * 2)
        elif after:
            self.stack.append(self._value(name, arg, popped))

    def _memo_put(self, index: object) -> None:
        if not isinstance(index, int) or index > self.opcodes:  # a pickler numbers its memo 0, 1, 2...
            raise self._damaged(f"memo index {index} is out of range")
        if not self.stack or (self.marks and len(self.stack) == self.marks[-1]):
            raise self._damaged("stores an empty stack in the memo")
        self.memo[index] = self.stack[-1]

    def _pop(self, before: list, name: str) -> list[object]:
        if _MARK in before:
            if not self.marks:
                raise self._damaged(f"{name} closes a mark that was never set")
            mark = self.marks.pop()
            popped = self.stack[mark:]
            del self.stack[mark:]
            below = before.index(_MARK)
            if below:
                popped = self._pop_items(below, name) + popped
            return popped
        if name == "POP" and self.marks and len(self.stack) == self.marks[-1]:
            self.marks.pop()  # POP right after MARK drops the mark, as the unpickler does
            return []
        return self._pop_items(len(before), name)

    def _pop_items(self, count: int, name: str) -> list[object]:
        if not count:
            return []
        floor = self.marks[-1] if self.marks else 0
        if len(self.stack) - count < floor:
            raise self._damaged(f"{name} takes more values than the stack holds")
        popped = self.stack[-count:]
        del self.stack[-count:]
        return popped

    def _value(self, name: str, arg: object, popped: list[object]) -> object:
        if name in _STRING_OPS:
            return arg.decode("latin-1") if isinstance(arg, bytes) else arg
        if name in _INT_OPS:
            return arg
        if name in _TUPLE_OPS:
            return tuple(popped)
        if name in _MEMO_GET_OPS:
            if arg not in self.memo:
                raise self._damaged(f"memo entry {arg} is read before it is written")
            return self.memo[arg]
        if name in ("GLOBAL", "INST"):
            module, _, attr = str(arg).partition(" ")
            return self._global(module, attr)
        if name == "STACK_GLOBAL":
            if not all(isinstance(value, str) for value in popped):
                raise UnsafeFileError(f"{self.where} names a global through computed values; refused")
            return self._global(*popped)
        if name == "BINPERSID":
            self._storage(popped[0])
        return _OPAQUE

    def _global(self, module: str, name: str) -> _Global:
        self.scan.globals.add((module, name))
        return _Global(module, name)

    def _storage(self, pid: object) -> None:
        """Count a torch storage: ``('storage', type, key, location, numel[, view])``; torch refuses other ids."""
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            return
        if len(pid) < 5 or not isinstance(pid[1], _Global) or type(pid[4]) is not int or pid[4] < 0:
            raise FileFormatError(f"{self.where} declares a tensor storage whose type or size is not written out")
        key = pid[2] if isinstance(pid[2], (str, int)) else len(self.storage_keys)
        if key in self.storage_keys:
            return  # the same storage again (tensors sharing it): its data is stored once
        self.storage_keys.add(key)
        element_size = _ELEMENT_SIZES.get(pid[1].name.removesuffix("Storage"), 8)
        self.scan.storages += 1
        self.scan.storage_bytes += pid[4] * element_size
