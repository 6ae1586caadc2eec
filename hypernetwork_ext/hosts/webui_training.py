"""Hypernetwork training in AUTOMATIC1111 1.10: a *Hypernetworks* sub-tab of Train and the training
routes, both on the host's loaded model, GPU queue, progress bar and Interrupt buttons.

- The tab is added in ``on_ui_train_tabs`` (the host calls it inside the Train tab's sub-tabs, with
  the txt2img components for "preview from txt2img"). A1111's own hypernetwork creation and
  training controls are hidden while *Hide A1111's own hypernetwork training* is on (default): on
  current torch they fail, they have the bugs our trainer fixes, and they see neither
  ``.safetensors`` files nor the extra folders. Embedding training is left alone.
- A job holds the host's ``queue_lock`` for its whole run, so generation and training never
  overlap; it reports through ``shared.state`` (job, step count, textinfo, live preview) and
  registers its task with ``modules.progress``, so the host's progress bar follows it; it stops on
  ``shared.state.interrupted`` (every Interrupt button and ``/sdapi/v1/interrupt``).
- The backend drives ``shared.sd_model`` as loaded (ldm ``LatentDiffusion`` for SD1/SD2, sgm
  ``DiffusionEngine`` for SDXL): nothing is copied; the engine's ``ModelGuard`` puts every module
  back as found. Previews are rendered by the host's own ``StableDiffusionProcessingTxt2Img`` with
  the network in the trainer's to_k/to_v hooks (not the host's ``loaded_hypernetworks``).
- Forge, reForge and Forge Classic train through ``forge_training`` (a backend over
  ``sd_model.forge_objects``): reForge kept A1111's Train tab and gets the same sub-tab; Forge and
  Forge Classic, which have none, get a top-level *Train* tab with the same content. Forge Classic
  also lost ``modules.lowvram``, ``--lowvram``, ``--hypernetwork-dir``,
  ``--textual-inversion-templates-dir`` and ``shared.reload_hypernetworks``: each is used only
  where the host has it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import closing
from typing import Any

import gradio as gr
from modules import (
    call_queue,
    devices,
    paths_internal,
    processing,
    progress,
    script_callbacks,
    scripts,
    sd_models,
    sd_samplers,
    shared,
)

from ..errors import HypernetworkError
from ..training import (
    LdmBackend,
    PreviewRequest,
    SgmBackend,
    TrainingBackend,
    TrainingConfig,
)
from ..training.api import build_training_router
from ..training.jobs import JobStatus, TrainingServices
from ..ui import compat
from ..ui.training import HostHooks, build_training_tab
from . import api, forge_training, webui
from .forge import detect_patcher_host
from .queued_jobs import QueuedTrainingJobs
from .state_report import StateReport

TAB_TITLE = "Hypernetworks"
NAME = "hypernetworks-training"  # of our callbacks, where the host names them
JOB_NAME = "train-hypernetwork"
PRESETS_FOLDER = "hypernetwork-training-presets"
HIDE_SETTING = "hypernetwork_hide_host_training"
HIDE_LABEL = "Hide A1111's own hypernetwork training (Train tab)"

LOWVRAM_REFUSAL = (
    "Training is not possible with --lowvram: it moves every UNet block on and off the GPU for each "
    "call. Restart the WebUI without --lowvram (--medvram works)."
)
NO_MODEL_REFUSAL = "No checkpoint is loaded; choose one in the Stable Diffusion checkpoint list first."
SD3_REFUSAL = (
    "The loaded checkpoint is SD3: hypernetworks act on the attention of SD1, SD2 and SDXL UNets, which SD3 has not."
)
FAMILY_REFUSAL = (
    "The loaded checkpoint is not SD1, SD2 or SDXL (Flux, SD3, ...): hypernetworks act on the attention "
    "of SD1, SD2 and SDXL UNets."
)

# The host's hypernetwork creation/training controls (A1111 1.10.1 modules/ui.py), by elem_id; the
# dropout textbox has none, so it is known by the start of its label.
HOST_CONTROL_IDS = frozenset(
    {
        "train_new_hypernetwork_name",
        "train_new_hypernetwork_sizes",
        "train_new_hypernetwork_layer_structure",
        "train_new_hypernetwork_activation_func",
        "train_new_hypernetwork_initialization_option",
        "train_new_hypernetwork_add_layer_norm",
        "train_new_hypernetwork_use_dropout",
        "train_overwrite_old_hypernetwork",
        "train_create_hypernetwork",
        "train_hypernetwork",
        "refresh_train_hypernetwork_name",
        "train_hypernetwork_learn_rate",
        "train_train_hypernetwork",
    }
)
HOST_DROPOUT_LABEL = "Enter hypernetwork Dropout structure"
HOST_CREATE_BUTTON = "train_create_hypernetwork"
MOVED_NOTE = (
    "<p class='hnx-moved-note'>Hypernetworks are created and trained in the <b>Hypernetworks</b> sub-tab "
    "(sd-webui-hypernetworks), which keeps A1111's options and fixes its trainer. A1111's own controls "
    "are hidden by the setting <i>Settings → Hypernetworks → Hide A1111's own hypernetwork training</i>.</p>"
)


# --- the loaded model ---------------------------------------------------------------------------------


def loaded_model():
    """The checkpoint loaded now, without loading one (``shared.sd_model`` would load it)."""
    return sd_models.model_data.sd_model


def model_family(sd_model) -> str | None:
    if sd_model is None:
        return None
    for flag, family in (("is_sdxl", "sdxl"), ("is_sd2", "sd2"), ("is_sd1", "sd1")):
        if getattr(sd_model, flag, False):
            return family
    return None


def host_lowvram():
    """A1111's ``modules.lowvram`` (--medvram/--lowvram bookkeeping); None where the host has none (Forge Classic)."""
    try:
        from modules import lowvram
    except ImportError:
        return None
    return lowvram


