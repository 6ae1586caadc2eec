"""The training loop: ``train(network, backend, config, callbacks) -> TrainingResult``.

It does what A1111's ``train_hypernetwork`` does, without its bugs: gradients are unscaled before
they are clipped; copies are named with their true step and carry that name inside; optimizer
sidecars are bound to the file they sit next to; the network trained is never overwritten (the
result is a new file, written atomically); a run that diverges (a non-finite loss or gradient, a
loss far above its recent level, a step that dwarfs the weights) stops on the weights from before
it did (``divergence.py``); the host's attention optimisation stays on (the network runs in to_k/to_v
hooks, so any kernel works); the text encoder stays where it is and conditioning of fixed captions
is computed once; SDXL and v-prediction models train through their backends. Every random choice
comes from the run's seed and the step, so a resumed run continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .. import formats
from ..atomic import atomic_write_bytes, atomic_write_with, check_writable_folder
from ..errors import HypernetworkError, InvalidConfigError
from ..formats.optim import read_optimizer_sidecar, write_optimizer_sidecar
from ..network import Hypernetwork
from . import data as data_mod
from . import distributed, logs
from .backends.base import (
    ENCODER_KINDS,
    Conditioning,
    ModelGuard,
    PreviewRequest,
    TrainingBackend,
    cat_conditioning,
    in_float32,
    stored_dtype,
    text_part,
    unet_compute_dtype,
)
from .checkpointing import gradient_checkpointing
from .config import PREVIEW_FIELDS, TrainingConfig
from .divergence import Diverged, DivergenceGuard, all_finite
from .optimizers import build_optimizer
from .samples import EMPTY_PROMPT, NON_FINITE_CONDITIONING, NON_FINITE_LATENT, SampleReport, finite_rows
from .schedules import RateShape, StepSchedule

STOP_FINISHED = "finished"
STOP_INTERRUPTED = "interrupted"
STOP_NAN = "non-finite"
STOP_DIVERGED = "diverged"
STOP_ERROR = "error"
STOP_ALREADY = "already trained"
_CONDITIONING_CACHE = 4096
CAST_COPIES_NOTE = (
    "the host keeps the UNet's weights in float16 and computes in float32 on the CPU, so training does too; "
    "the float32 copies it makes of each layer's weights stay for the backward pass (twice the UNet's size "
    "in memory): gradient checkpointing recomputes them instead"
)
# The fixed-noise loss: this many training images, each at this many timesteps (one forward pass each).
FIXED_LOSS_IMAGES = 8
FIXED_LOSS_TIMESTEPS = 2


@dataclass
class TrainingProgress:
    step: int
    start_step: int
    max_steps: int
    loss: float | None = None
    learn_rate: float | None = None
    epoch: int = 0
    epoch_step: int = 0
    validation_loss: float | None = None
    last_copy: str | None = None
    last_preview: str | None = None
    last_prompt: str = ""
    message: str = ""
    elapsed: float = 0.0
    skipped_samples: int = 0  # so far: samples whose inputs were not finite
    #: (step, loss at fixed noise and timesteps) so far, when ``fixed_loss_every`` asks for them.
    fixed_losses: list[tuple[int, float]] = field(default_factory=list)

    @property
    def fraction(self) -> float:
        span = max(self.max_steps - self.start_step, 1)
        return min(max((self.step - self.start_step) / span, 0.0), 1.0)


@dataclass
class TrainingCallbacks:
    """How a host follows and steers a run; every member is optional."""

    on_progress: Callable[[TrainingProgress], None] | None = None
    should_stop: Callable[[], bool] | None = None
    on_preview: Callable[[object, str], None] | None = None
    on_message: Callable[[str], None] | None = None

    def stop_requested(self) -> bool:
        return bool(self.should_stop and self.should_stop())

    def message(self, text: str) -> None:
        if self.on_message:
            self.on_message(text)


@dataclass
class TrainingResult:
    network: Hypernetwork
    path: str | None
    start_step: int
    step: int
    stopped: str
    message: str
    seed: int
    last_loss: float | None = None
    copies: list[str] = field(default_factory=list)
    previews: list[str] = field(default_factory=list)
    preview_path: str | None = None
    log_dir: str | None = None
    settings_path: str | None = None
    losses: list[tuple[int, float]] = field(default_factory=list)
    validation_losses: list[tuple[int, float]] = field(default_factory=list)
    fixed_losses: list[tuple[int, float]] = field(default_factory=list)
    skipped_images: list[str] = field(default_factory=list)  # dataset files that could not be read
    #: Samples left out because their latent or conditioning was not finite (image, caption, reason, count).
    skipped_samples: list[dict] = field(default_factory=list)
    #: Inputs (and losses) half precision made non-finite that float32 recomputed: {"latent": n, ...}.
    recomputed_in_float32: dict[str, int] = field(default_factory=dict)


# --- helpers ----------------------------------------------------------------------------------
def base_name(network: Hypernetwork, source_path: str | None) -> str:
    """The name copies and results are built on: the file's stem without a ``-<step>`` suffix."""
    stem = os.path.splitext(os.path.basename(source_path))[0] if source_path else network.name
    return re.sub(r"-\d+$", "", stem) or stem


