"""What the fast paths keep in memory: measured, bounded and released.

Between calls, and between generations while the networks stay the same, the fast paths of
:mod:`hypernetwork_ext.fastpath` keep tensors on the device where the UNet computes. The host's
memory accounting (Forge's memory manager, A1111's ``--medvram``) does not see them, so they are
measured here (:class:`HeldMemory`), the largest kind is bounded (:class:`FoldBudget`), and the
host adapters release them when the host frees the UNet's memory. What is kept, by kind:

- ``folds``: the folded weights, a copy of a self-attention ``to_k``/``to_v`` weight with affine
  networks folded in, in the UNet's dtype (up to two per projection: one per set of multipliers,
  e.g. the positive and the negative pass with ``neg=``); bounded by :class:`FoldBudget`;
- ``network_copies``: the networks' modules moved to the UNet's device or dtype (networks load
  on the CPU in float32), as A1111 keeps every loaded network on the GPU;
- ``composites``: the composed ``width x width`` matrix of each affine module;
- ``paired_layers``: the first Linears of a key/value module pair, stacked for one batched GEMM;
- ``contexts``: the text contexts and what each network made of them (a few kilobytes each);
- ``old_unet_weights``: weights a projection no longer uses that a fold state still references
  (the host moved or replaced them); dropped at the end of the generation.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

MiB = 1 << 20
DEFAULT_FOLD_LIMIT = 256 * MiB  # a 6-8 GB card's share: SD1.5's folds whole, SDXL's in part (docs/speed.md)

KINDS = ("folds", "network_copies", "composites", "paired_layers", "contexts", "old_unet_weights")
LABELS = {
    "folds": "folded weights",
    "network_copies": "network copies",
    "composites": "composed matrices",
    "paired_layers": "paired first layers",
    "contexts": "text contexts",
    "old_unet_weights": "old UNet weights",
}


def mib(nbytes: float) -> str:
    return f"{nbytes / MiB:.1f} MiB"


def limit_from_mib(value: object, default: int | None = DEFAULT_FOLD_LIMIT) -> int | None:
    """A limit in MiB as users type it (a setting, an option): None for "no limit" (a negative
    number), ``default`` for something that is not a number."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return default
    if number != number:  # NaN
        return default
    return None if number < 0 else int(number * MiB)


# -- what a network will hold on a family's UNet -----------------------------------------------------
def fold_set_bytes(layers: Iterable[tuple[int, int]], widths: Iterable[int], element_size: int) -> int:
    """One set of folded weights: for every self-attention block whose width the network has, a
    ``width x width`` key and value weight with its bias, in the UNet's dtype (``element_size``)."""
    present = set(widths)
    return sum(blocks * 2 * width * (width + 1) * element_size for width, blocks in layers if width in present)


# -- measuring ------------------------------------------------------------------------------------
def storage_key(tensor: torch.Tensor) -> tuple[str, int, int] | None:
    """(device, address, bytes) of the memory behind a tensor; None for meta tensors, which have none."""
    if tensor.device.type == "meta":
        return None
    storage = tensor.untyped_storage()
    return str(tensor.device), storage.data_ptr(), storage.nbytes()


