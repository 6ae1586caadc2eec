"""Stand-ins of the A1111 1.10.1 modules that run jobs on the loaded model: ``processing`` (txt2img
and img2img through ``process_images``), ``sd_samplers``, ``sd_models``, ``call_queue``,
``progress``, ``lowvram``, ``devices`` and the full ``shared_state.State``.

Names, signatures and order of calls are those of the host (commit 82a973c): ``process_images``
applies ``override_settings`` around the job (a ``sd_model_checkpoint`` override keeps the model the
job asks for) and restores the options after; ``process_images_inner`` fixes the seeds
(``random.randrange`` for -1), sets ``state.job_count``, strips extra-network tags and activates
them unless ``disable_extra_networks``, runs the scripts' hooks, draws the noise after a global
``torch.manual_seed(seed)`` (the host's ``rng.randn``), samples with the CFG layout and callbacks of
``CFGDenoiser`` (rows ``[cond..., uncond...]``, ``step``/``total_steps``), checks
``state.interrupted`` every step, decodes with ``decode_first_stage`` and calls ``state.nextjob()``.
img2img encodes its init image with ``encode_first_stage`` and samples the last
``int(denoising_strength * steps) + 1`` steps from the noised latent, as ``sample_img2img`` does.
The sampler is Euler over the model's discrete schedule (the host's default is DPM++ 2M; which
solver runs does not matter to the extension).
"""

from __future__ import annotations

import collections
import contextlib
import random
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

# --- modules.shared_state.State ---------------------------------------------------------------


class State:
    skipped = False
    interrupted = False
    stopping_generation = False
    job = ""
    job_no = 0
    job_count = 0
    processing_has_refined_job_count = False
    job_timestamp = "0"
    sampling_step = 0
    sampling_steps = 0
    current_latent = None
    current_image = None
    current_image_sampling_step = 0
    id_live_preview = 0
    textinfo = None
    time_start = None

    def __init__(self):
        self.server_start = time.time()
        self.jobs_begun: list[str] = []  # what the tests read: every begin() since the start

    def skip(self):
        self.skipped = True

    def interrupt(self):
        self.interrupted = True

    def stop_generating(self):
        self.stopping_generation = True

    def nextjob(self):
        self.job_no += 1
        self.sampling_step = 0
        self.current_image_sampling_step = 0

    def dict(self):
        return {
            "skipped": self.skipped,
            "interrupted": self.interrupted,
            "stopping_generation": self.stopping_generation,
            "job": self.job,
            "job_count": self.job_count,
            "job_timestamp": self.job_timestamp,
            "job_no": self.job_no,
            "sampling_step": self.sampling_step,
            "sampling_steps": self.sampling_steps,
        }

    def begin(self, job: str = "(unknown)"):
        self.sampling_step = 0
        self.time_start = time.time()
        self.job_count = -1
        self.processing_has_refined_job_count = False
        self.job_no = 0
        self.current_latent = None
        self.current_image = None
        self.current_image_sampling_step = 0
        self.id_live_preview = 0
        self.skipped = False
        self.interrupted = False
        self.stopping_generation = False
        self.textinfo = None
        self.job = job
        self.jobs_begun.append(job)

    def end(self):
        self.job = ""
        self.job_count = 0

    def assign_current_image(self, image):
        self.current_image = image
        self.id_live_preview += 1


# --- modules.fifo_lock / call_queue / progress -------------------------------------------------------


class FIFOLock:
    """The host's queue lock: first come, first served; ``acquire(blocking)``/``release``/``with``."""

    def __init__(self):
        self._lock = threading.Lock()
        self._inner_lock = threading.Lock()
        self._pending_threads = collections.deque()

    def acquire(self, blocking=True):
        with self._inner_lock:
            if self._lock.acquire(False):
                return True
            if not blocking:
                return False
            release_event = threading.Event()
            self._pending_threads.append(release_event)
        release_event.wait()
        return self._lock.acquire()

    def release(self):
        with self._inner_lock:
            if self._pending_threads:
                self._pending_threads.popleft().set()
            self._lock.release()

    __enter__ = acquire

    def __exit__(self, t, v, tb):
        self.release()


