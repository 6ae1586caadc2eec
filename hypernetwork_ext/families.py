"""Stable Diffusion model families and the attention widths a hypernetwork meets in each.

A hypernetwork module is chosen by the width of the key/value input: the text-context width for
cross-attention and the UNet channel widths for self-attention.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelFamily:
    key: str
    label: str
    context_width: int
    self_attention_widths: tuple[int, ...]
    # (width, transformer blocks of that width): each block has one self- and one cross-attention
    self_attention_layers: tuple[tuple[int, int], ...] = ()

    @property
    def widths(self) -> tuple[int, ...]:
        return (self.context_width, *self.self_attention_widths)


# SD1/SD2: one transformer block per attention level: input blocks 1-2, 4-5, 7-8, the middle block,
# output blocks 3-11. SDXL: 2 blocks deep at 640 (input 4-5, output 3-5), 10 at 1280 (input 7-8,
# middle, output 0-2).
_SD_LAYERS = ((320, 5), (640, 5), (1280, 6))
SD1 = ModelFamily("sd1", "SD1", 768, (320, 640, 1280), _SD_LAYERS)
SD2 = ModelFamily("sd2", "SD2", 1024, (320, 640, 1280), _SD_LAYERS)
SDXL = ModelFamily("sdxl", "SDXL", 2048, (640, 1280), ((640, 10), (1280, 60)))

FAMILIES: dict[str, ModelFamily] = {family.key: family for family in (SD1, SD2, SDXL)}
CONTEXT_WIDTHS: dict[int, ModelFamily] = {family.context_width: family for family in FAMILIES.values()}


def infer_family(widths: Iterable[int]) -> str | None:
    """The family a set of widths targets, or None when the widths do not tell.

    A cross-attention width decides; without one, 320 rules out SDXL (whose first level has no
    attention) but cannot tell SD1 from SD2, so the answer is None.
    """
    present = set(widths)
    matches = [family.key for width, family in CONTEXT_WIDTHS.items() if width in present]
    return matches[0] if len(matches) == 1 else None


def family_from_name(name: str | None) -> str | None:
    """Normalise a family written by a person or another tool ("SDXL", "sd_xl", "SD 1.5") to a key."""
    if not name:
        return None
    compact = "".join(ch for ch in name.lower() if ch.isalnum())
    if compact.startswith("sdxl") or compact == "xl":
        return "sdxl"
    if compact.startswith(("sd2", "sdv2")):
        return "sd2"
    if compact.startswith(("sd1", "sdv1")):
        return "sd1"
    return None


def widths_fit(network_widths: Iterable[int], context_width: int, self_widths: Iterable[int]) -> bool:
    """Whether a network's modules would act as intended on a model with these attention widths.

    A network with the model's context width fits. A network with the context width of another
    family (an SD1 network on SDXL) does not, whatever else it shares; its self-attention modules
    would change the image while its text-conditioning part never runs. Otherwise a network fits
    when it shares at least one self-attention width with the model.
    """
    widths = set(network_widths)
    if context_width in widths:
        return True
    if widths & (set(CONTEXT_WIDTHS) - {context_width}):
        return False
    return bool(widths & set(self_widths))
