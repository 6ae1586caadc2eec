"""A1111's own hypernetwork trainer against this extension's, in one running A1111 1.10.1.

    python benchmarks/host_training.py --url http://127.0.0.1:7870 --pid SERVER_PID --data /tmp/set --make-data

Both trainers train a fresh network of the same shape (relu, structure 1,2,1, Normal init, widths
768/320/640/1280) on the same captioned images, at the same size, batch, learning rate, template and
step count, one run after the other in the same server (one process, one loaded model), in a
rotating order (A1111, ours, then ours, A1111, ...) so that the machine's load falls on both alike:

- ``a1111``: A1111's own trainer through its API (``/sdapi/v1/create/hypernetwork``, then
  ``/sdapi/v1/train/hypernetwork``: its Train tab's code), followed through ``/sdapi/v1/progress``.
  It needs torch < 2.2 (its ``GroupedBatchSampler`` fails on later versions).
- ``ours``: this extension's trainer through its routes (``/hypernetworks/v1/create``, ``/train``,
  ``/jobs/{id}``), with A1111's options where both have one (no caption dropout, latents once).

Each run is followed by polling: the moment each step is first seen, the server's CPU time then (every
process of its session: ``--pid`` names one), its resident memory throughout. Seconds a step are
counted from the end of step ``--warmup`` to the last step (the first steps pay caches and the
allocator's growth); *extra resident* is the run's peak less the server's resident memory just
before it. Medians over the runs with the spread [lowest, highest], the load average named.

``--make-data`` draws candidate pictures (the extension's procedural shapes, captioned) and keeps the
first ``--images`` whose captions the server renders finitely without a network (a random checkpoint's
text encoder overflows on some captions, and A1111's NaN check refuses their images): a training run
on such a caption would test the checkpoint, not the trainers.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

NETWORK = {"layer_structure": [1, 2, 1], "activation_func": "relu", "weight_init": "Normal", "add_layer_norm": False,
           "use_dropout": False, "enable_sizes": [768, 320, 640, 1280], "overwrite_old": True}  # fmt: skip
LOSS = re.compile(r"Loss:\s*([-+0-9.eE]+|nan|inf|-inf)", re.IGNORECASE)
TRAINERS = ("a1111", "ours")


def call(url: str, path: str, payload: dict | None = None, timeout: float = 7200):
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(
        url.rstrip("/") + path, data=data, headers={"Content-Type": "application/json"},
        method="GET" if payload is None else "POST",
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read() or b"null")


# -- the server's processes ---------------------------------------------------------------------------
def _session_processes(pid: int) -> list[Path]:
    """/proc entries of every process in ``pid``'s session (the launcher may run the server in a child)."""
    session = _stat_fields(Path(f"/proc/{pid}"))[3]
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(entry)
            if fields and fields[3] == session:
                found.append(entry)
    return found


