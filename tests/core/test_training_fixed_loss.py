"""The loss at fixed noise (``fixed_loss_every``): the training images at the same noise, timesteps and
captions each time, so it tells learning from the swing of each step's random timestep; measuring it
changes nothing about the run itself."""

from __future__ import annotations

import pytest
import torch

import hypernetwork_ext as hx
from hypernetwork_ext.training import LdmBackend, TrainingCallbacks, TrainingConfig, train
from hypernetwork_ext.training.jobs import JobStatus
from tests.support.fixtures import one_torch_thread  # noqa: F401 (autouse fixture)
from tests.support.models import LDM_WIDTHS
from tests.support.training_models import LDM_CONTEXT, dataset_folder, tiny_latent_diffusion, training_config


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return dataset_folder(tmp_path_factory.mktemp("data"), 4)


def run(tmp_path, data, **changes):
    path = tmp_path / "style.pt"
    hx.save(hx.create((LDM_CONTEXT, *LDM_WIDTHS), (1, 2, 1), "relu", seed=1, name="style"), path)
    progress = []
    result = train(
        hx.load(path),
        LdmBackend(tiny_latent_diffusion(0)),
        training_config(tmp_path, data, seed=7, **changes),
        TrainingCallbacks(on_progress=progress.append),
        progress_bar=False,
    )
    assert result.stopped == "finished", result.message
    return result, progress


def test_measured_before_the_first_step_every_n_steps_and_after_the_last(tmp_path, data):
    result, progress = run(tmp_path / "a", data, steps=7, fixed_loss_every=3, learn_rate="0.005")
    assert [step for step, _loss in result.fixed_losses] == [0, 3, 6, 7]
    assert progress[-1].fixed_losses == result.fixed_losses
    first, last = result.fixed_losses[0][1], result.fixed_losses[-1][1]
    assert f"Loss at fixed noise: {first:.5f} at step 0, {last:.5f} at step 7" in result.message


def test_it_is_the_same_measurement_each_time_and_leaves_the_run_as_it_was(tmp_path, data):
    measured, _ = run(tmp_path / "a", data, steps=4, fixed_loss_every=2)
    again, _ = run(tmp_path / "b", data, steps=4, fixed_loss_every=2)
    plain, _ = run(tmp_path / "c", data, steps=4)
    assert measured.fixed_losses == again.fixed_losses
    assert measured.losses == plain.losses and plain.fixed_losses == []
    trained, untouched = hx.load(measured.path).state_dict(), hx.load(plain.path).state_dict()
    assert trained.keys() == untouched.keys()
    assert all(torch.equal(trained[key], untouched[key]) for key in trained)


def test_it_falls_when_the_network_learns_and_not_when_it_does_not(tmp_path, data):
    learning, _ = run(tmp_path / "a", data, steps=20, fixed_loss_every=20, learn_rate="0.005")
    still, _ = run(tmp_path / "b", data, steps=20, fixed_loss_every=20, learn_rate="0")
    (_, before), (_, after) = learning.fixed_losses
    assert after < before, learning.fixed_losses
    assert still.fixed_losses[0][1] == still.fixed_losses[-1][1] == before


def test_the_option_is_checked_and_reaches_the_job_status():
    problems = TrainingConfig(hypernetwork_name="x", data_root="d", fixed_loss_every=-1).problems()
    assert problems["fixed_loss_every"] == "must be 0 or more (is -1)"
    status = JobStatus(id="j", fixed_losses=[(0, 1.5), (20, 1.25)])
    assert status.to_dict(history=False)["fixed_losses"] == [(0, 1.5), (20, 1.25)]
