"""Procedurally drawn pictures with captions: what the embedded tiny model learned to draw, and the
styles its demo networks learn. Nothing is downloaded; every picture comes from a seed.

A scene is one shape (circle, square, triangle, diamond) of one colour on a plain background,
centred unless the caption names a side: ``"a red circle on a white background"``,
``"a blue square on the left on a black background"``. Shapes are drawn at four times the size
and scaled down, so their edges are smooth as in a photograph rather than aliased.

A :class:`Style` redraws the same scenes differently (another background, an outline); the tiny
model never saw one, so a network trained on a styled dataset has something to learn.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

RGB = tuple[int, int, int]

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS: dict[str, RGB] = {
    "red": (220, 40, 40),
    "orange": (240, 140, 30),
    "yellow": (235, 205, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (150, 60, 190),
}
BACKGROUNDS: dict[str, RGB] = {
    "white": (245, 245, 245),
    "grey": (128, 128, 128),
    "black": (24, 24, 24),
    "cream": (240, 226, 190),
}
# Where a shape's centre goes, as a fraction of the image size away from the middle.
POSITIONS: dict[str, tuple[int, int]] = {
    "on the left": (-1, 0),
    "on the right": (1, 0),
    "at the top": (0, -1),
    "at the bottom": (0, 1),
}
POSITION_OFFSET = 0.21  # of the image size: 13 pixels at 64
SIZE_RANGE = (0.32, 0.5)  # the side of a shape's box, as a fraction of the image size
CENTRE_JITTER = 0.05
SUPERSAMPLING = 4


@dataclass(frozen=True)
class Style:
    """How a styled dataset differs from what the base model draws."""

    name: str
    background: RGB | None = None  # replaces every background colour
    outline: RGB | None = None  # a ring drawn around each shape
    outline_width: float = 0.0  # of the image size


STYLES: dict[str, Style] = {
    # A deep-blue night sky, every shape rimmed with cyan moonlight: no background of the base data is
    # blue, no shape of it has an outline, and both colours are far from every colour it has.
    "night": Style("night", background=(30, 40, 120), outline=(90, 220, 230), outline_width=0.05),
    # A warm dusk with dark ink rims: the efficacy benchmark's teacher learns it, away from "night".
    "dusk": Style("dusk", background=(235, 120, 70), outline=(50, 25, 60), outline_width=0.04),
}


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    position: str | None = None  # a key of POSITIONS, or None (centred)
    size: float = 0.42  # the side of the shape's box, as a fraction of the image size
    jitter: tuple[float, float] = (0.0, 0.0)  # the centre's small random offset, as a fraction

    @property
    def caption(self) -> str:
        where = f" {self.position}" if self.position else ""
        return f"a {self.colour} {self.shape}{where} on a {self.background} background"

    def centre(self, size: int) -> tuple[float, float]:
        dx, dy = POSITIONS[self.position] if self.position else (0, 0)
        x = 0.5 + dx * POSITION_OFFSET + self.jitter[0]
        y = 0.5 + dy * POSITION_OFFSET + self.jitter[1]
        return x * size, y * size


def all_captions() -> list[str]:
    """Every caption the base data can have (colour x shape x position x background)."""
    return [
        Scene(shape, colour, background, position).caption
        for colour in COLOURS
        for shape in SHAPES
        for position in (None, *POSITIONS)
        for background in BACKGROUNDS
    ]


def vocabulary() -> list[str]:
    """The words of every caption (the tokenizer gives each its own token)."""
    words = {word for caption in all_captions() for word in caption.split()}
    return sorted(words)


def random_scene(
    rng: random.Random,
    *,
    shapes: Sequence[str] = SHAPES,
    colours: Sequence[str] = tuple(COLOURS),
    backgrounds: Sequence[str] = tuple(BACKGROUNDS),
    positioned: float = 0.4,
) -> Scene:
    """A scene drawn from ``rng``; a fraction ``positioned`` of them sit on a named side."""
    position = rng.choice(sorted(POSITIONS)) if rng.random() < positioned else None
    return Scene(
        shape=rng.choice(list(shapes)),
        colour=rng.choice(list(colours)),
        background=rng.choice(list(backgrounds)),
        position=position,
        size=rng.uniform(*SIZE_RANGE),
        jitter=(rng.uniform(-CENTRE_JITTER, CENTRE_JITTER), rng.uniform(-CENTRE_JITTER, CENTRE_JITTER)),
    )


_CAPTION = re.compile(
    r"^a (?P<colour>\w+) (?P<shape>\w+)(?: (?P<position>on the left|on the right|at the top|at the bottom))?"
    r"(?: on a (?P<background>\w+) background)?$"
)


@dataclass(frozen=True)
class Expected:
    colour: str
    shape: str
    background: str | None
    position: str | None


def parse_caption(caption: str) -> Expected:
    match = _CAPTION.match(" ".join(caption.lower().split()))
    if not match or match["colour"] not in COLOURS or match["shape"] not in SHAPES:
        raise ValueError(f"not a caption of the tiny model's data: {caption!r}")
    background = match["background"]
    if background is not None and background not in BACKGROUNDS:
        raise ValueError(f"unknown background {background!r} in {caption!r}")
    return Expected(match["colour"], match["shape"], background, match["position"])


def scene_for_caption(caption: str, rng: random.Random) -> Scene:
    """A random scene (size, jitter) matching a caption of :func:`all_captions`."""
    expected = parse_caption(caption)
    scene = random_scene(rng)
    return replace(
        scene,
        shape=expected.shape,
        colour=expected.colour,
        background=expected.background,
        position=expected.position,
    )


def shape_outline(shape: str, box: tuple[float, float, float, float]) -> list[tuple[float, float]] | None:
    """The polygon of a shape in ``box`` (left, top, right, bottom); None for a circle."""
    left, top, right, bottom = box
    middle_x, middle_y = (left + right) / 2, (top + bottom) / 2
    if shape == "square":
        return [(left, top), (right, top), (right, bottom), (left, bottom)]
    if shape == "triangle":
        return [(middle_x, top), (right, bottom), (left, bottom)]
    if shape == "diamond":
        return [(middle_x, top), (right, middle_y), (middle_x, bottom), (left, middle_y)]
    if shape == "circle":
        return None
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def draw_shape(draw, shape: str, box, fill) -> None:
    polygon = shape_outline(shape, box)
    if polygon is None:
        draw.ellipse(box, fill=fill)
    else:
        draw.polygon(polygon, fill=fill)


def draw_scene(scene: Scene, size: int = 64, style: Style | None = None):
    """The scene as a PIL image of ``size`` x ``size`` pixels."""
    from PIL import Image, ImageDraw

    big = size * SUPERSAMPLING
    background = style.background if style and style.background else BACKGROUNDS[scene.background]
    image = Image.new("RGB", (big, big), background)
    draw = ImageDraw.Draw(image)
    centre_x, centre_y = scene.centre(big)
    half = scene.size * big / 2
    box = (centre_x - half, centre_y - half, centre_x + half, centre_y + half)
    if style and style.outline:
        rim = style.outline_width * big
        draw_shape(draw, scene.shape, _grown(scene.shape, box, rim), style.outline)
    draw_shape(draw, scene.shape, box, COLOURS[scene.colour])
    return image.resize((size, size), Image.Resampling.LANCZOS)


def _grown(shape: str, box, rim: float):
    """The box of the same shape ``rim`` wider on every side (a triangle's corners need more)."""
    grow = rim * (2.0 if shape == "triangle" else 1.41 if shape == "diamond" else 1.0)
    left, top, right, bottom = box
    return (left - grow, top - grow, right + grow, bottom + grow * (0.6 if shape == "triangle" else 1.0))


def scenes(count: int, seed: int, **choices) -> Iterator[Scene]:
    rng = random.Random(seed)
    for _ in range(count):
        yield random_scene(rng, **choices)


def write_dataset(
    folder: str | os.PathLike,
    count: int,
    *,
    seed: int = 0,
    size: int = 64,
    style: Style | None = None,
    **choices,
) -> list[Path]:
    """Draw ``count`` scenes into ``folder`` as PNGs, each with its caption in ``<image>.txt``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for index, scene in enumerate(scenes(count, seed, **choices)):
        path = folder / f"{index:04d}-{scene.colour}-{scene.shape}.png"
        draw_scene(scene, size, style).save(path)
        path.with_suffix(".txt").write_text(scene.caption)
        written.append(path)
    return written
