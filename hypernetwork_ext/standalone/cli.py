"""Command line: ``python -m hypernetwork_ext <command>`` (also installed as ``hypernetwork``).

Exit codes: 0 success; 1 some items of a batch failed (the others were done); 2 bad input or a
refused operation (the message says which file and why); 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from pathlib import Path

from .. import __version__
from ..atomic import check_writable_file, check_writable_folder
from ..errors import FileExistsRefusedError, HypernetworkError, InvalidConfigError, NonFiniteWeightsError
from .folders import DEFAULT_NETWORK_DIR, DEMO_NETWORKS, DEMO_OUTPUT, network_folders, program_name

EXIT_OK, EXIT_PARTIAL, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130

EXAMPLES = {
    "inspect": "  {prog} inspect models/hypernetworks/anime.pt\n  {prog} inspect --json a.pt b.safetensors",
    "convert": "  {prog} convert anime.pt anime.safetensors\n  {prog} convert models/hypernetworks/ converted/ --to safetensors",
    "merge": (
        "  {prog} merge blend.safetensors a.pt:0.6 b.pt:0.4\n"
        "  {prog} merge blend.pt a.pt:0.5 b.pt:0.5 --width 768=0.8,0.2\n"
        "  {prog} merge diff.pt --add-difference a.pt b.pt c.pt --multiplier 0.7"
    ),
    "bake": "  {prog} bake v1-5.safetensors anime.pt:0.8 -o v1-5-anime.safetensors",
    "export-lora": (
        "  {prog} export-lora anime.pt --model v1-5.safetensors -o anime-lora.safetensors\n"
        "  {prog} export-lora style.pt:0.8 --model v1-5.safetensors --rank 32 -o style-r32.safetensors"
    ),
    "generate": (
        '  {prog} generate "a castle <hypernet:anime:0.8>" --model v1-5.safetensors --config sd15-diffusers/ \\\n'
        "      --hypernetwork-dir models/hypernetworks -o castle.png\n"
        '  {prog} generate "a red circle <hypernet:demo>" --grid=-1,0,0.5,1 -o grid.png   # embedded tiny model'
    ),
    "train": (
        "  {prog} train --create anime --data-root data/anime --output-dir models/hypernetworks \\\n"
        "      --model sd15-diffusers/ --learn-rate '5e-5:100, 5e-6:1500, 1e-6' --steps 2000\n"
        "  {prog} train --network models/hypernetworks/anime.pt --data-root data/anime --preset fast.json\n"
        "  accelerate launch --num_processes 2 -m hypernetwork_ext train --create anime --data-root data/anime   # 2 GPUs"
    ),
    "demo": "  {prog} demo                 # embedded tiny model, output in ./hypernetwork-demo/run-*/\n  {prog} demo --model sd15/   # a real model",
}


DEFAULT_FOLD_LIMIT_MIB = 256  # hypernetwork_ext.memory.DEFAULT_FOLD_LIMIT, without importing torch for --help
STEP_LIMIT = "HYPERNETWORK_STEP_LIMIT"  # caps every step count: commands run as written, only shorter


def _limited_steps(steps: int) -> int:
    text = os.environ.get(STEP_LIMIT, "").strip()
    if not text:
        return steps
    try:
        return min(steps, _positive(text))
    except argparse.ArgumentTypeError as exc:
        raise InvalidConfigError(f"{STEP_LIMIT}={text!r}: {exc}") from None


# -- option values, checked by argparse: a bad one stops with the command's usage before any work --
def _whole_number(text: str, minimum: int | None = None) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, found {text!r}") from None
    if minimum is not None and value < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum}, found {value}")
    return value


def _positive(text: str) -> int:
    return _whole_number(text, 1)


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, found {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, found {text!r}")
    return value


def _image_size(text: str) -> int:
    value = _positive(text)
    if value % 8:
        raise argparse.ArgumentTypeError(f"must be a multiple of 8, found {value}")
    return value


def _finite_list(text: str) -> list[float]:
    values = [_finite(part.strip()) for part in text.split(",") if part.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, found {text!r}")
    return values


def _width_list(text: str) -> list[int]:
    return [_positive(part.strip()) for part in text.split(",") if part.strip()]


def _network_arg(text: str) -> tuple[str, float]:
    """``path`` or ``path:multiplier`` (a drive letter's colon is not a multiplier)."""
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            multiplier = float(tail)
        except ValueError:
            return text, 1.0
        if not math.isfinite(multiplier):
            raise argparse.ArgumentTypeError(f"{text!r}: the multiplier must be a finite number")
        return head, multiplier
    return text, 1.0


def _width_values(text: str) -> tuple[int, list[float]]:
    """``WIDTH=V[,V...]`` of merge's --width."""
    width, sep, numbers = text.partition("=")
    try:
        if not sep:
            raise argparse.ArgumentTypeError(text)
        return _positive(width), _finite_list(numbers)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected WIDTH=VALUE[,VALUE...], e.g. 768=0.8,0.2") from None


def _load_entries(specs: list[tuple[str, float]]):
    from ..formats import load

    return [(load(path), multiplier) for path, multiplier in specs]


# -- inspect --------------------------------------------------------------------------------------
def _inspect_record(path: str) -> dict:
    from ..formats import load
    from ..hashing import content_hash, file_sha256, short_hash

    network = load(path)
    arch = network.architecture
    sha = file_sha256(path)
    return {
        "path": path,
        "format": "safetensors" if path.lower().endswith(".safetensors") else "pt",
        "size_bytes": os.path.getsize(path),
        "name": network.name,
        "widths": network.widths,
        "layer_structure": list(arch.layer_structure),
        "activation": arch.activation,
        "activate_output": arch.activate_output,
        "layer_norm": arch.is_layer_norm,
        "dropout_structure": list(arch.dropout_structure),
        "weight_initialization": arch.weight_initialization,
        "step": network.step,
        "trained_on": network.info.sd_checkpoint_name,
        "trained_on_hash": network.info.sd_checkpoint,
        "model_family": network.family,
        "model_family_inferred": network.info.model_family is None,
        "parameters": network.parameter_count(),
        "affine": network.is_affine,
        "sha256": sha,
        "short_hash": short_hash(sha),
        "content_hash": content_hash(network),
        "description": network.describe(),
        "device_memory": _device_memory(network),
    }


def _device_memory(network) -> dict | None:
    """What generating with the network keeps on the GPU, on the family it targets with a float16
    UNet: per kind, one set of folded weights (A1111 folds affine networks; Forge and reForge fold
    nothing), as :mod:`hypernetwork_ext.footprint` works it out (docs/speed.md has it measured)."""
    from ..families import FAMILIES, infer_family
    from ..footprint import expected_bytes
    from ..memory import DEFAULT_FOLD_LIMIT

    key = network.family or infer_family(network.widths)
    if key is None and {320, 640, 1280} & set(network.widths):
        key = "sd1"  # no context width: SD1 and SD2 share their self-attention layout
    if key is None:
        return None
    family = FAMILIES[key]
    return {
        "family": family.label,
        "unet_dtype": "float16",
        "a1111": expected_bytes(network, family),
        "forge": expected_bytes(network, family, folding=False),
        "fold_limit_bytes": DEFAULT_FOLD_LIMIT,
    }


def _device_memory_line(memory: dict | None) -> str:
    from ..memory import mib

    if memory is None:
        return "GPU memory while in use: unknown (no width of a known model family)"
    a1111, forge = memory["a1111"], memory["forge"]
    rest = sum(nbytes for kind, nbytes in a1111.items() if kind != "folds")
    line = f"GPU memory while in use on {memory['family']} (float16 UNet): A1111 {mib(rest)}"
    if a1111["folds"]:
        line += (
            f" + {mib(a1111['folds'])} of folded weights per set of multipliers"
            f" (at most 2, limited to {mib(memory['fold_limit_bytes'])} by default)"
        )
    return line + f"; Forge/reForge {mib(sum(forge.values()))}"


def _refused_record(path: str, exc: HypernetworkError) -> dict:
    """What ``--json`` lists for a file that was refused (say, for NaN weights) instead of dropping it."""
    record = {"path": path, "error": str(exc)}
    if isinstance(exc, NonFiniteWeightsError):
        record.update(non_finite_weights=exc.count, parameters=exc.total)
    return record


def _inspect(args) -> int:
    records, failed = [], 0
    for path in args.files:
        try:
            records.append(_inspect_record(path))
        except HypernetworkError as exc:
            failed += 1
            records.append(_refused_record(path, exc))
            print(f"error: {exc}", file=sys.stderr)
    if args.json:
        print(json.dumps([{k: v for k, v in r.items() if k != "description"} for r in records], indent=2))
    else:
        for record in (r for r in records if "error" not in r):
            print(f"== {record['path']} ({record['format']}, {record['size_bytes']:,} bytes)")
            print(record["description"])
            print(f"hash: {record['short_hash']} (sha256 {record['sha256']})")
            print(f"content hash: {record['content_hash']}")
            print(_device_memory_line(record["device_memory"]))
            print()
    return _batch_exit(failed, len(args.files))


def _batch_exit(failed: int, total: int) -> int:
    if failed == 0:
        return EXIT_OK
    return EXIT_ERROR if failed == total else EXIT_PARTIAL


# -- convert --------------------------------------------------------------------------------------
def _convert(args) -> int:
    from ..formats import SUPPORTED_SUFFIXES, load, save

    source = Path(args.source)
    if source.is_dir():
        if not args.to:
            raise InvalidConfigError("converting a folder needs --to pt or --to safetensors")
        check_writable_folder(args.destination)
        pairs = []
        for path in sorted(source.rglob("*")):
            if path.suffix.lower() in SUPPORTED_SUFFIXES and path.is_file() and not path.name.endswith(".optim"):
                target = Path(args.destination) / path.relative_to(source).with_suffix(f".{args.to}")
                if path.suffix.lower() != f".{args.to}":
                    pairs.append((path, target))
    else:
        check_writable_file(args.destination)
        pairs = [(source, Path(args.destination))]
    failed = 0
    for path, target in _progress(pairs, "converting"):
        try:
            save(load(path), target, overwrite=args.overwrite)
            print(f"{path} -> {target}")
        except HypernetworkError as exc:
            failed += 1
            print(f"error: {_explained(exc, args)}", file=sys.stderr)
    if not pairs:
        print("nothing to convert", file=sys.stderr)
    return _batch_exit(failed, len(pairs)) if pairs else EXIT_OK


def _progress(items: list, label: str):
    if len(items) < 2:
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=label, unit="file", file=sys.stderr)


