"""How strongly a network acts, per path, attention kind, UNet block and sampling step.

A plain number is the A1111 multiplier. A :class:`Strength` refines it: separate key and value
factors, separate self- and cross-attention factors, per-block factors, a step window with
fade-in/out, and a factor for the negative (unconditional) pass. The effective multiplier of one
module call is the product of the factors that apply to it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from .errors import InvalidConfigError

KEY, VALUE = "key", "value"
SELF, CROSS = "self", "cross"
BLOCK_GROUPS = ("in", "mid", "out")
_BLOCK_ID = re.compile(r"^(IN|M|OUT)(\d{2})$")


def block_group(block: str | None) -> str | None:
    """``IN04`` -> ``in``, ``M00`` -> ``mid``, ``OUT03`` -> ``out``."""
    match = _BLOCK_ID.match(block or "")
    if not match:
        return None
    return {"IN": "in", "M": "mid", "OUT": "out"}[match[1]]


def normalise_block_selector(selector: str) -> str:
    """Accept ``IN4``/``in04``/``IN04``, ``M``/``MID``/``M00``, ``OUT3`` and the groups in/mid/out."""
    text = selector.strip()
    lowered = text.lower()
    if lowered in BLOCK_GROUPS:
        return lowered
    if lowered in ("m", "mid00", "middle"):
        return "M00"
    match = re.fullmatch(r"(in|m|mid|out)(\d{1,2})", lowered)
    if not match:
        raise InvalidConfigError(f"unknown UNet block {selector!r}; use IN00-IN11, M00, OUT00-OUT11 or in/mid/out")
    prefix = {"in": "IN", "m": "M", "mid": "M", "out": "OUT"}[match[1]]
    return f"{prefix}{int(match[2]):02d}"


def _finite(value: float, what: str) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise InvalidConfigError(f"{what} must be a finite number, found {value}")
    return value


@dataclass(frozen=True)
class Strength:
    multiplier: float = 1.0
    key: float = 1.0
    value: float = 1.0
    self_attn: float = 1.0
    cross_attn: float = 1.0
    blocks: tuple[tuple[str, float], ...] = field(default=())
    start: float = 0.0
    stop: float = 1.0
    fade_in: float = 0.0
    fade_out: float = 0.0
    uncond: float = 1.0

    def __post_init__(self) -> None:
        for name in ("multiplier", "key", "value", "self_attn", "cross_attn", "uncond"):
            _finite(getattr(self, name), name)
        for name in ("start", "stop", "fade_in", "fade_out"):
            value = _finite(getattr(self, name), name)
            if not 0.0 <= value <= 1.0:
                raise InvalidConfigError(f"{name} must be a fraction of the steps between 0 and 1, found {value}")
        if self.start >= self.stop:
            raise InvalidConfigError(f"start ({self.start}) must come before stop ({self.stop})")
        if self.fade_in + self.fade_out > self.stop - self.start + 1e-9:
            raise InvalidConfigError("fade-in and fade-out together are longer than the start-stop window")
        object.__setattr__(self, "blocks", tuple((normalise_block_selector(s), _finite(f, s)) for s, f in self.blocks))

    @classmethod
    def of(cls, value: float | Strength) -> Strength:
        return value if isinstance(value, Strength) else cls(multiplier=_finite(value, "multiplier"))

    @property
    def is_scheduled(self) -> bool:
        return self.start > 0 or self.stop < 1 or self.fade_in > 0 or self.fade_out > 0

    def block_factor(self, block: str | None) -> float:
        """The most specific block selector wins: an exact block id, then its group, then 1."""
        exact = dict(self.blocks)
        if block in exact:
            return exact[block]
        group = block_group(block)
        return exact.get(group, 1.0) if group else 1.0

    def site_factor(self, kind: str, block: str | None, path: str) -> float:
        """The part of the multiplier that depends only on where the module sits."""
        path_factor = self.key if path == KEY else self.value
        kind_factor = self.cross_attn if kind == CROSS else self.self_attn
        return self.multiplier * path_factor * kind_factor * self.block_factor(block)

    def time_factor(self, progress: float | None) -> float:
        """The part that depends on how far sampling has got (0 = first step; None = unknown)."""
        if progress is None or not self.is_scheduled:
            return 1.0
        if progress < self.start or (progress >= self.stop and self.stop < 1.0):
            return 0.0
        factor = 1.0
        if self.fade_in > 0 and progress < self.start + self.fade_in:
            factor = min(factor, (progress - self.start) / self.fade_in)
        if self.fade_out > 0 and progress > self.stop - self.fade_out:
            factor = min(factor, (self.stop - progress) / self.fade_out)
        return max(0.0, factor)


def block_weights_from_vector(values: Iterable[float], block_ids: list[str]) -> tuple[tuple[str, float], ...]:
    """Pair a per-block vector with the block ids it lists, in order."""
    values = [float(v) for v in values]
    if len(values) != len(block_ids):
        raise InvalidConfigError(f"a block vector for these blocks needs {len(block_ids)} values, found {len(values)}")
    return tuple(zip(block_ids, values, strict=True))


# The UNet blocks that hold attention, in the order LoRA block-weight vectors list them.
SD_ATTENTION_BLOCKS = (
    "IN01",
    "IN02",
    "IN04",
    "IN05",
    "IN07",
    "IN08",
    "M00",
    *(f"OUT{i:02d}" for i in range(3, 12)),
)
SDXL_ATTENTION_BLOCKS = ("IN04", "IN05", "IN07", "IN08", "M00", *(f"OUT{i:02d}" for i in range(6)))


def attention_block_order(block_ids: Iterable[str | None]) -> list[str]:
    """The distinct block ids of a model's attention sites, in UNet order (input, middle, output)."""
    rank = {"IN": 0, "M": 1, "OUT": 2}
    unique = {block for block in block_ids if block and _BLOCK_ID.match(block)}

    def key(block: str) -> tuple[int, int]:
        match = _BLOCK_ID.match(block)
        return rank[match[1]], int(match[2])

    return sorted(unique, key=key)
