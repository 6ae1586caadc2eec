"""Command line: ``python -m hypernetwork_ext <command>`` (also installed as ``hypernetwork``).

Exit codes: 0 success; 1 some items of a batch failed (the others were done); 2 bad input or a
refused operation (the message says which file and why); 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import __version__
from .errors import HypernetworkError, InvalidConfigError, NonFiniteWeightsError

EXIT_OK, EXIT_PARTIAL, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130

EXAMPLES = {
    "inspect": "  hypernetwork inspect models/hypernetworks/anime.pt\n  hypernetwork inspect --json a.pt b.safetensors",
    "convert": "  hypernetwork convert anime.pt anime.safetensors\n  hypernetwork convert models/hypernetworks/ converted/ --to safetensors",
    "merge": (
        "  hypernetwork merge blend.safetensors a.pt:0.6 b.pt:0.4\n"
        "  hypernetwork merge blend.pt a.pt:0.5 b.pt:0.5 --width 768=0.8,0.2\n"
        "  hypernetwork merge diff.pt --add-difference a.pt b.pt c.pt --multiplier 0.7"
    ),
    "bake": "  hypernetwork bake v1-5.safetensors anime.pt:0.8 -o v1-5-anime.safetensors",
    "export-lora": (
        "  hypernetwork export-lora anime.pt --model v1-5.safetensors -o anime-lora.safetensors\n"
        "  hypernetwork export-lora style.pt:0.8 --model v1-5.safetensors --rank 32 -o style-r32.safetensors"
    ),
    "generate": (
        '  hypernetwork generate "a castle <hypernet:anime:0.8>" --model v1-5.safetensors --config sd15-diffusers/ \\\n'
        "      --hypernetwork-dir models/hypernetworks -o castle.png\n"
        '  hypernetwork generate "a red circle <hypernet:demo>" --grid=-1,0,0.5,1 -o grid.png   # embedded tiny model'
    ),
    "train": (
        "  hypernetwork train --create anime --data-root data/anime --output-dir models/hypernetworks \\\n"
        "      --model sd15-diffusers/ --learn-rate '5e-5:100, 5e-6:1500, 1e-6' --steps 2000\n"
        "  hypernetwork train --network models/hypernetworks/anime.pt --data-root data/anime --preset fast.json\n"
        "  accelerate launch --num_processes 2 -m hypernetwork_ext train --create anime --data-root data/anime   # 2 GPUs"
    ),
    "demo": "  hypernetwork demo                 # embedded tiny model, output in ./hypernetwork-demo/run-*/\n  hypernetwork demo --model sd15/   # a real model",
}


def _network_arg(text: str) -> tuple[str, float]:
    """``path`` or ``path:multiplier`` (a drive letter's colon is not a multiplier)."""
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return text, 1.0


def _load_entries(specs: list[str]):
    from .formats import load

    return [(load(path), multiplier) for path, multiplier in map(_network_arg, specs)]


# -- inspect --------------------------------------------------------------------------------------
def _inspect_record(path: str) -> dict:
    from .formats import load
    from .hashing import content_hash, file_sha256, short_hash

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
    }


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
            print()
    return _batch_exit(failed, len(args.files))


def _batch_exit(failed: int, total: int) -> int:
    if failed == 0:
        return EXIT_OK
    return EXIT_ERROR if failed == total else EXIT_PARTIAL


# -- convert --------------------------------------------------------------------------------------
def _convert(args) -> int:
    from .formats import SUPPORTED_SUFFIXES, load, save

    source = Path(args.source)
    if source.is_dir():
        if not args.to:
            raise InvalidConfigError("converting a folder needs --to pt or --to safetensors")
        pairs = []
        for path in sorted(source.rglob("*")):
            if path.suffix.lower() in SUPPORTED_SUFFIXES and path.is_file() and not path.name.endswith(".optim"):
                target = Path(args.destination) / path.relative_to(source).with_suffix(f".{args.to}")
                if path.suffix.lower() != f".{args.to}":
                    pairs.append((path, target))
    else:
        pairs = [(source, Path(args.destination))]
    failed = 0
    for path, target in _progress(pairs, "converting"):
        try:
            save(load(path), target, overwrite=args.overwrite)
            print(f"{path} -> {target}")
        except HypernetworkError as exc:
            failed += 1
            print(f"error: {exc}", file=sys.stderr)
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
def _width_overrides(values: list[str] | None) -> dict[int, list[float]]:
    overrides = {}
    for item in values or []:
        width, _sep, numbers = item.partition("=")
        try:  # without "=", numbers is "" and float("") refuses it too
            overrides[int(width)] = [float(x) for x in numbers.split(",")]
        except ValueError:
            raise InvalidConfigError(f"--width {item!r}: expected WIDTH=VALUE[,VALUE...], e.g. 768=0.8,0.2") from None
    return overrides


def _merge(args) -> int:
    from .formats import load, save
    from .ops.merge import add_difference, weighted_sum

    name = args.name or Path(args.output).stem
    overrides = _width_overrides(args.width)
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
    from .ops.bake import bake
    from .ops.checkpoints import read_unet, write_unet

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

    from .atomic import atomic_write_bytes
    from .ops.bake import export_lora
    from .ops.checkpoints import read_unet

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