# -- merge ----------------------------------------------------------------------------------------
def _merge(args) -> int:
    from ..formats import load, save
    from ..ops.merge import add_difference, weighted_sum

    name = args.name or Path(args.output).stem
    overrides = dict(args.width or [])
    _refuse_existing([args.output], args)
    check_writable_file(args.output)
    if args.add_difference:
        if args.networks:
            raise InvalidConfigError("give either networks with weights or --add-difference A B C, not both")
        a, b, c = (load(path) for path in args.add_difference)
        for width, values in overrides.items():
            if len(values) != 1:
                raise InvalidConfigError(f"--width {width}: add-difference takes one multiplier per width")
        merged = add_difference(
            a, b, c, args.multiplier, width_multipliers={w: v[0] for w, v in overrides.items()}, name=name
        )
    else:
        merged = weighted_sum(_load_entries(args.networks), width_weights=overrides, name=name)
    save(merged, args.output, overwrite=args.overwrite)
    print(f"wrote {args.output}: {merged.info.optional_info}")
    return EXIT_OK


# -- bake / export-lora ---------------------------------------------------------------------------
def _bake(args) -> int:
    from ..ops.bake import bake
    from ..ops.checkpoints import read_unet, write_unet

    _refuse_existing([args.output], args)
    check_writable_folder(os.path.dirname(os.path.abspath(args.output)), output=args.output)  # a file or a folder
    entries = _load_entries(args.networks)
    weights = read_unet(args.checkpoint)
    changed, report = bake(weights, entries, approximate=args.approximate, seed=args.seed)
    note = {"hypernetworks_baked": json.dumps([[net.name, m] for net, m in entries])}
    write_unet(weights, changed, args.output, note)
    print(report.summary())
    print(
        "the fold is exact"
        if not report.fit_errors
        else "nonlinear modules were replaced by affine fits (errors above)"
    )
    print(f"wrote {args.output}")
    return EXIT_OK


