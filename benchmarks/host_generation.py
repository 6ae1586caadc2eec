"""What a tag costs per generation in a running WebUI: whole txt2img requests over its HTTP API.

    python benchmarks/host_generation.py --url http://127.0.0.1:7860 --tag "<hypernet:NAME:0.8>"
    python benchmarks/host_generation.py --url URL --tag TAG --builtin-url http://127.0.0.1:7870  # A1111 only

Variants, interleaved in a rotating order so that the machine's load falls on all of them alike:
- ``none``: the prompt without a tag;
- ``ours``: the prompt with the tag, on the server at ``--url`` (this extension installed);
- ``builtin``: the same prompt on ``--builtin-url``, a second A1111 started without this extension
  (``--disable-extra-extensions``), whose own hypernetwork code then handles the tag.

Each variant is timed at two step counts; ``time = fixed + per_step × steps`` is solved per round,
so the table separates what a tag costs once per generation (loading, folding, rewriting the
context: ``fixed``) from what it costs at every step (``per step``). Ratios are of medians over
rounds. The first request of each variant is a warm-up and not counted (it loads the network).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import urllib.request


def txt2img(url: str, prompt: str, steps: int, size: int, seed: int) -> float:
    payload = {
        "prompt": prompt,
        "seed": seed,
        "steps": steps,
        "width": size,
        "height": size,
        "sampler_name": "Euler",
        "cfg_scale": 7,
        "send_images": False,
        "save_images": False,
    }
    request = urllib.request.Request(
        url.rstrip("/") + "/sdapi/v1/txt2img",
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=3600) as response:
        response.read()
    return time.perf_counter() - started


def variants(args) -> dict[str, tuple[str, str]]:
    found = {"none": (args.url, args.prompt), "ours": (args.url, f"{args.prompt} {args.tag}")}
    if args.builtin_url:
        found["builtin"] = (args.builtin_url, f"{args.prompt} {args.tag}")
    return found


def measure(args) -> dict[str, list[tuple[float, float]]]:
    """Per variant and round: (fixed seconds, seconds per step)."""
    chosen = variants(args)
    for url, prompt in chosen.values():
        txt2img(url, prompt, args.low, args.size, args.seed)  # warm-up: model, network, caches
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in chosen}
    names = list(chosen)
    for round_index in range(args.rounds):
        order = names[round_index % len(names) :] + names[: round_index % len(names)]
        timings = {name: {} for name in names}
        for steps in (args.low, args.high):
            for name in order:
                url, prompt = chosen[name]
                timings[name][steps] = txt2img(url, prompt, steps, args.size, args.seed)
        for name in names:
            per_step = (timings[name][args.high] - timings[name][args.low]) / (args.high - args.low)
            results[name].append((timings[name][args.low] - per_step * args.low, per_step))
        print(f"round {round_index + 1}/{args.rounds}: " + ", ".join(
            f"{name} {timings[name][args.low]:.2f}/{timings[name][args.high]:.2f} s" for name in names
        ), flush=True)  # fmt: skip
    return results


def report(args, results) -> str:
    median = {name: tuple(statistics.median(r[i] for r in rows) for i in (0, 1)) for name, rows in results.items()}
    base_fixed, base_step = median["none"]
    lines = [
        f"{args.size}x{args.size}, steps {args.low} and {args.high}, {args.rounds} rounds, tag {args.tag}",
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "",
        "| variant | fixed per generation (s) | per step (s) | extra per generation | extra per step |",
        "|---|---|---|---|---|",
    ]
    for name, (fixed, step) in median.items():
        lines.append(
            f"| {name} | {fixed:.2f} | {step:.3f} | {fixed - base_fixed:+.2f} s | "
            f"{(step - base_step) / base_step:+.1%} |"
        )
    if "builtin" in median:
        ours, builtin = median["ours"][1] - base_step, median["builtin"][1] - base_step
        share = ours / builtin if builtin > 0 else float("nan")
        lines.append(f"\nours/builtin, extra time per step: {share:.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="the WebUI with this extension, e.g. http://127.0.0.1:7860")
    parser.add_argument("--tag", required=True, help="e.g. '<hypernet:mynet:0.8>'")
    parser.add_argument("--builtin-url", help="an A1111 without this extension, for its built-in hypernetworks")
    parser.add_argument("--prompt", default="a red circle")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--low", type=int, default=2, help="the smaller step count")
    parser.add_argument("--high", type=int, default=8, help="the larger step count")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    if not 0 < args.low < args.high:
        parser.error("--low must be positive and smaller than --high")
    print(report(args, measure(args)))


if __name__ == "__main__":
    main()
