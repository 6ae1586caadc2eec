"""Every training option in one JSON-serialisable dataclass.

Options A1111 has keep its names, meanings and defaults (``learn_rate`` is a schedule string,
``steps`` counts earlier sessions, ``gradient_step`` is gradient accumulation, ...), including the
host settings that change training (``save_optimizer_state``, ``training_write_csv_every``, ...).
The options A1111 lacks follow.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, fields

from ..atomic import atomic_write_bytes
from ..errors import HypernetworkError, InvalidConfigError
from .schedules import LR_SCHEDULERS, parse_schedule


class FieldProblems(InvalidConfigError):
    """Invalid input, with the problem of each field (for showing next to it)."""

    def __init__(self, problems: dict[str, str]):
        self.problems = problems
        super().__init__("; ".join(f"{name}: {problem}" for name, problem in problems.items()))


CLIP_GRAD_MODES = ("disabled", "value", "norm")
LATENT_SAMPLING_METHODS = ("once", "deterministic", "random")
MIXED_PRECISION = ("auto", "no", "fp16", "bf16")
FILE_FORMATS = ("pt", "safetensors")
PREVIEW_FIELDS = (
    "preview_prompt",
    "preview_negative_prompt",
    "preview_steps",
    "preview_sampler_name",
    "preview_cfg_scale",
    "preview_seed",
    "preview_width",
    "preview_height",
)


@dataclass
class TrainingConfig:
    # --- A1111's train_hypernetwork parameters (same names, defaults and syntax) ---------------
    hypernetwork_name: str = ""
    learn_rate: str = "0.00001"
    batch_size: int = 1
    gradient_step: int = 1
    data_root: str = ""
    log_directory: str = "textual_inversion"
    training_width: int = 512
    training_height: int = 512
    varsize: bool = False
    steps: int = 100000
    clip_grad_mode: str = "disabled"
    clip_grad_value: str = "0.1"
    shuffle_tags: bool = False
    tag_drop_out: float = 0.0
    latent_sampling_method: str = "once"
    use_weight: bool = False
    create_image_every: int = 500
    save_hypernetwork_every: int = 500
    template_filename: str = "style_filewords.txt"
    preview_from_txt2img: bool = False
    preview_prompt: str = ""
    preview_negative_prompt: str = ""
    preview_steps: int = 20
    preview_sampler_name: str = ""
    preview_cfg_scale: float = 7.0
    preview_seed: int = -1
    preview_width: int = 512
    preview_height: int = 512
    # --- A1111 settings that change training (Settings > Training) ------------------------------
    save_optimizer_state: bool = False
    save_training_settings_to_txt: bool = True
    dataset_filename_word_regex: str = ""
    dataset_filename_join_string: str = " "
    training_write_csv_every: int = 500
    training_enable_tensorboard: bool = False
    training_tensorboard_save_images: bool = False
    training_tensorboard_flush_every: int = 120
    # Text encoder(s) and VAE off the compute device during steps (A1111's "Move VAE and CLIP to RAM
    # when training if possible. Saves VRAM."): they visit it only to encode what is not cached yet.
    unload_models_when_training: bool = False
    # --- beyond A1111 -------------------------------------------------------------------------
    optimizer: str = "AdamW"
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    lr_cycles: int = 1
    lr_min_ratio: float = 0.0
    ema_decay: float = 0.0
    min_snr_gamma: float = 0.0
    noise_offset: float = 0.0
    # The share of samples trained on the conditioning of an empty negative prompt, so the network
    # learns the pass that classifier-free guidance subtracts. -1 = auto: 0.1 where the host samples
    # that pass with zeros instead of encoding "" (SDXL), which a network never sees otherwise.
    caption_dropout: float = -1.0
    bucketing: bool = False
    bucket_step: int = 64
    keep_tags: int = 0
    validation_split: float = 0.0
    validation_every: int = 100
    # The loss on the training images at fixed noise and timesteps, before the first step, every N
    # steps and after the last (0 = off): unlike each step's loss, it moves only when the network does.
    fixed_loss_every: int = 0
    gradient_checkpointing: bool = False
    mixed_precision: str = "auto"
    seed: int = -1
    file_format: str = ""  # "" keeps the format of the network being trained
    output_name: str = ""  # "" names the result <name>-<step>
    resume_from: str = ""  # a saved copy to continue from (with its optimizer state when saved)
    max_consecutive_skipped_steps: int = 20

    # -- validation ----------------------------------------------------------------------------
    def problems(self) -> dict[str, str]:
        """Each invalid option with what is wrong with it; empty when the config is usable."""
        found: dict[str, str] = {}
        self._check_types(found)
        if found:
            return found
        for name, minimum in (
            ("batch_size", 1),
            ("gradient_step", 1),
            ("steps", 1),
            ("training_width", 64),
            ("training_height", 64),
            ("bucket_step", 8),
            ("lr_cycles", 1),
            ("validation_every", 1),
            ("max_consecutive_skipped_steps", 1),
        ):
            if getattr(self, name) < minimum:
                found[name] = f"must be at least {minimum} (is {getattr(self, name)})"
        for name in (
            "create_image_every",
            "save_hypernetwork_every",
            "training_write_csv_every",
            "lr_warmup_steps",
            "keep_tags",
            "training_tensorboard_flush_every",
            "fixed_loss_every",
        ):
            if getattr(self, name) < 0:
                found[name] = f"must be 0 or more (is {getattr(self, name)})"
        for name in ("training_width", "training_height"):
            if name not in found and getattr(self, name) % 8:
                found[name] = f"must be a multiple of 8 (is {getattr(self, name)})"
        for name, low, high in (
            ("tag_drop_out", 0.0, 1.0),
            ("ema_decay", 0.0, 1.0),
            ("validation_split", 0.0, 0.9),
            ("lr_min_ratio", 0.0, 1.0),
            ("beta1", 0.0, 1.0),
            ("beta2", 0.0, 1.0),
        ):
            value = getattr(self, name)
            if not low <= value < high and not (name == "lr_min_ratio" and value == 1.0):
                found[name] = f"must be between {low} and {high} (is {value})"
        if self.caption_dropout != -1.0 and not 0.0 <= self.caption_dropout < 1.0:
            found["caption_dropout"] = f"must be between 0 and 1, or -1 for auto (is {self.caption_dropout})"
        for name in ("weight_decay", "min_snr_gamma", "noise_offset"):
            if getattr(self, name) < 0:
                found[name] = f"must be 0 or more (is {getattr(self, name)})"
        for name, choices in (
            ("clip_grad_mode", CLIP_GRAD_MODES),
            ("latent_sampling_method", LATENT_SAMPLING_METHODS),
            ("mixed_precision", MIXED_PRECISION),
            ("lr_scheduler", LR_SCHEDULERS),
        ):
            if getattr(self, name) not in choices:
                found[name] = f"{getattr(self, name)!r} is not one of {', '.join(choices)}"
        if self.file_format and self.file_format not in FILE_FORMATS:
            found["file_format"] = f"{self.file_format!r} is not one of {', '.join(FILE_FORMATS)} (or empty)"
        from .optimizers import optimizer_problem

        problem = optimizer_problem(self.optimizer)
        if problem:
            found["optimizer"] = problem
        for name, what in (("learn_rate", "learning rate"), ("clip_grad_value", "gradient clipping")):
            if name == "clip_grad_value" and self.clip_grad_mode == "disabled":
                continue
            try:
                parse_schedule(getattr(self, name), self.steps, what=what)
            except InvalidConfigError as exc:
                found[name] = exc.problem
        if not self.hypernetwork_name.strip() and not self.resume_from.strip():
            found["hypernetwork_name"] = "choose the hypernetwork to train"
        if not self.data_root.strip():
            found["data_root"] = "choose the dataset folder"
        if (self.create_image_every or self.save_hypernetwork_every) and not self.log_directory.strip():
            found["log_directory"] = "a log folder is needed to save copies and previews"
        if self.dataset_filename_word_regex:
            import re

            try:
                re.compile(self.dataset_filename_word_regex)
            except re.error as exc:
                found["dataset_filename_word_regex"] = f"not a valid regular expression ({exc})"
        if self.output_name and _unsafe_name(self.output_name):
            found["output_name"] = "use letters, digits, spaces, '.', '_' and '-' only"
        return found

    def _check_types(self, found: dict[str, str]) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            expected = _field_type(item)
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                setattr(self, item.name, float(value))
                continue
            if expected is bool and not isinstance(value, bool):
                found[item.name] = f"must be true or false, found {value!r}"
            elif expected is int and (isinstance(value, bool) or not isinstance(value, int)):
                if isinstance(value, float) and value.is_integer():
                    setattr(self, item.name, int(value))
                else:
                    found[item.name] = f"must be a whole number, found {value!r}"
            elif expected is float and (isinstance(value, bool) or not isinstance(value, float)):
                found[item.name] = f"must be a number, found {value!r}"
            elif expected is float and not math.isfinite(value):
                found[item.name] = f"must be a finite number, found {value!r}"
            elif expected is str and not isinstance(value, str):
                found[item.name] = f"must be text, found {value!r}"

    def check(self) -> TrainingConfig:
        found = self.problems()
        if found:
            raise FieldProblems(found)
        return self

    # -- derived values --------------------------------------------------------------------------
    @property
    def clip_enabled(self) -> bool:
        return self.clip_grad_mode != "disabled"

    # -- JSON ----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict, *, base: TrainingConfig | None = None) -> TrainingConfig:
        """A config from a dict; unknown keys are refused by name, missing keys keep ``base``'s values."""
        if not isinstance(values, dict):
            raise InvalidConfigError(f"training options must be a JSON object, found {type(values).__name__}")
        known = {item.name for item in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InvalidConfigError(f"unknown training option(s): {', '.join(unknown)}")
        config = dataclasses.replace(base) if base is not None else cls()
        for key, value in values.items():
            setattr(config, key, value)
        return config

    def replace(self, **changes) -> TrainingConfig:
        return TrainingConfig.from_dict(changes, base=self)


def sized_for(image_size: int) -> dict:
    """The options A1111 sizes for SD1.5's 512 px, for a model made for ``image_size`` (the embedded
    tiny model: 64, SDXL: 1024); a trainer applies them under what its user chose."""
    return {
        "training_width": image_size,
        "training_height": image_size,
        "preview_width": image_size,
        "preview_height": image_size,
        "bucket_step": max(8, min(64, image_size // 8 // 8 * 8)),
    }


def _field_type(item: dataclasses.Field) -> type:
    text = item.type if isinstance(item.type, str) else getattr(item.type, "__name__", "")
    return {"str": str, "int": int, "float": float, "bool": bool}[text]


def _unsafe_name(name: str) -> bool:
    return not all(ch.isalnum() or ch in "._- " for ch in name) or name.strip(" .") == ""


# --- presets ----------------------------------------------------------------------------------
# Options that describe where things are rather than how to train; a preset leaves them alone.
PLACE_OPTIONS = ("hypernetwork_name", "data_root", "log_directory", "resume_from", "output_name")


def preset_dict(config: TrainingConfig) -> dict:
    values = config.to_dict()
    for name in PLACE_OPTIONS:
        values.pop(name, None)
    return values


def save_preset(config: TrainingConfig, path: str | os.PathLike, *, overwrite: bool = False) -> str:
    """Write the training options (not the places: network, dataset, logs) as a JSON preset."""
    path = os.fspath(path)
    payload = {"kind": "hypernetwork-training-preset", "version": 1, "options": preset_dict(config)}
    atomic_write_bytes(path, json.dumps(payload, indent=2).encode(), overwrite=overwrite)
    return path


def load_preset(path: str | os.PathLike, *, base: TrainingConfig | None = None) -> TrainingConfig:
    """Apply a preset file on top of ``base`` (the places of ``base`` are kept)."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as handle:
            payload = json.load(handle)
    except FileNotFoundError:
        raise HypernetworkError("no such preset file", path) from None
    except (OSError, ValueError) as exc:
        raise HypernetworkError(f"not a readable JSON preset ({exc})", path) from None
    options = payload.get("options") if isinstance(payload, dict) and "options" in payload else payload
    if not isinstance(options, dict):
        raise HypernetworkError("a preset must be a JSON object of training options", path)
    misplaced = sorted(set(options) & set(PLACE_OPTIONS))
    if misplaced:
        options = {k: v for k, v in options.items() if k not in PLACE_OPTIONS}
    try:
        config = TrainingConfig.from_dict(options, base=base)
        found = {k: v for k, v in config.problems().items() if k in options}
    except InvalidConfigError as exc:
        raise HypernetworkError(exc.problem, path) from None
    if found:
        raise HypernetworkError("; ".join(f"{name}: {problem}" for name, problem in found.items()), path)
    return config