def _export_lora(args) -> int:
    import torch
    from safetensors.torch import save

    from ..atomic import atomic_write_bytes
    from ..ops.bake import export_lora
    from ..ops.checkpoints import read_unet

    _refuse_existing([args.output], args)
    check_writable_file(args.output)
    entries = _load_entries(args.networks)
    weights = read_unet(args.model)
    dtype = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    lora, report = export_lora(
        weights, entries, rank=args.rank, approximate=args.approximate, seed=args.seed, dtype=dtype
    )
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(args.rank or "full"),
        "hypernetworks_exported": json.dumps([[net.name, m] for net, m in entries]),
    }
    atomic_write_bytes(args.output, save(lora, metadata=metadata), overwrite=args.overwrite)
    print(report.summary())
    print(f"wrote {args.output} ({len(lora) // 3} LoRA modules)")
    return EXIT_OK


# -- model sources, generate, train, demo ----------------------------------------------------------
def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        help="single-file checkpoint (.safetensors/.ckpt) or diffusers folder (default: the embedded tiny model)",
    )
    parser.add_argument(
        "--config", help="for a single file: a diffusers folder of the same architecture (its configs and tokenizer)"
    )
    parser.add_argument(
        "--allow-download",
        action="store_true",
        help="let diffusers fetch a single file's configs from the Hugging Face hub",
    )
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument(
        "--threads",
        type=_positive,
        help="CPU threads (default: HYPERNETWORK_THREADS, else OMP_NUM_THREADS, else the cores free now: "
        "the cores usable less the load average)",
    )


