"""Hypernetwork training in SD.Next (diffusers backend), on the loaded pipeline.

SD.Next removed training in 2024, its Train tab with it; the extension adds a top-level *Train*
tab (with *Create hypernetwork* and *Train hypernetwork*, the options, presets, progress, loss
chart, previews and Interrupt of A1111's) and the ``/hypernetworks/v1`` training routes.

- The backend is :class:`DiffusersBackend` over ``shared.sd_model``'s own components (UNet, VAE,
  text encoders, tokenizers, noise schedule): nothing is copied or reloaded, and the engine's
  ``ModelGuard`` puts every module back as found.
- A job holds SD.Next's ``queue_lock`` for its whole run (generation and training never overlap),
  reports through ``shared.state`` and stops on its Interrupt flag (every Interrupt button and
  ``/sdapi/v1/interrupt``).
- Previews are drawn by SD.Next's own txt2img processing, with the network being trained in the
  trainer's hooks.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import closing
from typing import Any

import gradio as gr
from modules import call_queue, processing, progress, script_callbacks, sd_samplers, shared

from ..errors import HypernetworkError
from ..families import infer_family
from ..shape import ModelShape
from ..training import DiffusersBackend, PreviewRequest, TrainingBackend, TrainingConfig
from ..training.api import build_training_router
from ..training.jobs import JobStatus, TrainingServices
from ..ui.training import HostHooks, build_training_tab
from . import api, sdnext_webui
from .extension import EXTENSION, api_credentials, data_path, primary_folder
from .forge_training import Txt2imgSources
from .queued_jobs import QueuedTrainingJobs
from .sdnext import pipeline_unet
from .state_report import StateReport

TAB_LABEL = "Train"
TAB_ID = "hnx_train"
JOB_NAME = "Train hypernetwork"
PRESETS_FOLDER = "hypernetwork-training-presets"

NO_MODEL_REFUSAL = "No model is loaded; choose an SD 1.5, SD 2 or SDXL model in SD.Next first."
FAMILY_REFUSAL = (
    "The loaded model is not SD 1.5, SD 2 or SDXL (Flux, SD3, ...): hypernetworks act on the attention "
    "of SD1, SD2 and SDXL UNets."
)
FUSED_REFUSAL = "The loaded UNet uses fused QKV projections; turn the fusing option off to train a hypernetwork."


def loaded_model():
    return sdnext_webui.loaded_pipeline()


def model_family(pipeline) -> str | None:
    unet = pipeline_unet(pipeline)
    if unet is None:
        return None
    shape = EXTENSION.shape_of(unet)
    return infer_family(shape.default_widths) if shape.context_width else None


def loaded_shape() -> ModelShape | None:
    unet = pipeline_unet(loaded_model())
    return EXTENSION.shape_of(unet) if unet is not None else None


def refusal(pipeline) -> str | None:
    """Why SD.Next cannot train now, or None: a UNet with cross-attention and a CLIP tokenizer are needed
    (Flux, SD3 and the other transformer models have neither)."""
    if pipeline is None:
        return NO_MODEL_REFUSAL
    unet = pipeline_unet(pipeline)
    if unet is None or not EXTENSION.shape_of(unet).context_width or getattr(pipeline, "tokenizer", None) is None:
        return FAMILY_REFUSAL
    return None


def sampler_name(name: str) -> str | None:
    """A sampler name of SD.Next (or the index its txt2img dropdown sends); None for its default."""
    name = str(name).strip()
    if not name:
        return None
    if name.isdigit():
        return processing.get_sampler_name(int(name))
    return name


def render_preview(request: PreviewRequest):
    """A preview through SD.Next's txt2img processing; the caller has the network attached."""
    p = processing.StableDiffusionProcessingTxt2Img(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        steps=request.steps,
        cfg_scale=request.cfg_scale,
        seed=request.seed,
        width=request.width,
        height=request.height,
        do_not_save_grid=True,
        do_not_save_samples=True,
    )
    p.sampler_name = sampler_name(request.sampler_name) or "Default"
    p.disable_extra_networks = True
    state = shared.state
    job, job_no, job_count = state.job, state.job_no, state.job_count
    try:
        with closing(p):
            processed = processing.process_images(p)
    finally:  # the sampler counted its own steps and job; the progress bar follows the training
        state.job, state.job_no, state.job_count = job, job_no, job_count
    images = getattr(processed, "images", None) or []
    return images[0] if images else None


