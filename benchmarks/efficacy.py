"""What training achieves, on the pretrained tiny model, measured on prompts and seeds it never trained on.

    python benchmarks/efficacy.py [--budget 180] [--option-budget 60] [--variants sd1,v,sdxl]
                                  [--skip-options] [--threads 2] [--markdown FILE] [--quick]

1. Planted-network recovery. A "teacher" network H*, trained by the same engine on a style of its
   own ("dusk", hypernetwork_ext.standalone.procedural.STYLES), draws a dataset: captions of the base data, each
   at its own seed. A fresh network trains on those pictures; on other captions and other seeds it
   is compared with the teacher:
       recovery = 1 - d(trained, teacher) / d(no network, teacher)
   in pixels (mean absolute difference of the pictures, 0-255) and in eps space (the UNet's noise
   predictions on the teacher's held-out pictures, noised at fixed random timesteps). 1 is the
   teacher exactly; 0 is no better than no network; below 0, further from it. Reported at
   intervals of steps with the wall time they took.
2. Style transfer. The demo's "night" dataset (hypernetwork_ext.standalone.procedural.STYLES): the share of
   pixels in the style's colours on held-out prompts (colours and shapes the dataset has not),
   without a network, with the trained one, and on the dataset itself; and how often the caption's
   shape is still recognised (hypernetwork_ext.standalone.recognise).
3. Options. The same two measurements on the SD1-shaped model for AdamW (the baseline), Lion,
   Prodigy, min-SNR, EMA, noise offset, batch sizes and gradient accumulation, each given the same
   wall time.

Every run trains with the engine users run (hypernetwork_ext.training.train), stopped by the clock.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import hypernetwork_ext as hx
from hypernetwork_ext.attach import apply
from hypernetwork_ext.shape import model_shape
from hypernetwork_ext.standalone.generate import GenerationSettings, generate
from hypernetwork_ext.standalone.pipelines import ModelSource
from hypernetwork_ext.standalone.procedural import STYLES, all_captions, write_dataset
from hypernetwork_ext.standalone.recognise import judge, style_share
from hypernetwork_ext.standalone.tiny import TINY_VARIANTS, build_tiny_components
from hypernetwork_ext.standalone.workflows import DEMO_DATA_COLOURS, DEMO_DATA_SHAPES, DEMO_STYLE
from hypernetwork_ext.training import DiffusersBackend, TrainingCallbacks, TrainingConfig, train

SAMPLING = {"steps": 20, "cfg_scale": 5.0}
TEACHER_SEED = 11
TEACHER_STYLE = "dusk"
# The teacher's dataset is drawn without guidance: samples of the distribution its noise predictions
# describe. Guided samples are sharper than that, and a student trained on them learns the guidance
# too (measured: 45-60% recovery, falling as it trains, against 69-79% from unguided pictures).
TEACHER_SAMPLING = {**SAMPLING, "cfg_scale": 1.0}
BASELINE = {"learn_rate": "0.002", "batch_size": 4}
OPTIONS = {
    "AdamW (baseline)": {},
    "Lion, rate 2e-4": {"optimizer": "Lion", "learn_rate": "0.0002"},
    "Prodigy, rate 1": {"optimizer": "Prodigy", "learn_rate": "1.0"},
    "min-SNR gamma 5": {"min_snr_gamma": 5.0},
    "EMA 0.99": {"ema_decay": 0.99},
    "noise offset 0.05": {"noise_offset": 0.05},
    "batch 1": {"batch_size": 1},
    "batch 8": {"batch_size": 8},
    "batch 2 x accumulation 2": {"batch_size": 2, "gradient_step": 2},
}


@dataclasses.dataclass
class Setup:
    variants: list[str]
    budget: float
    option_budget: float
    train_pictures: int
    held_out_captions: int
    held_out_seeds: tuple[int, ...]
    checkpoints: int
    teacher_steps: int = 400


def load_variant(variant: str) -> ModelSource:
    components = build_tiny_components(variant=variant)
    pipe = components.pipeline()
    pipe.set_progress_bar_config(disable=True)
    return ModelSource(pipe, TINY_VARIANTS[variant], None, variant == "sdxl")


def caption_split(train_count: int, held_count: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Training captions from the front of a shuffled list, held-out ones from its end: the same
    held-out captions whatever the number of training pictures."""
    captions = all_captions()
    random.Random(seed).shuffle(captions)
    if train_count + held_count > len(captions):
        raise ValueError(f"{train_count} + {held_count} captions asked for; there are {len(captions)}")
    return captions[:train_count], captions[len(captions) - held_count :]


def render(source: ModelSource, prompts, seeds, networks=(), sampling=SAMPLING) -> list:
    pictures = []
    for prompt, seed in zip(prompts, seeds, strict=True):
        settings = GenerationSettings(prompt, width=64, height=64, seed=seed, **sampling)
        pictures += generate(source, settings, networks)
    return pictures