def _use_threads(args, print_to=None) -> None:
    """As many CPU threads as cores are free now, unless the user chose (one process only: under
    accelerate each process keeps what the launcher gave it)."""
    from .threads import apply_threads, choose_threads

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return
    choice = choose_threads(args.threads)
    apply_threads(choice)
    if print_to is not None:
        print(choice.describe(), file=print_to, flush=True)


def _device(args) -> str:
    import torch

    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _load_source(args, device: str | None = None):
    from .pipelines import load_model

    source = load_model(args.model, config=args.config, allow_download=args.allow_download)
    source.pipe.to(device or _device(args))
    return source


def _library(args):
    """The folders given, else models/hypernetworks and the newest demo run's networks."""
    from ..library import Library

    return Library(network_folders(args.hypernetwork_dir))


def _refuse_existing(paths: list[str], args) -> None:
    """Refuse before any work, not after it, when an output exists and overwriting was not asked for."""
    if getattr(args, "overwrite", False):
        return
    for path in paths:
        if path and os.path.lexists(path):
            raise FileExistsRefusedError("exists", path)


def _tag_problems_before_sampling(library, prompt: str) -> list[str]:
    """Unknown names and malformed tags, found (and printed) before the model loads."""
    from ..syntax import find_tags

    problems = library.plan(find_tags(prompt), with_hashes=False).problems
    for problem in problems:
        print(f"warning: {problem}", file=sys.stderr)
    return problems


def _generate(args) -> int:
    from .generate import GenerationSettings
    from .workflows import generate_with_tags, multiplier_grid, save_png

    settings = GenerationSettings(
        args.prompt, args.negative, _limited_steps(args.steps), args.cfg, args.width, args.height, args.seed, args.batch
    )
    settings.fold_limit = None if args.fold_limit < 0 else args.fold_limit << 20
    settings.check()
    targets = [args.output] if args.grid else _image_paths(args.output, args.batch)
    _refuse_existing(targets, args)
    for target in targets:  # found now, not after the whole render
        check_writable_file(target)
    library = _library(args)
    reported = _tag_problems_before_sampling(library, args.prompt)
    _use_threads(args, None if args.quiet else sys.stderr)
    source = _load_source(args)
    if args.grid:
        bar = _step_printer(args, settings.steps * len(args.grid))
        picture, outputs = multiplier_grid(source, library, [args.prompt], args.grid, settings, on_step=bar)
        written = [save_png(picture, args.output, outputs[-1].infotext, overwrite=args.overwrite)]
        problems = [p for o in outputs for p in o.problems]
        notes = [n for o in outputs for n in o.notes]
    else:
        output = generate_with_tags(
            source, library, settings, force_mismatch=args.force, on_step=_step_printer(args, settings.steps)
        )
        written = _write_images(output.images, targets, output.infotext, args.overwrite)
        problems, notes = output.problems, output.notes
    for note in _once_per_tag(notes):
        print(f"note: {note}", file=sys.stderr)
    for problem in _once_per_tag(problems, already=reported):
        print(f"warning: {problem}", file=sys.stderr)
    for path in written:
        print(f"wrote {path}")
    return EXIT_PARTIAL if problems else EXIT_OK


def _once_per_tag(messages: list[str], already: list[str] = ()) -> list[str]:
    """Each message once, though a grid repeats it for every multiplier (``<hypernet:x:-1>: ...``,
    ``<hypernet:x:0>: ...``), and not again when it was reported before sampling."""
    seen = {message.partition(": ")[2] for message in already}
    kept = []
    for message in messages:
        if message.partition(": ")[2] not in seen:
            seen.add(message.partition(": ")[2])
            kept.append(message)
    return kept


