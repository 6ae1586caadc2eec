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
from .errors import HypernetworkError, InvalidConfigError

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


def _inspect(args) -> int:
    records, failed = [], 0
    for path in args.files:
        try:
            records.append(_inspect_record(path))
        except HypernetworkError as exc:
            failed += 1
            print(f"error: {exc}", file=sys.stderr)
    if args.json:
        print(json.dumps([{k: v for k, v in r.items() if k != "description"} for r in records], indent=2))
    else:
        for record in records:
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
    return _batch_exit(failed, max(len(pairs), 1)) if pairs else EXIT_OK


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
        width, sep, numbers = item.partition("=")
        try:
            overrides[int(width)] = [float(x) for x in numbers.split(",")]
        except ValueError:
            raise InvalidConfigError(f"--width {item!r}: expected WIDTH=VALUE[,VALUE...], e.g. 768=0.8,0.2") from None
        if not sep:
            raise InvalidConfigError(f"--width {item!r}: expected WIDTH=VALUE[,VALUE...]")
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


def _demo(args) -> int:
    from .network import create
    from .tiny import TINY_WIDTHS

    network = create(TINY_WIDTHS, (1, 2, 1), "relu", seed=args.seed, name="demo")
    print(network.describe())
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

    demo = _subparser(commands, "demo", "run the main job on the embedded default model", _demo)
    demo.add_argument("--seed", type=int, default=0)
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