def resolve_precision(config: TrainingConfig, backend: TrainingBackend) -> tuple[torch.dtype | None, bool, str]:
    """(autocast dtype or None, whether a gradient scaler is needed, a note for the user)."""
    device_type = backend.device.type
    note = ""
    model_dtype = stored_dtype(backend.unet)
    if model_dtype == torch.float16 and device_type == "cpu":
        # A CPU has no float16 kernels (a convolution's backward 80x slower than in float32 here): where
        # the host keeps float16 weights and computes in float32 (Forge Classic's --unet-in-fp16), so do
        # we. Elsewhere autocast follows the stored dtype, so the layers use the weights without copies.
        model_dtype = unet_compute_dtype(backend)
        if model_dtype != torch.float16 and not config.gradient_checkpointing:
            note = CAST_COPIES_NOTE
    wanted = config.mixed_precision
    if wanted == "auto":
        if device_type == "cuda":
            wanted = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            wanted = "no"
    if model_dtype in (torch.float16, torch.bfloat16):
        forced = "fp16" if model_dtype == torch.float16 else "bf16"
        if wanted != forced:
            note = f"the model's weights are {model_dtype}, so training runs under {forced} autocast"
        wanted = forced
    if wanted == "no":
        return None, False, note
    dtype = torch.float16 if wanted == "fp16" else torch.bfloat16
    return dtype, dtype == torch.float16 and device_type == "cuda", note


