"""Learning-rate and clipping schedules.

The schedule string is A1111's: ``rate:step`` pairs separated by commas, each rate holding *until*
its step (``5e-5:100, 5e-6:1500, 1e-6``). A bare rate, or step ``-1``, holds until the maximum
step and ends the list; a step beyond the maximum is cut to it and ends the list too. When the
last pair ends before the maximum step, training ends there (as in the host). The same syntax
schedules the gradient-clipping limit.

On top of it, a linear warm-up and a cosine curve with restarts can scale the rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import InvalidConfigError

LR_SCHEDULERS = ("constant", "cosine_with_restarts")


@dataclass(frozen=True)
class Segment:
    value: float
    until: int  # the value holds while step < until


def parse_schedule(text: str, max_steps: int, *, what: str = "learning rate") -> list[Segment]:
    """Parse ``"5e-5:100, 5e-6:1500, 1e-6"`` into segments, with the host's rules."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidConfigError(f"Invalid {what} schedule {text!r}: it is empty")
    segments: list[Segment] = []
    for part in text.split(","):
        pieces = [piece.strip() for piece in part.split(":")]
        if len(pieces) > 2 or not pieces[0]:
            raise InvalidConfigError(f"Invalid {what} schedule {text!r}: cannot read {part.strip()!r} as rate:step")
        value = _number(pieces[0], text, what)
        if len(pieces) == 1:
            segments.append(Segment(value, max_steps))
            break
        step = _step(pieces[1], text, what)
        if step == -1 or step >= max_steps:
            segments.append(Segment(value, max_steps))
            break
        if step <= 0:
            raise InvalidConfigError(f"Invalid {what} schedule {text!r}: step {step} must be positive or -1")
        if segments and step <= segments[-1].until:
            raise InvalidConfigError(f"Invalid {what} schedule {text!r}: steps must increase ({step})")
        segments.append(Segment(value, step))
    return segments


def _number(piece: str, text: str, what: str) -> float:
    try:
        value = float(piece)
    except ValueError:
        raise InvalidConfigError(f"Invalid {what} schedule {text!r}: {piece!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise InvalidConfigError(f"Invalid {what} schedule {text!r}: {piece!r} must be a finite number >= 0")
    return value


def _step(piece: str, text: str, what: str) -> int:
    try:
        return int(piece)
    except ValueError:
        raise InvalidConfigError(f"Invalid {what} schedule {text!r}: step {piece!r} is not a whole number") from None


class StepSchedule:
    """A parsed schedule: the value in force at a step, or None once it has run out."""

    def __init__(self, text: str, max_steps: int, *, what: str = "learning rate"):
        self.text = text
        self.max_steps = max_steps
        self.segments = parse_schedule(text, max_steps, what=what)

    @property
    def end_step(self) -> int:
        """The step at which the schedule runs out (training stops there)."""
        return self.segments[-1].until

    def value_at(self, step: int) -> float | None:
        for segment in self.segments:
            if step < segment.until:
                return segment.value
        return None


@dataclass(frozen=True)
class RateShape:
    """Warm-up and cosine-with-restarts factors applied to the scheduled rate."""

    scheduler: str = "constant"
    warmup_steps: int = 0
    cycles: int = 1
    min_ratio: float = 0.0
    start_step: int = 0
    max_steps: int = 1

    def factor(self, step: int) -> float:
        factor = 1.0
        if self.warmup_steps > 0 and step < self.warmup_steps:
            factor = (step + 1) / (self.warmup_steps + 1)
        if self.scheduler == "cosine_with_restarts":
            factor *= self._cosine(step)
        return factor

    def _cosine(self, step: int) -> float:
        begin = max(self.warmup_steps, 0)
        span = max(self.max_steps - begin, 1)
        if step < begin:
            return 1.0
        period = span / max(self.cycles, 1)
        position = ((step - begin) % period) / period
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * position))