def _device(args) -> str:
    import torch

    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _load_source(args, device: str | None = None):
    from .pipelines import load_model

    source = load_model(args.model, config=args.config, allow_download=args.allow_download)
    source.pipe.to(device or _device(args))
    return source


def _library(args):
    from .library import Library

    folders = list(args.hypernetwork_dir or [])
    if not folders and os.path.isdir(os.path.join("models", "hypernetworks")):
        folders.append(os.path.join("models", "hypernetworks"))
    return Library(folders)


def _multipliers(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InvalidConfigError(f"--grid {text!r}: expected comma-separated multipliers, e.g. -1,0,0.5,1") from None


def _generate(args) -> int:
    from .generate import GenerationSettings
    from .workflows import generate_with_tags, multiplier_grid, save_png

    library = _library(args)
    source = _load_source(args)
    settings = GenerationSettings(
        args.prompt, args.negative, args.steps, args.cfg, args.width, args.height, args.seed, args.batch
    )
    if args.grid:
        picture, outputs = multiplier_grid(source, library, [args.prompt], _multipliers(args.grid), settings)
        written = [save_png(picture, args.output, outputs[-1].infotext)]
        problems = sorted({p for o in outputs for p in o.problems})
        notes = sorted({n for o in outputs for n in o.notes})
    else:
        output = generate_with_tags(source, library, settings, force_mismatch=args.force, on_step=_step_printer(args))
        written = _write_images(output.images, args.output, output.infotext)
        problems, notes = output.problems, output.notes
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    for problem in problems:
        print(f"warning: {problem}", file=sys.stderr)
    for path in written:
        print(f"wrote {path}")
    return EXIT_PARTIAL if problems else EXIT_OK


def _step_printer(args):
    if args.quiet:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    bar = tqdm(total=args.steps, desc="sampling", unit="step", file=sys.stderr)

    def report(done: int, total: int) -> None:
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return report


def _write_images(images: list, output: str, parameters: str) -> list[str]:
    from .workflows import save_png

    if len(images) == 1:
        return [save_png(images[0], output, parameters)]
    stem, suffix = os.path.splitext(output)
    return [save_png(image, f"{stem}-{index}{suffix or '.png'}", parameters) for index, image in enumerate(images)]


def _training_options() -> list:
    import dataclasses

    from .training import TrainingConfig

    return [item for item in dataclasses.fields(TrainingConfig) if item.name != "hypernetwork_name"]


_TRAINING_HELP = {
    "learn_rate": "learning-rate schedule, e.g. '5e-5:100, 5e-6:1500, 1e-6'",
    "data_root": "dataset folder (images with optional .txt captions)",
    "log_directory": "logs, copies and previews go to <log>/<date>/<name>/",
    "steps": "max steps, counting earlier sessions",
    "template_filename": "prompt template: a name (ours or --template-dir) or a path",
    "optimizer": "AdamW, AdamW8bit, Lion, Prodigy, or any torch.optim class",
    "resume_from": "a saved copy to continue from (with its .optim sidecar when saved)",
}


def _add_training_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training options (TrainingConfig; same names, defaults and syntax as A1111)")
    for item in _training_options():
        flag = "--" + item.name.replace("_", "-")
        kind = item.type if isinstance(item.type, str) else item.type.__name__
        help_text = _TRAINING_HELP.get(item.name, "") + f" (default: {item.default!r})"
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


def _training_config(args, name: str):
    from .training import TrainingConfig, load_preset

    config = TrainingConfig(hypernetwork_name=name)
    if args.preset:
        config = load_preset(args.preset, base=config)
    given = {item.name: getattr(args, f"cfg_{item.name}") for item in _training_options()}
    config = config.replace(**{k: v for k, v in given.items() if v is not None})
    return config.check()


def _network_to_train(args, source):
    from .formats import load, save
    from .training.distributed import is_main
    from .workflows import new_network_for

    if args.network:
        return load(args.network), args.network
    if not args.create:
        if args.cfg_resume_from:
            return None, None
        raise InvalidConfigError("give --network FILE to train an existing network or --create NAME for a new one")
    structure = [float(x) for x in args.layer_structure.split(",")]
    dropout = [float(x) for x in args.dropout_structure.split(",")] if args.dropout_structure else None
    widths = [int(x) for x in args.widths.split(",")] if args.widths else None
    network = new_network_for(
        source,
        args.create,
        widths=widths,
        layer_structure=structure,
        activation=args.activation,
        weight_init=args.weight_init,
        layer_norm=args.layer_norm,
        dropout_structure=dropout,
        activate_output=args.activate_output,
        seed=args.init_seed,
    )
    path = os.path.join(args.output_dir, f"{args.create}.{args.format}")
    if is_main():  # under accelerate every process builds it; the engine starts all from the main one's weights
        save(network, path, overwrite=args.overwrite)
    return network, path


def _train(args) -> int:
    from .training import TrainingCallbacks, save_preset, train
    from .training.distributed import is_main
    from .workflows import training_backend

    device = _setup_processes(args)
    source = _load_source(args, device)
    network, path = _network_to_train(args, source)
    name = args.create or (network.name if network is not None else "")
    config = _training_config(args, name)
    if args.save_preset:
        save_preset(config, args.save_preset, overwrite=args.overwrite)
    main_process = is_main()
    callbacks = TrainingCallbacks(on_message=(lambda text: print(text, file=sys.stderr)) if main_process else None)
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
    return EXIT_OK if result.stopped in ("finished", "already trained") else EXIT_PARTIAL


def _setup_processes(args) -> str:
    """Under ``accelerate launch``/``torchrun`` every process gets its own device and joins the group."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return _device(args)
    from accelerate import PartialState

    state = PartialState(cpu=args.device == "cpu")
    return str(state.device)


def _demo(args) -> int:
    from .workflows import demo_report, run_demo

    source = _load_source(args)
    result = run_demo(args.output, source, steps=args.steps, seed=args.seed, log=lambda text: print(text, flush=True))
    print()
    print("\n".join(demo_report(result)))
    return EXIT_OK


# -- parser ---------------------------------------------------------------------------------------
def _subparser(commands, name: str, help_text: str, run) -> argparse.ArgumentParser:
    epilog = f"examples:\n{EXAMPLES[name]}" if name in EXAMPLES else None
    parser = commands.add_parser(
        name, help=help_text, description=help_text, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.set_defaults(run=run)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hypernetwork",
        description="Hypernetworks for Stable Diffusion: inspect, convert, merge, bake, export, train, generate.",
        epilog="Run 'hypernetwork COMMAND --help' for a command's options and examples.",
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
    merge.add_argument("networks", nargs="*", metavar="NETWORK[:WEIGHT]", help="weighted sum of these networks")
    merge.add_argument("--add-difference", nargs=3, metavar=("A", "B", "C"), help="A + (B - C) * multiplier")
    merge.add_argument("--multiplier", type=float, default=1.0, help="for --add-difference (default 1)")
    merge.add_argument(
        "--width", action="append", metavar="WIDTH=V[,V...]", help="other weights (or multiplier) for one width"
    )
    merge.add_argument("--name", help="internal name of the result (default: the output's stem)")
    merge.add_argument("--overwrite", action="store_true")

    bake = _subparser(
        commands, "bake", "fold networks into a checkpoint's key/value projections (exact for affine networks)", _bake
    )
    bake.add_argument("checkpoint", metavar="CHECKPOINT", help="single-file .safetensors/.ckpt or a diffusers folder")
    bake.add_argument("networks", nargs="+", metavar="NETWORK[:MULTIPLIER]")
    bake.add_argument("-o", "--output", required=True, help="new checkpoint (.safetensors, or a folder for diffusers)")
    bake.add_argument(
        "--approximate", action="store_true", help="fit affine maps to nonlinear networks and report the error"
    )
    bake.add_argument("--seed", type=int, default=0, help="seed of the fitting samples")

    export = _subparser(commands, "export-lora", "write the networks' weight delta as a LoRA file", _export_lora)
    export.add_argument("networks", nargs="+", metavar="NETWORK[:MULTIPLIER]")
    export.add_argument(
        "--model", required=True, help="the checkpoint the LoRA is for (its projection weights are needed)"
    )
    export.add_argument("-o", "--output", required=True)
    export.add_argument("--rank", type=int, help="truncate each delta to this rank (default: full rank, exact)")
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
    generate.add_argument(
        "--hypernetwork-dir", action="append", help="folder of networks (repeatable; default models/hypernetworks)"
    )
    generate.add_argument("--steps", type=int, default=20)
    generate.add_argument("--cfg", type=float, default=7.0, help="CFG scale")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--width", type=int)
    generate.add_argument("--height", type=int)
    generate.add_argument("--batch", type=int, default=1)
    generate.add_argument(
        "--grid", metavar="M1,M2,...", help="one image per multiplier (every tag's), tiled into one grid"
    )
    generate.add_argument("--force", action="store_true", help="apply networks made for another model family too")
    generate.add_argument("--quiet", action="store_true")
    _add_model_options(generate)

    train = _subparser(
        commands, "train", "train a network headless (one process, or data-parallel with accelerate launch)", _train
    )
    which = train.add_argument_group("the network")
    which.add_argument("--network", help="an existing network file to train (never overwritten)")
    which.add_argument("--create", metavar="NAME", help="create a new network first")
    which.add_argument("--widths", help="for --create: comma-separated widths (default: the model's)")
    which.add_argument("--layer-structure", default="1,2,1")
    which.add_argument("--activation", default="linear")
    which.add_argument("--weight-init", default="Normal")
    which.add_argument("--layer-norm", action="store_true")
    which.add_argument("--dropout-structure", help="e.g. 0,0.1,0")
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
    demo.add_argument("--output", default="hypernetwork-demo", help="a new run-* folder is made in here")
    demo.add_argument("--steps", type=int, default=600)
    demo.add_argument("--seed", type=int, default=0)
    _add_model_options(demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except HypernetworkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