def _stat_fields(entry: Path) -> list[str]:
    """The fields of /proc/PID/stat after the command name (state is [0], session [3], utime [11])."""
    try:
        return (entry / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def resident_bytes(pid: int) -> int:
    total = 0
    for entry in _session_processes(pid):
        with contextlib.suppress(OSError, IndexError, ValueError):
            total += int((entry / "statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return total


def cpu_seconds(pid: int) -> float:
    ticks = 0
    for entry in _session_processes(pid):
        fields = _stat_fields(entry)
        if len(fields) > 12:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


# -- one run ------------------------------------------------------------------------------------------
@dataclass
class Run:
    trainer: str
    marks: list[tuple[int, float, float]] = field(default_factory=list)  # (step, wall, cpu) when first seen
    losses: dict[int, float] = field(default_factory=dict)
    rss_before: int = 0
    rss_peak: int = 0
    rss_after: int = 0
    loads: list[float] = field(default_factory=list)
    outcome: str = ""
    seed: int | None = None  # ours: the run's seed (its noise, timesteps and initial weights)

    def mark(self, step: int | None, cpu: float) -> None:
        if step is not None and step > 0 and (not self.marks or step > self.marks[-1][0]):
            self.marks.append((step, time.perf_counter(), cpu))


def per_step(marks: list[tuple[int, float, float]], warmup: int) -> tuple[float, float] | None:
    """(wall, CPU) seconds a step from the first mark at or after step ``warmup`` to the last one;
    None when fewer than two marks lie there (the run stopped early)."""
    counted = [mark for mark in marks if mark[0] >= warmup]
    if len(counted) < 2:
        return None
    (first_step, first_wall, first_cpu), (last_step, last_wall, last_cpu) = counted[0], counted[-1]
    steps = last_step - first_step
    return (last_wall - first_wall) / steps, (last_cpu - first_cpu) / steps


def follow(run: Run, pid: int, poll, done, interval: float) -> None:
    """Poll until ``done()``: ``poll()`` gives (step, loss or None); resident memory and load sampled."""
    while True:
        finished = done()
        step, loss = poll()
        run.mark(step, cpu_seconds(pid))
        if step and loss is not None:
            run.losses[step] = loss
        run.rss_peak = max(run.rss_peak, resident_bytes(pid))
        run.loads.append(os.getloadavg()[0])
        if finished:
            return
        time.sleep(interval)


def a1111_run(args, data: Path, name: str, seed: int) -> Run:
    """A1111 draws its noise and timesteps from the global RNG: ``seed`` is not its to take."""
    run = Run("a1111", rss_before=resident_bytes(args.pid))
    call(args.url, "/sdapi/v1/create/hypernetwork", {"name": name, **NETWORK})
    log_root = data.parent / f"{data.name}-log"
    # A1111 makes its log folder only when it saves copies or previews; this run does neither
    (log_root / datetime.datetime.now().strftime("%Y-%m-%d") / name).mkdir(parents=True, exist_ok=True)
    body = {
        "id_task": f"hnx-bench-{name}", "hypernetwork_name": name, "learn_rate": args.learn_rate,
        "batch_size": 1, "gradient_step": 1, "data_root": str(data), "log_directory": str(log_root),
        "training_width": args.size, "training_height": args.size, "varsize": False, "steps": args.steps, "clip_grad_mode": "disabled",
        "clip_grad_value": "0.1", "shuffle_tags": False, "tag_drop_out": 0, "latent_sampling_method": "once",
        "use_weight": False, "create_image_every": 0, "save_hypernetwork_every": 0,
        "template_filename": args.template, "preview_from_txt2img": False, "preview_prompt": "",
        "preview_negative_prompt": "", "preview_steps": 20, "preview_sampler_name": "Euler", "preview_cfg_scale": 7,
        "preview_seed": -1, "preview_width": args.size, "preview_height": args.size,
    }  # fmt: skip
    answer: dict = {}
    worker = threading.Thread(target=lambda: answer.update(call(args.url, "/sdapi/v1/train/hypernetwork", body)))
    worker.start()

    def poll():
        state = call(args.url, "/sdapi/v1/progress?skip_current_image=true")
        step = state["state"].get("job_no") if state["state"].get("job") == "train-hypernetwork" else None
        found = LOSS.search(state.get("textinfo") or "")
        return step, float(found.group(1)) if found else None

    follow(run, args.pid, poll, lambda: not worker.is_alive(), args.interval)
    worker.join()
    run.outcome = answer.get("info", "no answer")
    run.rss_after = resident_bytes(args.pid)
    return run


def our_run(args, data: Path, name: str, seed: int) -> Run:
    run = Run("ours", rss_before=resident_bytes(args.pid), seed=seed)
    call(args.url, "/hypernetworks/v1/create", {"name": name, "weight_init_seed": seed, **NETWORK})
    body = {
        "hypernetwork_name": name, "learn_rate": args.learn_rate, "batch_size": 1, "gradient_step": 1,
        "data_root": str(data), "log_directory": str(data.parent / f"{data.name}-log"),
        "training_width": args.size, "training_height": args.size, "steps": args.steps,
        "latent_sampling_method": "once", "create_image_every": 0, "save_hypernetwork_every": 0,
        "template_filename": args.template, "caption_dropout": 0.0, "seed": seed,
        "save_training_settings_to_txt": False,
    }  # fmt: skip
    job = call(args.url, "/hypernetworks/v1/train", body)["job_id"]
    status: dict = {}

    def poll():
        status.update(call(args.url, f"/hypernetworks/v1/jobs/{job}?history=false"))
        return status.get("step"), status.get("last_loss")

    follow(run, args.pid, poll, lambda: status.get("state") not in (None, "queued", "running"), args.interval)
    run.outcome = f"{status.get('state')}: {status.get('message') or status.get('error') or ''}".strip()
    run.rss_after = resident_bytes(args.pid)
    return run


# -- the data set ------------------------------------------------------------------------------------
def renders_finitely(url: str, caption: str) -> str | None:
    """None when A1111 renders ``caption`` (no network) finitely, else why not (its NaN check's answer)."""
    payload = {"prompt": caption, "seed": 1, "steps": 4, "width": 64, "height": 64, "sampler_name": "Euler",
               "send_images": False, "save_images": False}  # fmt: skip
    try:
        call(url, "/sdapi/v1/txt2img", payload)
    except urllib.error.HTTPError as exc:
        body = exc.read().decode(errors="replace")
        if "nan" in body.lower():
            return body[:200]
        raise
    return None


def make_data(url: str, folder: Path, count: int, size: int, seed: int) -> list[str]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from hypernetwork_ext.standalone.tiny import procedural_images

    candidates = folder.with_name(f"{folder.name}-candidates")
    for path in (folder, candidates):
        shutil.rmtree(path, ignore_errors=True)
    folder.mkdir(parents=True)
    kept = []
    for image in procedural_images(candidates, 3 * count, seed=seed, colour="red", size=size):
        caption = image.with_suffix(".txt").read_text()
        if caption in kept:
            continue
        reason = renders_finitely(url, caption)
        if reason:
            print(f"dropped {caption!r}: {reason}", flush=True)
            continue
        kept.append(caption)
        for path in (image, image.with_suffix(".txt")):
            shutil.copy2(path, folder / path.name)
        if len(kept) == count:
            break
    shutil.rmtree(candidates)
    if len(kept) < count:
        raise SystemExit(f"the server renders only {len(kept)} of the candidate captions finitely")
    return kept


# -- the report ----------------------------------------------------------------------------------------
def spread(values: list[float], form: str) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):{form}} [{min(values):{form}}, {max(values):{form}}]"


def order_of(round_index: int) -> tuple[str, ...]:
    return TRAINERS if round_index % 2 == 0 else TRAINERS[::-1]


def summarise(runs: list[Run], warmup: int) -> dict[str, dict]:
    """Per trainer: the runs' seconds a step (wall, CPU), extra and peak resident GiB, loads, NaN steps."""
    gib = 1 << 30
    table = {}
    for trainer in TRAINERS:
        mine = [run for run in runs if run.trainer == trainer]
        timed = [t for t in (per_step(run.marks, warmup) for run in mine) if t is not None]
        table[trainer] = {
            "wall": [t[0] for t in timed],
            "cpu": [t[1] for t in timed],
            "extra_gib": [(run.rss_peak - run.rss_before) / gib for run in mine],
            "peak_gib": [run.rss_peak / gib for run in mine],
            "loads": [load for run in mine for load in run.loads],
            "nan_steps": [sorted(s for s, loss in run.losses.items() if loss != loss) for run in mine],
            "last_steps": [run.marks[-1][0] if run.marks else 0 for run in mine],
            "outcomes": [run.outcome for run in mine],
            "seeds": [run.seed for run in mine],
        }
    return table


def report(args, table: dict[str, dict]) -> str:
    lines = [
        f"{args.size}x{args.size}, batch 1, relu 1,2,1, learn rate {args.learn_rate}, {args.steps} steps a run "
        f"(seconds a step from step {args.warmup} on), template {args.template}",
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "medians over runs [lowest, highest]",
        "",
        "| trainer | runs | s/step (wall) | CPU s/step | x A1111 (wall) | extra resident GiB | peak resident GiB "
        "| load average | steps with a NaN loss |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    base = statistics.median(table["a1111"]["wall"]) if table["a1111"]["wall"] else None
    for trainer, row in table.items():
        ratio = f"{base / statistics.median(row['wall']):.2f}" if base and row["wall"] else "-"
        nans = "; ".join(",".join(map(str, steps)) or "none" for steps in row["nan_steps"])
        lines.append(
            f"| {trainer} | {len(row['outcomes'])} | {spread(row['wall'], '.2f')} | {spread(row['cpu'], '.2f')} | "
            f"{ratio} | {spread(row['extra_gib'], '.2f')} | {spread(row['peak_gib'], '.2f')} | "
            f"{spread(row['loads'], '.1f')} | {nans} |"
        )
    lines.append("")
    for trainer, row in table.items():
        for index, (outcome, last) in enumerate(zip(row["outcomes"], row["last_steps"], strict=True)):
            seed = "" if row["seeds"][index] is None else f" (seed {row['seeds'][index]})"
            lines.append(f"{trainer} run {index + 1}{seed}: reached step {last}; {outcome}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="A1111 (torch < 2.2) with this extension and --api")
    parser.add_argument("--pid", type=int, required=True, help="a process of the server (its session is measured)")
    parser.add_argument("--data", type=Path, required=True, help="captioned images (.png + .txt)")
    parser.add_argument("--make-data", action="store_true", help="draw the images into --data first (emptied)")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the timing")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each trainer")
    parser.add_argument("--learn-rate", default="0.00001")
    parser.add_argument("--template", default="hypernetwork.txt")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--retries", type=int, default=0,
        help="ours stops at a non-finite loss (A1111 trains on with it): run it again with the next seed, up to N times",
    )  # fmt: skip
    parser.add_argument("--interval", type=float, default=0.25, help="seconds between polls")
    parser.add_argument("--json", type=Path, help="also write every run's marks and the table here")
    args = parser.parse_args(argv)
    if not 0 <= args.warmup < args.steps - 1:
        parser.error("--warmup must leave at least two steps to time")
    if args.make_data:
        print("captions:", make_data(args.url, args.data, args.images, args.size, args.seed), flush=True)
    runs = []
    for round_index in range(args.rounds):
        for trainer in order_of(round_index):
            name = f"hnx-bench-{trainer}"
            run = (a1111_run if trainer == "a1111" else our_run)(args, args.data, name, args.seed)
            for retry in range(1, args.retries + 1):
                if trainer != "ours" or per_step(run.marks, args.warmup) is not None:
                    break
                print(f"round {round_index + 1} ours stopped before it could be timed ({run.outcome}); again with "
                      f"seed {args.seed + retry}", flush=True)  # fmt: skip
                run = our_run(args, args.data, name, args.seed + retry)
            runs.append(run)
            timed = per_step(run.marks, args.warmup)
            print(
                f"round {round_index + 1} {trainer}: {timed[0] if timed else float('nan'):.2f} s/step, "
                f"CPU {timed[1] if timed else float('nan'):.2f} s/step, extra resident "
                f"{(run.rss_peak - run.rss_before) / (1 << 30):.2f} GiB, load {statistics.median(run.loads):.1f}, "
                f"losses {run.losses}; {run.outcome}",
                flush=True,
            )
    table = summarise(runs, args.warmup)
    print(report(args, table))
    if args.json:
        args.json.write_text(json.dumps({"table": table, "runs": [vars(run) for run in runs]}, indent=1))
    return table


if __name__ == "__main__":
    main()
