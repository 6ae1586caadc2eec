"""Schedules, options, presets, optimizers and dataset rules of the trainer (no model needed)."""

from __future__ import annotations

import random

import pytest
import torch

from hypernetwork_ext.errors import HypernetworkError, InvalidConfigError
from hypernetwork_ext.training.config import TrainingConfig, load_preset, save_preset
from hypernetwork_ext.training.data import CaptionBuilder, alpha_weight, bucket_size, filewords_for, split_validation
from hypernetwork_ext.training.optimizers import Lion, Prodigy, build_optimizer, optimizer_problem
from hypernetwork_ext.training.schedules import RateShape, StepSchedule


def test_schedule_follows_a1111():
    schedule = StepSchedule("5e-5:100, 5e-6:1500, 1e-6", 3000)
    assert [schedule.value_at(s) for s in (0, 99, 100, 1499, 1500, 2999)] == [5e-5, 5e-5, 5e-6, 5e-6, 1e-6, 1e-6]
    assert schedule.value_at(3000) is None
    assert StepSchedule("0.001:100", 1000).end_step == 100  # the host stops when the list runs out
    assert StepSchedule("0.01:-1, 0.5:5", 50).segments[-1].until == 50  # -1 ends the list
    assert StepSchedule("0.1:10, 0.2:99999", 50).segments[-1].until == 50
    for bad in ("", "fast", "1e-3:x", "1e-3:10, 1e-4:5", "1:2:3"):
        with pytest.raises(InvalidConfigError, match="schedule"):
            StepSchedule(bad, 100)


def test_warmup_and_cosine_restarts():
    shape = RateShape("cosine_with_restarts", warmup_steps=4, cycles=2, min_ratio=0.1, max_steps=24)
    assert shape.factor(0) == pytest.approx(0.2) and shape.factor(4) == pytest.approx(1.0)
    assert shape.factor(14) == pytest.approx(1.0)  # second cycle restarts at the top
    assert shape.factor(13) == pytest.approx(0.1, abs=0.05)


def test_config_problems_name_each_field_and_presets_round_trip(tmp_path):
    config = TrainingConfig(hypernetwork_name="x", data_root="d", batch_size=0, tag_drop_out=2.0, learn_rate="1e-3:q")
    problems = config.problems()
    assert set(problems) == {"batch_size", "tag_drop_out", "learn_rate"}
    assert TrainingConfig(optimizer="SGD", hypernetwork_name="x", data_root="d").problems() == {}
    assert "optimizer" in TrainingConfig(optimizer="Magic", hypernetwork_name="x", data_root="d").problems()
    with pytest.raises(InvalidConfigError, match="unknown training option"):
        TrainingConfig.from_dict({"learning_rate": 1})
    tuned = TrainingConfig(
        hypernetwork_name="a", data_root="/data", optimizer="Lion", learn_rate="3e-6", ema_decay=0.99
    )
    path = save_preset(tuned, tmp_path / "p.json")
    loaded = load_preset(path, base=TrainingConfig(hypernetwork_name="b", data_root="/other"))
    assert (loaded.optimizer, loaded.learn_rate, loaded.ema_decay) == ("Lion", "3e-6", 0.99)
    assert (loaded.hypernetwork_name, loaded.data_root) == ("b", "/other")  # places are not part of presets
    (tmp_path / "bad.json").write_text('{"options": {"batch_size": -3}}')
    with pytest.raises(HypernetworkError, match="batch_size"):
        load_preset(tmp_path / "bad.json")


def _run(optimizer_class, reference_class, kwargs, reference_kwargs, steps=25):
    torch.manual_seed(0)
    target = torch.randn(40)
    ours = torch.nn.Parameter(torch.randn(40))
    theirs = torch.nn.Parameter(ours.detach().clone())
    a, b = optimizer_class([ours], **kwargs), reference_class([theirs], **reference_kwargs)
    for _ in range(steps):
        for parameter, optimizer in ((ours, a), (theirs, b)):
            optimizer.zero_grad()
            ((parameter - target) ** 2).sum().backward()
            optimizer.step()
    return ours.detach(), theirs.detach(), target


def test_lion_matches_the_reference_package():
    from lion_pytorch import Lion as ReferenceLion

    ours, theirs, _ = _run(Lion, ReferenceLion, {"lr": 1e-2, "weight_decay": 0.1}, {"lr": 1e-2, "weight_decay": 0.1})
    torch.testing.assert_close(ours, theirs)


def test_prodigy_matches_the_reference_package_and_learns():
    from prodigyopt import Prodigy as ReferenceProdigy

    ours, theirs, target = _run(Prodigy, ReferenceProdigy, {"weight_decay": 0.01}, {"weight_decay": 0.01}, steps=60)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)
    torch.manual_seed(0)
    torch.randn(40)
    start = torch.randn(40)
    assert (ours - target).norm() < 0.5 * (start - target).norm()


def test_eight_bit_adamw_says_why_it_is_unavailable():
    problem = optimizer_problem("AdamW8bit")
    if problem is not None:
        assert "bitsandbytes" in problem or "CUDA" in problem
        with pytest.raises(InvalidConfigError, match="8-bit"):
            build_optimizer("AdamW8bit", [torch.nn.Parameter(torch.zeros(1))], 1e-3, weight_decay=0, betas=(0.9, 0.99))


def test_captions_filewords_buckets_weights_and_split(tmp_path):
    builder = CaptionBuilder(["a [filewords] by [name]"], "me", shuffle_tags=True, tag_drop_out=0.5, keep_tags=1)
    for seed in range(10):
        text = builder.build("first,b,c,d", random.Random(seed))
        assert text.startswith("a first") and text.endswith(" by me")
    image = tmp_path / "0012-red-circle.png"
    image.write_bytes(b"")
    assert filewords_for(str(image)) == "red-circle"
    assert filewords_for(str(image), r"[a-z]+", " ") == "red circle"
    (tmp_path / "0012-red-circle.txt").write_text("a tagged caption\n")
    assert filewords_for(str(image)) == "a tagged caption"
    assert bucket_size(1024, 512, 512 * 512, 64) == (704, 320)
    assert bucket_size(512, 512, 512 * 512, 64) == (512, 512)
    alpha = torch.zeros(64, 64)
    alpha[:, 32:] = 1.0
    weight = alpha_weight(alpha, (8, 8))
    assert weight.shape == (1, 8, 8) and weight.mean().item() == pytest.approx(1.0)
    assert weight[0, :, 0].max() == 0 and torch.equal(alpha_weight(torch.ones(64, 64), (8, 8)), torch.ones(1, 8, 8))
    train, held = split_validation(10, 0.2, seed=3)
    assert len(held) == 2 and sorted(train + held) == list(range(10)) and split_validation(10, 0.2, 3)[1] == held
