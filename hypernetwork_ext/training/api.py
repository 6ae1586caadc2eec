"""The training HTTP API as a FastAPI router (the host mounts it, under its own auth).

    POST /hypernetworks/v1/create                 body: CreateRequest fields -> {path, name, widths, parameters}
    POST /hypernetworks/v1/train                  body: TrainingConfig fields -> {job_id}
    GET  /hypernetworks/v1/jobs/{job_id}          -> status (state, progress, step, last_loss, ...)
    GET  /hypernetworks/v1/jobs/{job_id}/preview  -> the last preview image (PNG)
    POST /hypernetworks/v1/jobs/{job_id}/interrupt -> {job_id, interrupted}

Invalid input answers 422 with ``{"detail": {"message", "problems": {field: problem}}}``; a
second job while one runs answers 409; an unknown job 404; a host that cannot train now 400.
Works with FastAPI 0.94 (A1111) and current FastAPI.
"""

from __future__ import annotations

import os

from fastapi import APIRouter, Body, HTTPException
from fastapi.responses import FileResponse

from ..errors import HypernetworkError, InvalidConfigError
from .config import FieldProblems
from .jobs import JobBusyError, TrainingJobs

PREFIX = "/hypernetworks/v1"
_JSON_BODY = Body(...)


def _invalid(exc: InvalidConfigError) -> HTTPException:
    problems = exc.problems if isinstance(exc, FieldProblems) else {}
    return HTTPException(status_code=422, detail={"message": str(exc), "problems": problems})


def build_training_router(jobs: TrainingJobs, *, prefix: str = PREFIX, dependencies=None) -> APIRouter:
    router = APIRouter(prefix=prefix, dependencies=list(dependencies or []))

    def job_or_404(job_id: str):
        try:
            return jobs.status(job_id)
        except KeyError:
            raise HTTPException(status_code=404, detail=f"no training job {job_id!r}") from None

    @router.post("/create")
    def create_network(payload: dict = _JSON_BODY):
        try:
            return jobs.create(payload)
        except InvalidConfigError as exc:
            raise _invalid(exc) from None
        except HypernetworkError as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from None

    @router.post("/train")
    def start_training(payload: dict = _JSON_BODY):
        try:
            return {"job_id": jobs.start(payload)}
        except JobBusyError as exc:
            raise HTTPException(status_code=409, detail=str(exc)) from None
        except InvalidConfigError as exc:
            raise _invalid(exc) from None
        except HypernetworkError as exc:  # the host cannot train now (e.g. --lowvram, no model loaded)
            raise HTTPException(status_code=400, detail=str(exc)) from None

    @router.get("/jobs/{job_id}")
    def job_status(job_id: str, history: bool = True):
        status = job_or_404(job_id).to_dict(history=history)
        status["preview_url"] = f"{prefix}/jobs/{job_id}/preview" if status["last_preview"] else None
        return status

    @router.get("/jobs/{job_id}/preview")
    def job_preview(job_id: str):
        path = job_or_404(job_id).last_preview
        if not path or not os.path.isfile(path):
            raise HTTPException(status_code=404, detail="this job has no preview image yet")
        return FileResponse(path, media_type="image/png")

    @router.post("/jobs/{job_id}/interrupt")
    def interrupt(job_id: str):
        job_or_404(job_id)
        return {"job_id": job_id, "interrupted": jobs.interrupt(job_id)}

    return router
