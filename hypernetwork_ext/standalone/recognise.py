"""Does a picture show what its caption says? A simple measurement for the tiny model's pictures.

The background is the colour of the border; the shape is every pixel clearly unlike it. The shape's
colour is the median of those pixels, named by the nearest colour of the data recipe; its form is
the shape whose outline, drawn into the same bounding box, overlaps it best; its side is where its
centre of mass lies. Used by the tiny model's training script (held-out captions), its test, the
demo and the efficacy benchmark.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy

from .procedural import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SUPERSAMPLING, Style, draw_shape, parse_caption

FOREGROUND_DISTANCE = 70.0  # RGB distance from the background that makes a pixel part of the shape
MIN_SHAPE_PIXELS = 0.02  # of the image: less than this is "nothing drawn"
SIDE_THRESHOLD = 0.12  # of the image size: a centre further than this from the middle is on a side


@dataclass(frozen=True)
class Reading:
    """What the measurement sees in a picture (None where it sees nothing it can name)."""

    background: str | None
    colour: str | None
    shape: str | None
    position: str | None
    shape_fit: float  # intersection over union of the shape and the best outline, 0..1
    coverage: float  # fraction of the picture that is shape


@dataclass(frozen=True)
class Verdict:
    caption: str
    reading: Reading
    colour: bool
    shape: bool
    background: bool
    position: bool

    @property
    def recognised(self) -> bool:
        """The caption's colour and shape are what the picture shows (the headline measurement)."""
        return self.colour and self.shape

    @property
    def everything(self) -> bool:
        return self.colour and self.shape and self.background and self.position


def _nearest(colour: numpy.ndarray, palette: dict[str, tuple[int, int, int]]) -> tuple[str, float]:
    names = list(palette)
    distances = numpy.linalg.norm(numpy.asarray([palette[n] for n in names], dtype=numpy.float64) - colour, axis=1)
    best = int(distances.argmin())
    return names[best], float(distances[best])


# The share of its box each shape fills, and how far down the box its centre of mass lies.
_FILL = {"circle": numpy.pi / 4, "square": 1.0, "triangle": 0.5, "diamond": 0.5}
_CENTRE_DOWN = {"circle": 0.5, "square": 0.5, "triangle": 2 / 3, "diamond": 0.5}


def _template(shape: str, centre: tuple[float, float], area: float, size: int) -> numpy.ndarray:
    """The shape with the given area and centre of mass, as a boolean mask."""
    from PIL import Image, ImageDraw

    side = (area / _FILL[shape]) ** 0.5
    left, top = centre[0] - side / 2, centre[1] - side * _CENTRE_DOWN[shape]
    box = (left, top, left + side, top + side)
    big = size * SUPERSAMPLING
    canvas = Image.new("L", (big, big), 0)
    draw_shape(ImageDraw.Draw(canvas), shape, tuple(v * SUPERSAMPLING for v in box), 255)
    return numpy.asarray(canvas.resize((size, size), Image.Resampling.BOX), dtype=numpy.float64) > 127


def read_picture(image) -> Reading:
    pixels = numpy.asarray(image.convert("RGB"), dtype=numpy.float64)
    height, width, _ = pixels.shape
    edges = (pixels[:2], pixels[-2:], pixels[:, :2], pixels[:, -2:])
    background_rgb = numpy.median(numpy.concatenate([edge.reshape(-1, 3) for edge in edges]), axis=0)
    background, background_error = _nearest(background_rgb, BACKGROUNDS)
    background = background if background_error < 60 else None
    distance = numpy.linalg.norm(pixels - background_rgb, axis=2)
    mask = distance > FOREGROUND_DISTANCE
    if mask.mean() < MIN_SHAPE_PIXELS:
        return Reading(background, None, None, None, 0.0, float(mask.mean()))
    shape_rgb = numpy.median(pixels[mask], axis=0)
    colour, colour_error = _nearest(shape_rgb, COLOURS)
    # Edge pixels blend both colours: each belongs to the one it is closer to.
    mask = numpy.linalg.norm(pixels - shape_rgb, axis=2) < distance
    coverage = float(mask.mean())
    ys, xs = numpy.nonzero(mask)
    centre = (float(xs.mean()) + 0.5, float(ys.mean()) + 0.5)
    fits = {}
    for shape in SHAPES:
        template = _template(shape, centre, float(mask.sum()), width)
        union = numpy.logical_or(template, mask).sum()
        fits[shape] = float(numpy.logical_and(template, mask).sum() / union) if union else 0.0
    shape = max(fits, key=fits.get)
    side = (float(mask.sum()) / _FILL[shape]) ** 0.5
    box_middle_y = centre[1] - side * (_CENTRE_DOWN[shape] - 0.5)  # a triangle's mass sits low in its box
    dx, dy = centre[0] / width - 0.5, box_middle_y / height - 0.5
    position = None
    if max(abs(dx), abs(dy)) > SIDE_THRESHOLD:
        direction = (int(numpy.sign(dx)), 0) if abs(dx) >= abs(dy) else (0, int(numpy.sign(dy)))
        position = next(name for name, offset in POSITIONS.items() if offset == direction)
    return Reading(
        background,
        colour if colour_error < 90 else None,
        shape if fits[shape] > 0.5 else None,
        position,
        fits[shape],
        coverage,
    )


def judge(image, caption: str) -> Verdict:
    expected = parse_caption(caption)
    reading = read_picture(image)
    return Verdict(
        caption=caption,
        reading=reading,
        colour=reading.colour == expected.colour,
        shape=reading.shape == expected.shape,
        background=expected.background is None or reading.background == expected.background,
        position=reading.position == expected.position,
    )


@dataclass(frozen=True)
class Score:
    count: int
    recognised: float  # colour and shape right
    colour: float
    shape: float
    background: float
    position: float
    everything: float

    def line(self) -> str:
        return (
            f"{self.recognised:.0%} recognised (colour and shape) of {self.count}; colour {self.colour:.0%}, "
            f"shape {self.shape:.0%}, background {self.background:.0%}, side {self.position:.0%}, "
            f"all four {self.everything:.0%}"
        )


def score(verdicts: Sequence[Verdict]) -> Score:
    count = len(verdicts)

    def share(attribute: str) -> float:
        return sum(bool(getattr(v, attribute)) for v in verdicts) / count if count else 0.0

    return Score(
        count,
        share("recognised"),
        share("colour"),
        share("shape"),
        share("background"),
        share("position"),
        share("everything"),
    )


STYLE_DISTANCE = 45.0  # RGB distance within which a pixel counts as one of a style's colours


def style_share(image, style: Style) -> float:
    """The fraction of a picture's pixels in the style's own colours (its background and outline):
    about 0.9 for a picture drawn in the style, about 0 for one of the base data."""
    pixels = numpy.asarray(image.convert("RGB"), dtype=numpy.float64)
    palette = [colour for colour in (style.background, style.outline) if colour is not None]
    near = numpy.zeros(pixels.shape[:2], dtype=bool)
    for colour in palette:
        near |= numpy.linalg.norm(pixels - numpy.asarray(colour, dtype=numpy.float64), axis=2) < STYLE_DISTANCE
    return float(near.mean())
