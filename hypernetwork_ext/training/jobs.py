"""Creating networks and running training jobs for a UI or an HTTP API, host-free.

The host passes a :class:`TrainingServices` (its hypernetwork folder, a backend over its loaded
model, its queue lock, its progress/interrupt hooks); :class:`TrainingJobs` runs one job at a time
in a background thread and keeps what a status query needs (step, progress, last loss, loss
history, previews, result).
"""

from __future__ import annotations

import os
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from .. import formats
from ..atomic import check_writable_folder
from ..errors import HypernetworkError, InvalidConfigError
from ..families import FAMILIES, widths_fit
from ..library import Library
from ..network import WEIGHT_INITS, create, usable_activation_names
from ..shape import ModelShape
from .config import FieldProblems, TrainingConfig
from .data import list_templates
from .engine import TrainingCallbacks, TrainingProgress, train


class JobBusyError(HypernetworkError):
    """A training job is already running."""


def default_widths(family: str | None) -> list[int]:
    """The widths a new network gets for a model family (SD1 when unknown, as A1111's default)."""
    return list(FAMILIES.get(family or "sd1", FAMILIES["sd1"]).widths)


# --- create -----------------------------------------------------------------------------------
@dataclass
class CreateRequest:
    """A1111's create_hypernetwork parameters (same names), plus init seed, output activation and format."""

    name: str = ""
    enable_sizes: list[int] | None = None  # None: the loaded model's widths
    layer_structure: str | list = "1, 2, 1"
    activation_func: str = "linear"
    weight_init: str = "Normal"
    weight_init_seed: int = -1
    add_layer_norm: bool = False
    use_dropout: bool = False
    dropout_structure: str | list = "0, 0, 0"
    activate_output: bool = False
    overwrite_old: bool = False
    file_format: str = "pt"

    @classmethod
    def from_dict(cls, values: dict) -> CreateRequest:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise FieldProblems({key: "unknown option" for key in unknown})
        return cls(**values)


def _numbers(value, field_name: str, problems: dict[str, str]) -> list[float]:
    if isinstance(value, str):
        parts = [part.strip() for part in value.split(",") if part.strip()]
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        problems[field_name] = f"expected comma-separated numbers, found {value!r}"
        return []
    numbers = []
    for part in parts:
        try:
            number = float(part)
        except (TypeError, ValueError):
            problems[field_name] = f"{part!r} is not a number"
            return []
        numbers.append(int(number) if number.is_integer() else number)
    return numbers


def sanitise_name(name: str) -> str:
    """A1111's rule: keep letters, digits and ``._- ``."""
    return "".join(ch for ch in str(name) if ch.isalnum() or ch in "._- ").strip()