@dataclass
class HeldMemory:
    """Bytes held per (device, kind); a storage shared by several tensors counts once."""

    by_place: dict[tuple[str, str], int] = field(default_factory=dict)
    folds: int = 0  # folded weights kept (projections x multiplier sets)
    fold_limit: int | None = None
    folding: bool = True  # False where nothing is ever folded (Forge's patches)

    @classmethod
    def measure(
        cls,
        tensors: Iterable[tuple[str, torch.Tensor]],
        *,
        folds: int = 0,
        fold_limit: int | None = None,
        folding: bool = True,
    ) -> HeldMemory:
        """From ``(kind, tensor)`` pairs; a storage met again under a later kind is not counted again."""
        seen: set[tuple[str, int]] = set()
        by_place: collections.Counter[tuple[str, str]] = collections.Counter()
        for kind, tensor in tensors:
            key = storage_key(tensor)
            if key is None or key[:2] in seen:
                continue
            seen.add(key[:2])
            by_place[(key[0], kind)] += key[2]
        return cls(dict(by_place), folds, fold_limit, folding)

    @property
    def total(self) -> int:
        return sum(self.by_place.values())

    def devices(self) -> dict[str, int]:
        totals: collections.Counter[str] = collections.Counter()
        for (device, _), nbytes in self.by_place.items():
            totals[device] += nbytes
        return dict(totals)

    def kinds(self, device: str | None = None) -> dict[str, int]:
        totals = {kind: 0 for kind in KINDS}
        for (where, kind), nbytes in self.by_place.items():
            if device is None or where == device:
                totals[kind] = totals.get(kind, 0) + nbytes
        return totals

    def on(self, device: str) -> int:
        return self.devices().get(device, 0)

    def as_dict(self) -> dict:
        return {
            "total_bytes": self.total,
            "devices": {
                device: {"total_bytes": total, **self.kinds(device)} for device, total in self.devices().items()
            },
            "folds": self.folds,
            "fold_limit_bytes": self.fold_limit,
            "folding": self.folding,
        }

    def line(self) -> str:
        """One console line: per device, the total and its parts."""
        limit = "no limit" if self.fold_limit is None else f"limit {mib(self.fold_limit)}"
        folds = f"{self.folds} folds, {limit}" if self.folding else "nothing folded"
        if not self.by_place:
            return f"holding nothing between generations ({folds})"
        parts = []
        for device, total in sorted(self.devices().items()):
            kinds = ", ".join(f"{mib(nbytes)} {LABELS[kind]}" for kind, nbytes in self.kinds(device).items() if nbytes)
            parts.append(f"{mib(total)} on {device} ({kinds})")
        return f"holding {'; '.join(parts)}; {folds}"


# -- bounding the folds ---------------------------------------------------------------------------------
@dataclass(eq=False)
class _Entry:
    owner: object  # the FoldState holding the fold
    signature: tuple
    nbytes: int
    epoch: int


class FoldBudget:
    """At most ``limit`` bytes of folded weights (None: no bound), shared by the projections of one
    attachment.

    A fold that does not fit first evicts the least recently used folds that no call has used since
    the last :meth:`new_epoch` (the hosts start one per generation); if it still does not fit it is
    not made, and that projection computes unfolded for the rest of the epoch, which gives the same
    result to float rounding. Folds in use are never evicted for other folds of the same epoch:
    a bound smaller than one generation's folds would otherwise refold at every step.
    """

    def __init__(self, limit: int | None = DEFAULT_FOLD_LIMIT) -> None:
        self.limit = limit
        self.used = 0
        self.epoch = 0
        self.evicted = 0
        self._entries: collections.OrderedDict[tuple[int, tuple], _Entry] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def new_epoch(self) -> None:
        self.epoch += 1

    def set_limit(self, limit: int | None) -> None:
        """A new bound; folds beyond it go at once, least recently used first."""
        self.limit = limit
        if limit is not None:
            self._evict_until(limit, any_epoch=True)

    def admit(self, nbytes: int) -> bool:
        """Whether a new fold of ``nbytes`` may be made now (evicting older folds to make room)."""
        if self.limit is None:
            return True
        if nbytes > self.limit:
            return False
        self._evict_until(self.limit - nbytes, any_epoch=False)
        return self.used + nbytes <= self.limit

    def added(self, owner, signature: tuple, nbytes: int) -> None:
        self._entries[(id(owner), signature)] = _Entry(owner, signature, nbytes, self.epoch)
        self.used += nbytes

    def used_now(self, owner, signature: tuple) -> None:
        entry = self._entries.get((id(owner), signature))
        if entry is not None:
            entry.epoch = self.epoch
            self._entries.move_to_end((id(owner), signature))

    def removed(self, owner, signature: tuple) -> None:
        entry = self._entries.pop((id(owner), signature), None)
        if entry is not None:
            self.used -= entry.nbytes

    def _evict_until(self, target: int, *, any_epoch: bool) -> None:
        while self.used > target and self._entries:
            key, entry = next(iter(self._entries.items()))
            if not any_epoch and entry.epoch >= self.epoch:
                return  # the least recently used fold is in use in this epoch: nothing older is left
            del self._entries[key]
            self.used -= entry.nbytes
            self.evicted += 1
            entry.owner.evict(entry.signature)