def pixel_distance(a: list, b: list) -> float:
    """Mean absolute difference of corresponding pictures, on 0-255."""
    differences = [
        numpy.abs(numpy.asarray(x, numpy.float64) - numpy.asarray(y, numpy.float64)).mean()
        for x, y in zip(a, b, strict=True)
    ]
    return float(numpy.mean(differences))


def new_network(source: ModelSource, name: str, **kwargs) -> hx.Hypernetwork:
    widths = model_shape(source.unet).default_widths
    return hx.create(widths, (1, 2, 1), kwargs.pop("activation", "relu"), name=name, **kwargs)


def write_pictures(folder: Path, pictures, captions) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for index, (picture, caption) in enumerate(zip(pictures, captions, strict=True)):
        picture.save(folder / f"{index:03d}.png")
        (folder / f"{index:03d}.txt").write_text(caption)
    return folder


@dataclasses.dataclass
class Trained:
    copies: list[tuple[int, float, str]]  # (step, seconds, path)
    final: hx.Hypernetwork
    steps: int
    seconds: float


def train_for(
    source,
    data: Path,
    folder: Path,
    budget: float,
    checkpoints: int,
    *,
    max_steps: int = 100_000,
    network_seed: int = 1,
    **options,
) -> Trained:
    """Train a fresh network (initialised from ``network_seed``) on ``data`` until ``budget`` seconds
    have passed (or ``max_steps``), keeping ``checkpoints`` copies along the way; ``options`` are
    TrainingConfig fields."""
    network = new_network(source, "student", seed=network_seed)
    path = hx.save(network, folder / "student.safetensors", overwrite=True)
    config = TrainingConfig(
        hypernetwork_name="student",
        data_root=str(data),
        log_directory=str(folder / "logs"),
        learn_rate=options.pop("learn_rate", BASELINE["learn_rate"]),
        batch_size=options.pop("batch_size", BASELINE["batch_size"]),
        training_width=64,
        training_height=64,
        steps=max_steps,
        template_filename="filewords.txt",
        create_image_every=0,
        save_hypernetwork_every=0,
        save_training_settings_to_txt=False,
        training_write_csv_every=0,
        seed=0,
        output_name=f"student-{time.monotonic_ns()}",
        **options,
    )
    backend = DiffusersBackend.from_components(source.pipe)
    started = time.monotonic()
    copies, marks = [], [budget * (i + 1) / checkpoints for i in range(checkpoints)]

    def on_progress(progress) -> None:
        elapsed = time.monotonic() - started
        if marks and elapsed >= marks[0]:
            marks.pop(0)
            copy = folder / "copies" / f"student-{progress.step}.safetensors"
            hx.save(network, copy, overwrite=True)  # the weights trained so far (EMA: the final file averages)
            copies.append((progress.step, elapsed, str(copy)))

    result = train(
        network,
        backend,
        config,
        TrainingCallbacks(on_progress=on_progress, should_stop=lambda: time.monotonic() - started >= budget),
        source_path=str(path),
        output_dir=str(folder),
        progress_bar=False,
    )
    seconds = time.monotonic() - started
    final = hx.load(result.path)
    if not copies or copies[-1][0] != result.step:
        copies.append((result.step, seconds, result.path))
    return Trained(copies, final, result.step, seconds)


# -- 1. planted-network recovery --------------------------------------------------------------------
@dataclasses.dataclass
class Planted:
    source: ModelSource
    teacher: hx.Hypernetwork
    data: Path
    held_prompts: list[str]
    held_seeds: list[int]
    none_pictures: list
    teacher_pictures: list
    probe: tuple  # (noisy latents, timesteps, conditioning, eps of no network, eps of the teacher)


def train_teacher(source: ModelSource, folder: Path, steps: int) -> hx.Hypernetwork:
    """The planted network: trained by the same engine on the "dusk" style, a fixed number of steps.
    (A random XavierNormal teacher rewrites every key and value arbitrarily; a student recovered at
    most 4% of it in eps space, docs/efficacy.md.)"""
    style = STYLES[TEACHER_STYLE]
    data = folder / "teacher-style"
    write_dataset(data, 32, seed=1, style=style, colours=DEMO_DATA_COLOURS, shapes=DEMO_DATA_SHAPES)
    return train_for(source, data, folder / "teacher", 1e9, 1, max_steps=steps, network_seed=TEACHER_SEED).final