def create_network_file(
    request: CreateRequest, directory: str, family: str | None = None, model_widths: list[int] | None = None
) -> tuple[str, object]:
    """Create and save a new network; every invalid field is reported at once. Without widths in
    the request it gets ``model_widths`` (the loaded model's), else its family's."""
    problems: dict[str, str] = {}
    name = sanitise_name(request.name)
    if not name:
        problems["name"] = "give the network a name (letters, digits, spaces, '.', '_' or '-')"
    if request.file_format not in ("pt", "safetensors"):
        problems["file_format"] = f"{request.file_format!r} is not 'pt' or 'safetensors'"
    widths = (model_widths or default_widths(family)) if not request.enable_sizes else []
    for width in request.enable_sizes or []:
        try:
            widths.append(int(width))
        except (TypeError, ValueError):
            problems["enable_sizes"] = f"{width!r} is not a width"
    if request.enable_sizes is not None and not request.enable_sizes:
        problems["enable_sizes"] = "choose at least one width"
    structure = _numbers(request.layer_structure, "layer_structure", problems)
    dropout = _numbers(request.dropout_structure, "dropout_structure", problems) if request.use_dropout else None
    if request.activation_func not in usable_activation_names():
        problems["activation_func"] = f"{request.activation_func!r} is not an activation that can be used here"
    if request.weight_init not in WEIGHT_INITS:
        problems["weight_init"] = f"{request.weight_init!r} is not one of {', '.join(WEIGHT_INITS)}"
    path = os.path.join(directory, f"{name}.{request.file_format}") if name else ""
    if path and os.path.exists(path) and not request.overwrite_old:
        problems["name"] = f"{path} exists; tick 'overwrite' or choose another name"
    if problems:
        raise FieldProblems(problems)
    if dropout is not None and len(dropout) != len(structure):
        raise FieldProblems({"dropout_structure": f"needs {len(structure)} entries, one per layer-structure entry"})
    try:
        network = create(
            widths,
            structure,
            request.activation_func,
            request.weight_init,
            layer_norm=request.add_layer_norm,
            dropout_structure=dropout if dropout is not None else [0] * len(structure),
            activate_output=request.activate_output,
            seed=None if request.weight_init_seed < 0 else request.weight_init_seed,
            name=name,
            model_family=family,
        )
    except InvalidConfigError as exc:
        field_name = "dropout_structure" if "dropout" in exc.problem else "layer_structure"
        if "activation" in exc.problem:
            field_name = "activation_func"
        raise FieldProblems({field_name: exc.problem}) from None
    formats.save(network, path, overwrite=request.overwrite_old)
    return path, network


# --- services and jobs -----------------------------------------------------------------------
@dataclass
class TrainingServices:
    """What a host provides. Only ``hypernetwork_dir`` and ``make_backend`` are required.

    ``run_exclusive(work, job)`` runs a job's training (the host takes its GPU queue around it);
    ``network_names`` lists what the tab offers (default: the files of ``hypernetwork_dir``);
    ``model_shape`` describes the loaded model's attention (widths for Create, and a network that
    would not attach to it is refused before its training starts).
    """

    hypernetwork_dir: str
    make_backend: Callable[[], Any]
    model_family: Callable[[], str | None] = lambda: None
    model_shape: Callable[[], ModelShape | None] = lambda: None
    template_dirs: Callable[[], list[str]] = list
    resolve_network: Callable[[str], str] | None = None
    network_names: Callable[[], list[str]] | None = None
    run_exclusive: Callable[[Callable[[], Any], JobStatus], Any] = lambda fn, job: fn()
    host_callbacks: Callable[[], TrainingCallbacks | None] = lambda: None
    on_saved: Callable[[str], None] = lambda path: None
    presets_dir: str | None = None

    def network_path(self, name: str) -> str:
        if self.resolve_network is not None:
            return self.resolve_network(name)
        return find_network(self.hypernetwork_dir, name)

    def templates(self) -> dict[str, str]:
        return list_templates(self.template_dirs())

    def names(self) -> list[str]:
        if self.network_names is not None:
            return list(self.network_names())
        return sorted(list_networks(self.hypernetwork_dir))

    def new_network_widths(self) -> list[int]:
        """The widths Create offers first: the loaded model's when known, else its family's."""
        shape = self.model_shape()
        return (shape.default_widths if shape else None) or default_widths(self.model_family())


def list_networks(directory: str) -> dict[str, str]:
    """Network name (file stem) -> path, searching ``directory`` recursively as the library does
    (shallowest first; links leading out of the folder are not followed)."""
    found: dict[str, str] = {}
    for entry in Library([directory]).entries:
        found.setdefault(entry.name, entry.path)
    return found


def find_network(directory: str, name: str) -> str:
    if os.path.isfile(name):
        return name
    networks = list_networks(directory)
    if name not in networks:
        raise HypernetworkError(f"no hypernetwork named {name!r} in {directory}")
    return networks[name]