def make_backend() -> TrainingBackend:
    pipeline = loaded_model()
    problem = refusal(pipeline)
    if problem:
        raise HypernetworkError(problem)
    if any(getattr(module, "fused_projections", False) for module in pipeline.unet.modules()):
        raise HypernetworkError(FUSED_REFUSAL)
    info = getattr(pipeline, "sd_checkpoint_info", None)
    return DiffusersBackend.from_components(
        pipeline,
        preview_generator=render_preview,
        model_family=model_family(pipeline),
        checkpoint_name=getattr(info, "model_name", None),
        checkpoint_hash=getattr(pipeline, "sd_model_hash", None) or getattr(info, "shorthash", None),
    )


def run_exclusive(work: Callable[[], Any], job: JobStatus) -> Any:
    """Run a job as SD.Next runs a generation: under its queue lock, between ``state.begin`` and
    ``state.end``, with its task active for the progress bar."""
    with call_queue.queue_lock:
        state = shared.state
        state_id = state.begin(JOB_NAME)
        state.textinfo = "Initializing hypernetwork training..."
        if job.task_id:
            progress.start_task(job.task_id)
        EXTENSION.finish()  # a generation that failed before its deactivate leaves its networks on
        try:
            return work()
        finally:
            if job.task_id:
                progress.finish_task(job.task_id)
            state.end(state_id)


class SdnextTrainingJobs(QueuedTrainingJobs):
    def refusal(self) -> str | None:
        return refusal(loaded_model())

    def preview_sampler_problem(self, config: TrainingConfig) -> str | None:
        return preview_sampler_problem(config)


def preview_sampler_problem(config: TrainingConfig) -> str | None:
    name = sampler_name(config.preview_sampler_name)
    if not config.preview_from_txt2img or name is None or sd_samplers.find_sampler(name) is not None:
        return None
    known = ", ".join(sampler.name for sampler in sd_samplers.visible_samplers())
    return f"no sampler named {config.preview_sampler_name!r}; SD.Next has {known}"


def network_saved(path: str) -> None:
    """A new file: the library, the tags and the Hypernetwork page see it."""
    EXTENSION.library.refresh()
    page = sdnext_webui.PATCH.page
    if page is not None:
        page.refresh_time = page.page_time = 0  # listed again when the page is next drawn


def build_services() -> TrainingServices:
    folder = primary_folder()
    os.makedirs(folder, exist_ok=True)
    return TrainingServices(
        hypernetwork_dir=folder,
        make_backend=make_backend,
        model_family=lambda: model_family(loaded_model()),
        model_shape=loaded_shape,
        resolve_network=lambda name: EXTENSION.library.resolve(name).entry.path,
        network_names=lambda: sorted(EXTENSION.prompt_names()),
        run_exclusive=run_exclusive,
        host_callbacks=lambda: StateReport(shared.state).callbacks(),
        on_saved=network_saved,
        presets_dir=os.path.join(data_path() or folder, PRESETS_FOLDER),
    )


_JOBS: list[SdnextTrainingJobs] = []


def jobs() -> SdnextTrainingJobs:
    """The process's job manager (it outlives a UI reload, and a job running through it)."""
    if not _JOBS:
        _JOBS.append(SdnextTrainingJobs(build_services()))
    return _JOBS[0]


SOURCES = Txt2imgSources()


def train_tab() -> list[tuple]:
    """``on_ui_tabs``: a top-level Train tab, reading previews from SD.Next's txt2img controls."""
    with gr.Blocks(analytics_enabled=False) as blocks, gr.Column(elem_id="hnx_train_tab"):
        build_training_tab(
            jobs(), blocks=blocks, host=HostHooks(preview_sources=SOURCES.components(), start_js="hnxStartTraining")
        )
    return [(blocks, TAB_LABEL, TAB_ID)]


def add_api_routes(demo, app) -> None:
    app.include_router(build_training_router(jobs(), dependencies=api.auth_dependencies(api_credentials())))


def register_training() -> None:
    script_callbacks.on_after_component(SOURCES.collect)
    script_callbacks.on_ui_tabs(train_tab)
    script_callbacks.on_app_started(add_api_routes)


if register_training not in sdnext_webui.REGISTRATIONS:
    sdnext_webui.REGISTRATIONS.append(register_training)
