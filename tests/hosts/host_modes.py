"""The host's generation modes beyond a plain txt2img, each rendered by A1111's own hypernetworks
(the references) and then with the extension: hires fix, img2img, inpainting, a batch of two, the
refiner switch, token merging and FP8 weights.

A mode may need host options (token merging, FP8 storage). They are set through
``/sdapi/v1/options`` and set back explicitly afterwards, never sent as ``override_settings``: those
were found kept in ``config.json`` after the request and changed every later image. A mode may need
a second checkpoint (the refiner): a hard link of the loaded one under another name, made for the
render and removed after.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import time
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

from tests.hosts import suite_files as files
from tests.hosts.real_host import DEFAULT_SETTINGS, Rendered, Server, decode_image

TAG = "<hypernet:hnx-relu-ln:0.8>"
REFINER_STEM = "hnx-suite-refiner"


def _png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def init_image() -> Image.Image:
    """A fixed picture for img2img: a red disc on a blue-to-green gradient, at the suite's size."""
    size = DEFAULT_SETTINGS["width"]
    image = Image.new("RGB", (size, size))
    pixels = image.load()
    for y in range(size):
        for x in range(size):
            pixels[x, y] = (40, 60 + 150 * y // size, 200 - 150 * y // size)
    ImageDraw.Draw(image).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=(210, 40, 30))
    return image


def inpaint_mask() -> Image.Image:
    """White where the image is repainted: the left half."""
    size = DEFAULT_SETTINGS["width"]
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).rectangle((0, 0, size // 2 - 1, size - 1), fill=255)
    return mask


@dataclass(frozen=True)
class Mode:
    name: str
    route: str  # "txt2img" or "img2img"
    payload: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)  # host options for this mode, set back after
    refiner: bool = False  # needs a second checkpoint for refiner_checkpoint
    tags: tuple[str, ...] = (TAG,)  # each after the session's plain prompt (``prompts``)

    def prompts(self, plain: str) -> list[str]:
        return [files.tagged(plain, tags) for tags in self.tags]

    def request(self, extra: dict | None = None) -> dict:
        payload = {**DEFAULT_SETTINGS, **self.payload, **(extra or {})}
        if self.route == "img2img":
            payload["init_images"] = [_png(init_image())]
            if self.name == "inpainting":
                payload["mask"] = _png(inpaint_mask())
        return payload

    def record(self) -> dict:
        """What made the reference: the request (its pictures by hash), the options, the route."""
        payload = self.request()
        for key in ("init_images", "mask"):
            if key in payload:
                payload[key] = hashlib.sha256(json.dumps(payload[key]).encode()).hexdigest()[:16]
        return {"route": self.route, "payload": payload, "options": self.options, "refiner": self.refiner}


MODES = (
    Mode(
        "hires-fix",
        "txt2img",
        {
            "enable_hr": True,
            "hr_scale": 2,
            "hr_upscaler": "Latent",
            "denoising_strength": 0.6,
            "hr_second_pass_steps": 3,
        },
    ),
    Mode("img2img", "img2img", {"denoising_strength": 0.75}),
    Mode(
        "inpainting",
        "img2img",
        {"denoising_strength": 0.9, "inpainting_fill": 1, "mask_blur": 0, "inpaint_full_res": False},
    ),
    Mode("batch-of-two", "txt2img", {"batch_size": 2}),
    Mode("refiner-switch", "txt2img", {"refiner_switch_at": 0.5}, refiner=True),
    Mode("token-merging", "txt2img", options={"token_merging_ratio": 0.5}),
    Mode(
        "fp8",
        "txt2img",
        options={"fp8_storage": "Enable"},
        tags=(TAG, "<hypernet:hnx-relu-ln:0.8> <hypernet:hnx-linear:-0.5>"),
    ),
)
MODE_NAMES = [mode.name for mode in MODES]


def case_name(mode: Mode, prompt_index: int | None, image_index: int) -> str:
    """``mode-<name>-tag<i>-<image>`` for the tagged prompts, ``mode-<name>-no-tag-<image>``."""
    which = "no-tag" if prompt_index is None else f"tag{prompt_index}"
    return f"mode-{mode.name}-{which}-{image_index}"


def images_per_request(mode: Mode) -> int:
    return int(mode.payload.get("batch_size", 1))


# -- rendering -------------------------------------------------------------------------------------------
def render(server: Server, mode: Mode, prompt: str) -> tuple[list[Rendered], dict]:
    """Every image of one request in this mode (the mode's options already set), and the ``info``."""
    extra = {"prompt": prompt}
    if mode.refiner:
        extra["refiner_checkpoint"] = REFINER_STEM
    payload = mode.request(extra)
    started = time.monotonic()
    result = server.post(f"/sdapi/v1/{mode.route}", payload)
    seconds = time.monotonic() - started
    info = json.loads(result.get("info") or "{}")
    texts = info.get("infotexts") or [""] * len(result["images"])
    images = [decode_image(image) for image in result["images"]]
    return [Rendered(image, text, seconds, payload) for image, text in zip(images, texts, strict=False)], info


@contextlib.contextmanager
def mode_set_up(server: Server, mode: Mode, checkpoint: files.Checkpoint):
    """The mode's options and refiner checkpoint, for the time of the renders; both undone after."""
    link = None
    before = {}
    try:
        if mode.refiner:
            link = checkpoint.path.with_name(f"{REFINER_STEM}{checkpoint.path.suffix}")
            if not link.exists():
                link.hardlink_to(checkpoint.path)
            server.post("/sdapi/v1/refresh-checkpoints")
        if mode.options:
            current = server.get("/sdapi/v1/options")
            before = {key: current.get(key) for key in mode.options}
            server.post("/sdapi/v1/options", mode.options)
        yield
    finally:
        if before:
            server.post("/sdapi/v1/options", before)
        if link is not None:
            link.unlink(missing_ok=True)
            server.post("/sdapi/v1/refresh-checkpoints")


def missing_references(references, kind: str, plain: str) -> list[Mode]:
    """The modes whose built-in images are not stored yet for this checkpoint (A1111 renders them)."""
    if kind != "a1111":
        return []
    return [
        mode
        for mode in MODES
        if any(references.get(case, prompt, mode.record()) is None for case, prompt in cases(mode, plain))
    ]


def cases(mode: Mode, plain: str) -> list[tuple[str, str]]:
    """(case, prompt) of each reference image: the no-tag image in this mode, then each tagged prompt."""
    found = []
    for prompt_index, prompt in [(None, plain), *enumerate(mode.prompts(plain))]:
        for image_index in range(images_per_request(mode)):
            found.append((case_name(mode, prompt_index, image_index), prompt))
    return found


def render_references(server: Server, references, modes: list[Mode], checkpoint: files.Checkpoint, plain: str) -> None:
    """A1111's own hypernetworks in each mode: the no-tag image and each tagged prompt."""
    for mode in modes:
        with mode_set_up(server, mode, checkpoint):
            for prompt_index, prompt in [(None, plain), *enumerate(mode.prompts(plain))]:
                rendered, _ = render(server, mode, prompt)
                for image_index, image in enumerate(rendered):
                    references.put(case_name(mode, prompt_index, image_index), prompt, mode.record(), image)
