"""Creating networks and running training jobs through the job manager and the HTTP routes."""

from __future__ import annotations

import threading

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

import hypernetwork_ext as hx
from hypernetwork_ext.standalone.tiny import TINY_WIDTHS, build_tiny_components
from hypernetwork_ext.training import DiffusersBackend
from hypernetwork_ext.training.api import build_training_router
from hypernetwork_ext.training.jobs import CreateRequest, TrainingJobs, TrainingServices, default_widths
from tests.support.fixtures import one_torch_thread  # noqa: F401 (autouse fixture)
from tests.support.training_models import dataset_folder


@pytest.fixture(scope="module")
def components():
    return build_tiny_components(0)


@pytest.fixture
def setup(tmp_path, components):
    data = dataset_folder(tmp_path / "data", 2)
    services = TrainingServices(
        hypernetwork_dir=str(tmp_path / "hypernetworks"),
        make_backend=lambda: DiffusersBackend.from_components(components),
    )
    jobs = TrainingJobs(services)
    app = FastAPI()
    app.include_router(build_training_router(jobs))
    return TestClient(app), jobs, data, tmp_path


def train_body(data, tmp_path, **changes):
    body = {
        "hypernetwork_name": "tiny",
        "learn_rate": "0.001",
        "data_root": str(data),
        "log_directory": str(tmp_path / "logs"),
        "training_width": 64,
        "training_height": 64,
        "steps": 3,
        "create_image_every": 3,
        "save_hypernetwork_every": 0,
        "preview_steps": 2,
        "template_filename": "filewords.txt",
        "seed": 1,
    }
    body.update(changes)
    return body


def test_create_then_train_then_status(setup):
    client, jobs, data, tmp_path = setup
    created = client.post(
        "/hypernetworks/v1/create",
        json={"name": "tiny", "enable_sizes": list(TINY_WIDTHS), "activation_func": "relu", "weight_init_seed": 3},
    )
    assert created.status_code == 200, created.text
    assert created.json()["widths"] == list(TINY_WIDTHS)
    again = client.post("/hypernetworks/v1/create", json={"name": "tiny", "enable_sizes": list(TINY_WIDTHS)})
    assert again.status_code == 422 and "exists" in again.json()["detail"]["problems"]["name"]
    started = client.post("/hypernetworks/v1/train", json=train_body(data, tmp_path))
    assert started.status_code == 200, started.text
    job_id = started.json()["job_id"]
    jobs.wait(job_id, 120)
    status = client.get(f"/hypernetworks/v1/jobs/{job_id}").json()
    assert status["state"] == "finished", status
    assert status["step"] == 3 and status["progress"] == 1.0 and status["last_loss"] is not None
    assert [step for step, _loss in status["losses"]] == [1, 2, 3]
    assert status["result_path"].endswith("tiny-3.pt") and hx.load(status["result_path"]).step == 3
    preview = client.get(status["preview_url"])
    assert preview.status_code == 200 and preview.content[:8] == b"\x89PNG\r\n\x1a\n"


def test_invalid_requests_name_the_fields(setup):
    client, _jobs, data, tmp_path = setup
    bad = client.post(
        "/hypernetworks/v1/create",
        json={"name": "", "layer_structure": "1, x, 1", "activation_func": "nope", "weight_init": "Zero"},
    )
    problems = bad.json()["detail"]["problems"]
    assert bad.status_code == 422 and set(problems) >= {"name", "layer_structure", "activation_func", "weight_init"}
    wrong = client.post(
        "/hypernetworks/v1/train",
        json=train_body(data, tmp_path, hypernetwork_name="missing", learn_rate="fast", batch_size=0),
    )
    problems = wrong.json()["detail"]["problems"]
    assert wrong.status_code == 422 and set(problems) == {"hypernetwork_name", "learn_rate", "batch_size"}
    unknown = client.post("/hypernetworks/v1/train", json={"not_an_option": 1})
    assert unknown.status_code == 422 and "not_an_option" in unknown.json()["detail"]["message"]
    assert client.get("/hypernetworks/v1/jobs/nope").status_code == 404