@dataclass
class JobStatus:
    id: str
    task_id: str | None = None  # the host's id for it (A1111's progress task), when it has one
    state: str = "queued"  # queued, running, finished, interrupted, non-finite, diverged, failed
    step: int = 0
    start_step: int = 0
    max_steps: int = 0
    progress: float = 0.0
    last_loss: float | None = None
    validation_loss: float | None = None
    learn_rate: float | None = None
    last_prompt: str = ""
    last_preview: str | None = None
    last_copy: str | None = None
    previews: list[str] = field(default_factory=list)
    losses: list[tuple[int, float]] = field(default_factory=list)
    fixed_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss at fixed noise)
    message: str = ""
    skipped_count: int = 0  # samples left out so far: their latent or conditioning was not finite
    skipped_samples: list[dict] = field(default_factory=list)  # when it ended: image, caption, reason, count
    recomputed_in_float32: dict[str, int] = field(default_factory=dict)
    result_path: str | None = None
    error: str | None = None
    started: float = field(default_factory=time.time)
    finished: float | None = None

    @property
    def active(self) -> bool:
        return self.state in ("queued", "running")

    def to_dict(self, *, history: bool = True) -> dict:
        values = asdict(self)
        if not history:
            values.pop("losses")
        values["losses"] = [list(pair) for pair in values.get("losses", [])] if history else None
        return values


