"""What the extension keeps for the UNet in a WebUI: released when the host frees the UNet's memory,
reported once per change in the console and at ``GET /hypernetworks/v1/memory``.

The hosts announce little: A1111 fires ``model_loaded`` after a checkpoint loads and nothing when it
unloads one or moves it to the CPU; Forge and reForge tell the sampling's attention patches when
their memory manager moves the UNet (``AttentionPatch.to``). :class:`ModelMoveWatch` fills the gap
by wrapping the functions every such move goes through (with a symmetric undo).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable

from ..memory import mib

MEDVRAM = "the host moves the UNet off its device (--medvram/--lowvram)"
UNLOADED = "the checkpoint was unloaded"
SWITCHED = "another checkpoint was loaded"


class HeldMemoryKeeper:
    """Releases what the applier holds for the host's reasons and tells what is held."""

    def __init__(self, applier, log: Callable[[str], None]) -> None:
        self.applier = applier
        self.log = log
        self.releases: collections.deque[dict] = collections.deque(maxlen=8)
        self.moves: collections.deque[dict] = collections.deque(maxlen=8)  # told by Forge's memory manager
        self._line: str | None = None

    def release(self, reason: str) -> None:
        """Let go of everything held (when anything is), saying why."""
        if self.applier.memory().total:
            self.record(reason, self.applier.release())

    def record(self, reason: str, released: int) -> None:
        self.releases.append({"reason": reason, "bytes": released, "time": time.time()})
        if released:
            self.log(f"released {mib(released)} held for the networks: {reason}")

    def after_sampling(self, p) -> None:
        """post_sample and before_hr: under A1111's --medvram/--lowvram (``sd_model.lowvram``) the
        UNet leaves the device for the VAE next; what is kept for it leaves now, not after the decode."""
        if getattr(getattr(p, "sd_model", None), "lowvram", False):
            self.release(MEDVRAM)

    def model_leaving(self, sd_model, reason: str) -> None:
        """A1111 is about to move a model to the CPU or discard it: release if it is ours."""
        if sd_model is not None and self.applier.unet(sd_model) is getattr(self.applier, "attached_unet", None):
            self.release(reason)

    def unet_moved(self, device, released: int) -> None:
        """Forge's or reForge's memory manager moved the UNet (and our patches) to ``device``."""
        self.moves.append({"device": str(device), "released_bytes": released, "time": time.time()})
        if released:
            self.record(f"the memory manager moved the UNet to {device}", released)

    def report(self) -> None:
        """One console line when what is held between generations changed."""
        line = self.applier.memory().line()
        if line != self._line:
            self._line = line
            self.log(line)

    def as_dict(self) -> dict:
        held = self.applier.memory()
        return {
            **held.as_dict(),
            "host": self.applier.kind,
            "line": held.line(),
            "releases": list(self.releases),
            "moves": list(self.moves),
        }


class ModelMoveWatch:
    """Wraps the host's functions that unload a model or move it off the device so that ``keeper``
    releases first. The unload button and route call ``sd_models.unload_model_weights`` on every
    host; on A1111 every move goes through ``send_model_to_cpu`` or ``send_model_to_trash``, looked
    up by name inside the module (unload, checkpoint switches, the checkpoint cache). ``apply()``
    twice wraps once; ``undo()`` puts the originals back."""

    def __init__(self) -> None:
        self.wrapped: list[tuple] = []

    def apply(self, sd_models, keeper: HeldMemoryKeeper, *, a1111: bool, on_error: Callable) -> None:
        if self.wrapped or sd_models is None:
            return
        watched = {"unload_model_weights": (UNLOADED, False)}
        if a1111:
            watched["send_model_to_cpu"] = ("the host moves the model to the CPU (a checkpoint switch)", True)
            watched["send_model_to_trash"] = ("the host discards the model", True)
        for name, (reason, of_model) in watched.items():
            original = getattr(sd_models, name, None)
            if callable(original) and not getattr(original, "hnx_wrapper", False):
                wrapper = _releasing_first(original, keeper, reason, of_model, on_error)
                setattr(sd_models, name, wrapper)
                self.wrapped.append((sd_models, name, original, wrapper))

    def undo(self) -> None:
        for owner, name, original, wrapper in self.wrapped:
            if getattr(owner, name, None) is wrapper:
                setattr(owner, name, original)
        self.wrapped = []


def _releasing_first(original: Callable, keeper: HeldMemoryKeeper, reason: str, of_model: bool, on_error) -> Callable:
    """``original`` after letting go of what is held: for its first argument's model when
    ``of_model``, else in any case."""

    def wrapper(*args, **kwargs):
        try:
            if of_model:
                keeper.model_leaving(args[0] if args else None, reason)
            else:
                keeper.release(reason)
        except Exception as exc:  # never stand between the host and its memory
            on_error(exc, "releasing hypernetwork memory")
        return original(*args, **kwargs)

    wrapper.hnx_wrapper = True
    wrapper.__wrapped__ = original
    return wrapper
