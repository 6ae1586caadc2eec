"""Per-step cost of hypernetworks: A1111's way against ours, on SD-shaped ldm UNets.

    python benchmarks/inference.py            # SD1.5 at 256 and 512, SDXL-shaped at 256 (~10 min, 2 cores)
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

The table gives the median over rounds of each variant's overhead over ``base`` in the same
round, and ``ours/naive``, the share of A1111's overhead we still pay; ``(min-based)`` is that
ratio from each variant's fastest step, which other jobs on the machine can only slow down.
``max diff`` compares our output with the naive one, relative to the output's largest magnitude.
``first step`` is the extra time of the first step after attaching (folding weights, computing
the context once).
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
CONFIGS = {
    "sd15-256": Config("SD1.5, 256x256", 32, 768, (320, 640, 1280), SD15),
    "sd15-512": Config("SD1.5, 512x512", 64, 768, (320, 640, 1280), SD15),
    "sdxl-256": Config("SDXL-shaped, 256x256", 32, 2048, (640, 1280), SDXL_SHAPED, depth=2),
}
# Each network: (activation, layer norm). Structure 1,2,1 as A1111's default.
SCENARIOS = {
    "linear": [("linear", False)],
    "relu+LN": [("relu", True)],
    "3 stacked": [("relu", True), ("elu", False), ("swish", False)],
    "linear, fading": [("linear", False)],
    "relu+LN, uncond 0": [("relu", True)],
}
DEFAULT_PLAN = {
    "sd15-256": (["linear", "relu+LN", "3 stacked", "linear, fading"], 3),
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
            x = args[0]
            for network, multiplier in self.entries:
                pair = network.layers.get(x.shape[-1])
                if pair is not None:
                    x = x + pair[index].linear(x) * self._multiplier(multiplier, x)
            return (x,)

        return hook

    def _multiplier(self, multiplier: float, x: torch.Tensor):
        if self.uncond_rows is None or self.uncond_factor == 1.0:
            return multiplier
        rows = torch.where(self.uncond_rows, self.uncond_factor, 1.0) * multiplier
        return rows.reshape(-1, *([1] * (x.dim() - 1)))


# -- timing ----------------------------------------------------------------------------------------
class Variant:
    def __init__(self, name: str, attach: Callable[[], None], remove: Callable[[], None], before_step=None):
        self.name, self.attach, self.remove = name, attach, remove
        self.before_step = before_step or (lambda: None)
        self.times: list[float] = []


def one_step(model, inputs, variant: Variant, clock) -> tuple[float, torch.Tensor]:
    x, timesteps, context = inputs
    fresh = [c.clone() for c in context] if isinstance(context, list) else context.clone()
    variant.before_step()
    variant.attach()
    try:
        with torch.no_grad():
            start = clock()
            out = model(x, timesteps, context=fresh)
            elapsed = clock() - start
    finally:
        variant.remove()
    return elapsed, out


def scenario_variants(name: str, model, config: Config, steps: int) -> tuple[Variant, Variant, object]:
    networks = [
        make_network((config.context_width, *config.self_widths), activation, layer_norm, seed=10 + i)
        for i, (activation, layer_norm) in enumerate(SCENARIOS[name])
    ]
    multipliers = [0.8, -0.5, 0.6][: len(networks)]
    naive = NaiveA1111(model, list(zip(networks, multipliers, strict=True)))
    if name.endswith("uncond 0"):
        strengths = [hx.Strength(multiplier=m, uncond=0.0) for m in multipliers]
    elif name.endswith("fading"):
        strengths = [hx.Strength(multiplier=m, fade_in=0.5) for m in multipliers]
    else:
        strengths = multipliers
    ours = hx.apply(model, list(zip(networks, strengths, strict=True)))
    ours.remove()
    naive_variant = Variant("naive", naive.attach, naive.remove)
    ours_variant = Variant("ours", ours.attach, ours.remove)
    rows = torch.tensor([True, False])
    if name.endswith("uncond 0"):
        ours.runtime.uncond_rows = rows
        naive.uncond_rows, naive.uncond_factor = rows, 0.0
    if name.endswith("fading"):
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
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    started = time.perf_counter()
    model = build_unet(config, args.attention)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, config.latent, config.latent, generator=generator)
    context = torch.randn(2, 77, config.context_width, generator=generator)
    inputs = (x, torch.tensor([500, 500]), [context] * config.depth if config.depth > 1 else context)
    base = Variant("base", lambda: None, lambda: None)
    one_step(model, inputs, base, clock)  # warm-up
    scenarios = []
    for name in names:
        naive, ours, handle = scenario_variants(name, model, config, rounds)
        first, _ = one_step(model, inputs, ours, clock)  # folds, first context: once per generation
        steady, _ = one_step(model, inputs, ours, clock)
        scenarios.append((name, naive, ours, handle, first - steady))
    # One round: every variant once, the order rotating from round to round; overheads are taken
    # against the base step of the same round.
    variants = [base] + [variant for _, naive, ours, _, _ in scenarios for variant in (naive, ours)]
    outputs = {}
    for round_index in range(rounds):
        shift = round_index % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            elapsed, outputs[id(variant)] = one_step(model, inputs, variant, clock)
            variant.times.append(elapsed)
    rows = []
    for name, naive, ours, handle, first_extra in scenarios:
        diff = None
        if not name.endswith("fading"):  # there each step has its own multipliers
            naive_out, ours_out = outputs[id(naive)], outputs[id(ours)]
            diff = ((ours_out - naive_out).abs().max() / naive_out.abs().max()).item()
        rows.append(
            {
                "config": config.name,
                "scenario": name,
                "base_s": statistics.median(base.times),
                "naive": statistics.median(n / b - 1 for n, b in zip(naive.times, base.times, strict=True)),
                "ours": statistics.median(o / b - 1 for o, b in zip(ours.times, base.times, strict=True)),
                "naive_min": min(naive.times) / min(base.times) - 1,
                "ours_min": min(ours.times) / min(base.times) - 1,
                "first_step_extra_s": first_extra,
                "max_diff": diff,
                "stats": dict(handle.stats),
            }
        )
        print_row(rows[-1])
    print(f"  ({config.name}: {rounds} rounds, {time.perf_counter() - started:.0f} s)", flush=True)
    return rows


def print_header() -> None:
    print(
        f"{'configuration':22} {'networks':18} {'step (base)':>11} {'naive':>7} {'ours':>7} "
        f"{'ours/naive':>10} {'(min-based)':>11} {'first step':>10} {'max diff':>9}"
    )


def print_row(row: dict) -> None:
    diff = "-" if row["max_diff"] is None else f"{row['max_diff']:.1e}"
    print(
        f"{row['config']:22} {row['scenario']:18} {row['base_s']:10.2f}s {row['naive']:+7.1%} "
        f"{row['ours']:+7.1%} {_ratio(row['ours'], row['naive']):10.2f} "
        f"{_ratio(row['ours_min'], row['naive_min']):11.2f} {row['first_step_extra_s']:+9.2f}s {diff:>9}",
        flush=True,
    )


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


def main(argv: list[str] | None = None) -> None:
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
    parser.add_argument("--no-load", action="store_true", help="skip the hx.load timing")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    plan = QUICK_PLAN if args.quick else DEFAULT_PLAN
    if args.configs:
        plan = {key: DEFAULT_PLAN.get(key, (list(SCENARIOS)[:2], 2)) for key in args.configs.split(",")}
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock, "
        f"{args.attention} attention, batch 2, CPU: {_cpu_name()}"
    )
    if not args.no_load:
        bench_loading(3 if args.quick else 5)
    print_header()
    for key, (names, rounds) in plan.items():
        if args.scenarios:
            names = args.scenarios.split(",")
        bench_config(key, names, args.rounds or rounds, args)


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
