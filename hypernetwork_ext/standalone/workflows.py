"""The standalone tools' jobs, shared by the CLI and the local app: generating with prompt tags,
training on a model source, and the end-to-end demo. Host-free: no WebUI, any gradio."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..atomic import atomic_write_bytes, atomic_write_with, check_writable_folder
from ..errors import InvalidConfigError
from ..library import ActivationPlan, Library
from ..network import Hypernetwork, create
from ..shape import model_shape
from ..syntax import find_tags, format_hashes, format_number, set_multipliers, strip_tags
from .generate import GenerationSettings, generate
from .images import grid, line_chart
from .pipelines import ModelSource
from .samplers import sampler_name

if TYPE_CHECKING:
    from ..training import TrainingConfig


# -- generation -------------------------------------------------------------------------------------
@dataclass
class GenerationOutput:
    images: list
    infotext: str
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    hashes: dict[str, str] = field(default_factory=dict)


def plan_tags(library: Library, source: ModelSource, prompt: str, *, force_mismatch: bool = False) -> ActivationPlan:
    shape = model_shape(source.unet)
    return library.plan(
        find_tags(prompt),
        model_blocks=shape.blocks,
        context_width=shape.context_width,
        self_widths=shape.self_widths,
        force_mismatch=force_mismatch,
    )


def generate_with_tags(
    source: ModelSource,
    library: Library,
    settings: GenerationSettings,
    *,
    force_mismatch: bool = False,
    compute_dtype: torch.dtype | None = None,
    on_step: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> GenerationOutput:
    """Generate from a prompt with ``<hypernet:...>`` tags; a bad tag is reported, the rest applies."""
    plan = plan_tags(library, source, settings.prompt, force_mismatch=force_mismatch)
    clean = dataclasses.replace(settings, prompt=" ".join(strip_tags(settings.prompt).split()))
    images = generate(
        source, clean, plan.entries, compute_dtype=compute_dtype, on_step=on_step, should_stop=should_stop
    )
    hashes = {name: short for name, short in plan.hashes.items() if short}
    size = images[0].size if images else (settings.width or source.image_size, settings.height or source.image_size)
    text = infotext(settings, source, hashes, size)
    return GenerationOutput(images, text, list(plan.problems), list(plan.notes), hashes)


def infotext(settings: GenerationSettings, source: ModelSource, hashes: dict[str, str], size: tuple[int, int]) -> str:
    """The A1111-style parameters text (PNG "parameters" chunk); the prompt keeps its tags.
    ``size`` is the images' (width, height): the model's own when the settings left it open."""
    width, height = size
    fields = [
        f"Steps: {settings.steps}",
        f"Sampler: {settings.sampler or sampler_name(source.pipe.scheduler)}",
        f"CFG scale: {format_number(settings.cfg_scale)}",
        f"Seed: {settings.seed}",
        f"Size: {width}x{height}",
        f"Model: {source.name}",
    ]
    if hashes:
        fields.append(f'Hypernet hashes: "{format_hashes(hashes)}"')
    lines = [settings.prompt]
    if settings.negative_prompt:
        lines.append(f"Negative prompt: {settings.negative_prompt}")
    lines.append(", ".join(fields))
    return "\n".join(lines)


def save_png(image, path: str | os.PathLike, parameters: str, *, overwrite: bool = False) -> str:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", parameters)
    atomic_write_with(path, lambda handle: image.save(handle, format="PNG", pnginfo=info), overwrite=overwrite)
    return os.fspath(path)


def multiplier_grid(
    source: ModelSource,
    library: Library,
    prompts: Sequence[str],
    multipliers: Sequence[float],
    settings: GenerationSettings,
    *,
    on_step: Callable[[int, int], None] | None = None,
    tile_size: int | None = None,
) -> tuple[object, list[GenerationOutput]]:
    """One row per prompt, one column per multiplier (every tag's multiplier set to it);
    ``on_step(done, total)`` counts sampling steps over the whole grid (so a bar can estimate the
    time left); ``tile_size`` scales the pictures in the grid."""
    outputs, tiles = [], []
    total = len(prompts) * len(multipliers) * settings.steps
    for prompt in prompts:
        for multiplier in multipliers:
            tagged = set_multipliers(prompt, multiplier)
            before = len(tiles) * settings.steps
            step = None if on_step is None else (lambda done, _steps, before=before: on_step(before + done, total))
            output = generate_with_tags(source, library, dataclasses.replace(settings, prompt=tagged), on_step=step)
            outputs.append(output)
            tiles.append(output.images[0])
    labels = [f"x{format_number(m)}" for m in multipliers]
    rows = [strip_tags(p).strip()[:48] for p in prompts]
    if tile_size:
        from PIL import Image

        tiles = [tile.resize((tile_size, tile_size), Image.Resampling.LANCZOS) for tile in tiles]
    return grid(tiles, len(multipliers), column_labels=labels, row_labels=rows), outputs


# -- training ---------------------------------------------------------------------------------------
def new_network_for(source: ModelSource, name: str, **create_kwargs) -> Hypernetwork:
    """A new network with the model's widths unless others are given."""
    widths = create_kwargs.pop("widths", None) or model_shape(source.unet).default_widths
    return create(widths, name=name, model_family=source.family, **create_kwargs)


def training_backend(source: ModelSource, device: torch.device | str | None = None):
    from ..training import DiffusersBackend

    if device is not None:
        source.pipe.to(device)
    return DiffusersBackend.from_components(
        source.pipe, checkpoint_name=source.name, checkpoint_hash=source.checkpoint_hash(), model_family=source.family
    )


# -- the demo ---------------------------------------------------------------------------------------
# The network learns the "night" style (see procedural.STYLES) from pictures of a few colours and
# shapes; the grid asks for others, so what it shows was not in the dataset.
DEMO_STYLE = "night"
DEMO_DATA_COLOURS = ("red", "yellow", "purple", "orange")
DEMO_DATA_SHAPES = ("circle", "square", "diamond")
DEMO_PROMPTS = (
    "a green triangle on a white background <hypernet:{name}:1>",
    "a blue circle on a cream background <hypernet:{name}:1>",
    "a red triangle on a grey background <hypernet:{name}:1>",
)
DEMO_MULTIPLIERS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass
class DemoResult:
    folder: str
    network_path: str
    network_pt_path: str
    grid_path: str
    loss_plot_path: str
    summary_path: str
    summary: dict


def demo_config(folder: Path, *, steps: int, seed: int, image_size: int, learn_rate: str) -> TrainingConfig:
    from ..training import TrainingConfig

    every = max(steps // 3, 1)
    return TrainingConfig(
        hypernetwork_name="demo",
        data_root=str(folder / "dataset"),
        log_directory=str(folder / "logs"),
        learn_rate=learn_rate,
        batch_size=4,
        training_width=image_size,
        training_height=image_size,
        steps=steps,
        template_filename="filewords.txt",
        create_image_every=every,
        save_hypernetwork_every=every,
        preview_steps=10,
        validation_split=0.25,
        validation_every=max(steps // 10, 1),
        fixed_loss_every=max(steps // 10, 1),
        training_write_csv_every=max(steps // 100, 1),
        seed=seed,
        output_name="demo-trained",
        file_format="safetensors",
    )


def run_demo(
    output_root: str | os.PathLike,
    source: ModelSource,
    *,
    steps: int = 600,
    seed: int = 0,
    image_count: int = 32,
    image_size: int = 64,
    learn_rate: str = "0.002",
    log: Callable[[str], None] = print,
    progress_bar: bool = True,
) -> DemoResult:
    """Create, train, save and try out a network end to end; every output lands in a new folder.

    Every option is checked before anything is written: a bad one leaves no folder behind.
    """
    from ..formats import save
    from ..training import TrainingCallbacks, train
    from .procedural import STYLES, write_dataset

    if image_count < 4:
        raise InvalidConfigError(f"image count must be at least 4, found {image_count}")
    demo_config(Path(output_root), steps=steps, seed=seed, image_size=image_size, learn_rate=learn_rate).check()
    check_writable_folder(output_root)
    started = time.monotonic()
    folder = _fresh_folder(output_root)
    style = STYLES[DEMO_STYLE]
    dataset = write_dataset(
        folder / "dataset",
        image_count,
        seed=seed,
        size=image_size,
        style=style,
        colours=DEMO_DATA_COLOURS,
        shapes=DEMO_DATA_SHAPES,
    )
    log(f"dataset: {len(dataset)} pictures in the {style.name} style in {folder / 'dataset'}")
    network = new_network_for(source, "demo", layer_structure=(1, 2, 1), activation="relu", seed=seed)
    initial = save(network, folder / "networks" / "demo.safetensors")
    log(f"created {initial} (widths {', '.join(map(str, network.widths))}, {network.parameter_count():,} parameters)")
    config = demo_config(folder, steps=steps, seed=seed, image_size=image_size, learn_rate=learn_rate)
    train_started = time.monotonic()
    result = train(
        network,
        training_backend(source),
        config,
        TrainingCallbacks(on_message=log),
        source_path=initial,
        output_dir=str(folder / "networks"),
        progress_bar=progress_bar,
    )
    train_seconds = time.monotonic() - train_started
    # The A1111 copy has a folder of its own: beside the .safetensors, `demo-trained` would name two files.
    pt_path = save(result.network, folder / "a1111" / "demo-trained.pt")
    loss_plot = folder / "loss.png"
    chart = line_chart(
        {
            "training loss": result.losses,
            "validation loss": result.validation_losses,
            "loss at fixed noise": result.fixed_losses,
        },
        title=f"demo: {result.step} steps",
    )
    atomic_write_with(loss_plot, lambda handle: chart.save(handle, format="PNG"))
    library = Library([str(folder / "networks")])
    prompts = [p.format(name="demo-trained") for p in DEMO_PROMPTS]
    settings = GenerationSettings("", steps=20, cfg_scale=5.0, width=image_size, height=image_size, seed=seed + 1)
    picture, outputs = multiplier_grid(
        source,
        library,
        prompts,
        DEMO_MULTIPLIERS,
        settings,
        on_step=_grid_progress(log, progress_bar, settings.steps * len(DEMO_MULTIPLIERS)),
        tile_size=max(image_size, 128),
    )
    grid_path = folder / "multiplier-grid.png"
    save_png(picture, grid_path, outputs[-1].infotext)
    summary = _demo_summary(result, train_seconds, time.monotonic() - started, outputs, source, dataset)
    summary_path = folder / "summary.json"
    atomic_write_bytes(summary_path, json.dumps(summary, indent=2).encode())
    return DemoResult(str(folder), result.path, pt_path, str(grid_path), str(loss_plot), str(summary_path), summary)


def _grid_progress(log: Callable[[str], None], progress_bar: bool, row_steps: int) -> Callable[[int, int], None]:
    """Progress while the grid renders, counted in sampling steps: a tqdm bar (with the time left)
    in a console, else a line per row of ``row_steps`` steps."""
    bar = None

    def on_step(done: int, total: int) -> None:
        nonlocal bar
        if progress_bar:
            if bar is None:
                import tqdm

                bar = tqdm.tqdm(total=total, desc="Rendering the multiplier grid", unit="step")
            bar.update(done - bar.n)
            if done == total:
                bar.close()
        elif done == total or done % row_steps == 0:
            log(f"multiplier grid: {done}/{total} sampling steps")

    return on_step


def _fresh_folder(root: str | os.PathLike) -> Path:
    base = Path(root) / time.strftime("run-%Y%m%d-%H%M%S")
    folder, counter = base, 2
    while folder.exists():
        folder = Path(f"{base}-{counter}")
        counter += 1
    folder.mkdir(parents=True)
    return folder


def _demo_summary(
    result,
    train_seconds: float,
    total_seconds: float,
    outputs: list[GenerationOutput],
    source: ModelSource,
    dataset: Sequence[Path],
) -> dict:
    import numpy
    from PIL import Image

    from .procedural import STYLES
    from .recognise import judge, style_share

    style = STYLES[DEMO_STYLE]
    losses = [loss for _, loss in result.losses]
    load_at_end = _load_average()
    window = max(1, min(10, len(losses) // 4))
    per_prompt = len(DEMO_MULTIPLIERS)
    rows = len(outputs) // per_prompt
    zero = DEMO_MULTIPLIERS.index(0.0)
    differences, shares, recognised = {}, {}, {}
    for column, multiplier in enumerate(DEMO_MULTIPLIERS):
        total = share = kept = 0.0
        for row in range(rows):
            image = outputs[row * per_prompt + column].images[0]
            a = numpy.asarray(outputs[row * per_prompt + zero].images[0], dtype=numpy.float64)
            total += float(numpy.abs(a - numpy.asarray(image, dtype=numpy.float64)).mean())
            share += style_share(image, style)
            kept += judge(image, strip_tags(DEMO_PROMPTS[row]).strip()).shape
        key = format_number(multiplier)
        differences[key] = round(total / rows, 3)
        shares[key] = round(share / rows, 3)
        recognised[key] = round(kept / rows, 3)
    dataset_share = sum(style_share(Image.open(path), style) for path in dataset) / len(dataset)
    return {
        "model": source.name,
        "style": style.name,
        "steps": result.step,
        "stopped": result.stopped,
        "training_seconds": round(train_seconds, 2),
        "steps_per_second": round(result.step / train_seconds, 2) if train_seconds else None,
        "total_seconds": round(total_seconds, 2),
        "threads": torch.get_num_threads(),
        "load_average_at_end": load_at_end,  # the machine's one-minute load as the demo ended (its own included)
        "loss_first_steps_mean": round(sum(losses[:window]) / window, 5) if losses else None,
        "loss_last_steps_mean": round(sum(losses[-window:]) / window, 5) if losses else None,
        "validation_loss": [[s, round(v, 5)] for s, v in result.validation_losses],
        "fixed_noise_loss": [[s, round(v, 5)] for s, v in result.fixed_losses],
        "style_share_by_multiplier": shares,
        "style_share_of_dataset": round(dataset_share, 3),
        "shape_kept_by_multiplier": recognised,
        "mean_pixel_difference_from_multiplier_0": differences,
        "network": result.path,
        "copies": result.copies,
        "previews": result.previews,
        "hypernet_hashes": outputs[-1].hashes,
    }


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def demo_report(result: DemoResult, latest: str | None = None) -> list[str]:
    """What the demo achieved, in a few lines for a console; ``latest`` is the link to the run's folder."""
    summary = result.summary
    lines = [
        f"demo finished in {summary['total_seconds']} s ({summary['steps']} training steps, "
        f"{summary['steps_per_second']} steps/s; {summary['threads']} CPU thread{'s' if summary['threads'] != 1 else ''}, load average "
        f"{summary['load_average_at_end']} at the end)",
        f"loss: {summary['loss_first_steps_mean']} over the first steps -> {summary['loss_last_steps_mean']} "
        "over the last",
    ]
    for key, label in (
        ("validation_loss", "held-out loss"),
        ("fixed_noise_loss", "loss at fixed noise (training images)"),
    ):
        if summary[key]:
            first, last = summary[key][0], summary[key][-1]
            lines.append(f"{label}: {first[1]} at step {first[0]} -> {last[1]} at step {last[0]}")
    shares = summary["style_share_by_multiplier"]
    lines.append(
        f"{summary['style']} style on prompts not in the dataset (share of pixels in its colours; the dataset: "
        f"{summary['style_share_of_dataset']:.0%}): " + ", ".join(f"x{k}: {v:.0%}" for k, v in shares.items())
    )
    lines += [
        f"network: {result.network_path} (A1111 copy: {result.network_pt_path})",
        f"multiplier grid: {result.grid_path}",
        f"loss plot: {result.loss_plot_path}",
        f"everything: {result.folder}" + (f" (also {latest}, where generate finds its networks)" if latest else ""),
    ]
    return lines