def make_progress(shared):
    from tests.support.webui_standin import module

    progress = module("modules.progress", current_task=None, pending_tasks=collections.OrderedDict(), finished_tasks=[])

    def start_task(id_task):
        progress.current_task = id_task
        progress.pending_tasks.pop(id_task, None)

    def finish_task(id_task):
        if progress.current_task == id_task:
            progress.current_task = None
        progress.finished_tasks.append(id_task)
        if len(progress.finished_tasks) > 16:
            progress.finished_tasks.pop(0)

    def add_task_to_queue(id_job):
        progress.pending_tasks[id_job] = time.time()

    @dataclass
    class ProgressRequest:
        id_task: str | None = None
        id_live_preview: int = -1
        live_preview: bool = True

    def progressapi(req):
        """``/internal/progress``: what the host's progress bar and live preview read."""
        active = req.id_task == progress.current_task
        queued = req.id_task in progress.pending_tasks
        completed = req.id_task in progress.finished_tasks
        if not active:
            return {"active": False, "queued": queued, "completed": completed, "textinfo": "Waiting..."}
        state = shared.state
        value = 0.0
        if state.job_count > 0:
            value += state.job_no / state.job_count
        if state.sampling_steps > 0 and state.job_count > 0:
            value += 1 / state.job_count * state.sampling_step / state.sampling_steps
        live = state.current_image if state.id_live_preview != req.id_live_preview else None
        return {
            "active": True,
            "queued": queued,
            "completed": completed,
            "progress": min(value, 1),
            "live_preview": live,
            "id_live_preview": state.id_live_preview,
            "textinfo": state.textinfo,
        }

    progress.start_task = start_task
    progress.finish_task = finish_task
    progress.add_task_to_queue = add_task_to_queue
    progress.ProgressRequest = ProgressRequest
    progress.progressapi = progressapi
    return progress


def make_call_queue(shared, progress):
    from tests.support.webui_standin import module

    queue_lock = FIFOLock()

    def wrap_queued_call(func):
        def f(*args, **kwargs):
            with queue_lock:
                return func(*args, **kwargs)

        return f

    def wrap_gradio_gpu_call(func, extra_outputs=None):
        def f(*args, **kwargs):
            id_task = args[0] if args and isinstance(args[0], str) and args[0].startswith("task(") else None
            if id_task:
                progress.add_task_to_queue(id_task)
            with queue_lock:
                shared.state.begin(job=id_task)
                progress.start_task(id_task)
                try:
                    res = func(*args, **kwargs)
                finally:
                    progress.finish_task(id_task)
                shared.state.end()
            shared.state.skipped = shared.state.interrupted = shared.state.stopping_generation = False
            shared.state.job_count = 0
            shared.state.job = ""
            return res

        return f

    return module(
        "modules.call_queue",
        queue_lock=queue_lock,
        wrap_queued_call=wrap_queued_call,
        wrap_gradio_gpu_call=wrap_gradio_gpu_call,
    )


# --- modules.devices / lowvram ---------------------------------------------------------------------------


def make_devices():
    """``modules.devices``: where the host computes, and ``autocast()``, the precision it samples in.

    ``autocast()`` follows the host's rules: nothing with ``force_fp16``; torch's CPU autocast in
    bfloat16 for FP8 weights on the CPU; its own ``manual_cast`` for FP8 weights with a float32
    inference dtype and on devices without autocast (``has_mps``/``has_xpu``/``cuda_no_autocast``);
    nothing when it computes in float32; torch's CUDA autocast otherwise. The defaults are A1111's
    on a CPU with ``--no-half --precision full``: float32, no autocast.
    """
    from tests.support.webui_standin import module

    cpu = torch.device("cpu")
    devices = module(
        "modules.devices",
        device=cpu,
        cpu=cpu,
        torch_gc=lambda: None,
        fp8=False,
        force_fp16=False,
        dtype=torch.float32,
        dtype_inference=torch.float32,
        has_mps=lambda: False,
        has_xpu=lambda: False,
        cuda_no_autocast=lambda device_id=None: False,
        manual_cast=manual_cast,
    )

    def autocast(disable=False):
        if disable or devices.force_fp16:
            return contextlib.nullcontext()
        if devices.fp8 and devices.device == devices.cpu:
            return torch.autocast("cpu", dtype=torch.bfloat16, enabled=True)
        if devices.fp8 and devices.dtype_inference == torch.float32:
            return manual_cast(devices.dtype, devices.dtype_inference)
        if torch.float32 in (devices.dtype, devices.dtype_inference):
            return contextlib.nullcontext()
        if devices.has_xpu() or devices.has_mps() or devices.cuda_no_autocast():
            return manual_cast(devices.dtype, devices.dtype_inference)
        return torch.autocast("cuda")

    devices.autocast = autocast
    return devices


