"""What the fast paths keep between generations, measured per model family on full-size layouts.

    python benchmarks/fold_memory.py                      # SD1.5 and SDXL, float16 and float32 UNets (~2 min)
    python benchmarks/fold_memory.py --families sd15 --check-step   # and one whole SD1.5 UNet step (3.4 GB)

Each family's UNet is built from its configuration on the meta device (SD1.5: ldm's ``UNetModel``
as A1111 loads it; SDXL: diffusers' ``UNet2DConditionModel`` with SDXL's layout: attention at 640
and 1280 channels, 2 and 10 transformer blocks deep, a 2048-wide context), then its attention
key/value projections alone get real random weights in the UNet's dtype. Every projection is then
called once as a sampling step calls it (self-attention on hidden states of its width,
cross-attention on a 77-token context, a batch of 2 as with CFG), through the path each host uses
(``--device cuda`` puts the projections on a GPU, where the allocator's growth is measured too):

- ``a1111``: ``hx.apply`` (pre-hooks, and folded projections for affine networks);
- ``forge``: the rewriter behind Forge's and reForge's attention patches (nothing is folded there).

The first layers of key/value pairs are batched as on a GPU. What is measured afterwards: the bytes
the fast paths hold (``memory()``, each storage counted once), by kind; the growth over the calls
of the process's resident memory (CPU) or of the allocator's memory (GPU), which also counts the
calls' outputs (a few MiB) and, on a CPU, what folding allocated on the way; with the default fold limit (256 MiB), how many projections
stay unfolded and the largest difference between their outputs and the unbounded fold's, relative
to the output's largest value. ``--check-step`` also runs one whole step of the real SD1.5 UNet in
float32 (64x64 px) and compares what it holds with the projection-level figure.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hypernetwork_ext as hx
from hypernetwork_ext import fastpath
from hypernetwork_ext.attach import KVRewriter, find_attention_sites
from hypernetwork_ext.families import ModelFamily
from hypernetwork_ext.footprint import expected_bytes
from hypernetwork_ext.memory import DEFAULT_FOLD_LIMIT, MiB


@dataclass
class Family:
    label: str
    widths: tuple[int, ...]  # the network's: context width first
    build: object  # () -> the UNet on the meta device


def sd15_unet():
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    return UNetModel(
        image_size=64, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
        num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
        transformer_depth=1, context_dim=768, legacy=False, use_checkpoint=False,
    )  # fmt: skip


def sdxl_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )  # fmt: skip


def tiny_unet():  # for the script's own test
    from tests.support import models as M

    return M.ldm_unet(0)


FAMILIES = {
    "sd15": Family("SD1.5", (768, 320, 640, 1280), sd15_unet),
    "sdxl": Family("SDXL", (2048, 640, 1280), sdxl_unet),
    "tiny": Family("tiny (script check)", (48, 32, 64), tiny_unet),
}
NETWORKS = {"linear": "linear", "relu": "relu"}  # activation; structure 1,2,1 as A1111's default
TOKENS = 16  # hidden-state rows per batch row: what is kept does not depend on them
CONTEXT_TOKENS = 77


def resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def in_use(device: torch.device) -> int:
    """What the allocator has handed out on a GPU; the process's resident memory on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.memory_allocated(device)
    return resident_bytes()


