"""What the extension holds for the UNet in the real host (GET /hypernetworks/v1/memory), against the
figures worked out for the checkpoint's layout, and its release when the host unloads the checkpoint
or switches to another. On a CPU-only machine the bytes are measured by the extension (its tensors'
storages) and, for the process, as resident memory; every figure is written to the artifacts."""

from __future__ import annotations

import collections
import json
import os
from pathlib import Path

import hypernetwork_ext as hx
from hypernetwork_ext.families import ModelFamily
from hypernetwork_ext.fastpath import CONTEXTS_KEPT
from hypernetwork_ext.footprint import expected_bytes
from tests.hosts import suite_files as files
from tests.hosts.real_host import TOLERANCE, max_difference

LINEAR = "<hypernet:hnx-linear:1.2>"  # after the session's plain prompt
# Hosts whose attention the extension hooks itself (A1111's ldm, SD.Next's diffusers UNet): affine networks
# are folded into the projections there; the UNet patchers of Forge, reForge and Forge Classic never fold.
FOLDING_HOSTS = ("a1111", "sdnext")


def memory(suite) -> dict:
    return suite.server.get("/hypernetworks/v1/memory")


def resident_bytes(suite) -> int:
    """The largest resident set among the server's processes (its launcher runs it in one of them)."""
    session = suite.server.process.pid
    largest = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) != session:  # the session id: the server runs in a session of its own
                continue
            pages = int((entry / "statm").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue
        largest = max(largest, pages * os.sysconf("SC_PAGE_SIZE"))
    return largest


def checkpoint_layout(path: Path) -> tuple[ModelFamily, int]:
    """The checkpoint's attention layout as a family, and the elements of one set of folds."""
    from safetensors import safe_open

    file, prefix = files.unet_file(path)  # a single file, or a diffusers folder (SD.Next)
    counts: collections.Counter[int] = collections.Counter()
    context, elements = None, 0
    with safe_open(str(file), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118
            if not key.startswith(prefix) or not key.endswith(("to_k.weight", "to_v.weight")):
                continue
            out_features, in_features = handle.get_slice(key).get_shape()
            if ".attn2." in key:
                context = in_features
            else:
                elements += out_features * (in_features + 1)
                counts[in_features] += key.endswith("to_k.weight")
    return ModelFamily(
        "checkpoint", "checkpoint", context, tuple(sorted(counts)), tuple(sorted(counts.items()))
    ), elements


def context_bytes_bound(context_width: int, networks: int = 1) -> int:
    """The most the context cache holds for ``networks`` networks: ``CONTEXTS_KEPT`` contexts (cond and
    uncond apart), each with its copy, the host's tensor it was seen as, and a key and a value per
    network, all of 77 tokens in float32. Hosts keep different numbers of them: A1111 and Forge 12
    tensors (2.7 MiB) on sd15-seed0, Forge Classic 18 (4.1 MiB) on sd15-seed1, so a fixed 4 MiB passed
    in one and failed in the other."""
    return CONTEXTS_KEPT * (2 + 2 * networks) * 77 * context_width * 4


def record(suite, name: str, figures: dict) -> None:
    path = suite.config.artifacts / "memory.json"
    found = json.loads(path.read_text()) if path.exists() else {}
    found[name] = figures
    path.write_text(json.dumps(found, indent=1))
    print(f"{name}: {json.dumps(figures)}")


def test_what_the_network_holds_is_what_was_worked_out(suite):
    rss_before = resident_bytes(suite)
    suite.server.txt2img(files.tagged(suite.plain, LINEAR))
    report = memory(suite)
    layout, elements = checkpoint_layout(suite.checkpoint.path)
    network = hx.load(suite.config.hypernetwork_dir / files.SUITE_FOLDER / "hnx-linear.pt")
    held = report["devices"]["cpu"]
    folding = suite.kind in FOLDING_HOSTS
    element_size = held["folds"] // elements if folding else 4
    expected = expected_bytes(network, layout, unet_element_size=element_size, folding=folding)
    record(suite, "held after a linear network", {"report": report, "expected": expected, "rss": rss_before})
    if folding:
        assert held["folds"] == elements * element_size and element_size in (2, 4)
        assert report["folds"] == 2 * sum(blocks for _, blocks in layout.self_attention_layers)
    for kind, nbytes in expected.items():
        assert held[kind] == nbytes, (kind, held[kind], nbytes)
    assert 0 < held["contexts"] <= context_bytes_bound(suite.checkpoint.context_width), held
    assert held["old_unet_weights"] == 0
    assert report["line"] in suite.server.log()


def test_unloading_the_checkpoint_lets_it_go(suite):
    first = suite.server.txt2img(files.tagged(suite.plain, LINEAR))
    held = memory(suite)["total_bytes"]
    rss_before = resident_bytes(suite)
    suite.server.post("/sdapi/v1/unload-checkpoint")
    report = memory(suite)
    rss_after = resident_bytes(suite)
    suite.server.post("/sdapi/v1/reload-checkpoint")
    again = suite.server.txt2img(files.tagged(suite.plain, LINEAR))
    record(
        suite,
        "unload-checkpoint",
        {"held": held, "after": report, "rss_before": rss_before, "rss_after": rss_after},
    )
    assert held > 0 and report["total_bytes"] == 0
    assert any(r["bytes"] == held and r["reason"] == "the checkpoint was unloaded" for r in report["releases"])
    assert max_difference(again, first) <= TOLERANCE
    assert memory(suite)["total_bytes"] == held  # rebuilt by the next generation


def test_a_checkpoint_switch_lets_it_go(suite):
    suite.server.txt2img(files.tagged(suite.plain, LINEAR))
    held = memory(suite)["total_bytes"]
    link = files.second_name_for(suite.checkpoint)
    suite.server.post("/sdapi/v1/refresh-checkpoints")
    original = files.loaded_title(suite.server, suite.checkpoint)
    other = files.title_for(suite.server, link)
    try:
        suite.server.switch_checkpoint(other)
        suite.server.txt2img(suite.plain)  # Forge loads the checkpoint it was switched to here
        report = memory(suite)
    finally:
        suite.server.switch_checkpoint(original)
        files.remove_checkpoint(link)
        suite.server.post("/sdapi/v1/refresh-checkpoints")
    record(suite, "checkpoint switch", {"held": held, "after": report})
    assert held > 0 and report["total_bytes"] == 0
    assert any(r["bytes"] == held for r in report["releases"]), report["releases"]
    suite.before_tags = suite.server.txt2img(suite.plain)  # as test_routes does after its switch
