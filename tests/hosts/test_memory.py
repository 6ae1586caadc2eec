"""What the extension holds for the UNet in the real host (GET /hypernetworks/v1/memory), against the
figures worked out for the checkpoint's layout, and its release when the host unloads the checkpoint,
switches to another, or moves the UNet off its device (A1111's --medvram/--lowvram, Forge's and
reForge's memory manager). On a CPU-only machine the bytes are measured by the extension (its tensors'
storages) and, for the process, as resident memory; every figure is written to the artifacts.

Run the suite with A1111 started with ``--medvram`` or ``--lowvram`` (in HNX_HOST_LAUNCH) for the
release after sampling; the tests that need memory kept between generations skip there, saying so."""

from __future__ import annotations

import collections
import json
import os
import time
from pathlib import Path

import pytest

import hypernetwork_ext as hx
from hypernetwork_ext.families import ModelFamily
from hypernetwork_ext.fastpath import CONTEXTS_KEPT
from hypernetwork_ext.footprint import expected_bytes
from hypernetwork_ext.hosts.held_memory import MEDVRAM
from hypernetwork_ext.memory import mib
from tests.hosts import suite_files as files
from tests.hosts.real_host import TOLERANCE, max_difference

LINEAR = "<hypernet:hnx-linear:1.2>"  # after the session's plain prompt
# Hosts whose attention the extension hooks itself (A1111's ldm, SD.Next's diffusers UNet): affine networks
# are folded into the projections there; the UNet patchers of Forge, reForge and Forge Classic never fold.
FOLDING_HOSTS = ("a1111", "sdnext")
# Hosts whose memory manager tells the sampling's attention patches where it moves the UNet.
PATCHER_HOSTS = ("forge", "reforge", "forgeclassic")


def memory(suite) -> dict:
    return suite.server.get("/hypernetworks/v1/memory")


def low_vram_mode(suite) -> str | None:
    """``"medvram"`` or ``"lowvram"`` when A1111 runs with ``--medvram``/``--lowvram`` (it then moves the UNet
    off its device after sampling, and the extension lets go of what it keeps for it), else None."""
    if suite.kind != "a1111":
        return None
    flags = suite.server.get("/sdapi/v1/cmd-flags")
    return "lowvram" if flags.get("lowvram") else "medvram" if flags.get("medvram") else None


def needs_memory_kept(suite) -> None:
    mode = low_vram_mode(suite)
    if mode:
        pytest.skip(f"under --{mode} nothing is kept between generations (test_under_medvram_... checks that)")


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
    needs_memory_kept(suite)
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
    needs_memory_kept(suite)
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
    needs_memory_kept(suite)
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


def test_under_medvram_and_lowvram_nothing_stays_with_the_unet(suite):
    """A1111's --medvram/--lowvram move the UNet off its device after sampling, for the VAE. What the extension
    derived for it goes before (post_sample), at every generation, and the next one rebuilds it: the same
    image, A1111's own. --lowvram, which moves each UNet block onto the device for its call and off again,
    folds nothing (a fold would keep a block's weights there).

    On a CPU-only host (--use-cpu all) A1111 still sets its low-VRAM bookkeeping up (``sd_model.lowvram``,
    its forward hooks), but its moves go to the CPU, where everything already is: there this proves the
    release, its size, the absence of folds under --lowvram and the images in the real host, not that a
    GPU's memory comes free."""
    from tests.hosts.test_render import reference_for

    mode = low_vram_mode(suite)
    if mode is None:
        pytest.skip("A1111 started without --medvram/--lowvram (HNX_HOST_LAUNCH), or another host")
    layout, _ = checkpoint_layout(suite.checkpoint.path)
    network = hx.load(suite.config.hypernetwork_dir / files.SUITE_FOLDER / "hnx-linear.pt")
    element_size = 4 if suite.server.get("/sdapi/v1/cmd-flags").get("no_half") else 2
    expected = expected_bytes(network, layout, unet_element_size=element_size, folding=True)
    if mode == "lowvram":
        expected["folds"] = 0
    renders, generations = [], []
    for _ in range(2):
        started, rss_before = time.time(), resident_bytes(suite)
        renders.append(suite.server.txt2img(files.tagged(suite.plain, LINEAR)))
        report = memory(suite)
        released = [r for r in report["releases"] if r["reason"] == MEDVRAM and r["time"] >= started]
        generations.append({"report": report, "rss_before": rss_before, "rss_after": resident_bytes(suite)})
        record(suite, f"--{mode}", {"expected": expected, "generations": generations})
        assert report["total_bytes"] == 0 and report["folds"] == 0, report
        assert len(released) == 1, report["releases"]
        contexts = released[0]["bytes"] - sum(expected.values())  # the rewritten text contexts
        assert 0 < contexts <= context_bytes_bound(suite.checkpoint.context_width), (released[0], expected)
    assert f"released {mib(released[0]['bytes'])} held for the networks: {MEDVRAM}" in suite.server.log()
    assert max_difference(renders[1], renders[0]) <= TOLERANCE
    assert max_difference(renders[0], reference_for(suite, "linear", files.tagged(suite.plain, LINEAR))) <= TOLERANCE


def test_the_memory_managers_moves_reach_what_is_kept(suite):
    """Forge's and reForge's memory manager call ``to(device)`` on the sampling's attention patches when it
    loads the UNet or moves it off (``model_patches_to``): what the extension keeps follows, nothing stays on
    a device the UNet has left. On a CPU-only host every move is to the CPU, where everything already is:
    there this proves that the moves reach the extension in the real host and release nothing that is still
    where the UNet is, not that a GPU's memory comes free."""
    if suite.kind not in PATCHER_HOSTS:
        pytest.skip("Forge, reForge and Forge Classic only: their memory manager moves the UNet")
    started = time.time()
    suite.server.txt2img(files.tagged(suite.plain, LINEAR))
    report = memory(suite)
    moves = [move for move in report["moves"] if move["time"] >= started]
    record(suite, "memory manager moves", {"report": report, "rss": resident_bytes(suite)})
    assert moves, report
    held_on = {device for device, figures in report["devices"].items() if figures["total_bytes"]}
    assert held_on <= {moves[-1]["device"]}, (held_on, moves)
    if all(move["device"] == "cpu" for move in moves):
        assert report["total_bytes"] > 0 and not any(move["released_bytes"] for move in moves), report
