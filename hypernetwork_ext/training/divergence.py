"""Stopping a run that diverges, with the weights from before it did.

A learn rate far too high does not always end in NaN at once: one step can move every weight by
the learn rate (1e6 with Adam) while the loss stays normal for a step or two (attention saturates),
and only then turn non-finite. Keeping "the last finite weights" kept those. So every step's
weights are remembered once their loss looks normal, and the run stops, back on them, when

- the loss is NaN or infinite,
- the loss jumps far above its recent level (a median, since single diffusion losses vary 100-fold
  with the timestep drawn), or
- an optimizer step moves the weights far more than their own size, or makes them non-finite.

The thresholds are far from anything training with a usable learn rate does: Adam moves each
weight by about the learn rate per step, so a step 100 times the weights' size (at least 0.01, the
size A1111's default initialisation gives) needs a learn rate near 1.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass

import torch

LOSS_SPIKE_FACTOR = 1000.0
LOSS_BASELINE_STEPS = 4  # losses needed before a jump can be judged
LOSS_WINDOW = 32
UPDATE_FACTOR = 100.0
WEIGHT_SIZE_FLOOR = 0.01  # weights' root mean square below this count as this (zero-initialised biases)


class Diverged(Exception):
    """Training diverged; the weights are back at those of ``step``, from before it."""

    def __init__(self, reason: str, step: int, non_finite: bool):
        super().__init__(reason)
        self.reason = reason
        self.step = step
        self.non_finite = non_finite


@dataclass
class _Snapshot:
    step: int
    weights: list[torch.Tensor]
    ema: list[torch.Tensor] | None


def _rms(tensors: list[torch.Tensor]) -> float:
    count = sum(t.numel() for t in tensors)
    if not count:
        return 0.0
    norms = torch.stack([torch.linalg.vector_norm(t.detach(), dtype=torch.float32) for t in tensors])
    return math.sqrt(float(norms.square().sum()) / count)  # one device sync for all of them


def _rms_distance(tensors: list[torch.Tensor], others: list[torch.Tensor]) -> float:
    """The root mean square of ``tensors - others``, one difference at a time (never a second
    copy of all the weights)."""
    count = sum(t.numel() for t in tensors)
    if not count:
        return 0.0
    distances = torch.stack([torch.dist(t.detach().float(), o.float()) for t, o in zip(tensors, others, strict=True)])
    return math.sqrt(float(distances.square().sum()) / count)


class DivergenceGuard:
    """Remembers the weights of the last step whose loss looked normal and restores them when the
    run diverges (``Diverged`` is raised with what happened and the step restored)."""

    def __init__(self, parameters: list[torch.nn.Parameter], start_step: int, ema=None):
        self.parameters = parameters
        self.start_step = start_step
        self.ema = ema
        self.losses: deque[float] = deque(maxlen=LOSS_WINDOW)
        self.snapshot: _Snapshot | None = None

    def check_loss(self, loss: float, step: int) -> None:
        """The loss of the weights of ``step`` (before its update); raises Diverged when it is not normal."""
        if not math.isfinite(loss):
            self.diverged(f"the loss became {loss} at step {step + 1}", non_finite=True)
        if len(self.losses) >= LOSS_BASELINE_STEPS:
            level = statistics.median(self.losses)
            if loss > LOSS_SPIKE_FACTOR * level:
                self.diverged(
                    f"the loss jumped to {loss:.4g} at step {step + 1}, over {LOSS_SPIKE_FACTOR:.0f} times its "
                    f"recent level ({level:.4g})",
                    non_finite=False,
                )

    def keep(self, loss: float, step: int) -> None:
        """The weights of ``step`` gave a normal loss: remember them before the optimizer moves them
        (copied into the same buffers at every step: no new memory after the first)."""
        self.losses.append(loss)
        with torch.no_grad():
            if self.snapshot is None:
                self.snapshot = _Snapshot(
                    step,
                    [p.detach().clone() for p in self.parameters],
                    [s.clone() for s in self.ema.shadow] if self.ema is not None else None,
                )
                return
            self.snapshot.step = step
            torch._foreach_copy_(self.snapshot.weights, [p.detach() for p in self.parameters])
            if self.ema is not None and self.snapshot.ema is not None:
                torch._foreach_copy_(self.snapshot.ema, list(self.ema.shadow))

    def check_update(self, step: int) -> None:
        """After the optimizer step of ``step``: the new weights must be finite and near the old ones."""
        before = self.snapshot.weights
        if not all_finite(self.parameters):
            self.diverged(f"the weights became non-finite at step {step + 1}", non_finite=True)
        size = max(_rms(before), WEIGHT_SIZE_FLOOR)
        moved = _rms_distance(self.parameters, before)
        if moved > UPDATE_FACTOR * size:
            self.diverged(
                f"step {step + 1} moved the weights by {moved:.3g} (root mean square), over "
                f"{UPDATE_FACTOR:.0f} times their size ({size:.3g}); the learn rate is far too high",
                non_finite=False,
            )

    def diverged(self, reason: str, *, non_finite: bool) -> None:
        """Put the remembered weights back and raise Diverged."""
        snapshot = self.snapshot
        if snapshot is None:  # the first step's loss: nothing has moved yet
            raise Diverged(reason, self.start_step, non_finite)
        with torch.no_grad():
            for parameter, saved in zip(self.parameters, snapshot.weights, strict=True):
                parameter.copy_(saved)
            if self.ema is not None and snapshot.ema is not None:
                for shadow, saved in zip(self.ema.shadow, snapshot.ema, strict=True):
                    shadow.copy_(saved)
        raise Diverged(reason, snapshot.step, non_finite)


def all_finite(tensors) -> bool:
    """One device sync for all of them, not one per tensor. The largest magnitude of each tensor
    is NaN or infinite exactly when one of its values is (and, unlike a sum of squares, it
    cannot overflow), and it reads each tensor once without a mask of its size."""
    tensors = [t.detach() for t in tensors]
    return not tensors or bool(torch.isfinite(torch.stack(torch._foreach_norm(tensors, float("inf")))).all())
