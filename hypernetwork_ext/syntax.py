"""The ``<hypernet:...>`` prompt tag: parsing its arguments into a :class:`Strength`, and rewriting tags.

A tag is ``<hypernet:NAME>``, ``<hypernet:NAME:MULTIPLIER>`` or either followed by named
arguments ``key=value`` separated by colons, e.g. ``<hypernet:anime:0.8:k=1.2:v=0.6:start=0.3>``.
Hosts split the text between ``<hypernet:`` and ``>`` on colons (A1111's ``ExtraNetworkParams.items``);
:func:`parse_tag` takes those items. Every problem raises :class:`TagError` naming the tag, the
argument and what is wrong, so the host can report it and go on with the other tags.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from .errors import InvalidConfigError, TagError
from .strength import (
    BLOCK_GROUPS,
    SD_ATTENTION_BLOCKS,
    SDXL_ATTENTION_BLOCKS,
    Strength,
    normalise_block_selector,
)

TAG_TYPE = "hypernet"
# The tag as a regular expression, for reference: the prompt scanners below find exactly its matches
# but do not use it, because from every unclosed "<hypernet:" it searches to the end of the prompt
# (100,000 characters of them took 32 s; the scanners take linear time).
TAG_PATTERN = re.compile(r"<hypernet:([^>]+)>")
_TAG_OPEN = f"<{TAG_TYPE}:"

# Accepted spellings of each named argument, after lower-casing and dropping "_" and "-".
_KEYS: dict[str, str] = {}
for _field, _spellings in {
    "multiplier": ("m", "mult", "multiplier", "weight"),
    "key": ("k", "key"),
    "value": ("v", "value"),
    "self_attn": ("self", "sa", "selfattn"),
    "cross_attn": ("cross", "ca", "crossattn"),
    "blocks": ("bw", "blocks", "lbw"),
    "start": ("start",),
    "stop": ("stop", "end"),
    "fade_in": ("fadein", "rampin"),
    "fade_out": ("fadeout", "rampout"),
    "uncond": ("neg", "negative", "uncond"),
}.items():
    for _spelling in _spellings:
        _KEYS[_spelling] = _field

NAMED_ARGUMENTS = (
    "m",
    "k",
    "v",
    "self",
    "cross",
    "in",
    "mid",
    "out",
    "IN00-IN11",
    "M00",
    "OUT00-OUT11",
    "bw",
    "start",
    "stop",
    "fadein",
    "fadeout",
    "neg",
)
_FRACTION_FIELDS = ("start", "stop", "fade_in", "fade_out")
_SWITCH_WORDS = {"on": 1.0, "yes": 1.0, "true": 1.0, "off": 0.0, "no": 0.0, "false": 0.0}

# Built-in block presets: group factors, independent of the model family.
BUILTIN_PRESETS: dict[str, dict[str, float]] = {
    "ALL": {"in": 1.0, "mid": 1.0, "out": 1.0},
    "NONE": {"in": 0.0, "mid": 0.0, "out": 0.0},
    "IN": {"in": 1.0, "mid": 0.0, "out": 0.0},
    "MID": {"in": 0.0, "mid": 1.0, "out": 0.0},
    "OUT": {"in": 0.0, "mid": 0.0, "out": 1.0},
    "INMID": {"in": 1.0, "mid": 1.0, "out": 0.0},
    "MIDOUT": {"in": 0.0, "mid": 1.0, "out": 1.0},
    "INOUT": {"in": 1.0, "mid": 0.0, "out": 1.0},
}


@dataclass(frozen=True)
class TagSpec:
    """One parsed tag: which network, how strongly, and the text it came from."""

    name: str
    strength: Strength
    text: str

    @property
    def multiplier(self) -> float:
        return self.strength.multiplier


def tag_text(items: Sequence[object]) -> str:
    return "<" + ":".join([TAG_TYPE, *(str(item) for item in items)]) + ">"


def parse_tag(
    items: Sequence[object],
    *,
    default_multiplier: float = 1.0,
    model_blocks: Sequence[str] | None = None,
    presets: Mapping[str, Sequence[float]] | None = None,
) -> TagSpec:
    """Parse the colon-separated items of one tag (the name first).

    ``model_blocks`` lists the loaded model's attention blocks in order, for block vectors whose
    length is neither the SD1/SD2 one (16) nor the SDXL one (11); ``presets`` maps user preset
    names to block vectors.
    """
    text = tag_text(items)
    values = [str(item).strip() for item in items]
    if not values or not values[0]:
        raise TagError(f"{text}: the network name is missing")
    name, rest = values[0], values[1:]
    if "=" in name:
        raise TagError(f"{text}: the first argument must be the network name, found {name!r}")
    fields: dict[str, float] = {}
    blocks: dict[str, float] = {}
    positional = 0
    for item in rest:
        if "=" not in item:
            positional += 1
            if positional > 1:
                raise TagError(
                    f"{text}: unexpected argument {item!r}; after the multiplier use named arguments key=value "
                    f"({', '.join(NAMED_ARGUMENTS)})"
                )
            _store(fields, "multiplier", _number(item, "multiplier", text), text, item)
            continue
        key, raw = (part.strip() for part in item.split("=", 1))
        _parse_named(key, raw, text, fields, blocks, model_blocks, presets)
    fields.setdefault("multiplier", float(default_multiplier))
    try:
        strength = Strength(**fields, blocks=tuple(blocks.items()))
    except InvalidConfigError as exc:
        raise TagError(f"{text}: {exc.problem}") from None
    return TagSpec(name=name, strength=strength, text=text)


def _parse_named(key, raw, text, fields, blocks, model_blocks, presets) -> None:
    compact = key.lower().replace("_", "").replace("-", "")
    if not compact:
        raise TagError(f"{text}: an argument has no name before '='")
    field = _field_of(compact)
    if field == "blocks":
        for block, factor in block_weights(raw, text, model_blocks=model_blocks, presets=presets).items():
            _store(blocks, block, factor, text, key)
        return
    if field == "uncond":
        switch = _SWITCH_WORDS.get(raw.lower())
        _store(fields, field, switch if switch is not None else _number(raw, key, text), text, key)
        return
    if field is not None:
        _store(fields, field, _number(raw, key, text, fraction=field in _FRACTION_FIELDS), text, key)
        return
    try:
        block = normalise_block_selector(compact)
    except InvalidConfigError:
        raise TagError(f"{text}: unknown argument {key!r}; known arguments: {', '.join(NAMED_ARGUMENTS)}") from None
    _store(blocks, block, _number(raw, key, text), text, key)


def _store(target: dict, field: str, value: float, text: str, key: str) -> None:
    if field in target:
        raise TagError(f"{text}: {key!r} sets {field} a second time")
    target[field] = value


def _number(raw: str, what: str, text: str, *, fraction: bool = False) -> float:
    body = raw.strip()
    percent = fraction and body.endswith("%")
    if percent:
        body = body[:-1]
    try:
        value = float(body)
    except ValueError:
        raise TagError(f"{text}: {what} must be a number, found {raw!r}") from None
    if not math.isfinite(value):
        raise TagError(f"{text}: {what} must be a finite number, found {raw!r}")
    return value / 100.0 if percent else value


def block_weights(
    raw: str,
    text: str = "",
    *,
    model_blocks: Sequence[str] | None = None,
    presets: Mapping[str, Sequence[float]] | None = None,
) -> dict[str, float]:
    """Block factors from a vector (``1,0,0.5,...``), a built-in preset or a user preset name."""
    label = text or raw
    body = raw.strip()
    preset = _preset(body, presets, label)
    if preset is not None:
        if isinstance(preset, Mapping):
            return dict(preset)
        values = list(preset)
    else:
        parts = [part for part in re.split(r"[,\s]+", body) if part]
        if not parts:
            raise TagError(f"{label}: the block vector is empty")
        values = [_number(part, "each block weight", label) for part in parts]
    order = _vector_layout(len(values), model_blocks, label)
    return dict(zip(order, values[len(values) - len(order) :], strict=True))


def _preset(name: str, presets: Mapping[str, Sequence[float]] | None, label: str):
    if not name or not re.fullmatch(r"[A-Za-z_][\w.+-]*", name):
        return None
    upper = name.upper()
    for key, vector in (presets or {}).items():
        if key.upper() == upper:
            return vector
    if upper in BUILTIN_PRESETS:
        return BUILTIN_PRESETS[upper]
    known = sorted({*BUILTIN_PRESETS, *(presets or {})})
    raise TagError(f"{label}: unknown block preset {name!r}; known presets: {', '.join(known)}")


def _vector_layout(count: int, model_blocks: Sequence[str] | None, label: str) -> tuple[str, ...]:
    """Which blocks a vector of ``count`` values lists; one extra leading value (LoRA's BASE) is skipped."""
    layouts = []
    if model_blocks:
        layouts.append(tuple(model_blocks))
    layouts += [SD_ATTENTION_BLOCKS, SDXL_ATTENTION_BLOCKS]
    for layout in layouts:
        if count in (len(layout), len(layout) + 1):
            return layout
    expected = f"{len(SD_ATTENTION_BLOCKS)} (SD1/SD2) or {len(SDXL_ATTENTION_BLOCKS)} (SDXL)"
    if model_blocks:
        expected += f" or {len(model_blocks)} (this model)"
    raise TagError(f"{label}: a block vector needs {expected} values, found {count}")


def parse_presets(text: str) -> dict[str, list[float]]:
    """User presets, one ``NAME: v1, v2, ...`` per line (the block-weight presets setting)."""
    presets: dict[str, list[float]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, vector = line.partition(":")
        name = name.strip()
        if not sep or not re.fullmatch(r"[A-Za-z_][\w.+-]*", name):
            raise TagError(f"block preset line {number} ({line!r}) must look like NAME: 1,0,0.5,...")
        parts = [part for part in re.split(r"[,\s]+", vector.strip()) if part]
        presets[name] = [_number(part, f"preset {name}", f"block preset line {number}") for part in parts]
        if not presets[name]:
            raise TagError(f"block preset line {number} ({line!r}) has no values")
    return presets


# --- prompts -------------------------------------------------------------------------------


def _tag_spans(prompt: str) -> Iterator[tuple[int, int, str]]:
    """``(start, end, body)`` of every tag, left to right: what ``TAG_PATTERN.finditer`` yields, in
    time linear in the prompt's length.

    A tag runs from ``<hypernet:`` to the first ``>`` after it and needs a non-empty body. When no
    ``>`` follows an opening, no later opening can close either, so the scan ends there.
    """
    position = 0
    while (start := prompt.find(_TAG_OPEN, position)) >= 0:
        body_start = start + len(_TAG_OPEN)
        end = prompt.find(">", body_start)
        if end < 0:
            return
        if end == body_start:  # "<hypernet:>": no tag starts here; look from the next character
            position = start + 1
            continue
        yield start, end + 1, prompt[body_start:end]
        position = end + 1


def _replace_tags(prompt: str, replacement: Callable[[str, str], str]) -> str:
    """The prompt with each tag replaced by ``replacement(tag_text, body)``."""
    pieces, position = [], 0
    for start, end, body in _tag_spans(prompt):
        pieces += [prompt[position:start], replacement(prompt[start:end], body)]
        position = end
    pieces.append(prompt[position:])
    return "".join(pieces)


def find_tags(prompt: str) -> list[list[str]]:
    """The items of every ``<hypernet:...>`` tag in a prompt, in order."""
    return [body.split(":") for _start, _end, body in _tag_spans(prompt)]


def strip_tags(prompt: str) -> str:
    return _replace_tags(prompt, lambda _tag, _body: "")


def format_number(value: float) -> str:
    text = f"{float(value):.4f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def rewrite_tags(prompt: str, change: Callable[[list[str]], list[str] | None]) -> str:
    """Replace each tag by ``change(items)``; None leaves it as it is."""

    def replace(tag: str, body: str) -> str:
        new_items = change(body.split(":"))
        return tag if new_items is None else tag_text(new_items)

    return _replace_tags(prompt, replace)


def with_multiplier(items: list[str], multiplier: float) -> list[str]:
    """The items of a tag with its multiplier set (named arguments kept)."""
    kept = [item for item in items[1:] if "=" in item and _field_of(item.split("=", 1)[0]) != "multiplier"]
    return [items[0], format_number(multiplier), *kept]


def _field_of(key: str) -> str | None:
    return _KEYS.get(key.strip().lower().replace("_", "").replace("-", ""))


def set_multipliers(prompt: str, multiplier: float, names: Iterable[str] | None = None) -> str:
    """Set the multiplier of every tag (or of the tags naming one of ``names``)."""
    wanted = None if names is None else {name.strip() for name in names}

    def change(items: list[str]) -> list[str] | None:
        if wanted is not None and items[0].strip() not in wanted:
            return None
        return with_multiplier(items, multiplier)

    return rewrite_tags(prompt, change)


def rename_tags(prompt: str, mapping: Mapping[str, str]) -> str:
    """Replace tag names (e.g. names from another machine mapped to local ones by hash)."""

    def change(items: list[str]) -> list[str] | None:
        new = mapping.get(items[0].strip())
        return None if new is None else [new, *items[1:]]

    return rewrite_tags(prompt, change)


def infotext_name(name: str) -> str:
    """A name as written in ``Hypernet hashes`` (its separators would break the list)."""
    return name.translate(str.maketrans("", "", ":,")).strip()


def format_hashes(hashes: Mapping[str, str]) -> str:
    return ", ".join(f"{infotext_name(name)}: {short}" for name, short in hashes.items())


def parse_hashes(text: str) -> dict[str, str]:
    """``name: hash, name2: hash2`` back to a dict; malformed parts are skipped."""
    result = {}
    for part in (text or "").split(","):
        name, sep, short = part.partition(":")
        if sep and name.strip() and short.strip():
            result[name.strip()] = short.strip()
    return result


__all__ = [
    "BLOCK_GROUPS",
    "BUILTIN_PRESETS",
    "NAMED_ARGUMENTS",
    "TAG_PATTERN",
    "TAG_TYPE",
    "TagSpec",
    "block_weights",
    "find_tags",
    "format_hashes",
    "format_number",
    "infotext_name",
    "parse_hashes",
    "parse_presets",
    "parse_tag",
    "rename_tags",
    "rewrite_tags",
    "set_multipliers",
    "strip_tags",
    "with_multiplier",
]
