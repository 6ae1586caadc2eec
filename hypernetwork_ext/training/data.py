"""The training data: images, captions from templates, latents, loss weights and batches.

As in A1111: every file of the dataset folder that PIL can open is an image (the folder is not
searched recursively); ``<image>.txt`` next to it holds its ``[filewords]``, else the file name
without leading digits and dashes (optionally picked apart with a regex and joined again). As in
A1111 a file that cannot be read is skipped and the run goes on, but not silently: each one is
reported by name (``on_skip``), with why.
Templates are text files with one prompt per line using ``[name]`` and ``[filewords]``.

Unlike A1111, a template line is drawn for every sample of every step (the host draws it once per
image), images can be bucketed by aspect ratio, the first tags can be kept in place when tags are
shuffled or dropped, and every random choice is derived from the run's seed and the step, so a
resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import HypernetworkError, InvalidConfigError

TEMPLATES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "templates")
_LEADING_NUMBERS = re.compile(r"^[-\d]+\s*")
_NOT_IMAGES = {".txt", ".json", ".csv", ".npz", ".pt", ".safetensors", ".caption", ".toml", ".yaml", ".md"}


class PreparationInterrupted(HypernetworkError):
    """A stop was requested while the dataset was being prepared."""


def derive_seed(seed: int, *parts: object) -> int:
    """A seed for one random choice, fixed by the run's seed and where the choice is made."""
    digest = hashlib.blake2b(repr((seed, *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


# --- templates --------------------------------------------------------------------------------
def list_templates(extra_dirs: Iterable[str] = ()) -> dict[str, str]:
    """Template file name -> path; the host's folders first, then the templates we ship."""
    found: dict[str, str] = {}
    for folder in [*extra_dirs, TEMPLATES_DIR]:
        if not folder or not os.path.isdir(folder):
            continue
        for root, _dirs, files in sorted(os.walk(folder)):
            for name in sorted(files):
                if name.endswith(".txt"):
                    found.setdefault(name, os.path.join(root, name))
    return found


def resolve_template(name_or_path: str, extra_dirs: Iterable[str] = ()) -> str:
    if os.path.isfile(name_or_path):
        return name_or_path
    templates = list_templates(extra_dirs)
    if name_or_path in templates:
        return templates[name_or_path]
    raise HypernetworkError(
        f"prompt template {name_or_path!r} not found; available: {', '.join(sorted(templates)) or 'none'}"
    )


def read_template(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as handle:
            lines = [line.strip() for line in handle]
    except OSError as exc:
        raise HypernetworkError(f"cannot read the prompt template ({exc.strerror or exc})", path) from None
    lines = [line for line in lines if line]
    if not lines:
        raise HypernetworkError("the prompt template has no lines", path)
    return lines


@dataclass
class CaptionBuilder:
    """Turns an image's filewords into a prompt: a template line with ``[name]`` and ``[filewords]``."""

    lines: Sequence[str]
    name: str
    shuffle_tags: bool = False
    tag_drop_out: float = 0.0
    keep_tags: int = 0

    def build(self, filewords: str, rng: random.Random) -> str:
        line = self.lines[rng.randrange(len(self.lines))] if len(self.lines) > 1 else self.lines[0]
        tags = filewords.split(",")
        kept, rest = tags[: self.keep_tags], tags[self.keep_tags :]
        if self.tag_drop_out > 0:
            rest = [tag for tag in rest if rng.random() > self.tag_drop_out]
        if self.shuffle_tags:
            rng.shuffle(rest)
        return line.replace("[filewords]", ",".join(kept + rest)).replace("[name]", self.name)


# --- images -----------------------------------------------------------------------------------
@dataclass
class ImageItem:
    path: str
    filewords: str
    size: tuple[int, int]  # (width, height) as fed to the VAE


def filewords_for(path: str, word_regex: str = "", join_string: str = " ") -> str:
    caption = os.path.splitext(path)[0] + ".txt"
    if os.path.exists(caption):
        with open(caption, encoding="utf-8", errors="replace") as handle:
            return handle.read().strip()
    text = _LEADING_NUMBERS.sub("", os.path.splitext(os.path.basename(path))[0])
    if word_regex:
        text = (join_string or "").join(re.findall(word_regex, text))
    return text


def scan_images(
    folder: str,
    word_regex: str = "",
    join_string: str = " ",
    *,
    on_skip: Callable[[str, str], None] | None = None,
) -> list[tuple[str, str, tuple[int, int]]]:
    """(path, filewords, original size) for every image file of ``folder`` (not recursive).
    ``on_skip(path, why)`` hears of each file that PIL cannot open (skipped, as in the host)."""
    from PIL import Image

    if not folder or not os.path.isdir(folder):
        raise HypernetworkError("the dataset folder does not exist", folder or "(empty)")
    found = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not os.path.isfile(path) or os.path.splitext(name)[1].lower() in _NOT_IMAGES:
            continue
        try:
            with Image.open(path) as image:
                size = image.size
        except Exception as exc:  # not an image PIL can read: skipped, as in the host, and named
            if on_skip is not None:
                on_skip(path, unreadable_because(exc))
            continue
        found.append((path, filewords_for(path, word_regex, join_string), size))
    if not found:
        raise HypernetworkError("no images found in the dataset folder", folder)
    return found


def unreadable_because(exc: Exception) -> str:
    """Why PIL could not read an image, without repeating its path."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(exc, UnidentifiedImageError):
        return "not an image file PIL can read (corrupt, or another kind of file)"
    if isinstance(exc, Image.DecompressionBombError):
        return f"too large to decode safely ({exc})"
    return f"cannot be decoded ({type(exc).__name__}: {exc})"


def bucket_size(width: int, height: int, area: int, step: int) -> tuple[int, int]:
    """The (width, height), multiples of ``step``, closest to the image's aspect ratio within ``area`` pixels."""
    aspect = width / height
    best, best_error = (step, step), float("inf")
    for bucket_width in range(step, int(math.sqrt(area * 4)) + step, step):
        bucket_height = max(step, int(area / bucket_width) // step * step)
        if bucket_width * bucket_height > area:
            continue
        error = abs(math.log((bucket_width / bucket_height) / aspect))
        if error < best_error - 1e-9:
            best, best_error = (bucket_width, bucket_height), error
    return best


def varsize_size(width: int, height: int, multiple: int = 64) -> tuple[int, int]:
    """ "Do not resize": the image keeps its size, cropped to a multiple the UNet can take."""
    return max(multiple, width // multiple * multiple), max(multiple, height // multiple * multiple)


def load_pixels(path: str, size: tuple[int, int], *, keep_aspect: bool, with_alpha: bool):
    """An image as a (3, H, W) tensor in [-1, 1], and its alpha channel (H, W) in [0, 1] or None."""
    import numpy as np
    from PIL import Image, ImageOps

    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened)
        alpha = image.getchannel("A") if with_alpha and "A" in image.getbands() else None
        rgb = image.convert("RGB")
    rgb = _fit(rgb, size, keep_aspect)
    pixels = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1).contiguous()
    alpha_tensor = None
    if alpha is not None:
        alpha_tensor = torch.from_numpy(np.asarray(_fit(alpha, size, keep_aspect), dtype=np.float32) / 255.0)
    return pixels, alpha_tensor


def _fit(image, size: tuple[int, int], keep_aspect: bool):
    from PIL import Image

    if image.size == size:
        return image
    if not keep_aspect:
        return image.resize(size, Image.BICUBIC)
    width, height = size
    scale = max(width / image.width, height / image.height)
    resized = image.resize(
        (max(width, round(image.width * scale)), max(height, round(image.height * scale))), Image.BICUBIC
    )
    left, top = (resized.width - width) // 2, (resized.height - height) // 2
    return resized.crop((left, top, left + width, top + height))


def alpha_weight(alpha: torch.Tensor | None, latent_size: tuple[int, int]) -> torch.Tensor:
    """The loss weight of one image at latent resolution: shifted to a minimum of 0 and a mean of 1
    (A1111's rule). An image without alpha, or with a uniform alpha, weighs 1 everywhere."""
    width, height = latent_size
    if alpha is None:
        return torch.ones(1, height, width)
    small = torch.nn.functional.interpolate(alpha[None, None], size=(height, width), mode="bilinear", antialias=True)[0]
    small = small - small.min()
    mean = small.mean()
    if float(mean) <= 1e-6:
        return torch.ones(1, height, width)
    return small / mean


# --- the prepared dataset --------------------------------------------------------------------
@dataclass
class Entry:
    path: str
    filewords: str
    size: tuple[int, int]
    mean: torch.Tensor  # scaled latent mean (C, h, w)
    std: torch.Tensor | None  # scaled latent std; None once the latent is fixed
    weight: torch.Tensor | None = None  # (1, h, w) loss weight


@dataclass
class Dataset:
    entries: list[Entry]
    train: list[int]
    validation: list[int]
    batch_size: int
    latent_sampling_method: str
    seed: int
    _groups: dict[tuple[int, int], list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        groups: dict[tuple[int, int], list[int]] = {}
        for index in self.train:
            groups.setdefault(self.entries[index].size, []).append(index)
        self._groups = groups

    @property
    def sizes(self) -> list[tuple[int, int]]:
        return sorted(self._groups)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The batches of one epoch: shuffled within each size group, then in shuffled order.

        Groups with at least a batch of images drop their last incomplete batch; smaller groups
        give one smaller batch, so no image is never seen.
        """
        rng = random.Random(derive_seed(self.seed, "epoch", epoch))
        batches: list[list[int]] = []
        for size in self.sizes:
            members = list(self._groups[size])
            rng.shuffle(members)
            if len(members) < self.batch_size:
                batches.append(members)
                continue
            for start in range(0, len(members) - self.batch_size + 1, self.batch_size):
                batches.append(members[start : start + self.batch_size])
        rng.shuffle(batches)
        return batches

    @property
    def batches_per_epoch(self) -> int:
        return len(self.epoch_batches(0))

    def latents(self, indices: Sequence[int], generator: torch.Generator | None, device) -> torch.Tensor:
        """The latents of a batch; ``random`` sampling draws a new sample each time."""
        latents = []
        for index in indices:
            entry = self.entries[index]
            if entry.std is None:
                latents.append(entry.mean)
            else:
                noise = torch.randn(entry.mean.shape, generator=generator, device=entry.mean.device)
                latents.append(entry.mean + entry.std * noise)
        return torch.stack(latents).to(device)

    def weights(self, indices: Sequence[int], device) -> torch.Tensor | None:
        if self.entries[indices[0]].weight is None:
            return None
        return torch.stack([self.entries[i].weight for i in indices]).to(device)


def plan_sizes(
    found: Sequence[tuple[str, str, tuple[int, int]]],
    width: int,
    height: int,
    *,
    varsize: bool,
    bucketing: bool,
    step: int,
) -> list[tuple[int, int]]:
    if varsize:
        return [varsize_size(*size) for _path, _words, size in found]
    if bucketing:
        return [bucket_size(*size, width * height, step) for _path, _words, size in found]
    return [(width, height)] * len(found)


def split_validation(count: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices for training and for the held-out validation set (at least one image each when asked)."""
    indices = list(range(count))
    if fraction <= 0:
        return indices, []
    held = max(1, round(count * fraction))
    if held >= count:
        raise InvalidConfigError(
            f"validation_split {fraction} would hold out all {count} images; at least one must remain for training"
        )
    rng = random.Random(derive_seed(seed, "validation"))
    chosen = set(rng.sample(indices, held))
    return [i for i in indices if i not in chosen], sorted(chosen)


def build_dataset(
    found: Sequence[tuple[str, str, tuple[int, int]]],
    sizes: Sequence[tuple[int, int]],
    encode: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor] | None],
    *,
    batch_size: int,
    latent_sampling_method: str,
    use_weight: bool,
    validation_split: float,
    seed: int,
    keep_aspect: bool,
    storage_device,
    should_stop: Callable[[], bool] = lambda: False,
    on_skip: Callable[[str, str], None] | None = None,
    on_image: Callable[[], None] | None = None,
    on_unusable: Callable[[str], None] = lambda path: None,
) -> Dataset:
    """Encode every image once (the VAE is not needed again), keeping what the sampling method needs.
    An image that opened but cannot be decoded (a truncated file) is skipped and reported to
    ``on_skip(path, why)``; an image ``encode`` finds no usable latent for (None) is left out and
    reported to ``on_unusable(path)``; ``on_image()`` is called after each image (a progress bar)."""
    entries: list[Entry] = []
    for index, ((path, words, _original), size) in enumerate(zip(found, sizes, strict=True)):
        if should_stop():
            raise PreparationInterrupted("interrupted while preparing the dataset")
        try:
            pixels, alpha = load_pixels(path, size, keep_aspect=keep_aspect, with_alpha=use_weight)
        except Exception as exc:  # PIL decodes lazily: a truncated file fails only here
            if on_skip is None:
                raise
            on_skip(path, unreadable_because(exc))
            if on_image is not None:
                on_image()
            continue
        encoded = encode(pixels[None])
        if encoded is None:
            on_unusable(path)
            if on_image is not None:
                on_image()
            continue
        mean, std = encoded
        mean, std = mean[0].to(storage_device), std[0].to(storage_device)
        latent_size = (mean.shape[-1], mean.shape[-2])
        if latent_sampling_method == "deterministic":
            std = None
        elif latent_sampling_method == "once":
            generator = torch.Generator(device="cpu").manual_seed(derive_seed(seed, "once", index))
            noise = torch.randn(mean.shape, generator=generator).to(storage_device)
            mean, std = mean + std * noise, None
        weight = alpha_weight(alpha, latent_size).to(storage_device) if use_weight else None
        entries.append(Entry(path, words, size, mean, std, weight))
        if on_image is not None:
            on_image()
    if not entries:
        raise HypernetworkError(
            f"none of the {len(found)} images of the dataset could be read or gives finite latents",
            os.path.dirname(found[0][0]),
        )
    train, validation = split_validation(len(entries), validation_split, seed)
    return Dataset(
        entries=entries,
        train=train,
        validation=validation,
        batch_size=min(batch_size, len(train)),
        latent_sampling_method=latent_sampling_method,
        seed=seed,
    )