def refusal(sd_model) -> str | None:
    """Why the host cannot train now, or None."""
    patcher_host = detect_patcher_host()
    if getattr(shared.cmd_opts, "lowvram", False) and not patcher_host:  # Forge's own low-VRAM modes: see ForgeBackend
        return LOWVRAM_REFUSAL
    if sd_model is None:
        return NO_MODEL_REFUSAL
    if getattr(sd_model, "is_sd3", False):
        return SD3_REFUSAL
    if patcher_host and model_family(sd_model) is None:
        return FAMILY_REFUSAL
    return None


def early_refusal() -> str | None:
    """``refusal`` before a job starts; Forge loads its checkpoint at the first job, so an unloaded one passes."""
    sd_model = shared.sd_model
    if detect_patcher_host() and not hasattr(sd_model, "forge_objects"):
        return None
    return refusal(sd_model)


def sampler_name(name: str) -> str | None:
    """A sampler name or alias of the host as its canonical name; None for the host's default."""
    if not name.strip():
        return None
    return sd_samplers.samplers_map.get(name.strip().lower())


def preview_sampler_problem(config: TrainingConfig) -> str | None:
    name = config.preview_sampler_name
    if not config.preview_from_txt2img or not name.strip() or sampler_name(name) is not None:
        return None
    return f"no sampler named {name!r}; the host has {', '.join(sorted(set(sd_samplers.samplers_map.values())))}"


def render_preview(request: PreviewRequest):
    """A preview through the host's txt2img processing; the caller has the network attached."""
    sd_model = shared.sd_model
    # A checkpoint chosen while training is loaded after it (its reload waits for the queue); the
    # preview would load it first, so it then asks for the model being trained. Only then: setting
    # options back fails under --freeze-settings.
    title = sd_model.sd_checkpoint_info.title
    chosen_meanwhile = shared.opts.data.get("sd_model_checkpoint") != title
    p = processing.StableDiffusionProcessingTxt2Img(
        sd_model=sd_model,
        do_not_save_grid=True,
        do_not_save_samples=True,
        override_settings={"sd_model_checkpoint": title} if chosen_meanwhile else {},
    )
    p.disable_extra_networks = True
    # No script of the host runs for a preview, but reForge's processing reads the always-on
    # scripts of p.scripts without checking it is there: an empty runner, not None.
    p.scripts, p.script_args = scripts.ScriptRunner(), []
    p.prompt, p.negative_prompt = request.prompt, request.negative_prompt
    p.steps, p.cfg_scale, p.seed = request.steps, request.cfg_scale, request.seed
    p.width, p.height = request.width, request.height
    p.sampler_name = sampler_name(request.sampler_name)
    state = shared.state
    job, job_no, job_count = state.job, state.job_no, state.job_count
    try:
        with closing(p):
            processed = processing.process_images(p)
    finally:  # the sampler counted its own steps and job; the progress bar follows the training
        state.job, state.job_no, state.job_count = job, job_no, job_count
        state.sampling_step = state.sampling_steps = 0
    return processed.images[0] if processed.images else None