def test_interrupt_route_stops_a_running_job_and_it_saves(setup):
    client, jobs, data, tmp_path = setup
    jobs.create(CreateRequest(name="tiny", enable_sizes=list(TINY_WIDTHS)))
    gate, release = threading.Event(), threading.Event()
    jobs.services.host_callbacks = lambda: hx.training.TrainingCallbacks(
        on_progress=lambda progress: (gate.set(), release.wait(30))
    )
    job_id = client.post("/hypernetworks/v1/train", json=train_body(data, tmp_path, steps=500)).json()["job_id"]
    assert gate.wait(60)
    busy = client.post("/hypernetworks/v1/train", json=train_body(data, tmp_path))
    assert busy.status_code == 409
    assert client.post(f"/hypernetworks/v1/jobs/{job_id}/interrupt").json()["interrupted"] is True
    release.set()
    status = jobs.wait(job_id, 60)
    assert status.state == "interrupted" and status.result_path and hx.load(status.result_path).step == status.step


def test_a_diverging_job_says_so_in_its_status_and_saves_nothing(setup):
    client, jobs, data, tmp_path = setup
    jobs.create(CreateRequest(name="tiny", enable_sizes=list(TINY_WIDTHS)))
    job_id = client.post("/hypernetworks/v1/train", json=train_body(data, tmp_path, learn_rate="1e6")).json()["job_id"]
    jobs.wait(job_id, 120)
    status = client.get(f"/hypernetworks/v1/jobs/{job_id}").json()
    assert status["state"] == "diverged" and status["result_path"] is None and status["step"] == 0
    assert "the learn rate is far too high" in status["message"] and "nothing was saved" in status["message"]


def test_default_widths_follow_the_model_family():
    assert default_widths("sd1") == [768, 320, 640, 1280]
    assert default_widths("sd2") == [1024, 320, 640, 1280]
    assert default_widths("sdxl") == [2048, 640, 1280]


def test_a_network_already_past_the_steps_asked_is_refused_before_starting(setup):
    """It used to start, "finish" at once and show "finished step 120/10"."""
    client, jobs, data, tmp_path = setup
    network = hx.create(TINY_WIDTHS, name="old")
    network.step = 120
    hx.save(network, tmp_path / "hypernetworks" / "old.safetensors")
    answer = client.post("/hypernetworks/v1/train", json=train_body(data, tmp_path, hypernetwork_name="old", steps=10))
    assert answer.status_code == 422
    assert "already at step 120" in answer.json()["detail"]["problems"]["steps"]
    assert jobs.latest() is None


def test_a_network_the_loaded_model_cannot_use_is_refused_before_starting(setup, components):
    """An SD1 network on the tiny model used to start, then fail with torch's "element 0 of tensors
    does not require grad" while the page said "Training started"."""
    from hypernetwork_ext.shape import model_shape

    client, jobs, data, tmp_path = setup
    jobs.services.model_shape = lambda: model_shape(components.unet)
    hx.save(hx.create([768, 320, 640, 1280], name="sd1net"), tmp_path / "hypernetworks" / "sd1net.safetensors")
    answer = client.post("/hypernetworks/v1/train", json=train_body(data, tmp_path, hypernetwork_name="sd1net"))
    assert answer.status_code == 422
    problem = answer.json()["detail"]["problems"]["hypernetwork_name"]
    assert "768, 320, 640, 1280" in problem and "48, 32, 64" in problem


def test_the_engine_names_widths_that_match_nothing(tmp_path, components):
    """Whatever calls it, training a network with none of the model's widths explains itself."""
    from hypernetwork_ext.training import TrainingConfig, train

    data = dataset_folder(tmp_path / "data", 2)
    config = TrainingConfig.from_dict({**train_body(data, tmp_path), "hypernetwork_name": "sd1net"})
    network = hx.create([768, 320, 640, 1280], name="sd1net")
    with pytest.raises(hx.InvalidConfigError, match=r"768, 320, 640, 1280.*48, 32, 64"):
        train(network, DiffusersBackend.from_components(components), config, progress_bar=False)


def test_create_without_widths_uses_the_loaded_models(tmp_path, components):
    """On the tiny model (no known family) Create used to make an SD1 network that could not train."""
    from hypernetwork_ext.shape import model_shape

    services = TrainingServices(
        str(tmp_path), make_backend=lambda: None, model_shape=lambda: model_shape(components.unet)
    )
    assert TrainingJobs(services).create(CreateRequest(name="fits"))["widths"] == list(TINY_WIDTHS)
