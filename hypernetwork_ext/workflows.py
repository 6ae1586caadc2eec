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

import torch

from .generate import GenerationSettings, generate
from .images import grid, line_chart
from .library import ActivationPlan, Library
from .network import Hypernetwork, create
from .pipelines import ModelSource
from .shape import model_shape
from .syntax import find_tags, format_hashes, format_number, set_multipliers, strip_tags


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
    return GenerationOutput(images, infotext(settings, source, hashes), list(plan.problems), list(plan.notes), hashes)


def infotext(settings: GenerationSettings, source: ModelSource, hashes: dict[str, str]) -> str:
    """The A1111-style parameters text (PNG "parameters" chunk); the prompt keeps its tags."""
    width, height = settings.width or "auto", settings.height or "auto"
    fields = [
        f"Steps: {settings.steps}",
        f"Sampler: {type(source.pipe.scheduler).__name__}",
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

    from .atomic import atomic_write_with

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
) -> tuple[object, list[GenerationOutput]]:
    """One row per prompt, one column per multiplier (every tag's multiplier set to it)."""
    outputs, tiles = [], []
    for prompt in prompts:
        for multiplier in multipliers:
            tagged = set_multipliers(prompt, multiplier)
            output = generate_with_tags(source, library, dataclasses.replace(settings, prompt=tagged))
            outputs.append(output)
            tiles.append(output.images[0])
    labels = [f"x{format_number(m)}" for m in multipliers]
    rows = [strip_tags(p).strip()[:24] for p in prompts]
    return grid(tiles, len(multipliers), column_labels=labels, row_labels=rows), outputs


# -- training ---------------------------------------------------------------------------------------
def new_network_for(source: ModelSource, name: str, **create_kwargs) -> Hypernetwork:
    """A new network with the model's widths unless others are given."""
    widths = create_kwargs.pop("widths", None) or model_shape(source.unet).default_widths
    return create(widths, name=name, model_family=source.family, **create_kwargs)


def training_backend(source: ModelSource, device: torch.device | str | None = None):
    from .training import DiffusersBackend

    if device is not None:
        source.pipe.to(device)
    return DiffusersBackend.from_components(
        source.pipe, checkpoint_name=source.name, checkpoint_hash=source.checkpoint_hash(), model_family=source.family
    )


# -- the demo ---------------------------------------------------------------------------------------
DEMO_PROMPTS = (
    "a red circle <hypernet:{name}:1>",
    "a blue square <hypernet:{name}:1>",
    "a green triangle <hypernet:{name}:1>",
)
DEMO_MULTIPLIERS = (-1.0, 0.0, 0.5, 1.0, 1.5)


@dataclass
class DemoResult:
    folder: str
    network_path: str
    network_pt_path: str
    grid_path: str
    loss_plot_path: str
    summary_path: str
    summary: dict


