"""Per-step cost of hypernetworks: A1111's way against ours, on SD-shaped ldm UNets.

    python benchmarks/inference.py            # SD1.5 at 256 and 512, SDXL-shaped at 256 (10-16 min, 2 cores)
    python benchmarks/inference.py --quick    # SD1.5 at 256, two networks (~2 min)
    python benchmarks/inference.py --threads 1 --clock cpu   # on a machine shared with other jobs

A "step" is one UNet forward under ``torch.no_grad`` with a CFG-sized batch of 2, on a real
``ldm.modules.diffusionmodules.openaimodel.UNetModel`` with random weights (zero-initialised layers
re-randomised so every block contributes). Attention runs through
``F.scaled_dot_product_attention`` like A1111's "sdp" optimisation (``--attention ldm`` keeps the
class's own einsum attention). Every step gets a fresh copy of the text context, as samplers
rebuild the conditioning batch with ``torch.cat`` at every step.

Variants, run interleaved in one process in a rotating order, each round timing one step of each:
- ``base``: no network;
- ``naive``: A1111's apply loop, written here independently: forward pre-hooks on every ``to_k`` and
  ``to_v`` that run ``x + module.linear(x) * m`` for each network, at every layer and step;
- ``ours``: ``hx.apply`` (folding, cached context, paired key/value GEMMs).

The table gives, per variant, the median over rounds of its overhead over ``base`` in the same
round, and ``ours/naive``, the share of A1111's overhead we still pay: first from whole steps
(the definition of the targets), then from the time spent inside the ``to_k``/``to_v`` calls,
where all the added work happens (timed in every variant, ``base`` included; on a machine that
other jobs keep busy the whole-step figures carry their noise, these far less). Both are
fractions of the base step. ``max diff`` compares our output with the naive one, relative to
the output's largest magnitude. ``first step`` is the extra time of the first step after
attaching (folding weights, rewriting the context): once per generation at most; ``folding`` is
the part of it spent folding, timed inside the library (``handle.stats["fold_seconds"]``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hypernetwork_ext as hx


@dataclass(frozen=True)
class Config:
    name: str
    latent: int
    context_width: int
    self_widths: tuple[int, ...]
    unet: dict
    depth: int = 1


SD15 = dict(
    model_channels=320,
    channel_mult=(1, 2, 4, 4),
    num_res_blocks=2,
    attention_resolutions=(4, 2, 1),
    num_heads=8,
    transformer_depth=1,
    context_dim=768,
)
# SDXL's attention layout (no attention at the first level, 64-wide heads, linear projections,
# 2048-wide context) with 2 transformer blocks per level instead of 2 and 10, to fit CPU time.
SDXL_SHAPED = dict(
    model_channels=320,
    channel_mult=(1, 2, 4),
    num_res_blocks=2,
    attention_resolutions=(2, 4),
    num_head_channels=64,
    transformer_depth=2,
    context_dim=[2048, 2048],
    use_linear_in_transformer=True,
)
TINY = dict(
    model_channels=32,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(1, 2),
    num_head_channels=8,
    transformer_depth=1,
    context_dim=48,
)
CONFIGS = {
    "sd15-256": Config("SD1.5, 256x256", 32, 768, (320, 640, 1280), SD15),
    "sd15-512": Config("SD1.5, 512x512", 64, 768, (320, 640, 1280), SD15),
    "sdxl-256": Config("SDXL-shaped, 256x256", 32, 2048, (640, 1280), SDXL_SHAPED, depth=2),
    "tiny": Config("tiny (script check)", 8, 48, (32, 64), TINY),
}
# Each network: (activation, layer norm). Structure 1,2,1 as A1111's default.
SCENARIOS = {
    "linear": [("linear", False)],
    "relu+LN": [("relu", True)],
    "3 stacked": [("relu", True), ("elu", False), ("swish", False)],
    "linear (fading)": [("linear", False)],
    "relu+LN (uncond 0)": [("relu", True)],
}
DEFAULT_PLAN = {
    "sd15-256": (["linear", "relu+LN", "3 stacked", "linear (fading)"], 3),
    "sd15-512": (["linear", "relu+LN"], 2),
    "sdxl-256": (["linear", "relu+LN"], 2),
}
QUICK_PLAN = {"sd15-256": (["linear", "relu+LN"], 2)}


# -- the model -----------------------------------------------------------------------------------
def build_unet(config: Config, attention: str, seed: int = 0) -> torch.nn.Module:
    from ldm.modules.attention import CrossAttention
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed(seed)
    model = UNetModel(
        image_size=config.latent,
        in_channels=4,
        out_channels=4,
        use_spatial_transformer=True,
        use_checkpoint=False,
        legacy=False,
        **config.unet,
    ).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for parameter in model.parameters():
            if torch.count_nonzero(parameter) == 0:  # zero_module layers would hide the attention blocks
                parameter.normal_(0.0, 0.05, generator=generator)
            parameter.requires_grad_(False)
    if attention == "sdp":
        for module in model.modules():
            if isinstance(module, CrossAttention):
                module.forward = types.MethodType(_sdp_attention, module)
    return model


def _sdp_attention(self, x, context=None, mask=None):
    """A1111's "sdp" cross-attention forward: the projections as modules, then torch's kernel."""
    heads = self.heads
    q = self.to_q(x)
    context = x if context is None else context
    k = self.to_k(context)
    v = self.to_v(context)
    batch, tokens, _ = q.shape
    q, k, v = (t.view(batch, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    return self.to_out(out.transpose(1, 2).reshape(batch, tokens, -1))


def make_network(widths, activation: str, layer_norm: bool, seed: int) -> hx.Hypernetwork:
    net = hx.create(widths, (1, 2, 1), activation, "XavierNormal", layer_norm=layer_norm, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.Linear):
                module.bias.normal_(0.0, 0.05, generator=generator)
    return net


# -- A1111's apply loop, written independently of hypernetwork_ext.attach ------------------------
class NaiveA1111:
    """Every network MLP on every to_k/to_v input at every step: ``x + linear(x) * m``."""

    def __init__(self, model: torch.nn.Module, entries: list[tuple[hx.Hypernetwork, float]]):
        self.model, self.entries, self.handles = model, entries, []
        self.uncond_rows: torch.Tensor | None = None
        self.uncond_factor = 1.0

    def attach(self) -> None:
        for module in self.model.modules():
            if hasattr(module, "to_k") and hasattr(module, "to_v"):
                self.handles.append(module.to_k.register_forward_pre_hook(self._hook(0)))
                self.handles.append(module.to_v.register_forward_pre_hook(self._hook(1)))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _hook(self, index: int):
        def hook(_module, args):
            x = y = args[0]
            for network, multiplier in self.entries:
                pair = network.layers.get(x.shape[-1])
                if pair is not None:
                    y = y.float()  # A1111 runs the networks in float32 (cond_cast_float)
                    y = y + pair[index].linear(y) * self._multiplier(multiplier, y)
            return (y.to(x.dtype),)

        return hook

    def _multiplier(self, multiplier: float, x: torch.Tensor):
        if self.uncond_rows is None or self.uncond_factor == 1.0:
            return multiplier
        rows = torch.where(self.uncond_rows, self.uncond_factor, 1.0) * multiplier
        return rows.to(x.device).reshape(-1, *([1] * (x.dim() - 1)))


# -- timing ----------------------------------------------------------------------------------------
class ProjectionTimer:
    """Time spent inside every to_k/to_v call, from before any other pre-hook to after the
    projection: all the work a hypernetwork adds happens there, in every variant. Its difference
    between variants is far less noisy than a difference of whole steps."""

    def __init__(self, model: torch.nn.Module, clock: Callable[[], float], enabled: bool = True):
        self.clock, self.total, self._started, self.enabled = clock, 0.0, [], enabled
        for module in model.modules() if enabled else ():
            if hasattr(module, "to_k") and hasattr(module, "to_v"):
                for projection in (module.to_k, module.to_v):
                    projection.register_forward_pre_hook(self._start, prepend=True)
                    projection.register_forward_hook(self._stop)

    def _start(self, _module, _args):
        self._started.append(self.clock())

    def _stop(self, _module, _args, _output):
        self.total += self.clock() - self._started.pop()


class Variant:
    def __init__(self, name: str, attach: Callable[[], None], remove: Callable[[], None], before_step=None):
        self.name, self.attach, self.remove = name, attach, remove
        self.before_step = before_step or (lambda: None)
        self.times: list[float] = []
        self.projection_times: list[float] = []


def one_step(model, inputs, variant: Variant, timer: ProjectionTimer) -> tuple[float, torch.Tensor]:
    x, timesteps, context, autocast_dtype = inputs
    fresh = [c.clone() for c in context] if isinstance(context, list) else context.clone()
    variant.before_step()
    variant.attach()
    try:
        half = torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype != torch.float32)
        with torch.no_grad(), half:
            timer.total = 0.0
            _synchronize(x.device)
            start = timer.clock()
            out = model(x, timesteps, context=fresh)
            _synchronize(x.device)
            elapsed = timer.clock() - start
    finally:
        variant.remove()
    variant.projection_times.append(timer.total)
    return elapsed, out


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def scenario_variants(name: str, model, config: Config, steps: int, device) -> tuple[Variant, Variant, object]:
    networks = [
        make_network((config.context_width, *config.self_widths), activation, layer_norm, seed=10 + i).to(device)
        for i, (activation, layer_norm) in enumerate(SCENARIOS[name])
    ]
    multipliers = [0.8, -0.5, 0.6][: len(networks)]
    naive = NaiveA1111(model, list(zip(networks, multipliers, strict=True)))
    if "uncond" in name:
        strengths = [hx.Strength(multiplier=m, uncond=0.0) for m in multipliers]
    elif "fading" in name:
        strengths = [hx.Strength(multiplier=m, fade_in=0.5) for m in multipliers]
    else:
        strengths = multipliers
    ours = hx.apply(model, list(zip(networks, strengths, strict=True)))
    ours.remove()
    naive_variant = Variant("naive", naive.attach, naive.remove)
    ours_variant = Variant("ours", ours.attach, ours.remove)
    rows = torch.tensor([True, False])
    if "uncond" in name:
        ours.runtime.uncond_rows = rows
        naive.uncond_rows, naive.uncond_factor = rows, 0.0
    if "fading" in name:
        # Every step inside the fade-in: new multipliers at every call, the case a fold cannot serve.
        progress = iter(i / (8 * (steps + 2)) for i in range(1, 10_000))

        def next_step():
            value = next(progress)
            ours.runtime.progress = value
            factor = min(1.0, value / 0.5)
            naive.entries = [(n, m * factor) for n, m in zip(networks, multipliers, strict=True)]

        naive_variant.before_step = ours_variant.before_step = next_step
    return naive_variant, ours_variant, ours


def bench_config(key: str, names: list[str], rounds: int, args) -> list[dict]:
    config = CONFIGS[key]
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    clock = time.process_time if args.clock == "cpu" and device.type == "cpu" else time.perf_counter
    started = time.perf_counter()
    # Half precision as hosts run it: under autocast, with the weights converted on a GPU (on a
    # CPU, torch's GroupNorm refuses half weights with the float32 inputs ldm gives it).
    weights_dtype = dtype if device.type == "cuda" else torch.float32
    model = build_unet(config, args.attention).to(device=device, dtype=weights_dtype)
    # Timing every projection on a GPU would need a synchronisation per call: whole steps only.
    timer = ProjectionTimer(model, clock, enabled=device.type == "cpu")
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, config.latent, config.latent, generator=generator).to(device, weights_dtype)
    context = torch.randn(2, 77, config.context_width, generator=generator).to(device, weights_dtype)
    timesteps = torch.tensor([500, 500], device=device)
    inputs = (x, timesteps, [context] * config.depth if config.depth > 1 else context, dtype)
    base = Variant("base", lambda: None, lambda: None)
    one_step(model, inputs, base, timer)  # warm-up
    scenarios = []
    for name in names:
        naive, ours, handle = scenario_variants(name, model, config, rounds, device)
        first, _ = one_step(model, inputs, ours, timer)  # folds, first context: once per generation
        one_step(model, inputs, ours, timer)
        scenarios.append((name, naive, ours, handle, first))
    # One round: every variant once, the order rotating from round to round; overheads are taken
    # against the base step of the same round.
    variants = [base] + [variant for _, naive, ours, _, _ in scenarios for variant in (naive, ours)]
    for variant in variants:  # forget the warm-up steps
        variant.times.clear()
        variant.projection_times.clear()
    outputs = {}
    for round_index in range(rounds):
        shift = round_index % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            elapsed, outputs[id(variant)] = one_step(model, inputs, variant, timer)
            variant.times.append(elapsed)
    rows = []
    for name, naive, ours, handle, first in scenarios:
        diff = None
        if "fading" not in name:  # there each step has its own multipliers
            naive_out, ours_out = outputs[id(naive)], outputs[id(ours)]
            diff = ((ours_out - naive_out).abs().max() / naive_out.abs().max()).float().item()
        rows.append(
            {
                "config": config.name,
                "scenario": name,
                "base_s": statistics.median(base.times),
                "naive": statistics.median(n / b - 1 for n, b in zip(naive.times, base.times, strict=True)),
                "ours": statistics.median(o / b - 1 for o, b in zip(ours.times, base.times, strict=True)),
                "naive_kv": _projection_overhead(naive, base) if timer.enabled else None,
                "ours_kv": _projection_overhead(ours, base) if timer.enabled else None,
                "first_step_extra_s": first - statistics.median(ours.times),
                "fold_s": handle.stats.get("fold_seconds", 0.0),
                "max_diff": diff,
                "stats": dict(handle.stats),
            }
        )
        print_row(rows[-1])
    print(f"  ({config.name}: {rounds} rounds, {time.perf_counter() - started:.0f} s)", flush=True)
    return rows


def _projection_overhead(variant: Variant, base: Variant) -> float:
    """Median over rounds of the extra time inside to_k/to_v calls, as a share of the base step."""
    return statistics.median(
        (v - b) / step for v, b, step in zip(variant.projection_times, base.projection_times, base.times, strict=True)
    )


def print_header() -> None:
    print(
        f"{'':22} {'':18} {'':>11} {'whole steps':^26} {'inside to_k/to_v':^26}\n"
        f"{'configuration':22} {'networks':18} {'step (base)':>11} {'naive':>7} {'ours':>7} {'ours/naive':>10} "
        f"{'naive':>7} {'ours':>7} {'ours/naive':>10} {'first step':>10} {'folding':>8} {'max diff':>9}"
    )


def print_row(row: dict) -> None:
    diff = "-" if row["max_diff"] is None else f"{row['max_diff']:.1e}"
    print(
        f"{row['config']:22} {row['scenario']:18} {row['base_s']:10.2f}s {row['naive']:+7.1%} "
        f"{row['ours']:+7.1%} {_ratio(row['ours'], row['naive']):10.2f} {_inside(row)} "
        f"{row['first_step_extra_s']:+9.2f}s {row['fold_s']:7.2f}s {diff:>9}",
        flush=True,
    )


def _inside(row: dict) -> str:
    if row["naive_kv"] is None:
        return f"{'-':>7} {'-':>7} {'-':>10}"
    return f"{row['naive_kv']:+7.1%} {row['ours_kv']:+7.1%} {_ratio(row['ours_kv'], row['naive_kv']):10.2f}"


def _ratio(ours: float, naive: float) -> float:
    return ours / naive if naive > 0 else float("nan")


# -- loading ----------------------------------------------------------------------------------------
def bench_loading(repeats: int) -> None:
    network = make_network(hx.network.DEFAULT_WIDTHS, "relu", False, seed=1)
    with tempfile.TemporaryDirectory() as folder:
        for suffix in (".pt", ".safetensors"):
            path = hx.save(network, os.path.join(folder, "default" + suffix))
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                hx.load(path)
                times.append(time.perf_counter() - start)
            size = os.path.getsize(path) / 2**20
            print(
                f"hx.load {suffix:13} {size:6.1f} MiB  median {statistics.median(times) * 1000:7.1f} ms  (n={repeats})"
            )


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="SD1.5 at 256x256 only, two networks, two rounds")
    parser.add_argument("--configs", help=f"comma-separated subset of {', '.join(CONFIGS)}")
    parser.add_argument("--scenarios", help=f"comma-separated subset of {', '.join(SCENARIOS)}")
    parser.add_argument("--rounds", type=int, help="timed rounds per scenario (default: per configuration)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="cpu: this process's CPU time; with --threads 1, robust on a machine other jobs keep busy",
    )
    parser.add_argument("--attention", choices=("sdp", "ldm"), default="sdp")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (the networks stay float32)")
    parser.add_argument(
        "--dtype", choices=("float32", "float16", "bfloat16"), default="float32", help="compute dtype (autocast)"
    )
    parser.add_argument("--no-load", action="store_true", help="skip the hx.load timing")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    plan = QUICK_PLAN if args.quick else DEFAULT_PLAN
    if args.configs:
        unknown = [key for key in args.configs.split(",") if key not in CONFIGS]
        if unknown:
            parser.error(f"unknown configuration {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")
        plan = {key: DEFAULT_PLAN.get(key, (list(SCENARIOS)[:2], 2)) for key in args.configs.split(",")}
    if args.scenarios:
        unknown = [name for name in args.scenarios.split(",") if name not in SCENARIOS]
        if unknown:
            parser.error(f"unknown scenario {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU: {_cpu_name()}"
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock, "
        f"{args.attention} attention, UNet in {args.dtype}, batch 2, {where}"
    )
    if not args.no_load:
        bench_loading(3 if args.quick else 5)
    print_header()
    rows = []
    for key, (names, rounds) in plan.items():
        if args.scenarios:
            names = args.scenarios.split(",")
        rows += bench_config(key, names, args.rounds or rounds, args)
    return rows


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        pass
    return f"{os.cpu_count()} cores"


if __name__ == "__main__":
    main()
