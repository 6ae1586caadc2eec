"""The local web app: the extension's tabs without a WebUI, on the current gradio.

    ./hypernetwork app                       # the embedded tiny model (python -m hypernetwork_ext app)
    ./hypernetwork app --model sd15-diffusers/ --hypernetwork-dir models/hypernetworks

Tabs: Generate (prompt with ``<hypernet:...>`` tags), Train (create and train, live loss chart and
previews), Hypernetworks (cards: previews, metadata, click to add a tag). Served on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import hashlib
import html
import json
import os
import random
import sys
import threading
from dataclasses import dataclass, field

import gradio as gr

from ..atomic import atomic_write_with, check_writable_folder
from ..errors import HypernetworkError
from ..library import Library, distinct_names
from ..shape import model_shape
from ..syntax import format_number
from ..training import TrainingConfig
from ..training.config import sized_for
from ..training.jobs import TrainingJobs, TrainingServices
from ..ui.compat import launch_kwargs, update
from ..ui.training import build_training_tab
from .folders import DEFAULT_NETWORK_DIR, DEMO_NETWORKS, network_folders, program_name
from .generate import GenerationSettings
from .pipelines import ModelSource, load_model
from .samplers import SAMPLERS, sampler_name
from .workflows import generate_with_tags, training_backend

CARD_SIZE = 128


@dataclass
class AppState:
    """The loaded model, the network library, and the lock that keeps generation and training apart."""

    source: ModelSource
    library: Library
    output_dir: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop_generation: threading.Event = field(default_factory=threading.Event)

    def run_exclusive(self, work, job=None):
        with self.lock:
            return work()


# -- generate ---------------------------------------------------------------------------------------
def generate_images(
    state: AppState, prompt, negative, steps, cfg, seed, width, height, batch, sampler="", on_step=None
):
    """The Generate button: images, the infotext, and what went wrong with any tag. A seed of -1
    draws a random one (the infotext tells which); Interrupt stops after the current step."""
    try:
        seed = int(seed)
        settings = GenerationSettings(
            prompt or "",
            negative or "",
            int(steps),
            float(cfg),
            int(width),
            int(height),
            random.randrange(2**32) if seed < 0 else seed,
            int(batch),
            sampler or "",
        )
        settings.check()
    except (HypernetworkError, ValueError, TypeError) as exc:
        return [], "", _messages([str(exc)])
    if not state.lock.acquire(blocking=False):
        return [], "", _messages(["the model is busy training; interrupt the training or wait for it to finish"])
    state.stop_generation.clear()
    reached = [0]

    def step(done: int, total: int) -> None:
        reached[0] = done
        if on_step is not None:
            on_step(done, total)

    try:
        output = generate_with_tags(
            state.source, state.library, settings, on_step=step, should_stop=state.stop_generation.is_set
        )
    except HypernetworkError as exc:
        return [], "", _messages([str(exc)])
    finally:
        state.lock.release()
    notes = list(output.notes)
    if state.stop_generation.is_set() and reached[0] < settings.steps:
        notes.append(f"interrupted after step {reached[0]} of {settings.steps}: the images are unfinished")
    return output.images, output.infotext, _messages(output.problems, notes)


def interrupt_generation(state: AppState) -> str:
    """The Interrupt button: the running generation stops after its current step."""
    if not state.lock.locked():
        return _messages([], ["nothing is generating"])
    state.stop_generation.set()
    return _messages([], ["interrupting after the current step"])


def _messages(problems, notes=()) -> str:
    items = [f"<li class='hnx-problem'>{html.escape(p)}</li>" for p in problems]
    items += [f"<li class='hnx-note'>{html.escape(n)}</li>" for n in notes]
    return f"<ul id='hnx_app_message_list'>{''.join(items)}</ul>" if items else ""


# -- cards ------------------------------------------------------------------------------------------
def card_items(state: AppState, search: str = "") -> list[tuple[str, str]]:
    """(preview image path, caption) for each network whose name, path or cached hash matches."""
    needle = (search or "").strip().lower()
    items = []
    for name, entry in distinct_names(state.library.entries).items():  # anime.pt beside anime.safetensors: 2 labels
        sha = state.library.cached_sha256(entry) or ""
        haystack = f"{name} {entry.relpath} {sha}".lower()
        if needle and needle not in haystack:
            continue
        items.append((_preview_or_tile(state, entry, name), name))
    return items


def _preview_or_tile(state: AppState, entry, label: str) -> str:
    stem = os.path.splitext(entry.path)[0]
    for candidate in (f"{stem}.preview.png", f"{stem}.png", f"{stem}.preview.jpg", f"{stem}.jpg"):
        if os.path.isfile(candidate):
            return candidate
    return _placeholder(state, label)


def _placeholder(state: AppState, name: str) -> str:
    from PIL import Image, ImageDraw

    folder = os.path.join(state.output_dir, ".cards")
    # A stable file name: str hashes change from run to run, which left a new set of tiles each launch.
    path = os.path.join(folder, f"{hashlib.sha256(name.encode()).hexdigest()[:16]}.png")
    if not os.path.exists(path):
        image = Image.new("RGB", (CARD_SIZE, CARD_SIZE), (60, 64, 80))
        ImageDraw.Draw(image).text((10, CARD_SIZE // 2 - 6), name[:18], fill="white")
        atomic_write_with(path, lambda handle: image.save(handle, format="PNG"), overwrite=True)
    return path


def card_details(state: AppState, visible_names: list[str], index: int, prompt: str) -> tuple[str, str]:
    """Selecting a card shows its metadata and adds ``<hypernet:name:preferred multiplier>`` to the prompt."""
    if index is None or not 0 <= index < len(visible_names):
        return "", prompt
    name = visible_names[index]
    entry = state.library.resolve(name).entry
    details = state.library.describe(entry)
    multiplier = state.library.preferred_multiplier(entry)
    tag = f"<hypernet:{name}:{format_number(1.0 if multiplier is None else multiplier)}>"
    joined = f"{prompt} {tag}".strip() if tag not in (prompt or "") else prompt
    return json.dumps(details, indent=2, default=str), joined


# -- the app ----------------------------------------------------------------------------------------
def build_app(state: AppState, *, poll_seconds: float = 1.0) -> gr.Blocks:
    with gr.Blocks(title="Hypernetworks", analytics_enabled=False) as app:
        gr.Markdown(
            f"## Hypernetworks\nModel: **{html.escape(state.source.name)}** · networks from {', '.join(state.library.folders()) or '(none)'}"
        )
        with gr.Tabs():
            with gr.Tab("Generate", id="generate"):
                prompt = _build_generate(state)
            with gr.Tab("Train", id="train"):
                defaults = TrainingConfig(**sized_for(state.source.image_size))  # 64 px on the tiny model
                build_training_tab(_training_jobs(state), blocks=app, poll_seconds=poll_seconds, defaults=defaults)
            with gr.Tab("Hypernetworks", id="cards"):
                _build_cards(state, prompt)
    return app


def _build_generate(state: AppState):
    with gr.Row():
        with gr.Column(scale=3):
            prompt = gr.Textbox(
                label="Prompt (with <hypernet:name:multiplier> tags)", lines=2, elem_id="hnx_app_prompt"
            )
            negative = gr.Textbox(label="Negative prompt", lines=1, elem_id="hnx_app_negative")
            with gr.Row():
                sampler = gr.Dropdown(
                    list(SAMPLERS),
                    value=sampler_name(state.source.pipe.scheduler),
                    label="Sampler",
                    elem_id="hnx_app_sampler",
                )
                steps = gr.Slider(1, 150, value=20, step=1, label="Steps", elem_id="hnx_app_steps")
                cfg = gr.Slider(
                    1.0, 30.0, value=_default_cfg(state.source), step=0.5, label="CFG scale", elem_id="hnx_app_cfg"
                )
            with gr.Row():
                seed = gr.Number(value=-1, precision=0, label="Seed (-1: random)", elem_id="hnx_app_seed")
                dice = gr.Button("\U0001f3b2 Random", elem_id="hnx_app_random_seed", scale=0)
            with gr.Row():
                size = state.source.image_size
                width = gr.Slider(64, 2048, value=size, step=8, label="Width", elem_id="hnx_app_width")
                height = gr.Slider(64, 2048, value=size, step=8, label="Height", elem_id="hnx_app_height")
                batch = gr.Slider(1, 8, value=1, step=1, label="Batch size", elem_id="hnx_app_batch")
            with gr.Row():
                button = gr.Button("Generate", variant="primary", elem_id="hnx_app_generate")
                interrupt = gr.Button("Interrupt", elem_id="hnx_app_interrupt")
        with gr.Column(scale=2):
            gallery = gr.Gallery(label="Images", elem_id="hnx_app_gallery", columns=2)
            info = gr.Textbox(label="Parameters", lines=4, interactive=False, elem_id="hnx_app_infotext")
            messages = gr.HTML(elem_id="hnx_app_messages")

    def run(prompt, negative, steps, cfg, seed, width, height, batch, sampler, progress=gr.Progress()):  # noqa: B008
        def on_step(done: int, total: int) -> None:
            progress((done, total), desc="Sampling", unit="steps")

        return generate_images(state, prompt, negative, steps, cfg, seed, width, height, batch, sampler, on_step)

    button.click(
        run,
        inputs=[prompt, negative, steps, cfg, seed, width, height, batch, sampler],
        outputs=[gallery, info, messages],
    )
    interrupt.click(lambda: interrupt_generation(state), inputs=[], outputs=[messages])
    dice.click(lambda: -1, inputs=[], outputs=[seed])
    return prompt


def _default_cfg(source: ModelSource) -> float:
    return 5.0 if source.path is None else 7.0  # the tiny model draws cleanest at 5


def _build_cards(state: AppState, prompt) -> None:
    with gr.Row():
        search = gr.Textbox(label="Search (name, path, hash)", elem_id="hnx_app_card_search", scale=4)
        refresh = gr.Button("Refresh", elem_id="hnx_app_card_refresh", scale=1)
    items = card_items(state)
    names = gr.State([name for _, name in items])
    cards = gr.Gallery(value=items, label="Hypernetworks", columns=6, elem_id="hnx_app_cards", allow_preview=False)
    details = gr.Code(label="Metadata", language="json", elem_id="hnx_app_card_details")

    def listing(text, rescan=False):
        if rescan:
            state.library.refresh()
        items = card_items(state, text)
        return update(value=items), [name for _, name in items]

    search.change(lambda text: listing(text), inputs=[search], outputs=[cards, names])
    refresh.click(lambda text: listing(text, True), inputs=[search], outputs=[cards, names])

    def select(visible, current_prompt, event: gr.SelectData):
        return card_details(state, visible, event.index, current_prompt)

    cards.select(select, inputs=[names, prompt], outputs=[details, prompt])


def _training_jobs(state: AppState) -> TrainingJobs:
    folder = state.library.folders()[0] if state.library.folders() else state.output_dir
    services = TrainingServices(
        hypernetwork_dir=folder,
        make_backend=lambda: training_backend(state.source),
        model_family=lambda: state.source.family,
        model_shape=lambda: model_shape(state.source.unet),
        # every folder's networks can be trained (the demo's too), as Generate finds them; results go to the first
        network_names=lambda: sorted(distinct_names(state.library.entries)),
        resolve_network=lambda name: state.library.resolve(name).entry.path,
        run_exclusive=state.run_exclusive,
        on_saved=lambda path: state.library.refresh(),
        presets_dir=os.path.join(state.output_dir, "presets"),
    )
    return TrainingJobs(services)


APP_EXAMPLES = """examples:
  {prog} app                                    # the embedded tiny model on http://127.0.0.1:7861
  {prog} app --port 7862 --device cpu
  {prog} app --model sd15-diffusers/ --hypernetwork-dir models/hypernetworks
  {prog} app --model v1-5.safetensors --config sd15-diffusers/
