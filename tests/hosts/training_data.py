"""The suite's plain prompt and training set, made of text the host itself renders finitely.

A random checkpoint's text encoder can overflow on some text: on one (seed 0, SD1.5 layout) the real
Forge, without this extension, renders "a red triangle on a black background" as an all-NaN image; on
another (seed 1) Forge Classic renders "a red circle" so. A check built on such a prompt tests the
checkpoint, not the extension. So the suite asks the host to render each candidate (no tag: the
extension takes no part) and keeps the first ones it renders finitely: the plain prompt every tag is
appended to (one per session, from ``PLAIN_CANDIDATES`` in suite_files.py) and the training captions
(more captioned pictures are drawn than needed); the dropped ones are named, with why, in the test
output and with the artifacts.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from hypernetwork_ext.standalone.tiny import procedural_images
from tests.hosts.real_host import HttpError, Rendered, Server, flat_image_reason

CANDIDATES = 12  # pictures drawn; the host keeps ``wanted`` of them


@dataclass(frozen=True)
class Dropped:
    caption: str
    reason: str


def rendered_or_reason(server: Server, prompt: str) -> Rendered | str:
    """The host's plain txt2img of ``prompt``, or why it is not finite.

    A1111 refuses a NaN latent with its NaN check (HTTP 500 naming NaNs); Forge and reForge, which have
    none, return the NaN image, drawn in one flat colour (a NaN anywhere spreads to every pixel through
    attention and convolutions; a finite image of a random checkpoint is never flat)."""
    try:
        rendered = server.txt2img(prompt)
    except HttpError as exc:
        if "nan" in exc.body.lower():
            return f"the host refused its image: {exc.body[:200]}"
        raise
    return flat_image_reason(rendered.pixels) or rendered


def non_finite_reason(server: Server, caption: str) -> str | None:
    """Why the host does not render ``caption`` finitely (None when it does)."""
    found = rendered_or_reason(server, caption)
    return found if isinstance(found, str) else None


def choose_plain_prompt(
    candidates: Sequence[str], reason_for: Callable[[str], str | None]
) -> tuple[str, list[Dropped]]:
    """The first candidate the host renders finitely, and the ones tried before it with what each
    rendered; none: an error naming every candidate and what it rendered."""
    dropped: list[Dropped] = []
    for candidate in candidates:
        reason = reason_for(candidate)
        if reason is None:
            return candidate, dropped
        dropped.append(Dropped(candidate, reason))
    raise RuntimeError(
        f"the host renders none of the suite's {len(candidates)} candidate plain prompts finitely without a tag "
        f"(tried: {'; '.join(f'{d.caption!r}: {d.reason}' for d in dropped)}); this checkpoint cannot test "
        "the extension"
    )


def choose_captions(
    captions: list[str], reason_for: Callable[[str], str | None], wanted: int
) -> tuple[list[int], list[Dropped]]:
    """The indices of the first ``wanted`` captions the host renders finitely, and the ones dropped
    before them. Each distinct caption is asked once."""
    kept: list[int] = []
    dropped: list[Dropped] = []
    reasons: dict[str, str | None] = {}
    for index, caption in enumerate(captions):
        if len(kept) == wanted:
            break
        if caption not in reasons:
            reasons[caption] = reason_for(caption)
        if reasons[caption] is None:
            kept.append(index)
        elif caption not in {item.caption for item in dropped}:
            dropped.append(Dropped(caption, reasons[caption]))
    if len(kept) < wanted:
        raise RuntimeError(
            f"the host renders only {len(kept)} of {len(captions)} candidate captions finitely "
            f"(dropped: {'; '.join(f'{d.caption!r}: {d.reason}' for d in dropped)}); this checkpoint cannot "
            "test training"
        )
    return kept, dropped


def finite_training_set(server: Server, folder: Path, wanted: int, *, seed: int = 0, size: int = 64) -> list[str]:
    """Write into ``folder`` (emptied first) ``wanted`` captioned pictures whose captions ``server``
    renders finitely; return their captions. Dropped captions are reported as a warning."""
    candidates = folder.with_name(f"{folder.name}-candidates")
    for path in (folder, candidates):
        shutil.rmtree(path, ignore_errors=True)
    images = procedural_images(candidates, CANDIDATES, seed=seed, colour="red", size=size)
    captions = [image.with_suffix(".txt").read_text() for image in images]
    kept, dropped = choose_captions(captions, lambda caption: non_finite_reason(server, caption), wanted)
    folder.mkdir(parents=True)
    for index in kept:
        for path in (images[index], images[index].with_suffix(".txt")):
            shutil.copy2(path, folder / path.name)
    shutil.rmtree(candidates)
    record = {"kept": [captions[i] for i in kept], "dropped": [vars(item) for item in dropped]}
    (folder.parent / "training-captions.json").write_text(json.dumps(record, indent=1))
    if dropped:
        warnings.warn(
            "training captions the host renders non-finitely, dropped: "
            + "; ".join(f"{item.caption!r} ({item.reason})" for item in dropped),
            stacklevel=2,
        )
    return record["kept"]