def plant(source: ModelSource, folder: Path, setup: Setup) -> Planted:
    teacher = train_teacher(source, folder, setup.teacher_steps)
    train_captions, held_captions = caption_split(setup.train_pictures, setup.held_out_captions)
    seeds = [1000 + i for i in range(len(train_captions))]
    pictures = render(source, train_captions, seeds, [(teacher, 1.0)], TEACHER_SAMPLING)
    data = write_pictures(folder / "teacher-data", pictures, train_captions)
    held_prompts = [c for c in held_captions for _ in setup.held_out_seeds]
    held_seeds = [s for _ in held_captions for s in setup.held_out_seeds]
    none_pictures = render(source, held_prompts, held_seeds)
    teacher_pictures = render(source, held_prompts, held_seeds, [(teacher, 1.0)])
    probe = eps_probe(source, teacher, teacher_pictures, held_prompts)
    return Planted(source, teacher, data, held_prompts, held_seeds, none_pictures, teacher_pictures, probe)


def eps_probe(source: ModelSource, teacher, pictures, prompts) -> tuple:
    backend = DiffusersBackend.from_components(source.pipe)
    pixels = torch.stack(
        [torch.from_numpy(numpy.asarray(p, numpy.float32) / 127.5 - 1).permute(2, 0, 1) for p in pictures]
    )
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        latents, _ = backend.encode_images(pixels)
        alphas = backend.alphas_cumprod()
        timesteps = torch.randint(50, 950, (len(pictures),), generator=generator)
        noise = torch.randn(latents.shape, generator=generator)
        ab = alphas[timesteps].view(-1, 1, 1, 1)
        noisy = ab.sqrt() * latents + (1 - ab).sqrt() * noise
        cond = backend.encode_text(prompts, (64, 64))
        plain = backend.predict(noisy, timesteps, cond)
        with apply(source.unet, [(teacher, 1.0)]):
            taught = backend.predict(noisy, timesteps, cond)
    return noisy, timesteps, cond, plain, taught, backend


def recovery(planted: Planted, network) -> tuple[float, float]:
    pictures = render(planted.source, planted.held_prompts, planted.held_seeds, [(network, 1.0)])
    pixel = 1 - pixel_distance(pictures, planted.teacher_pictures) / pixel_distance(
        planted.none_pictures, planted.teacher_pictures
    )
    noisy, timesteps, cond, plain, taught, backend = planted.probe
    with torch.no_grad(), apply(planted.source.unet, [(network, 1.0)]):
        learned = backend.predict(noisy, timesteps, cond)
    eps = 1 - float((learned - taught).pow(2).mean().sqrt() / (plain - taught).pow(2).mean().sqrt())
    return pixel, eps


# -- 2. style transfer ------------------------------------------------------------------------------
@dataclasses.dataclass
class StyleTask:
    source: ModelSource
    data: Path
    dataset_share: float
    prompts: list[str]
    seeds: list[int]
    none_share: float
    none_shapes: float


def style_task(source: ModelSource, folder: Path, setup: Setup) -> StyleTask:
    from PIL import Image

    style = STYLES[DEMO_STYLE]
    paths = write_dataset(
        folder / "style-data", 32, seed=0, style=style, colours=DEMO_DATA_COLOURS, shapes=DEMO_DATA_SHAPES
    )
    dataset_share = float(numpy.mean([style_share(Image.open(p), style) for p in paths]))
    unseen = [
        c for c in all_captions() if c.split()[1] not in DEMO_DATA_COLOURS or c.split()[2] not in DEMO_DATA_SHAPES
    ]
    random.Random(3).shuffle(unseen)
    chosen = unseen[: setup.held_out_captions]
    prompts = [c for c in chosen for _ in setup.held_out_seeds]
    seeds = [s for _ in chosen for s in setup.held_out_seeds]
    share, shapes = style_scores(source, prompts, seeds, ())
    return StyleTask(source, folder / "style-data", dataset_share, prompts, seeds, share, shapes)


def style_scores(source, prompts, seeds, networks) -> tuple[float, float]:
    style = STYLES[DEMO_STYLE]
    pictures = render(source, prompts, seeds, networks)
    share = float(numpy.mean([style_share(p, style) for p in pictures]))
    shapes = float(numpy.mean([judge(p, prompt).shape for p, prompt in zip(pictures, prompts, strict=True)]))
    return share, shapes