def _step_printer(args, steps: int):
    if args.quiet:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    bar = tqdm(total=steps, desc="sampling", unit="step", file=sys.stderr)

    def report(done: int, total: int) -> None:
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return report


def _image_paths(output: str, count: int) -> list[str]:
    """``out.png`` for one image, ``out-0.png``, ``out-1.png``, ... for a batch."""
    if count == 1:
        return [output]
    stem, suffix = os.path.splitext(output)
    return [f"{stem}-{index}{suffix or '.png'}" for index in range(count)]


def _write_images(images: list, paths: list[str], parameters: str, overwrite: bool) -> list[str]:
    from .workflows import save_png

    return [save_png(image, path, parameters, overwrite=overwrite) for image, path in zip(images, paths, strict=True)]


def _training_options() -> list:
    import dataclasses

    from ..training import TrainingConfig

    return [item for item in dataclasses.fields(TrainingConfig) if item.name != "hypernetwork_name"]


_TRAINING_HELP = {
    "learn_rate": "learning-rate schedule, e.g. '5e-5:100, 5e-6:1500, 1e-6'",
    "data_root": "dataset folder (images with optional .txt captions)",
    "log_directory": "logs, copies and previews go to <log>/<date>/<name>/",
    "steps": "max steps, counting earlier sessions",
    "template_filename": "prompt template: a name (ours or --template-dir) or a path",
    "caption_dropout": "share of samples trained on the empty negative prompt's conditioning; -1 = auto (0.1 on SDXL)",
    "optimizer": "AdamW, AdamW8bit, Lion, Prodigy, or any torch.optim class",
    "resume_from": "a saved copy to continue from (with its .optim sidecar when saved)",
    "gradient_checkpointing": "recompute the UNet's blocks in the backward pass: far less memory, slower steps",
    "mixed_precision": "auto, no, fp16 or bf16 (auto: bf16 on GPUs that have it, none on a CPU)",
    "unload_models_when_training": "text encoder and VAE off the GPU during steps (saves their memory)",
}


# Sized for SD1.5 in A1111; here sized for the model loaded (64 px on the embedded one): training.config.sized_for.
_MODEL_SIZED = ("training_width", "training_height", "preview_width", "preview_height", "bucket_step")