def _fork_rng(device: torch.device):
    devices = (
        [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    )
    return torch.random.fork_rng(devices=devices)


class Ema:
    """An exponential moving average of the network's weights; saved files hold the average."""

    def __init__(self, parameters: list[torch.nn.Parameter], decay: float):
        self.parameters = parameters
        self.decay = decay
        self.shadow = [p.detach().clone() for p in parameters]

    @torch.no_grad()
    def update(self) -> None:
        for shadow, parameter in zip(self.shadow, self.parameters, strict=True):
            shadow.lerp_(parameter.detach(), 1.0 - self.decay)

    @contextlib.contextmanager
    def swapped(self):
        """The averaged weights in place of the trained ones, for saving or previews."""
        saved = [p.detach().clone() for p in self.parameters]
        with torch.no_grad():
            for parameter, shadow in zip(self.parameters, self.shadow, strict=True):
                parameter.copy_(shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                for parameter, value in zip(self.parameters, saved, strict=True):
                    parameter.copy_(value)


class ConditioningCache:
    """Conditioning of captions already seen: fixed captions are encoded once, and the text encoder
    is never moved for it. Kept in the host's memory when the model computes elsewhere (a row is a
    few hundred KB: thousands of shuffled captions would take a GiB of a card) and moved per batch.
    A caption whose conditioning is not finite, even recomputed in float32, is remembered as unusable."""

    def __init__(self, backend: TrainingBackend, limit: int = _CONDITIONING_CACHE, report: SampleReport | None = None):
        self.backend = backend
        self.limit = limit
        self.report = report or SampleReport()
        self.storage = torch.device("cpu")
        self.items: OrderedDict = OrderedDict()
        self.unusable: set[tuple[str, tuple[int, int]]] = set()
        # Per image size, outside the eviction order: one entry each, used on every dropped caption.
        self.unconditionals: dict[tuple[int, int], Conditioning | None] = {}
        self.auto_rates: dict[tuple[int, int], float] = {}

    def usable(self, texts: list[str | None], size: tuple[int, int]) -> list[bool]:
        """Whether the conditioning of each caption (None: the host's empty negative prompt) is
        finite; the captions not seen yet are encoded now."""
        missing = [
            text
            for text in dict.fromkeys(texts)
            if text is not None and (text, size) not in self.items and (text, size) not in self.unusable
        ]
        if missing:
            self._encode(missing, size)
        return [
            self.unconditional(size) is not None if text is None else (text, size) not in self.unusable
            for text in texts
        ]

    def get(self, texts: list[str | None], size: tuple[int, int]):
        """Conditioning of usable ``texts``, on the model's device."""
        self.usable(texts, size)
        parts = [self.unconditional(size) if text is None else self.items[(text, size)] for text in texts]
        return _to(cat_conditioning(parts), self.backend.device)

    def _encode(self, texts: list[str], size: tuple[int, int]) -> None:
        encoded = self.backend.encode_text(texts, size)
        for index, (text, ok) in enumerate(zip(texts, finite_rows(encoded), strict=True)):
            row = _row(encoded, index) if ok else self._encode_alone(text, size, encoded, len(texts) > 1)
            if row is None:
                self.unusable.add((text, size))
            else:
                self.items[(text, size)] = _to(row, self.storage)
        while len(self.items) > self.limit:
            self.items.popitem(last=False)

    def _encode_alone(self, text: str, size: tuple[int, int], like: Conditioning, batched: bool) -> Conditioning | None:
        """A caption whose row is not finite, encoded by itself as a prompt is (A1111's emphasis
        rescales a batch by one mean over all its rows: a caption that overflows, or two whose sum
        does, make every row of their batch non-finite), then in float32 if still needed; None if
        it is not finite either way."""
        if batched:
            single = self.backend.encode_text([text], size)
            if finite_rows(single)[0]:
                return _row(single, 0)
        return self._in_float32(lambda: self.backend.encode_text([text], size), like, "caption", 1).get(0)

    def _in_float32(self, encode, like: Conditioning, what: str, count: int) -> dict[int, Conditioning]:
        """The rows of ``encode()`` that are finite with the text encoder in float32, and still
        finite in the precision the host gave (``like``'s): the UNet takes them in that."""
        with in_float32(self.backend.encoder_modules("text"), self.backend.device.type) as converted:
            if not converted:
                return {}
            encoded = _cast_like(encode(), like)
        found = {}
        for index, ok in enumerate(finite_rows(encoded)[:count]):
            if ok:
                found[index] = _row(encoded, index)
                self.report.recompute(what)
        return found

    def unconditional(self, size: tuple[int, int]) -> Conditioning | None:
        """The empty negative prompt's conditioning, or None when it is not finite."""
        if size not in self.unconditionals:
            cond = self.backend.encode_unconditional(1, size)
            if not all(finite_rows(cond)):
                cond = self._in_float32(
                    lambda: self.backend.encode_unconditional(1, size), cond, "empty prompt", 1
                ).get(0)
            self.unconditionals[size] = cond
        return self.unconditionals[size]

    def dropout_rate(self, configured: float, size: tuple[int, int]) -> float:
        """``configured``, or for auto (-1) the share that teaches a network the empty negative's
        pass where the host samples it as zeros (SDXL): never seen in training otherwise. Decided
        once per size (reading the tensor would wait for the device on every step)."""
        if configured != -1.0:
            return configured
        if size not in self.auto_rates:
            unconditional = self.unconditional(size)
            zeros = unconditional is not None and not text_part(unconditional).any()
            self.auto_rates[size] = _AUTO_CAPTION_DROPOUT if zeros else 0.0
        return self.auto_rates[size]


_AUTO_CAPTION_DROPOUT = 0.1


def _row(cond, index: int):
    if isinstance(cond, dict):
        return {key: value[index : index + 1] for key, value in cond.items()}
    return cond[index : index + 1]


def _cast_like(cond, like):
    if isinstance(cond, dict):
        return {key: value.to(like[key].dtype) for key, value in cond.items()}
    return cond.to(like.dtype)


def _to(cond, device: torch.device):
    if isinstance(cond, dict):
        return {key: value.to(device, non_blocking=True) for key, value in cond.items()}
    return cond.to(device, non_blocking=True)


# --- the run --------------------------------------------------------------------------------
class _Run:
    def __init__(self, network, backend, config, callbacks, *, source_path, output_dir, template_dirs, progress_bar):
        self.network = network
        self.backend = backend
        self.config = config
        self.callbacks = callbacks or TrainingCallbacks()
        self.source_path = source_path
        self.output_dir = output_dir
        self.template_dirs = list(template_dirs)
        self.progress_bar = progress_bar
        self.sidecar = None
        self.seed = config.seed
        self.losses: list[tuple[int, float]] = []
        self.validation_losses: list[tuple[int, float]] = []
        self.fixed_losses: list[tuple[int, float]] = []
        self.copies: list[str] = []
        self.previews: list[str] = []
        self.last_loss: float | None = None
        self.last_validation: float | None = None
        self.last_prompt = ""
        self.last_batch: list[int] = []
        self.parameters: list[torch.nn.Parameter] = []
        self.ema: Ema | None = None
        self.guard: DivergenceGuard | None = None
        self.settings_path: str | None = None
        self.error: Exception | None = None  # a failure after some steps: reported, the steps kept
        self.skipped_images: list[str] = []  # dataset files that could not be read
        self.started = time.monotonic()
        self.samples = SampleReport(self.callbacks.message)
        # Batches passed over because none of their samples had finite inputs (part of the resume state).
        self.batch_offset = 0
        self.autocast_enabled = True

    # -- set-up -----------------------------------------------------------------------------
    def prepare(self) -> None:
        config = self.config
        self.start_step = self.network.step
        self.name = config.output_name.strip() or base_name(self.network, self.source_path)
        self.file_format = config.file_format or _format_of(self.source_path)
        self.schedule = StepSchedule(config.learn_rate, config.steps)
        self.clip_schedule = (
            StepSchedule(config.clip_grad_value, config.steps, what="gradient clipping")
            if config.clip_enabled
            else None
        )
        self.shape = RateShape(
            config.lr_scheduler, config.lr_warmup_steps, config.lr_cycles, config.lr_min_ratio, 0, config.steps
        )
        self.autocast_dtype, use_scaler, note = resolve_precision(config, self.backend)
        if note:
            self.callbacks.message(note)
        self.scaler = _cuda_grad_scaler() if use_scaler else None
        writes = config.log_directory and distributed.is_main()
        self.log_dir = logs.log_folder(config.log_directory, self.name) if writes else None
        if distributed.is_main():  # refused now, not when the first copy or the result is due
            check_writable_folder(self._result_folder())
            if self.log_dir:
                check_writable_folder(self.log_dir)
        if config.training_enable_tensorboard:
            logs.tensorboard_writer_class()
        if config.output_name.strip():
            target = self._result_path(self.start_step)
            if os.path.exists(target):
                raise InvalidConfigError(f"output_name: {target} exists; choose another name")

    def build_dataset(self) -> None:
        config = self.config
        template = data_mod.resolve_template(config.template_filename, self.template_dirs)
        self.captions = data_mod.CaptionBuilder(
            data_mod.read_template(template),
            self.name,
            shuffle_tags=config.shuffle_tags,
            tag_drop_out=config.tag_drop_out,
            keep_tags=config.keep_tags,
        )
        found = data_mod.scan_images(
            config.data_root,
            config.dataset_filename_word_regex,
            config.dataset_filename_join_string,
            on_skip=self.skip_image,
        )
        sizes = data_mod.plan_sizes(
            found,
            config.training_width,
            config.training_height,
            varsize=config.varsize,
            bucketing=config.bucketing,
            step=config.bucket_step,
        )
        self.callbacks.message(f"Preparing dataset: {len(found)} images{self.skipped_note()}")
        bar = None
        if self.progress_bar and distributed.is_main():
            import tqdm

            bar = tqdm.tqdm(total=len(found), desc="Encoding the dataset", unit="image")
        try:
            self.dataset = self._encoded_dataset(found, sizes, bar)
        finally:
            if bar is not None:
                bar.close()
        self.batches_per_epoch = self.dataset.batches_per_epoch
        self._epoch_cache: dict[int, list[list[int]]] = {}
        self.conditioning = ConditioningCache(self.backend, report=self.samples)

    def skip_image(self, path: str, why: str) -> None:
        """A file of the dataset that cannot be read: named, counted, and the run goes on (A1111
        skips such files silently; a bad file among hundreds should not end a run)."""
        self.skipped_images.append(path)
        self.callbacks.message(f"warning: {path}: {why}; skipped, training goes on with the other images")

    def skipped_note(self) -> str:
        count = len(self.skipped_images)
        if not count:
            return ""
        names = ", ".join(os.path.basename(path) for path in self.skipped_images[:5])
        more = f" and {count - 5} more" if count > 5 else ""
        return f" ({count} unreadable file{'s' if count > 1 else ''} skipped: {names}{more})"

    def _encoded_dataset(self, found, sizes, bar) -> data_mod.Dataset:
        config = self.config
        return data_mod.build_dataset(
            found,
            sizes,
            self.finite_latents,
            batch_size=config.batch_size,
            latent_sampling_method=config.latent_sampling_method,
            use_weight=config.use_weight,
            validation_split=config.validation_split,
            seed=self.seed,
            keep_aspect=config.bucketing or config.varsize,
            storage_device=self.backend.device,
            should_stop=self.callbacks.stop_requested,
            on_skip=self.skip_image,
            on_unusable=lambda path: self.samples.skip(path, None, NON_FINITE_LATENT),
            on_image=bar.update if bar is not None else None,
        )

    def finite_latents(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The VAE's posterior of an image; recomputed with the VAE in float32 when half precision
        made it non-finite; None when it is not finite either way."""
        backend = self.backend
        needs_std = self.config.latent_sampling_method != "deterministic"

        def finite(encoded) -> bool:
            return all(finite_rows(encoded[0])) and (not needs_std or all(finite_rows(encoded[1])))

        encoded = backend.encode_images(pixels)
        if finite(encoded):
            return encoded
        with in_float32(backend.encoder_modules("image"), backend.device.type) as converted:
            encoded = backend.encode_images(pixels) if converted else None
        if encoded is not None and finite(encoded):
            self.samples.recompute("latent")
            return encoded
        return None

    def start_unloading(self) -> None:
        """``unload_models_when_training``: the text encoder(s) and VAE off the device from now on."""
        if not self.config.unload_models_when_training:
            return
        backend = self.backend
        if backend.start_unloading():
            self.callbacks.message("The text encoder and VAE rest off the device during steps")
        elif backend.unload_refusal:
            self.callbacks.message(f"unload_models_when_training: {backend.unload_refusal}")

    def load_resume_state(self, optimizer) -> None:
        if self.sidecar is None:
            return
        if self.sidecar.optimizer_name != self.config.optimizer:
            self.callbacks.message(
                f"the saved optimizer state is for {self.sidecar.optimizer_name}, not {self.config.optimizer}; "
                "starting the optimizer afresh"
            )
            return
        try:
            optimizer.load_state_dict(self.sidecar.state_dict)
        except (RuntimeError, ValueError, KeyError) as exc:
            self.callbacks.message(f"cannot resume the optimizer state ({exc}); starting it afresh")
            return
        state = self.sidecar.extra.get("training_state") or {}
        self.batch_offset = int(state.get("batch_offset") or 0)
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema") is not None:
            with torch.no_grad():
                for shadow, saved in zip(self.ema.shadow, state["ema"], strict=True):
                    shadow.copy_(saved.to(shadow.device))
                for parameter, saved in zip(self.parameters, state["weights"], strict=True):
                    parameter.copy_(saved.to(parameter.device))

    # -- the loop ---------------------------------------------------------------------------
    def batch_for(self, micro_index: int) -> tuple[list[int], int, int]:
        micro_index = micro_index * distributed.world_size() + distributed.rank()
        epoch, position = divmod(micro_index, self.batches_per_epoch)
        if epoch not in self._epoch_cache:
            self._epoch_cache = {epoch: self.dataset.epoch_batches(epoch)}
        return self._epoch_cache[epoch][position], epoch, position

    def autocast(self):
        if self.autocast_dtype is None or not self.autocast_enabled:
            return contextlib.nullcontext()
        return torch.autocast(self.backend.device.type, dtype=self.autocast_dtype)

    def captions_for(self, indices, captions_rng: random.Random) -> list[str]:
        return [self.captions.build(self.dataset.entries[i].filewords, captions_rng) for i in indices]

    def dropped(self, texts: list[str], indices, rng: random.Random) -> list[str | None]:
        """Each caption replaced by the empty negative prompt (None) at the caption-dropout rate."""
        rate = self.conditioning.dropout_rate(self.config.caption_dropout, self.dataset.entries[indices[0]].size)
        if rate <= 0:
            return list(texts)
        return [None if rng.random() < rate else text for text in texts]

    def loss_for(
        self, indices, texts: list[str], generator=None, *, timesteps: torch.Tensor | None = None
    ) -> torch.Tensor:
        backend = self.backend
        size = self.dataset.entries[indices[0]].size
        cond = self.conditioning.get(texts, size)
        latents = self.dataset.latents(indices, generator, backend.device)
        noise = torch.randn(latents.shape, generator=generator, device=latents.device)
        if self.config.noise_offset:
            offset = torch.randn((*latents.shape[:2], 1, 1), generator=generator, device=latents.device)
            noise = noise + self.config.noise_offset * offset
        alphas = self.alphas
        if timesteps is None:
            timesteps = torch.randint(
                0, alphas.shape[0], (latents.shape[0],), generator=generator, device=latents.device
            )
        ab = alphas[timesteps].view(-1, 1, 1, 1)
        noisy = ab.sqrt() * latents + (1 - ab).sqrt() * noise
        if backend.prediction_type == "v_prediction":
            target = ab.sqrt() * noise - (1 - ab).sqrt() * latents
        else:
            target = noise
        with self.autocast():
            prediction = backend.predict(noisy.to(unet_compute_dtype(backend)), timesteps, cond)
        error = (prediction.float() - target.float()) ** 2
        weights = self.dataset.weights(indices, backend.device)
        if weights is not None:
            error = error * weights
        per_sample = error.mean(dim=tuple(range(1, error.dim())))
        if self.config.min_snr_gamma > 0:
            snr = (ab / (1 - ab)).view(-1)
            clipped = torch.clamp(snr, max=self.config.min_snr_gamma)
            per_sample = per_sample * (clipped / (snr + 1 if backend.prediction_type == "v_prediction" else snr))
        return per_sample.mean()

    def draw(self, step: int, j: int) -> tuple[list[int], list[str], list[str | None]]:
        """Micro-batch ``j`` of ``step``: its images, captions, and the captions trained on (None
        where dropped), without the samples whose conditioning is not finite. A batch none of
        whose samples is usable gives way to the next one."""
        config = self.config
        process = (distributed.rank(),) if distributed.world_size() > 1 else ()
        for _attempt in range(2 * self.batches_per_epoch + 2):
            offset = self.batch_offset
            indices, self.epoch, self.epoch_step = self.batch_for(step * config.gradient_step + j + offset)
            shifted = (offset,) if offset else ()  # the draws of a run that skipped nothing stay as they were
            rng = random.Random(data_mod.derive_seed(self.seed, "captions", step, j, *process, *shifted))
            texts = self.captions_for(indices, rng)
            wanted = self.dropped(texts, indices, rng)
            usable = self.conditioning.usable(wanted, self.dataset.entries[indices[0]].size)
            for index, text, ok in zip(indices, wanted, usable, strict=True):
                if not ok:
                    caption = EMPTY_PROMPT if text is None else text
                    self.samples.skip(self.dataset.entries[index].path, caption, NON_FINITE_CONDITIONING)
            kept = [k for k, ok in enumerate(usable) if ok]
            if kept:
                return [indices[k] for k in kept], [texts[k] for k in kept], [wanted[k] for k in kept]
            self.batch_offset += 1
        raise HypernetworkError(
            f"no usable sample: every caption drawn gives non-finite conditioning ({self.samples.summary()})"
        )

    def recompute_loss(self, indices, wanted, seed: int, step: int, value: float) -> tuple[torch.Tensor, float]:
        """A non-finite loss on finite inputs: once more without autocast (the same noise and
        timesteps) when half precision computed it from float32 weights; a run that is still not
        finite has diverged."""
        float32_weights = next(self.backend.unet.parameters()).dtype == torch.float32
        if self.autocast_dtype is not None and float32_weights:
            self.autocast_enabled = False
            try:
                torch.manual_seed(seed)
                loss = self.loss_for(indices, wanted) / self.config.gradient_step
            finally:
                self.autocast_enabled = True
            again = loss.item()
            if math.isfinite(again):
                self.samples.recompute("loss")
                return loss, again
        self.guard.diverged(f"the loss became {value} at step {step + 1}", non_finite=True)
        raise AssertionError("unreachable")  # diverged() raises

    def learn_rate(self, step: int) -> float | None:
        rate = self.schedule.value_at(step)
        return None if rate is None else rate * self.shape.factor(step)

    def train_step(self, step: int, optimizer) -> float | None:
        """One optimizer step (``gradient_step`` micro-batches). None when a stop was requested."""
        config = self.config
        total = 0.0
        for j in range(config.gradient_step):
            if self.callbacks.stop_requested():
                optimizer.zero_grad(set_to_none=True)
                return None
            indices, texts, wanted = self.draw(step, j)
            self.last_prompt, self.last_batch = texts[0], indices  # what a preview without txt2img settings shows
            process = (distributed.rank(),) if distributed.world_size() > 1 else ()
            with _fork_rng(self.backend.device):
                seed = data_mod.derive_seed(self.seed, "step", step, j, *process)
                torch.manual_seed(seed)
                loss = self.loss_for(indices, wanted) / config.gradient_step
                value = loss.item()  # one device sync per micro-batch
                if not math.isfinite(value):
                    loss, value = self.recompute_loss(indices, wanted, seed, step, value)
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            total += value
        distributed.average_gradients(self.parameters)
        total = distributed.average(total, self.backend.device)
        self.guard.check_loss(total, step)  # the same on every process: the average
        self.guard.keep(total, step)
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        if self.clip_schedule is not None:
            limit = self.clip_schedule.value_at(step)
            if limit is not None:
                if config.clip_grad_mode == "value":
                    torch.nn.utils.clip_grad_value_(self.parameters, limit)
                else:
                    torch.nn.utils.clip_grad_norm_(self.parameters, limit)
        if self.scaler is None:
            if not all_finite([p.grad for p in self.parameters if p.grad is not None]):
                self.guard.diverged(f"a gradient became non-finite at step {step + 1}", non_finite=True)
            optimizer.step()
        else:
            scale = self.scaler.get_scale()
            self.scaler.step(optimizer)
            self.scaler.update()
            self.skipped = self.skipped + 1 if self.scaler.get_scale() < scale else 0
            if self.skipped >= config.max_consecutive_skipped_steps:
                self.guard.diverged(
                    f"{self.skipped} consecutive steps had non-finite gradients (last at step {step + 1})",
                    non_finite=True,
                )
        optimizer.zero_grad(set_to_none=True)
        self.guard.check_update(step)
        return total

    @contextlib.contextmanager
    def evaluating(self):
        """The network in evaluation mode (no dropout), gradients off, the random state untouched."""
        modes = [(m, m.training) for m in self.network.modules()]
        for module, _mode in modes:
            module.training = False
        try:
            with torch.no_grad(), _fork_rng(self.backend.device):
                yield
        finally:
            for module, mode in modes:
                module.training = mode

    def seeded_loss(self, index: int, position: int, label: str, timesteps=None) -> float | None:
        """The loss of image ``index`` with its caption and noise drawn from the run's seed for
        (``label``, ``position``): the same sample each time. None where the caption's conditioning
        is not finite (it says nothing about the network)."""
        rng = random.Random(data_mod.derive_seed(self.seed, f"{label}-captions", position))
        texts = self.captions_for([index], rng)
        if not self.conditioning.usable(texts, self.dataset.entries[index].size)[0]:
            return None
        generator = torch.Generator(device=self.backend.device)
        generator.manual_seed(data_mod.derive_seed(self.seed, label, position))
        return float(self.loss_for([index], texts, generator, timesteps=timesteps))

    def validation_loss(self) -> float | None:
        if not self.dataset.validation:
            return None
        with self.evaluating():
            losses = [
                self.seeded_loss(index, position, "validation")
                for position, index in enumerate(self.dataset.validation)
            ]
        counted = [loss for loss in losses if loss is not None]
        return sum(counted) / len(counted) if counted else None

    def fixed_noise_loss(self) -> float | None:
        """The mean loss over the first training images, each at ``FIXED_LOSS_TIMESTEPS`` timesteps spread
        evenly over the schedule, with noise and captions drawn from the run's seed: the same samples
        every time, so it changes only as the network does."""
        images = self.dataset.train[:FIXED_LOSS_IMAGES]
        count = len(images) * FIXED_LOSS_TIMESTEPS
        schedule = self.alphas.shape[0]
        with self.evaluating():
            losses = [
                self.seeded_loss(
                    images[position % len(images)],
                    position,
                    "fixed-loss",
                    torch.tensor([int((position + 0.5) * schedule / count)], device=self.backend.device),
                )
                for position in range(count)
            ]
        finite = [loss for loss in losses if loss is not None and math.isfinite(loss)]
        return sum(finite) / len(finite) if finite else None

    def record_fixed_loss(self, step: int) -> None:
        value = self.fixed_noise_loss()
        if value is not None:
            self.fixed_losses.append((step, value))

    # -- outputs ----------------------------------------------------------------------------
    def _extension(self) -> str:
        return f".{self.file_format}"

    def _result_folder(self) -> str:
        return self.output_dir or (os.path.dirname(self.source_path) if self.source_path else ".") or "."

    def _result_path(self, step: int) -> str:
        folder = self._result_folder()
        if self.config.output_name.strip():
            return os.path.join(folder, self.config.output_name.strip() + self._extension())
        path = os.path.join(folder, f"{self.name}-{step}{self._extension()}")
        counter = 2
        while os.path.exists(path):
            path = os.path.join(folder, f"{self.name}-{step}-{counter}{self._extension()}")
            counter += 1
        return path

    def _write(self, path: str, optimizer, *, overwrite: bool = False) -> str:
        """Write the network (the averaged weights with EMA) and, when asked, its optimizer sidecar."""
        network = self.network
        network.name = os.path.splitext(os.path.basename(path))[0]
        network.info.sd_checkpoint = self.backend.checkpoint_hash or network.info.sd_checkpoint
        network.info.sd_checkpoint_name = self.backend.checkpoint_name or network.info.sd_checkpoint_name
        if self.backend.model_family and not network.info.model_family:
            network.info.model_family = self.backend.model_family
        with self.ema.swapped() if self.ema is not None else contextlib.nullcontext():
            formats.save(network, path, overwrite=overwrite)
        if self.config.save_optimizer_state and optimizer is not None:
            state = {
                "seed": self.seed,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "ema": [s.detach().cpu() for s in self.ema.shadow] if self.ema is not None else None,
                "weights": [p.detach().cpu() for p in self.parameters] if self.ema is not None else None,
                "batch_offset": self.batch_offset,
            }
            write_optimizer_sidecar(path, self.config.optimizer, optimizer.state_dict(), {"training_state": state})
        return path

    def save_copy(self, step: int, optimizer) -> str:
        path = os.path.join(self.log_dir, "hypernetworks", f"{self.name}-{step}{self._extension()}")
        self._write(path, optimizer, overwrite=True)
        self.copies.append(path)
        return path

    def preview(self, step: int) -> str | None:
        generator = self.backend.preview_generator
        if generator is None:
            return None
        config = self.config
        if config.preview_from_txt2img:
            request = PreviewRequest(
                **{name.removeprefix("preview_"): getattr(config, name) for name in PREVIEW_FIELDS}
            )
        else:
            entry = self.dataset.entries[self.last_batch[0]]
            request = PreviewRequest(prompt=self.last_prompt, width=entry.size[0], height=entry.size[1])
        multipliers = {id(m): m.multiplier for pair in self.network.layers.values() for m in pair}
        self.network.eval()
        self.network.set_multiplier(1.0)
        try:
            with (
                _fork_rng(self.backend.device),
                self.ema.swapped() if self.ema else contextlib.nullcontext(),
                self.backend.encoders_on_device(*ENCODER_KINDS),
            ):
                image = generator(request)
        finally:
            for pair in self.network.layers.values():
                for module in pair:
                    module.multiplier = multipliers[id(module)]
            self.network.train()
        if image is None:
            return None
        path = os.path.join(self.log_dir, "images", f"{self.name}-{step}.png")
        atomic_write_with(path, lambda handle: image.save(handle, format="PNG"), overwrite=True)
        self.previews.append(path)
        if self.tensorboard is not None:
            self.tensorboard.image(step, image)
        if self.callbacks.on_preview:
            self.callbacks.on_preview(image, path)
        return path

    def final_preview(self, stopped: str, step: int) -> None:
        """A finished run that drew no preview (fewer steps than create_image_every) draws one, so
        the new network's card has a picture."""
        wanted = self.config.create_image_every and stopped == STOP_FINISHED and step > self.start_step
        if wanted and self.log_dir and not self.previews:
            self.preview(step)

    def settings(self) -> dict:
        return {
            "config": self.config.to_dict(),
            "seed": self.seed,
            "model_name": self.backend.checkpoint_name,
            "model_hash": self.backend.checkpoint_hash,
            "model_family": self.backend.model_family,
            "backend": self.backend.name,
            "prediction_type": self.backend.prediction_type,
            "num_of_dataset_images": len(self.dataset.entries),
            "skipped_dataset_files": list(self.skipped_images),
            "num_of_validation_images": len(self.dataset.validation),
            "source": self.source_path,
            "start_step": self.start_step,
            "network": {
                "widths": self.network.widths,
                "layer_structure": list(self.network.architecture.layer_structure),
                "activation_func": self.network.architecture.activation,
                "weight_initialization": self.network.architecture.weight_initialization,
                "is_layer_norm": self.network.architecture.is_layer_norm,
                "dropout_structure": list(self.network.architecture.dropout_structure),
            },
        }


def _format_of(path: str | None) -> str:
    if path and path.lower().endswith(".safetensors"):
        return "safetensors"
    return "pt"


def train(
    network: Hypernetwork | None,
    backend: TrainingBackend,
    config: TrainingConfig,
    callbacks: TrainingCallbacks | None = None,
    *,
    source_path: str | None = None,
    output_dir: str | None = None,
    template_dirs=(),
    progress_bar: bool = True,
) -> TrainingResult:
    """Train ``network`` on ``backend``'s model; the network object is updated in place.

    ``source_path`` is the file it came from (default: ``network.filename``); it is never written.
    The result goes to ``output_dir`` (default: the source's folder) as ``<name>-<step>``. With
    ``config.resume_from`` the network is loaded from that saved copy (``network`` may be None) and
    its optimizer state is used when its sidecar belongs to it.
    """
    config.check()
    sidecar = None
    if config.resume_from.strip():
        network = formats.load(config.resume_from)
        sidecar, reason = read_optimizer_sidecar(config.resume_from)
        if sidecar is None and callbacks:
            callbacks.message(f"resuming without optimizer state: {reason}")
        source_path = source_path or config.resume_from
    if network is None:
        raise InvalidConfigError("hypernetwork_name: no network to train")
    source_path = source_path or network.filename
    _check_attaches(network, backend.unet)
    if config.seed < 0:
        saved_seed = ((sidecar.extra.get("training_state") or {}).get("seed")) if sidecar else None
        seed = int(saved_seed) if saved_seed is not None else random.randrange(2**31)
        config = config.replace(seed=seed)
    run = _Run(
        network,
        backend,
        config,
        callbacks,
        source_path=source_path,
        output_dir=output_dir,
        template_dirs=template_dirs,
        progress_bar=progress_bar,
    )
    run.sidecar = sidecar
    run.prepare()
    if run.start_step >= config.steps:
        return TrainingResult(
            network, None, run.start_step, run.start_step, STOP_ALREADY,
            f"Model has already been trained beyond specified max steps ({run.start_step} >= {config.steps})",
            run.seed,
        )  # fmt: skip
    return _execute(run)


def _check_attaches(network: Hypernetwork, unet: torch.nn.Module) -> None:
    """A network none of whose widths the model has would train nothing (torch only says that
    "element 0 of tensors does not require grad")."""
    from ..shape import model_shape

    model_widths = model_shape(unet).default_widths
    if model_widths and not set(network.widths) & set(model_widths):
        raise InvalidConfigError(
            f"hypernetwork_name: {network.name} has widths {', '.join(map(str, network.widths))}, but the model's "
            f"attention has {', '.join(map(str, model_widths))}; create a network with the model's widths"
        )


def _execute(run: _Run) -> TrainingResult:
    with run.backend.session():
        return _execute_in_session(run)


def _execute_in_session(run: _Run) -> TrainingResult:
    config, backend, network = run.config, run.backend, run.network
    guard = ModelGuard(backend.host_modules(), placement=not backend.host_places_weights)
    network.to(backend.device)
    run.parameters = list(network.parameters())
    distributed.broadcast_parameters(run.parameters)
    run.tensorboard = None
    run.skipped = 0
    stopped, message, optimizer = STOP_FINISHED, "", None
    step = run.start_step
    progress_bar = None
    try:
        with guard.session():
            run.build_dataset()
            run.start_unloading()
            if config.save_training_settings_to_txt and run.log_dir:
                run.settings_path = logs.write_settings(run.log_dir, run.settings())
            run.alphas = backend.alphas_cumprod()
            run.csv = logs.LossCsv(run.log_dir, config.training_write_csv_every) if run.log_dir else None
            if config.training_enable_tensorboard and run.log_dir:
                run.tensorboard = logs.TensorBoardLog(
                    run.log_dir,
                    flush_every=config.training_tensorboard_flush_every,
                    save_images=config.training_tensorboard_save_images,
                )
            network.train()
            optimizer = build_optimizer(
                config.optimizer,
                run.parameters,
                run.learn_rate(step) or 0.0,
                weight_decay=config.weight_decay,
                betas=(config.beta1, config.beta2),
            )
            run.ema = Ema(run.parameters, config.ema_decay) if config.ema_decay > 0 else None
            run.load_resume_state(optimizer)
            run.guard = DivergenceGuard(run.parameters, step, run.ema)
            end = min(config.steps, run.schedule.end_step)
            if run.progress_bar and distributed.is_main():
                import tqdm

                progress_bar = tqdm.tqdm(total=end - step, desc=f"Training hypernetwork {run.name}")
            with backend.attach(network), gradient_checkpointing(backend.unet, config.gradient_checkpointing):
                stopped, message, step = _loop(run, optimizer, step, end, progress_bar)
                run.final_preview(stopped, step)
    except data_mod.PreparationInterrupted:
        stopped, message = STOP_INTERRUPTED, "Training interrupted while preparing the dataset"
    except Diverged as exc:
        network.step = exc.step
        stopped, message = STOP_NAN if exc.non_finite else STOP_DIVERGED, _diverged_message(exc, run.start_step)
        optimizer = None  # its state may hold the bad values: never saved
    except Exception as exc:
        stopped, message = STOP_ERROR, f"Training failed at step {network.step}: {exc}"
        if network.step == run.start_step:
            raise
        run.error = exc
    finally:
        network.eval()
        if progress_bar is not None:
            progress_bar.close()
        if run.tensorboard is not None:
            run.tensorboard.close()
    return _finish(run, optimizer, stopped, message)


def _diverged_message(exc: Diverged, start_step: int) -> str:
    kept = (
        "the weights it started from are kept"
        if exc.step == start_step
        else f"the weights of step {exc.step}, from before it diverged, are kept"
    )
    return f"Training stopped: {exc.reason}; {kept}"


def _loop(run: _Run, optimizer, step: int, end: int, progress_bar) -> tuple[str, str, int]:
    config, network = run.config, run.network
    if config.fixed_loss_every:
        run.record_fixed_loss(step)  # before the first step: what the steps are measured against
    while step < end:
        rate = run.learn_rate(step)
        if rate is None:
            break
        for group in optimizer.param_groups:
            group["lr"] = rate
        loss = run.train_step(step, optimizer)
        if loss is None:
            return STOP_INTERRUPTED, f"Training interrupted at step {step}", step
        step += 1
        network.step = step
        if run.ema is not None:
            run.ema.update()
        run.last_loss = loss
        run.losses.append((step, loss))
        validation = None
        if run.dataset.validation and (step % config.validation_every == 0 or step == end):
            validation = run.validation_loss()
            run.last_validation = validation
            run.validation_losses.append((step, validation))
        if config.fixed_loss_every and (step % config.fixed_loss_every == 0 or step == end):
            run.record_fixed_loss(step)
        if run.csv:
            run.csv.write(step, run.epoch, run.epoch_step, loss, rate, validation)
        if run.tensorboard is not None:
            run.tensorboard.scalars(step, loss, rate, validation)
        last_copy = None
        if run.log_dir and config.save_hypernetwork_every and step % config.save_hypernetwork_every == 0:
            last_copy = run.save_copy(step, optimizer)
        last_preview = None
        if run.log_dir and config.create_image_every and step % config.create_image_every == 0:
            last_preview = run.preview(step)
        if progress_bar is not None:
            progress_bar.update(1)
            progress_bar.set_postfix_str(f"loss: {loss:.7f}")
        if run.callbacks.on_progress:
            run.callbacks.on_progress(
                TrainingProgress(
                    step=step,
                    start_step=run.start_step,
                    max_steps=end,
                    loss=loss,
                    learn_rate=rate,
                    epoch=run.epoch,
                    epoch_step=run.epoch_step,
                    validation_loss=validation,
                    last_copy=last_copy,
                    last_preview=last_preview,
                    last_prompt=run.last_prompt,
                    elapsed=time.monotonic() - run.started,
                    skipped_samples=run.samples.skipped_count,
                    fixed_losses=list(run.fixed_losses),
                )
            )
    return STOP_FINISHED, f"Training finished at step {step}", step


def _finish(run: _Run, optimizer, stopped: str, message: str) -> TrainingResult:
    network = run.network
    path = preview_path = None
    if not distributed.is_main():
        message = f"{message} (process {distributed.rank()}: the main process saves)"
    elif network.step > run.start_step:
        path = run._write(run._result_path(network.step), optimizer)
        preview_path = _save_card_preview(run, path)
        message = f"{message}. Hypernetwork saved to {path}"
    else:
        message = f"{message}. No step was completed, so nothing was saved"
    message += run.skipped_note()  # said again at the end: the warnings scrolled away, a tab shows only this
    if run.samples.summary():
        message = f"{message}. {run.samples.summary()}"
    if len(run.fixed_losses) > 1:
        (first_step, first), (last_step, last) = run.fixed_losses[0], run.fixed_losses[-1]
        message = f"{message}. Loss at fixed noise: {first:.5f} at step {first_step}, {last:.5f} at step {last_step}"
    run.callbacks.message(message)
    result = TrainingResult(
        network=network,
        path=path,
        start_step=run.start_step,
        step=network.step,
        stopped=stopped,
        message=message,
        seed=run.seed,
        last_loss=run.last_loss,
        copies=run.copies,
        previews=run.previews,
        preview_path=preview_path,
        log_dir=run.log_dir,
        settings_path=run.settings_path,
        losses=run.losses,
        validation_losses=run.validation_losses,
        fixed_losses=run.fixed_losses,
        skipped_images=run.skipped_images,
        skipped_samples=run.samples.as_dicts(),
        recomputed_in_float32=dict(run.samples.recomputed),
    )
    error = run.error
    if error is not None:
        raise HypernetworkError(message) from error
    return result


def _save_card_preview(run: _Run, result_path: str) -> str | None:
    """The last preview next to the result, as its card's picture (``<name>.preview.png``)."""
    if not run.previews:
        return None
    path = os.path.splitext(result_path)[0] + ".preview.png"
    with open(run.previews[-1], "rb") as handle:
        atomic_write_bytes(path, handle.read(), overwrite=True)
    return path


def _cuda_grad_scaler():
    if hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler("cuda")
    return torch.cuda.amp.GradScaler()  # torch before 2.3 (A1111 1.10 ships 2.1.2)