def run_demo(
    output_root: str | os.PathLike,
    source: ModelSource,
    *,
    steps: int = 150,
    seed: int = 0,
    image_count: int = 8,
    image_size: int = 64,
    learn_rate: str = "0.001",
    log: Callable[[str], None] = print,
) -> DemoResult:
    """Create, train, save and try out a network end to end; every output lands in a new folder."""
    from .formats import save
    from .tiny import procedural_images
    from .training import TrainingCallbacks, TrainingConfig, train

    started = time.monotonic()
    folder = _fresh_folder(output_root)
    dataset = procedural_images(folder / "dataset", image_count, seed=seed, size=image_size, colour="red")
    log(f"dataset: {len(dataset)} procedurally drawn images in {folder / 'dataset'}")
    network = new_network_for(
        source, "demo", layer_structure=(1, 2, 1), activation="relu", weight_init="XavierNormal", seed=seed
    )
    initial = save(network, folder / "networks" / "demo.safetensors")
    log(f"created {initial}\n" + network.describe())
    config = TrainingConfig(
        hypernetwork_name="demo",
        data_root=str(folder / "dataset"),
        log_directory=str(folder / "logs"),
        learn_rate=learn_rate,
        batch_size=2,
        training_width=image_size,
        training_height=image_size,
        steps=steps,
        template_filename="filewords.txt",
        create_image_every=max(steps // 3, 1),
        save_hypernetwork_every=max(steps // 3, 1),
        preview_steps=10,
        validation_split=0.25,
        validation_every=max(steps // 10, 1),
        seed=seed,
        output_name="demo-trained",
        file_format="safetensors",
    )
    train_started = time.monotonic()
    result = train(
        network,
        training_backend(source),
        config,
        TrainingCallbacks(on_message=log),
        source_path=initial,
        output_dir=str(folder / "networks"),
    )
    train_seconds = time.monotonic() - train_started
    pt_path = save(result.network, folder / "networks" / "demo-trained.pt")
    loss_plot = folder / "loss.png"
    chart = line_chart(
        {"training loss": result.losses, "validation loss": result.validation_losses},
        title=f"demo: {result.step} steps",
    )
    chart.save(loss_plot)
    library = Library([str(folder / "networks")])
    prompts = [p.format(name="demo-trained") for p in DEMO_PROMPTS]
    settings = GenerationSettings("", steps=12, cfg_scale=6.0, width=image_size, height=image_size, seed=seed + 1)
    picture, outputs = multiplier_grid(source, library, prompts, DEMO_MULTIPLIERS, settings)
    grid_path = folder / "multiplier-grid.png"
    save_png(picture, grid_path, outputs[-1].infotext)
    summary = _demo_summary(result, train_seconds, time.monotonic() - started, outputs, source)
    summary_path = folder / "summary.json"
    summary_path.write_text(json.dumps(summary, indent=2))
    return DemoResult(str(folder), result.path, pt_path, str(grid_path), str(loss_plot), str(summary_path), summary)


def _fresh_folder(root: str | os.PathLike) -> Path:
    base = Path(root) / time.strftime("run-%Y%m%d-%H%M%S")
    folder, counter = base, 2
    while folder.exists():
        folder = Path(f"{base}-{counter}")
        counter += 1
    folder.mkdir(parents=True)
    return folder


def _demo_summary(
    result, train_seconds: float, total_seconds: float, outputs: list[GenerationOutput], source: ModelSource
) -> dict:
    import numpy

    losses = [loss for _, loss in result.losses]
    window = max(1, min(10, len(losses) // 4))
    per_prompt = len(DEMO_MULTIPLIERS)
    zero = DEMO_MULTIPLIERS.index(0.0)
    differences = {}
    for column, multiplier in enumerate(DEMO_MULTIPLIERS):
        total = 0.0
        for row in range(len(outputs) // per_prompt):
            a = numpy.asarray(outputs[row * per_prompt + zero].images[0], dtype=numpy.float64)
            b = numpy.asarray(outputs[row * per_prompt + column].images[0], dtype=numpy.float64)
            total += float(numpy.abs(a - b).mean())
        differences[format_number(multiplier)] = round(total / (len(outputs) // per_prompt), 3)
    return {
        "model": source.name,
        "steps": result.step,
        "stopped": result.stopped,
        "training_seconds": round(train_seconds, 2),
        "steps_per_second": round(result.step / train_seconds, 2) if train_seconds else None,
        "total_seconds": round(total_seconds, 2),
        "loss_first_steps_mean": round(sum(losses[:window]) / window, 5) if losses else None,
        "loss_last_steps_mean": round(sum(losses[-window:]) / window, 5) if losses else None,
        "validation_loss": [[s, round(v, 5)] for s, v in result.validation_losses],
        "mean_pixel_difference_from_multiplier_0": differences,
        "network": result.path,
        "copies": result.copies,
        "previews": result.previews,
        "hypernet_hashes": outputs[-1].hashes,
    }