"""


def build_parser() -> argparse.ArgumentParser:
    prog = program_name()
    parser = argparse.ArgumentParser(
        prog=f"{prog} app",
        description="The local web app: Generate (prompts with <hypernet:...> tags), Train (create and train,\n"
        "with a loss chart and previews) and Hypernetworks (cards); served until interrupted (Ctrl-C).",
        epilog=APP_EXAMPLES.format(prog=prog),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", help="single-file checkpoint or diffusers folder (default: the embedded tiny model)")
    parser.add_argument("--config", help="for a single file: a diffusers folder of the same architecture")
    parser.add_argument("--allow-download", action="store_true")
    parser.add_argument(
        "--hypernetwork-dir",
        action="append",
        help=f"folder of networks (repeatable; default: {DEFAULT_NETWORK_DIR} and {DEMO_NETWORKS}, the newest demo "
        "run's, as for generate); networks created and trained in the app go to the first",
    )
    parser.add_argument("--output-dir", default="hypernetwork-app", help="presets, logs and card tiles")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7861)
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    folders = network_folders(args.hypernetwork_dir)
    try:
        check_writable_folder(folders[0])  # where the Train tab writes; the demo's folder need not exist yet
        check_writable_folder(args.output_dir)
        source = load_model(args.model, config=args.config, allow_download=args.allow_download)
    except HypernetworkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    source.pipe.to(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    os.makedirs(folders[0], exist_ok=True)
    os.makedirs(args.output_dir, exist_ok=True)
    state = AppState(source, Library(folders), args.output_dir)
    app = build_app(state)
    app.queue()
    print(f"serving on http://{args.host}:{args.port}", flush=True)
    app.launch(
        **launch_kwargs(
            app,
            server_name=args.host,
            server_port=args.port,
            show_api=False,
            allowed_paths=[*(os.path.abspath(folder) for folder in folders), os.path.abspath(args.output_dir)],
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