def make_backend() -> TrainingBackend:
    if detect_patcher_host():
        forge_training.load_selected_checkpoint(sd_models)
    sd_model = shared.sd_model
    problem = refusal(sd_model)
    if problem:
        raise HypernetworkError(problem)
    info = sd_model.sd_checkpoint_info
    names = {
        "model_family": model_family(sd_model),
        "checkpoint_name": info.model_name,
        "checkpoint_hash": getattr(sd_model, "sd_model_hash", None) or info.shorthash,
    }
    if detect_patcher_host():
        return forge_training.make_backend(sd_model, render_preview, **names)
    kind = SgmBackend if hasattr(sd_model, "conditioner") else LdmBackend
    backend = kind(sd_model, preview_generator=render_preview, **names)
    # Under --medvram parts of the model rest on the CPU between calls; the host's device is
    # where it computes.
    backend.device = devices.device
    lowvram = host_lowvram()
    if lowvram is not None and lowvram.is_needed(sd_model):  # its hooks move the encoders onto the GPU for each call
        backend.unload_refusal = "--medvram already keeps the text encoder and VAE off the GPU between their uses"
    return backend


# --- shared.state -------------------------------------------------------------------------------------


def set_builtin_networks_aside() -> list:
    """A1111's own trainer (or its own tag handler) leaves its networks in ``shared.loaded_hypernetworks``,
    which A1111's attention code applies to every step and preview: they must not act on a run of
    ours. What was there is returned, for ``put_builtin_networks_back``."""
    loaded = getattr(shared, "loaded_hypernetworks", None)
    if not isinstance(loaded, list) or not loaded:
        return []
    kept = list(loaded)
    loaded.clear()
    return kept


def put_builtin_networks_back(kept: list) -> None:
    loaded = getattr(shared, "loaded_hypernetworks", None)
    if kept and isinstance(loaded, list) and not loaded:
        loaded.extend(kept)


def run_exclusive(work: Callable[[], Any], job: JobStatus) -> Any:
    """Run a job as the host runs a generation: under its queue lock, between ``state.begin`` and
    ``state.end``, with its task active for the progress bar."""
    with call_queue.queue_lock:
        state = shared.state
        state.begin(job=JOB_NAME)
        state.textinfo = "Initializing hypernetwork training..."
        if job.task_id:
            progress.start_task(job.task_id)
        parallel = shared.parallel_processing_allowed
        shared.parallel_processing_allowed = False
        lowvram = host_lowvram()
        medvram = lowvram is not None and lowvram.is_needed(shared.sd_model)
        webui.EXTENSION.finish()  # a generation that failed before its postprocess leaves its networks on
        builtin = set_builtin_networks_aside()
        try:
            if medvram:  # start and end with lowvram's "nothing on the GPU", so its bookkeeping stays true
                lowvram.send_everything_to_cpu()
            return work()
        finally:
            if medvram:
                lowvram.send_everything_to_cpu()
            put_builtin_networks_back(builtin)
            shared.parallel_processing_allowed = parallel
            if job.task_id:
                progress.finish_task(job.task_id)
            state.end()


# --- jobs and services ---------------------------------------------------------------------------------


class WebuiTrainingJobs(QueuedTrainingJobs):
    def refusal(self) -> str | None:
        return early_refusal()

    def preview_sampler_problem(self, config: TrainingConfig) -> str | None:
        return preview_sampler_problem(config)


