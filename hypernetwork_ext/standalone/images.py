"""Image helpers with PIL only: labelled grids and a loss chart."""

from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont


def _font(size: int = 12):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def grid(
    images: Sequence[Image.Image], columns: int, *, column_labels: Sequence[str] = (), row_labels: Sequence[str] = ()
) -> Image.Image:
    """Tile equally sized images row by row, with optional labels above columns and left of rows."""
    if not images:
        raise ValueError("no images to tile")
    width, height = images[0].size
    rows = math.ceil(len(images) / columns)
    top = 18 if column_labels else 0
    left = max((len(label) for label in row_labels), default=0) * 7 + (8 if row_labels else 0)
    canvas = Image.new("RGB", (left + columns * width, top + rows * height), "white")
    draw = ImageDraw.Draw(canvas)
    font = _font()
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        canvas.paste(image.convert("RGB").resize((width, height)), (left + column * width, top + row * height))
    for column, label in enumerate(column_labels[:columns]):
        draw.text((left + column * width + 3, 3), label, fill="black", font=font)
    for row, label in enumerate(row_labels[:rows]):
        draw.text((3, top + row * height + height // 2 - 6), label, fill="black", font=font)
    return canvas


def line_chart(
    series: dict[str, Sequence[tuple[float, float]]],
    *,
    size: tuple[int, int] = (640, 360),
    title: str = "",
    x_label: str = "step",
    y_label: str = "loss",
) -> Image.Image:
    """A plain line chart of (x, y) series, e.g. training and validation loss over steps."""
    width, height = size
    margin_left, margin_right, margin_top, margin_bottom = 56, 16, 28, 36
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = _font()
    points = [p for values in series.values() for p in values]
    draw.text((margin_left, 6), title, fill="black", font=font)
    if not points:
        draw.text((width // 2 - 30, height // 2), "no data yet", fill="gray", font=font)
        return image
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1
    plot_w, plot_h = width - margin_left - margin_right, height - margin_top - margin_bottom

    def to_pixel(x: float, y: float) -> tuple[float, float]:
        return (margin_left + (x - x0) / (x1 - x0) * plot_w, margin_top + (1 - (y - y0) / (y1 - y0)) * plot_h)

    draw.rectangle((margin_left, margin_top, margin_left + plot_w, margin_top + plot_h), outline="gray")
    for fraction in (0.0, 0.5, 1.0):
        y_value = y0 + fraction * (y1 - y0)
        _, py = to_pixel(x0, y_value)
        draw.text((4, py - 6), f"{y_value:.3g}", fill="black", font=font)
        x_value = x0 + fraction * (x1 - x0)
        px, _ = to_pixel(x_value, y0)
        draw.text((px - 10, margin_top + plot_h + 4), f"{x_value:.0f}", fill="black", font=font)
    draw.text((margin_left + plot_w // 2 - 12, height - 16), x_label, fill="black", font=font)
    draw.text((4, margin_top - 16), y_label, fill="black", font=font)
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    for index, (name, values) in enumerate(series.items()):
        colour = colours[index % len(colours)]
        pixels = [to_pixel(x, y) for x, y in values]
        if len(pixels) > 1:
            draw.line(pixels, fill=colour, width=2)
        elif pixels:
            px, py = pixels[0]
            draw.ellipse((px - 2, py - 2, px + 2, py + 2), fill=colour)
        draw.text((margin_left + plot_w - 120, margin_top + 4 + 14 * index), name, fill=colour, font=font)
    return image
