"""What a tag costs per generation in a running WebUI: whole txt2img requests over its HTTP API.

    python benchmarks/host_generation.py --url http://127.0.0.1:7860 --tag "<hypernet:NAME:0.8>"
    python benchmarks/host_generation.py --url URL --tag TAG --builtin   # A1111: its own code too

Variants, interleaved in a rotating order so that the machine's load falls on all of them alike:
- ``none``: the prompt without a tag;
- ``ours``: the prompt with the tag, handled by this extension;
- ``builtin`` (A1111 only, ``--builtin``): the same prompt on the same server, handled by A1111's
  own hypernetwork code: the extension's setting ``hypernetwork_builtin_handler`` hands the tag
  back to it for that request. One process, one loaded model, the same moment's load: the only
  difference between ``ours`` and ``builtin`` is the code that applies the network. (A second
  server beside the first would compete with it for the cores and memory; sequential servers would
  meet different loads on a shared machine.) The setting is switched through ``/sdapi/v1/options``
  and set back to off at the end, also after an error.

Each variant is timed at two step counts; ``time = fixed + per_step × steps`` is solved per round,
so the table separates what a tag costs once per generation (loading, folding, rewriting the
context: ``fixed``) from what it costs at every step (``per step``). Medians over rounds are printed
with their spread (lowest and highest round), and the machine's load average during the rounds.
The first request of each variant is a warm-up and not counted (it loads the network).

For A1111's own code the network must be a ``.pt`` in ``--hypernetwork-dir`` that its loader
accepts (files written by current torch need ``--disable-safe-unpickle``), with the file's name as
its internal name (A1111 reads it from disk again at every generation otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import urllib.request

BUILTIN_SETTING = "hypernetwork_builtin_handler"


def call(url: str, path: str, payload: dict | None = None, timeout: float = 3600):
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(
        url.rstrip("/") + path,
        data=data,
        headers={"Content-Type": "application/json"},
        method="GET" if payload is None else "POST",
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read() or b"null")


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
    started = time.perf_counter()
    call(url, "/sdapi/v1/txt2img", payload)
    return time.perf_counter() - started


class Handler:
    """Which code handles the tag: the extension, or A1111's own (the setting), switched only on change."""

    def __init__(self, url: str):
        self.url = url
        self.builtin: bool | None = None

    def use_builtin(self, builtin: bool) -> None:
        if builtin != self.builtin:
            call(self.url, "/sdapi/v1/options", {BUILTIN_SETTING: builtin})
            self.builtin = builtin


def variants(args) -> dict[str, tuple[str, bool]]:
    """name: (prompt, handled by A1111's own code)."""
    found = {"none": (args.prompt, False), "ours": (f"{args.prompt} {args.tag}", False)}
    if args.builtin:
        found["builtin"] = (f"{args.prompt} {args.tag}", True)
    return found


def check_builtin_setting(url: str) -> None:
    if BUILTIN_SETTING not in call(url, "/sdapi/v1/options"):
        raise SystemExit(
            f"--builtin needs A1111 with this extension ({BUILTIN_SETTING} is not among the server's options)"
        )


def measure(args) -> tuple[dict[str, list[tuple[float, float, float]]], list[float]]:
    """Per variant and round: (fixed seconds, seconds per step, whole request at --high steps); and
    the one-minute load average after each round."""
    chosen = variants(args)
    handler = Handler(args.url)
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in chosen}
    loads = []
    try:
        for prompt, builtin in chosen.values():  # warm-up: model, network, caches
            handler.use_builtin(builtin)
            txt2img(args.url, prompt, args.low, args.size, args.seed)
        names = list(chosen)
        for round_index in range(args.rounds):
            order = names[round_index % len(names) :] + names[: round_index % len(names)]
            timings = {name: {} for name in names}
            for steps in (args.low, args.high):
                for name in order:
                    prompt, builtin = chosen[name]
                    handler.use_builtin(builtin)
                    timings[name][steps] = txt2img(args.url, prompt, steps, args.size, args.seed)
            for name in names:
                low, high = timings[name][args.low], timings[name][args.high]
                per_step = (high - low) / (args.high - args.low)
                results[name].append((low - per_step * args.low, per_step, high))
            loads.append(os.getloadavg()[0])
            print(f"round {round_index + 1}/{args.rounds} (load {loads[-1]:.1f}): " + ", ".join(
                f"{name} {timings[name][args.low]:.2f}/{timings[name][args.high]:.2f} s" for name in names
            ), flush=True)  # fmt: skip
    finally:
        if args.builtin:
            Handler(args.url).use_builtin(False)
    return results, loads


def spread(values: list[float], form: str) -> str:
    """``median [lowest, highest]``, each formatted with ``form`` (e.g. ``.2f``, ``+.1%``)."""
    return f"{statistics.median(values):{form}} [{min(values):{form}}, {max(values):{form}}]"


def report(args, results, loads) -> str:
    base = results["none"]
    lines = [
        f"{args.size}x{args.size}, Euler, steps {args.low} and {args.high}, {args.rounds} rounds after a warm-up, "
        f"tag {args.tag}",
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}; "
        f"load average during the rounds: {spread(loads, '.1f')}",
        "medians over rounds [lowest, highest round]; extra: against the no-tag request of the same round",
        "",
        f"| variant | fixed per generation (s) | per step (s) | whole request, {args.high} steps (s) | "
        "extra per generation (s) | extra per step |",
        "|---|---|---|---|---|---|",
    ]
    for name, rows in results.items():
        fixed, step, whole = ([row[i] for row in rows] for i in range(3))
        line = f"| {name} | {spread(fixed, '.2f')} | {spread(step, '.3f')} | {spread(whole, '.2f')} |"
        if name == "none":
            lines.append(line + " | |")
            continue
        extra_fixed = [row[0] - b[0] for row, b in zip(rows, base, strict=True)]
        extra_step = [(row[1] - b[1]) / b[1] for row, b in zip(rows, base, strict=True)]
        lines.append(f"{line} {spread(extra_fixed, '+.2f')} | {spread(extra_step, '+.1%')} |")
    if "builtin" in results:
        extra_whole = {
            name: statistics.median(row[2] - b[2] for row, b in zip(results[name], base, strict=True))
            for name in ("ours", "builtin")
        }
        lines.append(
            f"\nextra time of a whole {args.high}-step request, medians: ours {extra_whole['ours']:+.2f} s, "
            f"A1111's own code {extra_whole['builtin']:+.2f} s"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="the WebUI with this extension, e.g. http://127.0.0.1:7860")
    parser.add_argument("--tag", required=True, help="e.g. '<hypernet:mynet:0.8>'")
    parser.add_argument(
        "--builtin", action="store_true", help=f"A1111: also time its own code, through the setting {BUILTIN_SETTING}"
    )
    parser.add_argument("--prompt", default="a red circle")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--low", type=int, default=2, help="the smaller step count")
    parser.add_argument("--high", type=int, default=8, help="the larger step count")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    if not 0 < args.low < args.high:
        parser.error("--low must be positive and smaller than --high")
    if args.builtin:
        check_builtin_setting(args.url)
    print(report(args, *measure(args)))


if __name__ == "__main__":
    main()