class TrainingJobs:
    """Runs one training job at a time and answers status queries about every job run."""

    def __init__(self, services: TrainingServices, *, background: bool = True):
        self.services = services
        self.background = background
        self.jobs: dict[str, JobStatus] = {}
        self._stop: dict[str, threading.Event] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()

    # -- create ------------------------------------------------------------------------------
    def create(self, request: CreateRequest | dict) -> dict:
        if isinstance(request, dict):
            request = CreateRequest.from_dict(request)
        check_writable_folder(self.services.hypernetwork_dir)  # a clear refusal, not an OSError; the save makes it
        path, network = create_network_file(
            request, self.services.hypernetwork_dir, self.services.model_family(), self.services.new_network_widths()
        )
        self.services.on_saved(path)
        return {"path": path, "name": network.name, "widths": network.widths, "parameters": network.parameter_count()}

    # -- train -------------------------------------------------------------------------------
    def start(self, config: TrainingConfig | dict, *, task_id: str | None = None) -> str:
        if isinstance(config, dict):
            config = TrainingConfig.from_dict(config)
        problems = config.problems()
        source = None
        if "hypernetwork_name" not in problems and not config.resume_from.strip():
            try:
                source = self.services.network_path(config.hypernetwork_name)
            except HypernetworkError as exc:
                problems["hypernetwork_name"] = exc.problem
        if config.resume_from.strip() and not os.path.isfile(config.resume_from):
            problems["resume_from"] = f"no such file: {config.resume_from}"
        if not problems:
            problems.update(self._network_problems(config.resume_from.strip() or source, config))
        if problems:
            raise FieldProblems(problems)
        with self._lock:
            if any(job.active for job in self.jobs.values()):
                raise JobBusyError("a training job is already running; interrupt it or wait for it to finish")
            job = JobStatus(id=uuid.uuid4().hex[:12], task_id=task_id, max_steps=config.steps)
            self.jobs[job.id] = job
            self._stop[job.id] = threading.Event()
        runner = threading.Thread(target=self._run, args=(job, config, source), name=f"hypernetwork-train-{job.id}")
        self._threads[job.id] = runner
        if self.background:
            runner.daemon = True
            runner.start()
        else:
            runner.run()
        return job.id

    def _network_problems(self, path: str, config: TrainingConfig) -> dict[str, str]:
        """What would make the run pointless, found before it starts: a network already at the
        steps asked for, or one whose widths the loaded model does not have."""
        try:
            network = formats.load(path)
        except HypernetworkError as exc:
            return {"hypernetwork_name": str(exc)}
        problems = {}
        if network.step >= config.steps:
            problems["steps"] = (
                f"the network is already at step {network.step}; steps count earlier sessions, so ask for more "
                f"than {network.step}"
            )
        shape = self.services.model_shape()
        if shape is not None and not widths_fit(network.widths, shape.context_width, shape.self_widths):
            problems["hypernetwork_name"] = (
                f"{os.path.basename(path)} has widths {', '.join(map(str, network.widths))}, but the loaded model's "
                f"attention has {', '.join(map(str, shape.default_widths))}: it would change nothing there"
            )
        return problems

    def _callbacks(self, job: JobStatus) -> TrainingCallbacks:
        host = self.services.host_callbacks() or TrainingCallbacks()
        stop = self._stop[job.id]

        def on_progress(progress: TrainingProgress) -> None:
            job.state = "running"
            job.step, job.start_step, job.max_steps = progress.step, progress.start_step, progress.max_steps
            job.progress = progress.fraction
            job.last_loss, job.learn_rate, job.last_prompt = progress.loss, progress.learn_rate, progress.last_prompt
            if progress.validation_loss is not None:
                job.validation_loss = progress.validation_loss
            if progress.last_copy:
                job.last_copy = progress.last_copy
            if progress.loss is not None:
                job.losses.append((progress.step, progress.loss))
            job.skipped_count = progress.skipped_samples
            if progress.fixed_losses:
                job.fixed_losses = progress.fixed_losses  # the run's copy as of this step
            if host.on_progress:
                host.on_progress(progress)

        def on_preview(image, path: str) -> None:
            job.last_preview = path
            job.previews.append(path)
            if host.on_preview:
                host.on_preview(image, path)

        def on_message(text: str) -> None:
            job.message = text
            if host.on_message:
                host.on_message(text)

        return TrainingCallbacks(
            on_progress=on_progress,
            should_stop=lambda: stop.is_set() or host.stop_requested(),
            on_preview=on_preview,
            on_message=on_message,
        )

    def _run(self, job: JobStatus, config: TrainingConfig, source: str | None) -> None:
        try:
            network = formats.load(source) if source else None

            def work():
                job.state = "running"  # "queued" until the host's queue lets it run
                return train(
                    network,
                    self.services.make_backend(),
                    config,
                    self._callbacks(job),
                    source_path=source,
                    output_dir=self.services.hypernetwork_dir,
                    template_dirs=self.services.template_dirs(),
                )

            result = self.services.run_exclusive(work, job)
            job.result_path = result.path
            job.step = result.step
            job.skipped_samples, job.recomputed_in_float32 = result.skipped_samples, result.recomputed_in_float32
            job.skipped_count = sum(item["count"] for item in result.skipped_samples)
            job.fixed_losses = list(result.fixed_losses)
            job.message = result.message
            job.state = {"finished": "finished", "already trained": "failed", "interrupted": "interrupted"}.get(
                result.stopped, result.stopped
            )
            if result.stopped == "already trained":  # nothing was trained: not "finished step 120/10"
                job.error = result.message
            if result.preview_path:
                job.last_preview = result.preview_path
            if result.path:
                self.services.on_saved(result.path)
        except HypernetworkError as exc:
            job.state, job.error, job.message = "failed", str(exc), str(exc)
        except Exception as exc:
            job.state, job.error = "failed", f"{type(exc).__name__}: {exc}"
            job.message = job.error
            traceback.print_exc()
        finally:
            job.finished = time.time()
            if job.max_steps:
                job.progress = min(1.0, max(0.0, (job.step - job.start_step) / max(job.max_steps - job.start_step, 1)))

    # -- queries -----------------------------------------------------------------------------
    def status(self, job_id: str) -> JobStatus:
        if job_id not in self.jobs:
            raise KeyError(job_id)
        return self.jobs[job_id]

    def latest(self) -> JobStatus | None:
        return next(reversed(self.jobs.values()), None)

    def interrupt(self, job_id: str) -> bool:
        if job_id not in self.jobs:
            raise KeyError(job_id)
        self._stop[job_id].set()
        return self.jobs[job_id].active

    def wait(self, job_id: str, timeout: float | None = None) -> JobStatus:
        thread = self._threads.get(job_id)
        if thread is not None and thread.is_alive():
            thread.join(timeout)
        return self.jobs[job_id]
