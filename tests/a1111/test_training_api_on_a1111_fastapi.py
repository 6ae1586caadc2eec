"""The training routes on A1111's FastAPI 0.94 / pydantic 1 (no model needed for these)."""

import os

from fastapi import FastAPI
from fastapi.testclient import TestClient

from hypernetwork_ext.training.api import build_training_router
from hypernetwork_ext.training.jobs import TrainingJobs, TrainingServices


def client(tmp_path) -> TestClient:
    services = TrainingServices(str(tmp_path), make_backend=lambda: None, model_family=lambda: "sd2")
    app = FastAPI()
    app.include_router(build_training_router(TrainingJobs(services)))
    return TestClient(app)


def test_create_and_field_problems(tmp_path):
    api = client(tmp_path)
    created = api.post("/hypernetworks/v1/create", json={"name": "x", "layer_structure": "1, 1.5, 1"})
    assert created.status_code == 200 and created.json()["widths"] == [1024, 320, 640, 1280]
    assert os.path.getsize(created.json()["path"]) > 0
    missing = api.post("/hypernetworks/v1/create", json={"name": ""})
    assert missing.status_code == 422 and "name" in missing.json()["detail"]["problems"]
    wrong = api.post("/hypernetworks/v1/train", json={"hypernetwork_name": "x", "steps": 0})
    assert wrong.status_code == 422 and set(wrong.json()["detail"]["problems"]) == {"steps", "data_root"}
    assert api.get("/hypernetworks/v1/jobs/none").status_code == 404