def with_projection_weights(family: Family, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """The UNet's layout with random weights in its attention key/value projections only."""
    if family.build is tiny_unet:
        return tiny_unet().to(device=device, dtype=dtype)
    with torch.device("meta"):
        model = family.build()
    generator = torch.Generator().manual_seed(seed)
    for site in find_attention_sites(model):
        for projection in (site.key_projection, site.value_projection):
            projection.to_empty(device="cpu")
            with torch.no_grad():
                projection.weight.copy_(torch.randn(projection.weight.shape, generator=generator) * 0.02)
                if projection.bias is not None:
                    projection.bias.zero_()
            projection.to(device=device, dtype=dtype)
    return model


def site_inputs(model, dtype: torch.dtype, device: torch.device, seed: int = 1) -> list[tuple[object, torch.Tensor]]:
    """Hidden states of each self-attention's width; one text context shared by every cross-attention."""
    generator = torch.Generator().manual_seed(seed)
    inputs, contexts = [], {}
    for site in find_attention_sites(model):
        width = site.key_projection.in_features
        if site.kind == "cross":
            if width not in contexts:
                contexts[width] = torch.randn(2, CONTEXT_TOKENS, width, generator=generator).to(device, dtype)
            inputs.append((site, contexts[width]))
        else:
            inputs.append((site, torch.randn(2, TOKENS, width, generator=generator).to(device, dtype)))
    return inputs


def family_layout(model) -> ModelFamily:
    """The UNet's attention layout as a family (the full-size ones equal families.FAMILIES')."""
    sites = find_attention_sites(model)
    counts = collections.Counter(s.key_projection.in_features for s in sites if s.kind == "self")
    context = next(s.key_projection.in_features for s in sites if s.kind == "cross")
    return ModelFamily("measured", "measured", context, tuple(sorted(counts)), tuple(sorted(counts.items())))


def call_projections(inputs) -> list[torch.Tensor]:
    outputs = []
    with torch.no_grad():
        for site, x in inputs:
            outputs += [site.key_projection(x), site.value_projection(x)]
    return outputs


def measure_a1111(model, inputs, network, limit: int | None, device) -> tuple[hx.Attachment, list, int]:
    before = in_use(device)
    handle = hx.apply(model, [(network, 0.8)], fold_limit=limit)
    outputs = call_projections(inputs)
    handle.remove()  # the end of the generation: what stays is what the next one finds
    return handle, outputs, in_use(device) - before


def measure_forge(inputs, network, device) -> tuple[KVRewriter, int]:
    before = in_use(device)
    rewriter = KVRewriter([(network, hx.Strength(0.8))])
    with torch.no_grad():
        for site, x in inputs:
            rewriter.rewrite_pair(x, x, kind=site.kind, block=site.block)
    return rewriter, in_use(device) - before


def relative_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    scale = max(float(t.abs().max()) for t in b) or 1.0
    return max(float((x.float() - y.float()).abs().max()) for x, y in zip(a, b, strict=True)) / scale


def row(family: Family, dtype: torch.dtype, network_name: str, args) -> list[dict]:
    device = torch.device(args.device)
    model = with_projection_weights(family, dtype, device)
    inputs = site_inputs(model, dtype, device)
    network = hx.create(family.widths, (1, 2, 1), NETWORKS[network_name], "XavierNormal", seed=3)
    rows = []
    handle, unbounded, rss = measure_a1111(model, inputs, network, None, device)
    held = handle.memory()
    fold_seconds = handle.stats.get("fold_seconds", 0.0)
    handle.release()
    limited_handle, limited, _ = measure_a1111(model, inputs, network, args.limit, device)
    limited_held = limited_handle.memory()
    unfolded = limited_handle.stats.get("unfolded_over_limit", 0)
    limited_handle.release()
    layout = family_layout(model)
    on_gpu = expected_bytes(network, layout, unet_element_size=dtype.itemsize)
    rows.append(
        dict(
            family=family.label, dtype=str(dtype).replace("torch.", ""), network=network_name, host="a1111",
            kinds=held.kinds(), total=held.total, folds=held.folds, rss=rss, fold_seconds=fold_seconds,
            gpu=sum(on_gpu.values()),
            limited_folds=limited_held.kinds()["folds"], limited_count=limited_held.folds, unfolded_calls=unfolded,
            limited_diff=relative_difference(limited, unbounded),
        )
    )  # fmt: skip
    rewriter, rss = measure_forge(inputs, network, device)
    forge_held = rewriter.memory()
    rows.append(
        dict(
            family=family.label, dtype=str(dtype).replace("torch.", ""), network=network_name, host="forge",
            kinds=forge_held.kinds(), total=forge_held.total, folds=0, rss=rss,
            gpu=sum(expected_bytes(network, layout, unet_element_size=dtype.itemsize, folding=False).values()),
        )
    )  # fmt: skip
    return rows


def check_step(limit: int | None) -> None:
    """One whole step of the real SD1.5 UNet (float32, 64x64 px, batch 2) against the projection-level
    measurement of the same network."""
    from benchmarks.inference import CONFIGS, build_unet

    model = build_unet(CONFIGS["sd15-256"], "sdp")
    network = hx.create(FAMILIES["sd15"].widths, (1, 2, 1), "linear", "XavierNormal", seed=3)
    generator = torch.Generator().manual_seed(2)
    x, context = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 77, 768, generator=generator)
    with hx.apply(model, [(network, 0.8)], fold_limit=limit) as handle, torch.no_grad():
        model(x, torch.tensor([500, 500]), context=context)
    step = handle.memory()
    handle.release()
    cpu = torch.device("cpu")
    projections, _, _ = measure_a1111(model, site_inputs(model, torch.float32, cpu), network, limit, cpu)
    level = projections.memory()
    print(f"\nwhole SD1.5 UNet step (float32, 64x64): held {step.total / MiB:.1f} MiB {_kinds(step.kinds())}")
    print(f"the same network, projection level:      held {level.total / MiB:.1f} MiB {_kinds(level.kinds())}")
    kinds = ("folds", "network_copies", "composites", "paired_layers")
    print("equal by kind (text contexts differ with the context's length):", all(
        step.kinds()[k] == level.kinds()[k] for k in kinds
    ))  # fmt: skip


