"""The extension's state in a WebUI (A1111, Forge, reForge, SD.Next): its library of networks, the
attention mechanism of the host, and what one generation activates. Touches only ``shared`` (options,
command line, state) and the processing object ``p``; each host's glue builds its pages and
callbacks around the one :data:`EXTENSION`.
"""

from __future__ import annotations

import os
import sys
import weakref
from collections.abc import Callable

from modules import shared

from ..errors import HypernetworkError
from ..library import ActivationPlan, Library, NetworkEntry, distinct_names, fit_problem
from ..memory import DEFAULT_FOLD_LIMIT, limit_from_mib
from ..shape import ModelShape, model_shape
from ..syntax import TAG_TYPE, format_hashes, format_number, parse_hashes, parse_presets, rename_tags
from ..ui.settings import DEFAULTS, MISMATCH_FORCE, UNKNOWN_CONSOLE, UNKNOWN_STOP, compute_dtype, extra_folders
from . import api
from .a1111 import LdmApplier
from .forge import PatcherApplier, detect_patcher_host
from .held_memory import SWITCHED, HeldMemoryKeeper
from .sdnext import DiffusersApplier, running_in_sdnext

LOG_PREFIX = "[Hypernetworks]"
CACHE_FILE_NAME = "hypernetworks-cache.json"
DEFAULT_FOLDER = "hypernetworks"  # under the host's models folder, where --hypernetwork-dir has no default
HOST_AUTO_ADD_SETTING = "sd_hypernetwork"  # A1111's "Add hypernetwork to prompt"
HASHES_KEY = "Hypernet hashes"
# A tag's problems on the generation's parameters: in the API's ``info`` (``extra_generation_params``
# and each image's infotext) and the PNG; a paste drops them (``infotext_pasted``).
WARNINGS_KEY = "Hypernet warnings"


def option(key: str):
    """A setting's value; its default until the settings page has registered it."""
    data = getattr(shared.opts, "data", {}) or {}
    return data.get(key, DEFAULTS[key])


def log(message: str) -> None:
    print(f"{LOG_PREFIX} {message}", file=sys.stderr)


def primary_folder() -> str | None:
    """``--hypernetwork-dir``; where a host has no such option or no default for it (Forge Classic
    before a restart adds it through ``preload.py``; SD.Next keeps the flag without a default),
    ``hypernetworks`` in the host's models folder, A1111's default."""
    folder = getattr(shared.cmd_opts, "hypernetwork_dir", None)
    models = getattr(shared, "models_path", None) or _internal_models_path()
    folder = folder or (os.path.join(models, DEFAULT_FOLDER) if models else None)
    return os.path.abspath(folder) if folder else None  # SD.Next's models path is relative to its folder


def _internal_models_path() -> str | None:
    try:
        from modules import paths_internal
    except ImportError:
        return None
    return getattr(paths_internal, "models_path", None)


def hypernetwork_folders() -> list[str]:
    return [folder for folder in [primary_folder(), *extra_folders(option("hypernetwork_extra_folders"))] if folder]


def data_path() -> str | None:
    """The WebUI's data folder (A1111: ``paths_internal.data_path``; SD.Next: ``paths.data_path``)."""
    for name in ("paths_internal", "paths"):
        try:
            module = __import__(f"modules.{name}", fromlist=["data_path"])
        except ImportError:
            continue
        if getattr(module, "data_path", None):
            return module.data_path
    return None


def cache_file() -> str | None:
    folder = data_path()
    return os.path.join(folder, "cache", CACHE_FILE_NAME) if folder else None


def make_applier():
    """The attention mechanism of the host, by what it can import: SD.Next's diffusers pipelines,
    a UNet patcher (Forge, reForge), else A1111's ldm/sgm modules."""
    if running_in_sdnext():
        return DiffusersApplier()
    return PatcherApplier() if detect_patcher_host() else LdmApplier()


# --- the extension's state ------------------------------------------------------------------------


