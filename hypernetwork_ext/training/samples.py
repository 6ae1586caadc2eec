"""Samples whose inputs are not finite: recomputed in float32 where that can help, otherwise
skipped, named in a warning and counted in the run's summary. They never end a run: only a loss
that diverges on finite inputs does (``divergence.py``).

A random or damaged checkpoint's text encoder can overflow on some captions (NaN conditioning),
and a half-precision VAE gives non-finite latents for some images (SDXL's is known for it; A1111
re-runs its VAE in float32 then). Training on such a sample makes the loss NaN whatever the
network does.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

NON_FINITE_LATENT = "non-finite latent"
NON_FINITE_CONDITIONING = "non-finite conditioning"
EMPTY_PROMPT = "(the empty negative prompt)"


def finite_rows(value: torch.Tensor | dict[str, torch.Tensor]) -> list[bool]:
    """Per batch row: whether every value of it (every tensor of a dict) is finite; one device sync."""
    tensors = list(value.values()) if isinstance(value, dict) else [value]
    rows = None
    for tensor in tensors:
        finite = torch.isfinite(tensor.reshape(tensor.shape[0], -1)).all(dim=1)
        rows = finite if rows is None else rows & finite
    return [bool(flag) for flag in rows.tolist()]


@dataclass
class SkippedSample:
    image: str  # the file's name
    caption: str | None  # None when the image itself is unusable
    reason: str
    count: int = 0

    def describe(self) -> str:
        what = f"{self.image}" if self.caption is None else f"{self.image} with caption {self.caption!r}"
        return f"{what}: {self.reason}"


class SampleReport:
    """Which samples were skipped (and how often), and how many were saved by float32."""

    def __init__(self, on_message: Callable[[str], None] = lambda text: None):
        self.on_message = on_message
        self.skipped: dict[tuple[str, str | None, str], SkippedSample] = {}
        self.recomputed: dict[str, int] = {}

    def skip(self, path: str, caption: str | None, reason: str) -> None:
        """Count a skipped sample; the first time, say which and why."""
        key = (os.path.basename(path), caption, reason)
        if key not in self.skipped:
            self.skipped[key] = SkippedSample(*key)
            self.on_message(f"Warning: skipping {self.skipped[key].describe()} (counted in the run's summary)")
        self.skipped[key].count += 1

    def recompute(self, what: str) -> None:
        self.recomputed[what] = self.recomputed.get(what, 0) + 1

    @property
    def skipped_count(self) -> int:
        return sum(item.count for item in self.skipped.values())

    def summary(self) -> str:
        parts = []
        if self.skipped:
            details = "; ".join(f"{item.describe()} (x{item.count})" for item in self.skipped.values())
            parts.append(f"{self.skipped_count} sample(s) skipped: {details}")
        if self.recomputed:
            counts = ", ".join(f"{count} {what}" for what, count in sorted(self.recomputed.items()))
            parts.append(f"recomputed in float32 after half precision gave non-finite values: {counts}")
        return ". ".join(parts)

    def as_dicts(self) -> list[dict]:
        return [asdict(item) for item in self.skipped.values()]