def _kinds(kinds: dict) -> str:
    return ", ".join(f"{k} {v / MiB:.1f}" for k, v in kinds.items() if v)


def print_rows(rows: list[dict], limit: int | None) -> None:
    limit_text = "no limit" if limit is None else f"{limit / MiB:.0f} MiB"
    print(
        "| family | UNet dtype | network | host | folds (one set) | composed matrices | paired first layers "
        "| network copies | text contexts | total | on a GPU (worked out) | growth (CPU: RSS; GPU: allocated) "
        "| folding, once "
        f"| with the limit ({limit_text}): folds kept | unfolded calls | max diff |"
    )
    print("|" + "---|" * 16)
    for r in rows:
        k = r["kinds"]
        limited = (
            f"{r['limited_folds'] / MiB:.1f} MiB ({r['limited_count']} of {r['folds']}) | {r['unfolded_calls']} "
            f"| {r['limited_diff']:.1e}"
            if r["host"] == "a1111" and r["folds"]
            else "- | - | -"
        )
        fold_time = f"{r['fold_seconds']:.2f} s" if r.get("fold_seconds") else "-"
        print(
            f"| {r['family']} | {r['dtype']} | {r['network']} | {r['host']} | {k['folds'] / MiB:.1f} MiB "
            f"| {k['composites'] / MiB:.1f} MiB | {k['paired_layers'] / MiB:.1f} MiB "
            f"| {k['network_copies'] / MiB:.1f} MiB | {k['contexts'] / 1024:.0f} KiB | {r['total'] / MiB:.1f} MiB "
            f"| {r['gpu'] / MiB:.1f} MiB "
            f"| {r['rss'] / MiB:.0f} MiB | {fold_time} | {limited} |"
        )


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default="sd15,sdxl", help=f"comma-separated subset of {', '.join(FAMILIES)}")
    parser.add_argument("--dtypes", default="float16,float32", help="the UNet's dtypes")
    parser.add_argument("--networks", default="linear,relu", help=f"subset of {', '.join(NETWORKS)}")
    parser.add_argument("--limit-mib", type=int, default=DEFAULT_FOLD_LIMIT // MiB, help="the fold limit compared")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument(
        "--device", default="cpu", help="cpu, cuda, cuda:1 ... (the networks stay on the CPU, as loaded)"
    )
    parser.add_argument("--check-step", action="store_true", help="also one whole SD1.5 UNet step (3.4 GB)")
    args = parser.parse_args(argv)
    args.limit = args.limit_mib * MiB
    torch.set_num_threads(args.threads)
    fastpath.Engine.batch_first_layers = True  # as on a GPU
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"torch {torch.__version__}, {where}, first layers batched as on a GPU")
    rows = []
    started = time.monotonic()
    for key in args.families.split(","):
        for dtype_name in args.dtypes.split(","):
            for network_name in args.networks.split(","):
                rows += row(FAMILIES[key], getattr(torch, dtype_name), network_name, args)
    print_rows(rows, args.limit)
    print(f"({time.monotonic() - started:.0f} s)")
    if args.check_step:
        check_step(None)
    fastpath.Engine.batch_first_layers = None
    return rows


if __name__ == "__main__":
    main()