def _add_training_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training options (TrainingConfig; same names, defaults and syntax as A1111)")
    for item in _training_options():
        flag = "--" + item.name.replace("_", "-")
        kind = item.type if isinstance(item.type, str) else item.type.__name__
        default = "the model's own size" if item.name in _MODEL_SIZED else repr(item.default)
        help_text = _TRAINING_HELP.get(item.name, "") + f" (default: {default})"
        if kind == "bool":
            group.add_argument(
                flag, dest=f"cfg_{item.name}", action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        else:
            converter = {"int": int, "float": float, "str": str}[kind]
            metavar = {"int": "N", "float": "X", "str": "TEXT"}[kind]
            group.add_argument(
                flag, dest=f"cfg_{item.name}", type=converter, default=None, metavar=metavar, help=help_text
            )


def _training_config(args, name: str, image_size: int | None = None):
    """The options: the defaults (A1111's, or sized for a model made for ``image_size``), then the
    preset's, then the flags given."""
    from ..training import TrainingConfig, load_preset
    from ..training.config import sized_for

    config = TrainingConfig(hypernetwork_name=name, **(sized_for(image_size) if image_size else {}))
    if args.preset:
        config = load_preset(args.preset, base=config)
    given = {item.name: getattr(args, f"cfg_{item.name}") for item in _training_options()}
    config = config.replace(**{k: v for k, v in given.items() if v is not None})
    return config.replace(steps=_limited_steps(config.steps)).check()


def _creation_options(args) -> dict:
    """--create's options, checked (the widths come from the model later unless --widths)."""
    from ..network import new_architecture

    options = {
        "layer_structure": args.layer_structure,
        "activation": args.activation,
        "weight_init": args.weight_init,
        "layer_norm": args.layer_norm,
        "dropout_structure": args.dropout_structure,
        "activate_output": args.activate_output,
    }
    new_architecture(**options)
    return {**options, "widths": args.widths, "seed": args.init_seed}


def _network_given(args):
    """The network file to train (None for --create or a resume); checks which one was asked for."""
    from ..formats import load

    if args.network and args.create:
        raise InvalidConfigError("give either --network FILE or --create NAME, not both")
    if args.network:
        return load(args.network)
    if not args.create and not args.cfg_resume_from:
        raise InvalidConfigError("give --network FILE to train an existing network or --create NAME for a new one")
    return None


def _check_training_inputs(args, config, created_path: str | None) -> None:
    """What the run would refuse after loading the model, refused before it (nothing is written yet)."""
    from ..training.data import resolve_template

    _refuse_existing([created_path, args.save_preset], args)
    check_writable_folder(args.output_dir)
    if config.log_directory.strip():  # copies, previews, the loss CSV and the settings go there
        check_writable_folder(config.log_directory)
    if args.save_preset:
        check_writable_file(args.save_preset)
    if not os.path.isdir(config.data_root):
        raise InvalidConfigError("data_root: the dataset folder does not exist", config.data_root)
    resolve_template(config.template_filename, args.template_dir or ())


@contextlib.contextmanager
def _removed_unless_trained(paths: list[str]):
    """Files this run creates are taken back when it fails before training (the engine raises only
    then; later failures keep the steps done): all or nothing. An interruption keeps them."""
    new = [path for path in paths if path and not os.path.lexists(path)]
    try:
        yield
    except Exception:
        for path in new:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        raise


def _train(args) -> int:
    from ..formats import save
    from ..training import TrainingCallbacks, distributed, save_preset, train
    from ..training.distributed import is_main
    from .interrupts import resume_command, stop_on_first_interrupt
    from .workflows import new_network_for, training_backend

    network, path = _network_given(args), args.network
    creation = _creation_options(args) if args.create else None
    config = _training_config(args, args.create or (network.name if network is not None else ""))
    created = os.path.join(args.output_dir, f"{args.create}.{args.format}") if args.create else None
    _check_training_inputs(args, config, created)
    _use_threads(args, None if args.quiet else sys.stderr)
    device = _setup_processes(args)
    source = _load_source(args, device)
    main_process = is_main()
    config = _sized_for_the_model(args, config, source.image_size, main_process)
    with _removed_unless_trained([created, args.save_preset] if main_process else []):
        if args.create:
            network, path = new_network_for(source, args.create, **creation), created
            if main_process:  # under accelerate every process builds it; the engine starts all from the main one's
                save(network, path, overwrite=args.overwrite)
        if args.save_preset and main_process:
            save_preset(config, args.save_preset, overwrite=args.overwrite)
        # One process: the first Ctrl-C stops after the step and saves (under accelerate every
        # process would stop at a different step, so there Ctrl-C ends the run as before).
        with stop_on_first_interrupt(enabled=distributed.world_size() == 1) as stop:
            callbacks = TrainingCallbacks(
                on_message=(lambda text: print(text, file=sys.stderr)) if main_process else None,
                should_stop=stop.should_stop,
            )
            result = train(
                network,
                training_backend(source),
                config,
                callbacks,
                source_path=path,
                output_dir=args.output_dir,
                template_dirs=args.template_dir or (),
                progress_bar=main_process and not args.quiet,
            )
    if main_process and result.path:
        print(f"wrote {result.path}")
    if stop.is_set() and result.stopped == "interrupted":
        if result.path:
            print(f"to resume: {resume_command(program_name(), args.argv, result.path)}")
            if not config.save_optimizer_state:
                print("(the optimizer starts afresh on resume; --save-optimizer-state keeps its state in the copies)")
        return EXIT_INTERRUPTED
    return EXIT_OK if result.stopped in ("finished", "already trained") else EXIT_PARTIAL


def _sized_for_the_model(args, config, image_size: int, report: bool):
    """A1111's defaults are sized for SD1.5 (512 px): what the user left open follows the model
    loaded (64 px for the embedded one, 1024 for SDXL)."""
    sized = _training_config(args, config.hypernetwork_name, image_size)
    if report and (sized.training_width, sized.training_height) != (config.training_width, config.training_height):
        print(
            f"training at {sized.training_width}x{sized.training_height}, the model's own size "
            "(--training-width/--training-height to choose another)",
            file=sys.stderr,
        )
    return sized


def _setup_processes(args) -> str:
    """Under ``accelerate launch``/``torchrun`` every process gets its own device and joins the group."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return _device(args)
    from accelerate import PartialState

    state = PartialState(cpu=args.device == "cpu")
    return str(state.device)


def _demo(args) -> int:
    from .workflows import demo_report, run_demo

    steps = _limited_steps(args.steps)
    check_writable_folder(args.output)
    _use_threads(args, sys.stdout)  # the demo's log is its standard output
    source = _load_source(args)
    result = run_demo(args.output, source, steps=steps, seed=args.seed, log=lambda text: print(text, flush=True))
    latest = _link_latest(args.output, result.folder)
    print()
    print("\n".join(demo_report(result, latest)))
    return EXIT_OK


def _link_latest(root: str, folder: str) -> str | None:
    """``<root>/latest`` -> the newest run, so commands can name the demo's files without its date."""
    link = os.path.join(root, "latest")
    temporary = os.path.join(root, f".latest-{os.getpid()}")
    try:
        os.symlink(os.path.basename(folder), temporary, target_is_directory=True)
        os.replace(temporary, link)  # one rename: never a moment without a link; a real folder is left alone
    except OSError:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        return None
    return link


# -- parser ---------------------------------------------------------------------------------------
def _subparser(commands, name: str, help_text: str, run) -> argparse.ArgumentParser:
    epilog = f"examples:\n{EXAMPLES[name].format(prog=program_name())}" if name in EXAMPLES else None
    parser = commands.add_parser(
        name, help=help_text, description=help_text, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.set_defaults(run=run, command_parser=parser)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=program_name(),
        description="Hypernetworks for Stable Diffusion: inspect, convert, merge, bake, export, train, generate.",
        epilog=f"Run '{program_name()} COMMAND --help' for a command's options and examples.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    inspect = _subparser(
        commands, "inspect", "describe hypernetwork files (architecture, hashes, target model)", _inspect
    )
    inspect.add_argument("files", nargs="+", metavar="FILE")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of text")

    convert = _subparser(commands, "convert", "convert .pt <-> .safetensors losslessly (a file, or a folder)", _convert)
    convert.add_argument("source", metavar="IN", help="a network file or a folder of them")
    convert.add_argument("destination", metavar="OUT", help="the output file, or folder when IN is a folder")
    convert.add_argument("--to", choices=("pt", "safetensors"), help="target format when converting a folder")
    convert.add_argument("--overwrite", action="store_true", help="replace existing outputs")

    merge = _subparser(commands, "merge", "merge networks of the same structure", _merge)
    merge.add_argument("output", metavar="OUT")
    merge.add_argument(
        "networks", nargs="*", type=_network_arg, metavar="NETWORK[:WEIGHT]", help="weighted sum of these networks"
    )
    merge.add_argument("--add-difference", nargs=3, metavar=("A", "B", "C"), help="A + (B - C) * multiplier")
    merge.add_argument("--multiplier", type=_finite, default=1.0, help="for --add-difference (default 1)")
    merge.add_argument(
        "--width",
        action="append",
        type=_width_values,
        metavar="WIDTH=V[,V...]",
        help="other weights (or multiplier) for one width",
    )
    merge.add_argument("--name", help="internal name of the result (default: the output's stem)")
    merge.add_argument("--overwrite", action="store_true")

    bake = _subparser(
        commands, "bake", "fold networks into a checkpoint's key/value projections (exact for affine networks)", _bake
    )
    bake.add_argument("checkpoint", metavar="CHECKPOINT", help="single-file .safetensors/.ckpt or a diffusers folder")
    bake.add_argument("networks", nargs="+", type=_network_arg, metavar="NETWORK[:MULTIPLIER]")
    bake.add_argument("-o", "--output", required=True, help="new checkpoint (.safetensors, or a folder for diffusers)")
    bake.add_argument(
        "--approximate", action="store_true", help="fit affine maps to nonlinear networks and report the error"
    )
    bake.add_argument("--seed", type=int, default=0, help="seed of the fitting samples")

    export = _subparser(commands, "export-lora", "write the networks' weight delta as a LoRA file", _export_lora)
    export.add_argument("networks", nargs="+", type=_network_arg, metavar="NETWORK[:MULTIPLIER]")
    export.add_argument(
        "--model", required=True, help="the checkpoint the LoRA is for (its projection weights are needed)"
    )
    export.add_argument("-o", "--output", required=True)
    export.add_argument("--rank", type=_positive, help="truncate each delta to this rank (default: full rank, exact)")
    export.add_argument("--dtype", choices=("fp16", "fp32", "bf16"), default="fp16")
    export.add_argument(
        "--approximate", action="store_true", help="fit affine maps to nonlinear networks and report the error"
    )
    export.add_argument("--seed", type=int, default=0)
    export.add_argument("--overwrite", action="store_true")

    generate = _subparser(
        commands, "generate", "txt2img with <hypernet:...> tags (same syntax as the WebUI)", _generate
    )
    generate.add_argument("prompt", help="the prompt, tags included")
    generate.add_argument("--negative", default="", help="negative prompt")
    generate.add_argument("-o", "--output", default="output.png")
    generate.add_argument("--overwrite", action="store_true", help="replace existing images")
    generate.add_argument(
        "--hypernetwork-dir",
        action="append",
        help=f"folder of networks (repeatable; default: {DEFAULT_NETWORK_DIR} and {DEMO_NETWORKS}, "
        "the newest demo run's)",
    )
    generate.add_argument("--steps", type=_positive, default=20)
    generate.add_argument("--cfg", type=_finite, default=7.0, help="CFG scale")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--width", type=_image_size, help="a multiple of 8 (default: the model's)")
    generate.add_argument("--height", type=_image_size, help="a multiple of 8 (default: the model's)")
    generate.add_argument("--batch", type=_positive, default=1)
    generate.add_argument(
        "--grid",
        type=_finite_list,
        metavar="M1,M2,...",
        help="one image per multiplier (every tag's), tiled into one grid",
    )
    generate.add_argument("--force", action="store_true", help="apply networks made for another model family too")
    generate.add_argument(
        "--fold-limit",
        type=lambda text: _whole_number(text, -1),
        default=DEFAULT_FOLD_LIMIT_MIB,
        metavar="MIB",
        help=f"memory for folded weights in MiB (default {DEFAULT_FOLD_LIMIT_MIB}; 0 folds nothing, -1 has no limit)",
    )
    generate.add_argument("--quiet", action="store_true")
    _add_model_options(generate)

    train = _subparser(
        commands, "train", "train a network headless (one process, or data-parallel with accelerate launch)", _train
    )
    which = train.add_argument_group("the network")
    which.add_argument("--network", help="an existing network file to train (never overwritten)")
    which.add_argument("--create", metavar="NAME", help="create a new network first")
    which.add_argument("--widths", type=_width_list, help="for --create: comma-separated widths (default: the model's)")
    which.add_argument("--layer-structure", type=_finite_list, default=[1.0, 2.0, 1.0], help="default 1,2,1")
    which.add_argument("--activation", default="linear")
    which.add_argument("--weight-init", default="Normal")
    which.add_argument("--layer-norm", action="store_true")
    which.add_argument("--dropout-structure", type=_finite_list, help="e.g. 0,0.1,0")
    which.add_argument("--activate-output", action="store_true")
    which.add_argument("--init-seed", type=int)
    which.add_argument("--format", choices=("pt", "safetensors"), default="safetensors", help="for --create")
    train.add_argument(
        "--output-dir", default=os.path.join("models", "hypernetworks"), help="where new and trained networks go"
    )
    train.add_argument("--preset", help="training options from a JSON preset (options given here win)")
    train.add_argument("--save-preset", metavar="FILE", help="also write the options used as a preset")
    train.add_argument("--template-dir", action="append", help="folder of prompt templates (repeatable)")
    train.add_argument("--overwrite", action="store_true")
    train.add_argument("--quiet", action="store_true")
    _add_model_options(train)
    _add_training_options(train)

    demo = _subparser(
        commands, "demo", "create, train, save and try a network end to end (embedded tiny model by default)", _demo
    )
    demo.add_argument(
        "--output", default=DEMO_OUTPUT, help="a new run-* folder is made in here, and 'latest' points to it"
    )
    demo.add_argument("--steps", type=_positive, default=600)
    demo.add_argument("--seed", type=int, default=0)
    _add_model_options(demo)

    _subparser(commands, "app", "the local web app: generate, train and browse networks (options: app --help)", None)
    return parser


def _explained(exc: HypernetworkError, args) -> str:
    """The error as the command line says it: a refused overwrite names the option that allows it."""
    if isinstance(exc, FileExistsRefusedError):
        how = "add --overwrite to replace it" if hasattr(args, "overwrite") else "choose another output"
        return f"{exc.path}: exists; nothing was written ({how})"
    return str(exc)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["app"]:  # the app has its own options (hypernetwork_ext.standalone.app)
        from .app import main as app_main

        return app_main(argv[1:])
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:  # argparse would answer with the top-level usage; the command's own is the useful one
        args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.argv = argv  # what was typed, for the command that resumes an interrupted run
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch is not None else None
    try:
        return args.run(args)
    except HypernetworkError as exc:
        print(f"error: {_explained(exc, args)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if threads is not None:  # called in a process that goes on (a test, a script): left as found
            torch.set_num_threads(threads)
