"""Training does what it is for, on the pretrained tiny model (not only "the loss falls"): a fresh
network recovers most of a planted teacher's effect, and learns a style on prompts outside its
dataset, on the SDXL-shaped model too. The measurements are those of benchmarks/efficacy.py, on a
small budget of steps."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.fixtures import one_torch_thread  # noqa: F401 (autouse fixture)
from tests.support.scripts import script_module

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "efficacy.py"


@pytest.fixture(scope="module")
def bench():
    with script_module(SCRIPT, "bench_efficacy") as module:
        yield module


@pytest.fixture(scope="module")
def small(bench):
    return bench.Setup(["sd1"], 0.0, 0.0, train_pictures=16, held_out_captions=4, held_out_seeds=(7, 8), checkpoints=1)


@pytest.fixture(scope="module")
def source(bench):
    return bench.load_variant("sd1")


def test_a_fresh_network_recovers_most_of_a_planted_teachers_effect(bench, source, tmp_path):
    setup = bench.Setup(["sd1"], 0.0, 0.0, 32, 4, (7, 8), 1, teacher_steps=300)
    planted = bench.plant(source, tmp_path, setup)
    assert bench.pixel_distance(planted.none_pictures, planted.teacher_pictures) > 20  # the teacher shows
    trained = bench.train_for(source, planted.data, tmp_path / "student", 1e9, 1, max_steps=300)
    pixel, eps = bench.recovery(planted, trained.final)
    # 68% and 62% here (the full benchmark: 74-77% and 71-74%, docs/efficacy.md); a random teacher
    # planted the same way was recovered not at all
    assert pixel > 0.5 and eps > 0.5, (pixel, eps)
    untrained_pixel, untrained_eps = bench.recovery(planted, bench.new_network(source, "fresh", seed=1))
    assert abs(untrained_pixel) < 0.1 and abs(untrained_eps) < 0.1  # a fresh network is no network


def test_a_network_learns_the_night_style_on_prompts_outside_its_dataset(bench, small, source, tmp_path):
    task = bench.style_task(source, tmp_path, small)
    assert task.none_share < 0.05 and task.dataset_share > 0.7
    trained = bench.train_for(source, task.data, tmp_path / "student", 1e9, 1, max_steps=200)
    share, shapes = bench.style_scores(source, task.prompts, task.seeds, [(trained.final, 1.0)])
    # 0% without the network; 56% of the dataset's share after these 200 steps here (94% after 180 s in
    # docs/efficacy.md)
    assert share > 0.4 * task.dataset_share, (share, shapes, task.dataset_share)
    assert shapes >= 0.25, (share, shapes)  # the prompt's shape still shows (3 of 8 pictures here)


def test_the_style_survives_guidance_on_the_sdxl_shaped_model(bench, small, tmp_path):
    """SDXL samples an empty negative prompt as zeros: trained without that pass (no caption dropout)
    the network's style vanished under CFG (0.4% of the pixels after 90 s, docs/efficacy.md)."""
    source = bench.load_variant("sdxl")
    task = bench.style_task(source, tmp_path, small)
    assert task.none_share < 0.05
    trained = bench.train_for(source, task.data, tmp_path / "student", 1e9, 1, max_steps=300)
    share, _shapes = bench.style_scores(source, task.prompts, task.seeds, [(trained.final, 1.0)])
    # 41% of the dataset's share after these 300 steps here (93% after 180 s in docs/efficacy.md)
    assert share > 0.2 * task.dataset_share, (share, task.dataset_share)


def test_the_script_prints_its_tables(bench, capsys):
    results = bench.main(["--quick", "--variants", "sd1", "--skip-options", "--threads", "1"])
    printed = capsys.readouterr().out
    assert "Planted-network recovery" in printed and "Style transfer" in printed and "Machine:" in printed
    assert results["planted"]["sd1"]["curve"] and results["style"]["sd1"]["dataset"] > 0.7
