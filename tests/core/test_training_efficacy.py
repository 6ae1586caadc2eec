"""Training does what it is for, on the pretrained tiny model: a network learns a style on prompts
outside its dataset (not only "the loss falls"); recovering a planted teacher's effect is the aim
not met yet (a strict xfail: it turns into a failure the day it passes, to be made a plain test).
The measurements are those of benchmarks/efficacy.py, on a small budget of steps."""

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


@pytest.mark.xfail(
    strict=True,
    reason="not met yet: on the trained tiny model a fresh network recovers -28%..-8% of a planted XavierNormal "
    "teacher's pixel effect and 1-4% in eps space within 90 s (docs/efficacy.md); the issue aims at 70%",
)
def test_a_fresh_network_recovers_most_of_a_planted_teachers_effect(bench, small, source, tmp_path):
    planted = bench.plant(source, tmp_path, small)
    assert bench.pixel_distance(planted.none_pictures, planted.teacher_pictures) > 10  # the teacher shows
    trained = bench.train_for(source, planted.data, tmp_path / "student", 1e9, 1, max_steps=200)
    pixel, eps = bench.recovery(planted, trained.final)
    assert pixel > 0.5 and eps > 0.5, (pixel, eps)
    untrained_pixel, untrained_eps = bench.recovery(planted, bench.new_network(source, "fresh", seed=1))
    assert abs(untrained_pixel) < 0.1 and abs(untrained_eps) < 0.1  # a fresh network is no network


def test_a_network_learns_the_night_style_on_prompts_outside_its_dataset(bench, small, source, tmp_path):
    task = bench.style_task(source, tmp_path, small)
    assert task.none_share < 0.05 and task.dataset_share > 0.7
    trained = bench.train_for(source, task.data, tmp_path / "student", 1e9, 1, max_steps=200)
    share, shapes = bench.style_scores(source, task.prompts, task.seeds, [(trained.final, 1.0)])
    # 0% without the network; 57% of the dataset's share after these 200 steps here (68% after 90 s in
    # docs/efficacy.md; the aim of 80% is not met yet)
    assert share > 0.4 * task.dataset_share, (share, shapes, task.dataset_share)
    assert shapes >= 0.375, (share, shapes)  # the prompt's shape still shows (5 of 8 pictures here)


def test_the_script_prints_its_tables(bench, capsys):
    results = bench.main(["--quick", "--variants", "sd1", "--skip-options", "--threads", "1"])
    printed = capsys.readouterr().out
    assert "Planted-network recovery" in printed and "Style transfer" in printed and "Machine:" in printed
    assert results["planted"]["sd1"]["curve"] and results["style"]["sd1"]["dataset"] > 0.7