MANUAL_CAST_CLASSES = (
    torch.nn.Linear,
    torch.nn.Conv2d,
    torch.nn.MultiheadAttention,
    torch.nn.GroupNorm,
    torch.nn.LayerNorm,
)


@contextlib.contextmanager
def manual_cast(target: torch.dtype, inference: torch.dtype):
    """``devices.manual_cast``: while active, every layer of these classes (the host's, and any
    extension's) computes in ``target``: its tensor arguments are cast to it when one differs, the
    layer itself is cast to it for the call and back after, and the result is cast to the inference
    dtype. The original forward is kept as ``org_forward`` on the class (MultiheadAttention computes
    in float32)."""

    def casting(dtype, original):
        def forward(self, *args, **kwargs):
            if any(isinstance(a, torch.Tensor) and a.dtype != dtype for a in args):
                args = [a.to(dtype) if isinstance(a, torch.Tensor) else a for a in args]
                kwargs = {k: v.to(dtype) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
            own = next((q.dtype for q in self.parameters() if q.dtype != dtype), dtype)
            if own != dtype:
                self.to(dtype)
            result = original(self, *args, **kwargs)
            if own != dtype:
                self.to(own)
            if dtype != inference:
                if isinstance(result, tuple):
                    result = tuple(r.to(inference) if isinstance(r, torch.Tensor) else r for r in result)
                elif isinstance(result, torch.Tensor):
                    result = result.to(inference)
            return result

        return forward

    patched = [cls for cls in MANUAL_CAST_CLASSES if not hasattr(cls, "org_forward")]
    for cls in patched:
        cls.org_forward = cls.forward
        cls.forward = casting(torch.float32 if cls is torch.nn.MultiheadAttention else target, cls.forward)
    try:
        yield None
    finally:
        for cls in patched:
            cls.forward = cls.org_forward
            del cls.org_forward


def make_lowvram(shared):
    from tests.support.webui_standin import module

    lowvram = module("modules.lowvram", module_in_gpu=None, cpu=torch.device("cpu"), sent_to_cpu=[])

    def send_everything_to_cpu():
        lowvram.sent_to_cpu.append(lowvram.module_in_gpu)
        if lowvram.module_in_gpu is not None:
            lowvram.module_in_gpu.to(lowvram.cpu)
        lowvram.module_in_gpu = None

    def is_needed(sd_model):
        opts = shared.cmd_opts
        return opts.lowvram or opts.medvram or (opts.medvram_sdxl and hasattr(sd_model, "conditioner"))

    lowvram.send_everything_to_cpu = send_everything_to_cpu
    lowvram.is_needed = is_needed
    return lowvram


# --- modules.sd_models ----------------------------------------------------------------------------------


class CheckpointInfo:
    def __init__(self, name: str, shorthash: str):
        self.filename = f"/models/Stable-diffusion/{name}"
        self.name = name
        self.name_for_extra = name.rsplit(".", 1)[0]
        self.model_name = self.name_for_extra
        self.hash = shorthash[:8]
        self.sha256 = shorthash * 6
        self.shorthash = shorthash
        self.title = f"{name} [{shorthash}]"
        self.short_title = f"{self.name_for_extra} [{shorthash}]"
        self.ids = [self.hash, self.model_name, self.title, name, self.name_for_extra, self.shorthash]

    def calculate_shorthash(self):
        return self.shorthash


class SdModelData:
    def __init__(self):
        self.sd_model = None
        self.loaded_sd_models = []
        self.was_loaded_at_least_once = False
        self.lock = threading.Lock()


class FakeInitialModel:
    """Forge's ``model_data.sd_model`` until its first generation loads the chosen checkpoint."""

    cond_stage_model = None


def make_sd_models(shared, *, forge: bool = False, reforge: bool = False):
    """``modules.sd_models``; with ``forge``, Forge's lazy loading: the checkpoint chosen
    (``forge_pending``) is loaded by ``forge_model_reload``, which generations call first."""
    from tests.support.webui_standin import module

    sd_models = module(
        "modules.sd_models",
        CheckpointInfo=CheckpointInfo,
        model_data=SdModelData(),
        checkpoint_aliases={},
        checkpoints_list={},
        switches=[],  # checkpoints the host would have loaded (what the tests read)
    )

    def register(info):
        sd_models.checkpoints_list[info.title] = info
        for alias in info.ids:
            sd_models.checkpoint_aliases[alias] = info

    def select_checkpoint():
        return sd_models.checkpoint_aliases.get(shared.opts.sd_model_checkpoint)

    def reload_model_weights(sd_model=None, info=None, forced_reload=False):
        """Loads the checkpoint the options select when it is not the loaded one (here: recorded)."""
        checkpoint_info = info or select_checkpoint()
        loaded = sd_models.model_data.sd_model
        if loaded is not None and checkpoint_info is not None and loaded.sd_checkpoint_info is not checkpoint_info:
            sd_models.switches.append(checkpoint_info.title)
        return loaded

    def forge_model_reload():
        pending = sd_models.forge_pending
        if pending is None:
            return sd_models.model_data.sd_model, False
        sd_models.forge_pending = None
        shared.sd_model = sd_models.model_data.sd_model = pending
        sd_models.on_forge_load(pending)
        return pending, True

    def send_model_to_cpu(m):
        """A1111 1.10.1: the unload button and route, checkpoint switches and the checkpoint cache."""
        if m is not None:
            if getattr(m, "lowvram", False):
                sd_models.lowvram.send_everything_to_cpu()
            else:
                m.to(torch.device("cpu"))
        sd_models.moves.append(("cpu", m))

    def send_model_to_trash(m):
        m.to(device="meta")
        sd_models.moves.append(("meta", m))

    def unload_model_weights(sd_model=None, info=None):
        sd_models.send_model_to_cpu(sd_model or shared.sd_model)  # looked up in the module, as in A1111
        return sd_model

    sd_models.moves = []
    sd_models.register = register
    sd_models.select_checkpoint = select_checkpoint
    sd_models.reload_model_weights = reload_model_weights

    def forge_unload_model_weights(sd_model=None, info=None):
        """Forge: ``memory_management.unload_all_models()``."""
        sd_models.moves.append(("unload_all_models", sd_model))
        manager = sys.modules.get("backend.memory_management")
        if manager is not None:
            manager.unload_all_models()

    def reforge_unload_model_weights(model=None):
        """reForge: the model itself moved to the CPU (its memory manager is not involved)."""
        model = model or sd_models.model_data.sd_model
        sd_models.moves.append(("cpu", model))
        if isinstance(model, torch.nn.Module):
            model.to("cpu")

    if forge:  # send_model_to_* are empty stubs on Forge; its memory manager moves models
        sd_models.unload_model_weights = forge_unload_model_weights
    elif reforge:
        sd_models.unload_model_weights = reforge_unload_model_weights
    else:
        sd_models.send_model_to_cpu = send_model_to_cpu
        sd_models.send_model_to_trash = send_model_to_trash
        sd_models.unload_model_weights = unload_model_weights
    if forge:
        sd_models.model_data.sd_model = FakeInitialModel()
        sd_models.forge_pending = None
        sd_models.on_forge_load = lambda sd_model: None
        sd_models.forge_model_reload = forge_model_reload
    return sd_models


# --- modules.sd_samplers ---------------------------------------------------------------------------------

SAMPLER_NAMES = {"DPM++ 2M": ["k_dpmpp_2m"], "Euler a": ["k_euler_a", "k_euler_ancestral"], "Euler": ["k_euler"]}


def make_sd_samplers():
    from tests.support.webui_standin import module

    samplers_map = {}
    for name, aliases in SAMPLER_NAMES.items():
        samplers_map[name.lower()] = name
        for alias in aliases:
            samplers_map[alias.lower()] = name
    default = next(iter(SAMPLER_NAMES))

    def fix_p_invalid_sampler_and_scheduler(p):
        p.sampler_name = p.sampler_name if p.sampler_name in SAMPLER_NAMES else default
        p.scheduler = p.scheduler or "Automatic"

    return module(
        "modules.sd_samplers",
        samplers_map=samplers_map,
        all_samplers_map={name: name for name in SAMPLER_NAMES},
        visible_sampler_names=lambda: list(SAMPLER_NAMES),
        fix_p_invalid_sampler_and_scheduler=fix_p_invalid_sampler_and_scheduler,
    )


# --- modules.processing ---------------------------------------------------------------------------------


def get_fixed_seed(seed):
    if seed == "" or seed is None:
        seed = -1
    elif isinstance(seed, str):
        try:
            seed = int(seed)
        except ValueError:
            seed = -1
    if seed == -1:
        return int(random.randrange(4294967294))
    return seed


class Processed:
    def __init__(self, p, images_list, seed=-1, info="", all_prompts=None, infotexts=None):
        self.images = images_list
        self.prompt = p.prompt
        self.negative_prompt = p.negative_prompt
        self.seed = seed
        self.info = info
        self.width = p.width
        self.height = p.height
        self.sampler_name = p.sampler_name
        self.cfg_scale = p.cfg_scale
        self.steps = p.steps
        self.all_prompts = all_prompts or [p.prompt]
        self.infotexts = infotexts or [info] * len(images_list)


def make_processing(host, base_class):
    """``modules.processing`` over the stand-in's ``StableDiffusionProcessing`` fields."""
    from tests.support.webui_standin import module

    shared, e, sd_models, sd_samplers = host.shared, host.extra_networks, host.sd_models, host.sd_samplers

    @dataclass(repr=False)
    class StableDiffusionProcessingTxt2Img(base_class):
        sampler_name: str | None = None
        scheduler: str | None = None
        cfg_scale: float = 7.0
        seed: int = -1
        width: int = 512
        height: int = 512
        do_not_save_samples: bool = False
        do_not_save_grid: bool = False
        override_settings: dict = field(default_factory=dict)
        override_settings_restore_afterwards: bool = True
        denoising_strength: float | None = None

        def close(self):
            self.c = self.uc = None

    @dataclass(repr=False)
    class StableDiffusionProcessingImg2Img(StableDiffusionProcessingTxt2Img):
        init_images: list = field(default_factory=list)
        denoising_strength: float = 0.75

    def process_images(p):
        stored = {k: shared.opts.data[k] for k in p.override_settings if k in shared.opts.data}
        if host.forge and not (
            host.reforge or host.classic
        ):  # Forge's manage_model_and_prompt_cache: the chosen checkpoint loads now
            p.sd_model, _reloaded = sd_models.forge_model_reload()
        try:
            if sd_models.checkpoint_aliases.get(p.override_settings.get("sd_model_checkpoint")) is None:
                p.override_settings.pop("sd_model_checkpoint", None)
                sd_models.reload_model_weights()
            for k, v in p.override_settings.items():
                shared.opts.set(k, v, is_api=True, run_callbacks=False)
                if k == "sd_model_checkpoint":
                    sd_models.reload_model_weights()
            sd_samplers.fix_p_invalid_sampler_and_scheduler(p)
            return process_images_inner(p)
        finally:
            if p.override_settings_restore_afterwards:
                for k, v in stored.items():
                    setattr(shared.opts, k, v)

    def process_images_inner(p):
        """Forge and reForge run the loop inside ``torch.inference_mode()`` and, before each
        sampling, reset the model's patchers to the post-Lora copy."""
        with torch.inference_mode() if host.forge else contextlib.nullcontext():
            return _process_images_inner(p)

    def _process_images_inner(p):
        if host.reforge:  # reForge reads its "advanced model sampling" script's arguments unchecked
            next((s for s in p.scripts.alwayson_scripts if s.name == "advanced model sampling for reforge"), None)
        state = shared.state
        seed = get_fixed_seed(p.seed)
        p.all_prompts = [p.prompt] * p.batch_size * p.n_iter
        p.all_negative_prompts = [p.negative_prompt] * len(p.all_prompts)
        p.all_seeds = [int(seed) + x for x in range(len(p.all_prompts))]
        images, infotexts = [], []
        if state.job_count == -1:
            state.job_count = p.n_iter
        for n in range(p.n_iter):
            p.iteration = n
            if state.interrupted or state.stopping_generation:
                break
            p.prompts = p.all_prompts[n * p.batch_size : (n + 1) * p.batch_size]
            p.negative_prompts = p.all_negative_prompts[n * p.batch_size : (n + 1) * p.batch_size]
            p.seeds = p.all_seeds[n * p.batch_size : (n + 1) * p.batch_size]
            p.prompts, p.extra_network_data = e.parse_prompts(p.prompts)
            if not p.disable_extra_networks:
                with host.devices.autocast():
                    e.activate(p, p.extra_network_data)
            if host.forge:
                p.sd_model.forge_objects = p.sd_model.forge_objects_after_applying_lora.shallow_copy()
            if p.scripts is not None:
                for script in p.scripts.script_instances:
                    script.process_before_every_sampling(p, x=None, noise=None, c=None, uc=None)
            with torch.no_grad():
                with host.devices.autocast():
                    samples = sample(host, p)
                if p.scripts is not None:
                    for script in p.scripts.script_instances:
                        script.post_sample(p, None)
                decoded = p.sd_model.decode_first_stage(samples.float())
            for i, x in enumerate(torch.clamp((decoded.float() + 1.0) / 2.0, 0.0, 1.0)):
                array = (255.0 * np.moveaxis(x.cpu().numpy(), 0, 2)).astype(np.uint8)
                images.append(Image.fromarray(array))
                infotexts.append(f"{p.prompts[i]}\nSteps: {p.steps}, Seed: {p.seeds[i]}")
            state.nextjob()
        if not p.disable_extra_networks and p.extra_network_data:
            e.deactivate(p, p.extra_network_data)
        if p.scripts is not None:
            for script in p.scripts.script_instances:
                script.postprocess(p, None)
        return Processed(p, images, p.all_seeds[0], infotexts[0] if infotexts else "", p.all_prompts, infotexts)

    return module(
        "modules.processing",
        StableDiffusionProcessing=base_class,
        StableDiffusionProcessingTxt2Img=StableDiffusionProcessingTxt2Img,
        StableDiffusionProcessingImg2Img=StableDiffusionProcessingImg2Img,
        Processed=Processed,
        process_images=process_images,
        get_fixed_seed=get_fixed_seed,
    )


# --- sampling (KDiffusionSampler + CFGDenoiser, Euler) ----------------------------------------------------


class CFGDenoiser:
    """The fields of the host's CFGDenoiser the extension reads: ``step`` and ``total_steps``."""

    def __init__(self, total_steps: int):
        self.step = 0
        self.total_steps = total_steps


def _sigmas(sd_model, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    alphas = sd_model.alphas_cumprod.float().cpu()
    timesteps = torch.linspace(alphas.shape[0] - 1, 0, steps).round().long()
    sigmas = ((1 - alphas[timesteps]) / alphas[timesteps]).sqrt()
    return timesteps, torch.cat([sigmas, sigmas.new_zeros(1)])


def _denoised(sd_model, x, sigma, t, cond):
    """CompVisDenoiser / CompVisVDenoiser: the model's prediction as the denoised latent."""
    c_in = 1 / (sigma**2 + 1) ** 0.5
    out = sd_model.apply_model(x * c_in, t, cond)
    if getattr(sd_model, "parameterization", "eps") == "v":
        c_skip = 1 / (sigma**2 + 1)
        c_out = -sigma / (sigma**2 + 1) ** 0.5
        return x * c_skip + out * c_out
    return x - out * sigma


def sample(host, p) -> torch.Tensor:
    shared, sd_model = host.shared, p.sd_model
    state = shared.state
    cond = sd_model.get_learned_conditioning(p.prompts)
    uncond = sd_model.get_learned_conditioning(p.negative_prompts)
    torch.manual_seed(p.seeds[0])  # the host's rng.randn seeds the global generator
    noise = torch.randn((len(p.prompts), 4, p.height // 8, p.width // 8))
    timesteps, sigmas = _sigmas(sd_model, p.steps)
    init = getattr(p, "init_images", None)
    if init:
        t_enc = int(min(p.denoising_strength, 0.999) * p.steps)
        start = p.steps - t_enc - 1
        timesteps, sigmas = timesteps[start:], sigmas[start:]
        pixels = torch.stack(
            [torch.from_numpy(np.moveaxis(np.asarray(i).astype(np.float32) / 255.0, 2, 0)) for i in init]
        )
        x = sd_model.get_first_stage_encoding(sd_model.encode_first_stage(2.0 * pixels - 1.0)) + noise * sigmas[0]
    else:
        x = noise * sigmas[0]
    rows = x.shape[0]
    denoiser = CFGDenoiser(len(timesteps))
    state.sampling_steps = len(timesteps)
    for index, t in enumerate(timesteps):
        if state.interrupted or state.skipped:
            break
        state.sampling_step = index
        sigma = sigmas[index]
        x_in = torch.cat([x, x])
        params = host.script_callbacks.CFGDenoiserParams(
            x_in, None, sigma.repeat(2 * rows), state.sampling_step, state.sampling_steps, cond, uncond, denoiser
        )
        host.script_callbacks.cfg_denoiser_callback(params)
        out = _denoised(
            sd_model, params.x, sigma, t.repeat(2 * rows), torch.cat([params.text_cond, params.text_uncond])
        )
        denoised = out[rows:] + (out[:rows] - out[rows:]) * p.cfg_scale
        x = x + (x - denoised) / sigma * (sigmas[index + 1] - sigma)
        denoiser.step += 1
    return x