# -- the report -------------------------------------------------------------------------------------
def machine() -> str:
    model = platform.processor() or "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (
        f"{model}, {os.cpu_count()} cores, torch {torch.__version__} on {torch.get_num_threads()} thread(s), "
        f"load average {load}"
    )


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def run(setup: Setup, *, options: bool, out=print) -> dict:
    results: dict = {"planted": {}, "style": {}, "options": {}}
    lines = [f"Machine: {machine()}", ""]
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        rows = []
        style_rows = []
        for variant in setup.variants:
            source = load_variant(variant)
            folder = root / variant
            planted = plant(source, folder, setup)
            trained = train_for(source, planted.data, folder / "planted", setup.budget, setup.checkpoints, **{})
            curve = []
            for step, seconds, path in trained.copies:
                pixel, eps = recovery(planted, hx.load(path))
                curve.append((step, seconds, pixel, eps))
                rows.append([source.name, str(step), f"{seconds:.0f}", f"{pixel:.0%}", f"{eps:.0%}"])
                out(f"planted {variant}: step {step} ({seconds:.0f} s): recovery {pixel:.0%} pixels, {eps:.0%} eps")
            results["planted"][variant] = {
                "teacher_pixel_effect": pixel_distance(planted.none_pictures, planted.teacher_pictures),
                "curve": curve,
            }
            task = style_task(source, folder, setup)
            styled = train_for(source, task.data, folder / "style", setup.budget, 1)
            share, shapes = style_scores(source, task.prompts, task.seeds, [(styled.final, 1.0)])
            results["style"][variant] = {
                "none": task.none_share,
                "trained": share,
                "dataset": task.dataset_share,
                "shapes_none": task.none_shapes,
                "shapes_trained": shapes,
                "steps": styled.steps,
                "seconds": styled.seconds,
            }
            style_rows.append(
                [
                    source.name,
                    f"{task.none_share:.0%}",
                    f"{share:.0%}",
                    f"{task.dataset_share:.0%}",
                    f"{share / task.dataset_share:.0%}",
                    f"{task.none_shapes:.0%} -> {shapes:.0%}",
                    f"{styled.steps} in {styled.seconds:.0f} s",
                ]
            )
            out(f"style {variant}: {task.none_share:.0%} -> {share:.0%} of pixels (dataset {task.dataset_share:.0%})")
            if variant == "sd1" and options:
                results["options"] = option_rows(source, planted, task, folder, setup, out)
        lines += ["Planted-network recovery (held-out captions and seeds; 100% = the teacher):", ""]
        lines += table(["model", "steps", "seconds", "recovery (pixels)", "recovery (eps)"], rows)
        lines += ["", f"Style transfer ({DEMO_STYLE} style; share of pixels in its colours on held-out prompts):", ""]
        lines += table(
            ["model", "no network", "trained", "dataset", "trained / dataset", "shape recognised", "training"],
            style_rows,
        )
        if results["options"]:
            lines += ["", f"Options (SD1-shaped model, {setup.option_budget:.0f} s each):", ""]
            lines += table(
                ["option", "steps", "recovery (pixels)", "recovery (eps)", "style / dataset", "shape recognised"],
                [
                    [
                        name,
                        str(r["steps"]),
                        f"{r['pixel']:.0%}",
                        f"{r['eps']:.0%}",
                        f"{r['style'] / r['dataset']:.0%}",
                        f"{r['shapes']:.0%}",
                    ]
                    for name, r in results["options"].items()
                ],
            )
    results["lines"] = lines
    return results


def option_rows(source, planted: Planted, task: StyleTask, folder: Path, setup: Setup, out) -> dict:
    found = {}
    for index, (name, options) in enumerate(OPTIONS.items()):
        trained = train_for(source, planted.data, folder / f"option-{index}", setup.option_budget, 1, **dict(options))
        pixel, eps = recovery(planted, trained.final)
        styled = train_for(source, task.data, folder / f"option-style-{index}", setup.option_budget, 1, **dict(options))
        share, shapes = style_scores(source, task.prompts, task.seeds, [(styled.final, 1.0)])
        found[name] = {
            "steps": trained.steps,
            "pixel": pixel,
            "eps": eps,
            "style": share,
            "dataset": task.dataset_share,
            "shapes": shapes,
        }
        out(f"option {name}: recovery {pixel:.0%} pixels, {eps:.0%} eps; style {share:.0%} ({trained.steps} steps)")
    return found


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=180.0, help="seconds of training per measurement")
    parser.add_argument("--option-budget", type=float, default=60.0, help="seconds of training per option")
    parser.add_argument("--variants", default="sd1,v,sdxl")
    parser.add_argument("--skip-options", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--markdown", help="also write the tables to this file")
    parser.add_argument("--quick", action="store_true", help="seconds, not minutes: checks that the script runs")
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in TINY_VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(TINY_VARIANTS)}")
    torch.set_num_threads(args.threads)
    if args.quick:
        setup = Setup(variants, 4.0, 2.0, 4, 2, (7,), 2, teacher_steps=4)
    else:
        setup = Setup(variants, args.budget, args.option_budget, 128, 12, (7, 8), 5)
    results = run(setup, options=not args.skip_options)
    print()
    print("\n".join(results["lines"]))
    if args.markdown:
        Path(args.markdown).write_text("\n".join(results["lines"]) + "\n")
    return results


if __name__ == "__main__":
    main()