def network_path(name: str) -> str:
    return webui.EXTENSION.library.resolve(name).entry.path


def network_names() -> list[str]:
    return sorted(webui.EXTENSION.prompt_names())


def template_dirs() -> list[str]:
    return [folder for folder in [getattr(shared.cmd_opts, "textual_inversion_templates_dir", None)] if folder]


def network_saved(path: str) -> None:
    """A new file: our library and the host's list see it (cards page, tags, /sdapi/v1/hypernetworks)."""
    webui.EXTENSION.library.refresh()
    reload_host_list = getattr(shared, "reload_hypernetworks", None)  # Forge Classic has no list of its own
    if callable(reload_host_list):
        reload_host_list()


def build_services() -> TrainingServices:
    return TrainingServices(
        hypernetwork_dir=webui.hypernetwork_dir(),
        make_backend=make_backend,
        model_family=lambda: model_family(loaded_model()),
        template_dirs=template_dirs,
        resolve_network=network_path,
        network_names=network_names,
        run_exclusive=run_exclusive,
        host_callbacks=lambda: StateReport(shared.state).callbacks(),
        on_saved=network_saved,
        presets_dir=os.path.join(paths_internal.data_path, PRESETS_FOLDER),
    )


_JOBS: list[WebuiTrainingJobs] = []


def jobs() -> WebuiTrainingJobs:
    """The process's job manager (it outlives Reload UI, and a job running through it)."""
    if not _JOBS:
        _JOBS.append(WebuiTrainingJobs(build_services()))
    return _JOBS[0]


# --- UI, settings, API ------------------------------------------------------------------------------------


def add_train_tab(params) -> None:
    """``on_ui_train_tabs``: our sub-tab, with the txt2img components for previews."""
    with gr.Tab(TAB_TITLE, id="hnx_training", elem_id="hnx_train_tab"):
        build_training_tab(
            jobs(),
            blocks=compat.enclosing_blocks(),
            host=HostHooks(preview_sources=list(params.txt2img_preview_params), start_js="hnxStartTraining"),
        )


def hide_host_training() -> bool:
    return bool(getattr(shared.opts, "data", {}).get(HIDE_SETTING, True))


def hide_host_control(component, **kwargs) -> None:
    """``on_after_component``: hide A1111's hypernetwork creation/training controls, and say where they went."""
    elem_id = kwargs.get("elem_id")
    label = kwargs.get("label")
    is_host_control = elem_id in HOST_CONTROL_IDS or (isinstance(label, str) and label.startswith(HOST_DROPOUT_LABEL))
    if not is_host_control or not hide_host_training():
        return
    component.visible = False
    if elem_id == HOST_CREATE_BUTTON:
        gr.HTML(MOVED_NOTE, elem_id="hnx_moved_note")


def add_settings() -> None:
    info = shared.OptionInfo(True, HIDE_LABEL, gr.Checkbox, section=webui.SECTION)
    shared.opts.add_option(HIDE_SETTING, info.info("replaced by the Hypernetworks sub-tab").needs_reload_ui())


def add_api_routes(demo, app) -> None:
    credentials = api.parse_credentials(getattr(shared.cmd_opts, "api_auth", None))
    app.include_router(build_training_router(jobs(), dependencies=api.auth_dependencies(credentials or None)))


def register_training() -> None:
    if not forge_training.host_has_train_tab():  # Forge, Forge Classic: a top-level one
        sources = forge_training.Txt2imgSources()
        webui.on(script_callbacks.on_after_component, sources.collect, NAME)
        webui.on(script_callbacks.on_ui_tabs, lambda: forge_training.train_tab(jobs(), sources), NAME)
    else:  # A1111 and reForge
        webui.on(script_callbacks.on_ui_train_tabs, add_train_tab, NAME)
        webui.on(script_callbacks.on_after_component, hide_host_control, NAME)
        webui.on(script_callbacks.on_ui_settings, add_settings, NAME)
    webui.on(script_callbacks.on_app_started, add_api_routes, NAME)


if register_training not in webui.REGISTRATIONS:
    webui.REGISTRATIONS.append(register_training)