class Extension:
    """What lives as long as the process: the library, the attention mechanism and the last plan."""

    def __init__(self) -> None:
        self.library = Library(
            hypernetwork_folders, cache_size=DEFAULTS["hypernetwork_cache_size"], cache_file=cache_file()
        )
        self.applier = make_applier()
        self.memory = HeldMemoryKeeper(self.applier, log)
        if isinstance(self.applier, PatcherApplier):
            self.applier.on_move = self.memory.unet_moved
        self.last_plan: ActivationPlan | None = None
        self._shape: tuple = (None, None)
        self._builtin_loaded: list = []  # A1111's own loaded networks, while ours handle the tags

    # -- generation -------------------------------------------------------------------------------
    def activate(self, p, tags: list[list[str]]) -> None:
        tags = self._with_auto_added(p, tags)
        if not tags:
            self._record_warnings(p, [])
            self.applier.detach()
            self.last_plan = None
            return
        self.library.set_cache_size(as_int(option("hypernetwork_cache_size"), 4))
        self.applier.fold_limit = self.fold_limit(p.sd_model)
        plan = self.plan(p.sd_model, tags)
        self.last_plan = plan
        self._report(p, plan)
        self._apply(p.sd_model, plan.entries, compute_dtype(option("hypernetwork_compute_dtype")))
        self._record_hashes(p, plan)

    # -- A1111's own code, for comparisons (setting hypernetwork_builtin_handler) ------------------------
    def hand_back(self, p, activate_builtin: Callable[[], None]) -> None:
        """Nothing of ours acts; A1111's handler loads the tags into ``shared.loaded_hypernetworks``,
        which its attention code applies. What it had loaded before comes back first, so it reads
        from disk only what it would without this extension."""
        self.applier.detach()
        self.last_plan = None
        loaded = getattr(shared, "loaded_hypernetworks", None)
        if isinstance(loaded, list) and not loaded:
            loaded.extend(self._builtin_loaded)
        self._builtin_loaded = []
        activate_builtin()

    def take_over(self) -> None:
        """Before our own handling: A1111's networks must not act a second time; they are kept aside."""
        loaded = getattr(shared, "loaded_hypernetworks", None)
        if isinstance(loaded, list) and loaded:
            self._builtin_loaded = list(loaded)
            loaded.clear()

    def plan(self, sd_model, tags: list[list[str]]) -> ActivationPlan:
        shape = self.shape_of(self.applier.unet(sd_model))
        try:
            presets = parse_presets(str(option("hypernetwork_block_presets") or ""))
            preset_problem = None
        except HypernetworkError as exc:
            presets, preset_problem = {}, f"block presets setting: {exc}"

        def make() -> ActivationPlan:
            return self.library.plan(
                tags,
                default_multiplier=as_float(option("hypernetwork_default_multiplier"), 1.0),
                model_blocks=shape.blocks,
                presets=presets,
                context_width=shape.context_width,
                self_widths=shape.self_widths,
                force_mismatch=option("hypernetwork_family_mismatch") == MISMATCH_FORCE,
                with_hashes=bool(option("hypernetwork_add_hashes_to_infotext")),
            )

        plan = make()
        if plan.names_not_found:
            self.library.refresh()  # a file added since the last listing
            plan = make()
        if preset_problem:
            plan.problems.insert(0, preset_problem)
        return plan

    def _with_auto_added(self, p, tags: list[list[str]]) -> list[list[str]]:
        """Honour the host's "Add hypernetwork to prompt" setting, as its own handler did."""
        extra = getattr(shared.opts, "data", {}).get(HOST_AUTO_ADD_SETTING, "None")
        if not extra or extra == "None" or any(items and items[0] == extra for items in tags):
            return tags
        multiplier = format_number(as_float(option("hypernetwork_default_multiplier"), 1.0))
        text = f"<{TAG_TYPE}:{extra}:{multiplier}>"
        p.all_prompts = [f"{prompt}{text}" for prompt in p.all_prompts]
        return [*tags, [extra, multiplier]]

    def _report(self, p, plan: ActivationPlan) -> None:
        behaviour = option("hypernetwork_unknown_name")
        for problem in plan.problems:
            log(problem)
            if behaviour != UNKNOWN_CONSOLE:
                p.comment(f"Hypernetworks: {problem}")
        for note in plan.notes:
            log(note)
            p.comment(f"Hypernetworks: {note}")
        self._record_warnings(p, plan.problems if behaviour != UNKNOWN_CONSOLE else [])
        if plan.problems and behaviour == UNKNOWN_STOP:
            log("stopping the generation (setting: stop on unknown names and malformed tags)")
            shared.state.interrupt()

    def _record_warnings(self, p, problems: list[str]) -> None:
        """The problems of this batch's tags (and of its hires pass) as ``Hypernet warnings``: comments
        reach only the UI, this reaches API users too. Folders are named without their path, as
        the parameters go into PNGs that users share."""
        params = getattr(p, "extra_generation_params", None)
        if not isinstance(params, dict):
            return
        if not getattr(p, "is_hr_pass", False) or not isinstance(getattr(p, "hnx_warnings", None), dict):
            p.hnx_warnings = {}
        for problem in problems:
            p.hnx_warnings[self._without_folder_paths(problem)] = None
        if p.hnx_warnings:
            params[WARNINGS_KEY] = "; ".join(p.hnx_warnings)
        else:
            params.pop(WARNINGS_KEY, None)

    def _without_folder_paths(self, text: str) -> str:
        folders = {str(folder).rstrip("/\\") for folder in [*self.library.folders(), *hypernetwork_folders()]}
        for folder in sorted((f for f in folders if f), key=len, reverse=True):
            text = text.replace(folder, os.path.basename(folder) or folder)
        return text

    def _record_hashes(self, p, plan: ActivationPlan) -> None:
        if not option("hypernetwork_add_hashes_to_infotext"):
            return
        if not getattr(p, "is_hr_pass", False) or not hasattr(p, "hnx_hashes"):
            p.hnx_hashes = {}
        p.hnx_hashes.update(plan.hashes)
        if p.hnx_hashes:
            p.extra_generation_params[HASHES_KEY] = format_hashes(p.hnx_hashes)

    def cfg_denoiser(self, params) -> None:
        denoiser = getattr(params, "denoiser", None)
        step, total = getattr(denoiser, "step", None), getattr(denoiser, "total_steps", None)
        if not isinstance(step, int) or not total:
            step, total = params.sampling_step, params.total_sampling_steps
        progress = min(1.0, max(0.0, step / total)) if total else None
        cond = params.text_cond
        cond = cond.get("crossattn") if isinstance(cond, dict) else cond
        x = params.x
        rows = getattr(cond, "shape", [None])[0]
        self.applier.step(progress, rows, x.shape[0] if hasattr(x, "shape") else None)

    # -- memory -----------------------------------------------------------------------------------
    def fold_limit(self, sd_model) -> int | None:
        """The setting, except under A1111's ``--lowvram``, which moves each UNet block onto the
        device for its call and off again: a fold would keep the block's weights there."""
        if getattr(shared.cmd_opts, "lowvram", False) and getattr(sd_model, "lowvram", False):
            return 0
        return limit_from_mib(option("hypernetwork_fold_limit_mib"), DEFAULT_FOLD_LIMIT)

    def model_loaded(self, sd_model) -> None:
        """A checkpoint switch: nothing may stay on the old model; active networks follow if they fit."""
        if isinstance(self.applier, PatcherApplier):
            self.memory.release(SWITCHED)
            return
        if self.applier.attached_unet is None:
            return
        unet = self.applier.unet(sd_model)
        if unet is self.applier.attached_unet:
            return
        entries, dtype = self.applier.entries, self.applier.compute_dtype
        self.memory.release(SWITCHED)
        self.applier.clear()
        shape = self.shape_of(unet)
        kept = []
        for network, strength in entries:
            problem = fit_problem(network, shape.context_width, shape.self_widths)
            if problem and option("hypernetwork_family_mismatch") != MISMATCH_FORCE:
                log(f"{network.name} {problem}; not applied to the new model")
                continue
            kept.append((network, strength))
        if kept and unet is not None:
            self._apply(sd_model, kept, dtype)

    def _apply(self, sd_model, entries: list, dtype) -> None:
        # The built-in Lora's functional mode decides whether folds may follow its merged weights.
        lora_functional = bool((getattr(shared.opts, "data", {}) or {}).get("lora_functional", False))
        self.applier.apply(sd_model, entries, dtype, lora_functional=lora_functional)

    def finish(self) -> None:
        self.applier.detach()
        self.memory.report()

    # -- names -----------------------------------------------------------------------------------
    def shape_of(self, unet) -> ModelShape:
        """The attention widths and blocks of a UNet, remembered for the last UNet asked about."""
        if unet is None:
            return model_shape(None)
        cached = self._shape[0]() if self._shape[0] is not None else None
        if cached is not unet:  # a weak reference: a switched-away model must not stay alive here
            self._shape = (weakref.ref(unet), model_shape(unet))
        return self._shape[1]

    def fits_loaded_model(self, info: dict, sd_model) -> bool:
        """Whether a network (its cached summary) fits the loaded checkpoint; a file that cannot load,
        or no checkpoint, counts as fitting (its card shows, with what is wrong)."""
        if info.get("error") or not info.get("widths"):
            return True
        unet = self.applier.unet(sd_model) if sd_model is not None else None
        if unet is None:
            return True
        shape = self.shape_of(unet)
        return fit_problem(_Widths(info["widths"], info.get("family")), shape.context_width, shape.self_widths) is None

    def prompt_names(self) -> dict[str, NetworkEntry]:
        """Each file under the shortest name that resolves to it (see ``library.distinct_names``)."""
        return distinct_names(self.library.entries)

    def prompt_name(self, entry: NetworkEntry) -> str:
        return next((name for name, other in self.prompt_names().items() if other.path == entry.path), entry.name)

    def infotext_pasted(self, infotext: str, params: dict) -> None:
        """Map the names of ``Hypernet hashes`` to local files with those hashes (renamed copies);
        drop ``Hypernet warnings``, which says what went wrong then and sets nothing."""
        params.pop(WARNINGS_KEY, None)
        hashes = parse_hashes(params.get(HASHES_KEY, ""))
        mapping = {}
        for name, short in hashes.items():
            try:
                if self.library.short_hash(self.library.resolve(name).entry) == short:
                    continue
            except HypernetworkError:
                pass
            matches = self.library.find_by_hash(short)
            if matches:
                mapping[name] = self.prompt_name(matches[0])
        if not mapping:
            return
        for key in ("Prompt", "Hires prompt"):
            if isinstance(params.get(key), str):
                params[key] = rename_tags(params[key], mapping)


class _Widths:
    """Just enough of a network for :func:`fit_problem`, from a cached summary."""

    def __init__(self, widths, family) -> None:
        self.widths = list(widths)
        self.family = family


def api_credentials() -> dict[str, str] | None:
    """The host's ``--api-auth`` for the extension's routes (None when it is not set)."""
    return api.parse_credentials(getattr(shared.cmd_opts, "api_auth", None)) or None


def as_float(value, default: float) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def as_int(value, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


EXTENSION = Extension()
