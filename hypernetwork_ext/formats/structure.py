"""What unpickled content may look like before anything else touches it.

The unpickler builds nested containers without recursion, but what comes after (``repr`` in a
message, ``copy.deepcopy``, ``json.dumps`` of metadata) recurses and expands shared references:
a list nested 100,000 deep ends in RecursionError, and 30 lists that each hold the previous one
twice (a "billion laughs", a few hundred bytes of pickle) expand to a billion items. A tensor whose
strides are zero views a 4-byte storage as terabytes, which the first operation on it would
allocate. All three are refused here, in one pass that visits each object once.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..errors import FileFormatError
from .limits import ReadLimits, size_text

_END = object()


def _children(value: object) -> list:
    if isinstance(value, Mapping):
        return [*value.keys(), *value.values()]
    if isinstance(value, (list, tuple, set, frozenset)):
        return list(value)
    return []


def check_structure(content: object, path: str, limits: ReadLimits) -> None:
    """Refuse content nested deeper than ``limits.max_nesting``, holding itself, expanding to more
    items than a pickle of ``limits.max_pickle_opcodes`` could write out, or with an impossible tensor."""
    _Walk(path, limits).run(content)


class _Walk:
    """A depth-first walk with an explicit stack; each container is entered once and its expanded
    size (items counted as often as they are referred to) remembered for later references."""

    def __init__(self, path: str, limits: ReadLimits):
        self.path = path
        self.limits = limits
        self.expanded: dict[int, int] = {}
        self.open_ids: set[int] = set()
        self.stack: list[tuple[object, object]] = []
        self.totals: list[int] = []

    def run(self, content: object) -> None:
        if isinstance(content, torch.Tensor):
            _check_tensor(content, self.path)
        self._enter(content, _children(content))
        while self.stack:
            value, children = self.stack[-1]
            child = next(children, _END)
            if child is _END:
                self._leave(value)
            else:
                self._visit(child)
            if self.totals and self.totals[-1] > self.limits.max_pickle_opcodes:
                raise FileFormatError(
                    f"the file's containers expand to more than {self.limits.max_pickle_opcodes:,} items through "
                    "shared references; refused",
                    self.path,
                )

    def _enter(self, value: object, children: list) -> None:
        if len(self.stack) >= self.limits.max_nesting:
            raise FileFormatError(
                f"containers in the file are nested more than {self.limits.max_nesting} deep; refused", self.path
            )
        self.stack.append((value, iter(children)))
        self.open_ids.add(id(value))
        self.totals.append(1)

    def _leave(self, value: object) -> None:
        self.stack.pop()
        self.open_ids.discard(id(value))
        total = self.totals.pop()
        self.expanded[id(value)] = total
        if self.totals:
            self.totals[-1] += total

    def _visit(self, child: object) -> None:
        if isinstance(child, torch.Tensor):
            _check_tensor(child, self.path)
        grandchildren = _children(child)
        if not grandchildren:
            self.totals[-1] += 1
        elif id(child) in self.expanded:
            self.totals[-1] += self.expanded[id(child)]
        elif id(child) in self.open_ids:
            raise FileFormatError("a container in the file holds itself; refused", self.path)
        else:
            self._enter(child, grandchildren)


def _check_tensor(tensor: torch.Tensor, path: str) -> None:
    needed = tensor.numel() * tensor.element_size()
    held = tensor.untyped_storage().nbytes()
    if needed > held:
        raise FileFormatError(
            f"a tensor of shape {list(tensor.shape)} would need {size_text(needed)} but its storage holds "
            f"{size_text(held)} (its strides repeat elements); refused",
            path,
        )
