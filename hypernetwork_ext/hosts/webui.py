"""Glue for A1111 1.10 and Forge/reForge (which keep A1111's ``modules`` API).

``register_all()`` registers every callback when the entry script is imported (the host clears
callbacks before each load, so nothing is registered twice). In ``on_before_ui`` one
:class:`HostPatch` takes over the host's ``hypernet`` extra network and its Hypernetworks page and
adds the X/Y/Z axis; its ``undo()`` runs on script unload. Which attention mechanism is used is
decided by trying to import a UNet patcher (Forge, reForge), never by version strings.
"""

from __future__ import annotations

import html
import inspect
import os
import sys
import weakref
from collections.abc import Callable

import gradio as gr
from modules import (
    errors,
    extra_networks,
    script_callbacks,
    scripts,
    shared,
    ui_extra_networks,
    ui_extra_networks_user_metadata,
)

from ..errors import HypernetworkError
from ..library import ActivationPlan, Library, NetworkEntry, distinct_names, fit_problem, preferred_multiplier_of
from ..shape import ModelShape, model_shape
from ..syntax import TAG_TYPE, find_tags, format_hashes, format_number, parse_hashes, parse_presets, rename_tags
from ..syntax import set_multipliers as set_prompt_multipliers
from ..ui import compat
from ..ui.metadata import metadata_rows
from ..ui.settings import (
    DEFAULTS,
    MISMATCH_FORCE,
    SECTION,
    SETTINGS,
    UNKNOWN_CONSOLE,
    UNKNOWN_STOP,
    component_class,
    compute_dtype,
    extra_folders,
)
from . import api
from .a1111 import LdmApplier
from .forge import PatcherApplier, detect_patcher_host

LOG_PREFIX = "[Hypernetworks]"
PAGE_TITLE = "Hypernetworks"
XYZ_STRENGTH_LABEL = "[Hypernet] Strength"
CACHE_FILE_NAME = "hypernetworks-cache.json"


def option(key: str):
    """A setting's value; its default until the settings page has registered it."""
    data = getattr(shared.opts, "data", {}) or {}
    return data.get(key, DEFAULTS[key])


def log(message: str) -> None:
    print(f"{LOG_PREFIX} {message}", file=sys.stderr)


def hypernetwork_dir() -> str:
    """``--hypernetwork-dir``; where a host has no such option (Forge Classic before a restart adds it
    through ``preload.py``), A1111's default, ``models/hypernetworks``."""
    folder = getattr(shared.cmd_opts, "hypernetwork_dir", None)
    if folder:
        return folder
    from modules import paths_internal

    return os.path.join(paths_internal.models_path, "hypernetworks")


def hypernetwork_folders() -> list[str]:
    return [folder for folder in [hypernetwork_dir(), *extra_folders(option("hypernetwork_extra_folders"))] if folder]


def cache_file() -> str | None:
    try:
        from modules import paths_internal
    except ImportError:
        return None
    return os.path.join(paths_internal.data_path, "cache", CACHE_FILE_NAME)


# --- the extension's state ------------------------------------------------------------------------


class Extension:
    """What lives as long as the process: the library, the attention mechanism and the last plan."""

    def __init__(self) -> None:
        self.library = Library(
            hypernetwork_folders, cache_size=DEFAULTS["hypernetwork_cache_size"], cache_file=cache_file()
        )
        self.applier = PatcherApplier() if detect_patcher_host() else LdmApplier()
        self.last_plan: ActivationPlan | None = None
        self._shape: tuple = (None, None)

    # -- generation -------------------------------------------------------------------------------
    def activate(self, p, tags: list[list[str]]) -> None:
        tags = self._with_auto_added(p, tags)
        if not tags:
            self.applier.detach()
            self.last_plan = None
            return
        self.library.set_cache_size(_as_int(option("hypernetwork_cache_size"), 4))
        plan = self.plan(p.sd_model, tags)
        self.last_plan = plan
        self._report(p, plan)
        self._apply(p.sd_model, plan.entries, compute_dtype(option("hypernetwork_compute_dtype")))
        self._record_hashes(p, plan)

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
                default_multiplier=_as_float(option("hypernetwork_default_multiplier"), 1.0),
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
        multiplier = format_number(_as_float(option("hypernetwork_default_multiplier"), 1.0))
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
        if plan.problems and behaviour == UNKNOWN_STOP:
            log("stopping the generation (setting: stop on unknown names and malformed tags)")
            shared.state.interrupt()

    def _record_hashes(self, p, plan: ActivationPlan) -> None:
        if not option("hypernetwork_add_hashes_to_infotext"):
            return
        if not getattr(p, "is_hr_pass", False) or not hasattr(p, "hnx_hashes"):
            p.hnx_hashes = {}
        p.hnx_hashes.update(plan.hashes)
        if p.hnx_hashes:
            p.extra_generation_params["Hypernet hashes"] = format_hashes(p.hnx_hashes)

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

    def model_loaded(self, sd_model) -> None:
        """A checkpoint switch: nothing may stay on the old model; active networks follow if they fit."""
        if not isinstance(self.applier, LdmApplier) or self.applier.attached_unet is None:
            return
        unet = self.applier.unet(sd_model)
        if unet is self.applier.attached_unet:
            return
        entries, dtype = self.applier.entries, self.applier.compute_dtype
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

    # -- names -----------------------------------------------------------------------------------
    def shape_of(self, unet) -> ModelShape:
        """The attention widths and blocks of a UNet, remembered for the last UNet asked about."""
        if unet is None:
            return model_shape(None)
        cached = self._shape[0]() if self._shape[0] is not None else None
        if cached is not unet:  # a weak reference: a switched-away model must not stay alive here
            self._shape = (weakref.ref(unet), model_shape(unet))
        return self._shape[1]

    def prompt_names(self) -> dict[str, NetworkEntry]:
        """Each file under the shortest name that resolves to it (see ``library.distinct_names``)."""
        return distinct_names(self.library.entries)

    def prompt_name(self, entry: NetworkEntry) -> str:
        return next((name for name, other in self.prompt_names().items() if other.path == entry.path), entry.name)

    def infotext_pasted(self, infotext: str, params: dict) -> None:
        """Map the names of ``Hypernet hashes`` to local files with those hashes (renamed copies)."""
        hashes = parse_hashes(params.get("Hypernet hashes", ""))
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


def _as_float(value, default: float) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def _as_int(value, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


EXTENSION = Extension()


# --- host objects -----------------------------------------------------------------------------------


class HypernetExtraNetwork(extra_networks.ExtraNetwork):
    """Replaces the host's ``hypernet`` handler: one handler, so a network is never applied twice."""

    def __init__(self) -> None:
        super().__init__(TAG_TYPE)

    def activate(self, p, params_list) -> None:
        EXTENSION.activate(p, [list(params.items) for params in params_list])

    def deactivate(self, p) -> None:
        """Hooks come off in the script's postprocess, which runs even without tags."""


class HypernetworksPage(ui_extra_networks.ExtraNetworksPage):
    def __init__(self) -> None:
        super().__init__(PAGE_TITLE)

    def refresh(self) -> None:
        EXTENSION.library.refresh()

    def create_item(self, name, index=None, enable_filter=True):
        entry = EXTENSION.prompt_names().get(name)
        if entry is None:
            return None
        return self._item(name, entry, index, enable_filter)

    def _item(self, prompt_name: str, entry: NetworkEntry, index, enable_filter: bool = True):
        library = EXTENSION.library
        info = library.info(entry)
        if enable_filter and not option("hypernetwork_show_all") and not self._fits_loaded_model(info):
            return None
        path, _ = os.path.splitext(entry.path)
        user = library.user_metadata(entry)
        sha = library.cached_sha256(entry)
        preferred = preferred_multiplier_of(user)
        multiplier = format_number(preferred) if preferred is not None else "opts.hypernetwork_default_multiplier"
        prompt = ui_extra_networks.quote_js(f"<{TAG_TYPE}:{prompt_name}:") + " + " + str(multiplier) + " + "
        prompt += ui_extra_networks.quote_js(">")
        if user.get("activation text"):
            prompt += " + " + ui_extra_networks.quote_js(" " + str(user["activation text"]))
        search_terms = [self.search_terms_from_path(entry.path), entry.relpath]
        search_terms += [term for term in (sha, str(user.get("alias") or "")) if term]
        description = user.get("description") or self.find_description(path)
        return {
            "name": prompt_name,
            "filename": entry.path,
            "shorthash": sha[:10] if sha else None,
            "preview": self.find_preview(path),
            "description": description,
            "search_terms": search_terms,
            "prompt": prompt,
            "local_preview": f"{path}.preview.{getattr(shared.opts, 'samples_format', 'png')}",
            "metadata": {**info, "sha256": sha, "relative_path": entry.relpath},
            "sort_keys": {"default": index, **self.get_sort_keys(entry.path), "hash": sha or ""},
            "user_metadata": user,
        }

    def _fits_loaded_model(self, info: dict) -> bool:
        if info.get("error") or not info.get("widths"):
            return True  # shown, so the user can see what is wrong with it
        sd_model = getattr(shared, "sd_model", None)
        unet = EXTENSION.applier.unet(sd_model) if sd_model is not None else None
        if unet is None:
            return True
        shape = EXTENSION.shape_of(unet)
        return fit_problem(_Widths(info["widths"], info.get("family")), shape.context_width, shape.self_widths) is None

    def list_items(self):
        with EXTENSION.library.deferred_cache_writes():
            for index, (name, entry) in enumerate(EXTENSION.prompt_names().items()):
                item = self._item(name, entry, index)
                if item is not None:
                    yield item

    def allowed_directories_for_previews(self):
        return EXTENSION.library.folders()

    def create_user_metadata_editor(self, ui, tabname):
        return HypernetworkMetadataEditor(ui, tabname, self)


class _Widths:
    """Just enough of a network for :func:`fit_problem`, from a cached summary."""

    def __init__(self, widths, family) -> None:
        self.widths = list(widths)
        self.family = family


class HypernetworkMetadataEditor(ui_extra_networks_user_metadata.UserMetadataEditor):
    """The card editor: description, notes, alias, preferred multiplier and activation text."""

    def __init__(self, ui, tabname, page) -> None:
        super().__init__(ui, tabname, page)
        self.edit_alias = None
        self.edit_preferred = None
        self.edit_activation_text = None

    def _entry(self, name) -> NetworkEntry | None:
        item = self.page.items.get(name, {})
        for entry in EXTENSION.library.entries:
            if entry.path == item.get("filename"):
                return entry
        return None

    def get_metadata_table(self, name):
        entry = self._entry(name)
        if entry is None:
            return super().get_metadata_table(name)
        rows = metadata_rows(EXTENSION.library.describe(entry))
        return [(f"{label}:", html.escape(str(value))) for label, value in rows]

    def put_values_into_components(self, name):
        values = super().put_values_into_components(name)
        user = self.get_user_metadata(name)
        preferred = _as_float(user.get("preferred weight"), 0.0)
        return [*values, user.get("alias", ""), preferred, user.get("activation text", "")]

    def save_hypernetwork_metadata(self, name, description, notes, alias, preferred, activation_text):
        entry = self._entry(name)
        if entry is None:
            return
        updates = {
            "description": description,
            "notes": notes,
            "alias": alias,
            "preferred weight": preferred,
            "activation text": activation_text,
        }
        try:
            self.page.items.get(name, {})["user_metadata"] = EXTENSION.library.write_user_metadata(entry, updates)
        except HypernetworkError as exc:
            errors.display(exc, f"saving user metadata for {entry.relpath}")
            raise gr.Error(str(exc)) from None

    def create_editor(self):
        self.create_default_editor_elems()
        self.edit_notes = gr.TextArea(label="Notes", lines=4)
        with gr.Row():
            self.edit_alias = gr.Textbox(
                label="Alias", placeholder="another name for <hypernet:...>", elem_id=f"{self.id_part}_hnx_alias"
            )
            self.edit_preferred = gr.Slider(
                label="Preferred multiplier",
                minimum=-2.0,
                maximum=2.0,
                step=0.05,
                value=0.0,
                elem_id=f"{self.id_part}_hnx_preferred",
                info="0 uses the default multiplier setting",
            )
        self.edit_activation_text = gr.Textbox(
            label="Activation text", placeholder="added after the tag when the card is clicked"
        )
        self.create_default_buttons()
        outputs = [
            self.edit_name,
            self.edit_description,
            self.html_filedata,
            self.html_preview,
            self.edit_notes,
            self.edit_alias,
            self.edit_preferred,
            self.edit_activation_text,
        ]
        self.button_edit.click(fn=self.put_values_into_components, inputs=[self.edit_name_input], outputs=outputs).then(
            fn=lambda: compat.update(visible=True), inputs=[], outputs=[self.box]
        )
        fields = [
            self.edit_description,
            self.edit_notes,
            self.edit_alias,
            self.edit_preferred,
            self.edit_activation_text,
        ]
        self.setup_save_handler(self.button_save, self.save_hypernetwork_metadata, fields)


class HypernetworkScript(scripts.Script):
    """Always on, without controls: takes the networks off after each generation and, on
    Forge/reForge, installs the patches before each sampling."""

    def title(self):
        return PAGE_TITLE

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def process_before_every_sampling(self, p, *args, **kwargs):
        EXTENSION.applier.before_sampling(p)

    def postprocess(self, p, processed, *args):
        EXTENSION.finish()


# --- the patch of host state -------------------------------------------------------------------------


def find_xyz_module():
    for data in getattr(scripts, "scripts_data", []):
        if getattr(data.script_class, "__module__", None) == "xyz_grid.py" and hasattr(data.module, "AxisOption"):
            return data.module
    return None


def apply_xyz_strength(p, x, xs) -> None:
    found = False
    for field in ("prompt", "hr_prompt"):
        value = getattr(p, field, None)
        if isinstance(value, str) and find_tags(value):
            setattr(p, field, set_prompt_multipliers(value, float(x)))
            found = found or field == "prompt"
        elif isinstance(value, list):
            setattr(p, field, [set_prompt_multipliers(v, float(x)) for v in value])
            found = found or (field == "prompt" and any(find_tags(v) for v in value))
    if not found:
        raise RuntimeError(f"{XYZ_STRENGTH_LABEL}: the prompt has no <{TAG_TYPE}:...> tag to set the strength of")


class HostPatch:
    """Everything the extension changes in the host, with a symmetric ``undo()``; ``apply()`` twice
    changes things once."""

    def __init__(self) -> None:
        self.handler: HypernetExtraNetwork | None = None
        self.replaced_handler = None
        self.page: HypernetworksPage | None = None
        self.removed_pages: list = []
        self.xyz: tuple | None = None

    def apply(self) -> None:
        self._take_over_handler()
        self._take_over_page()
        self._add_xyz_axis()
        loaded = getattr(shared, "loaded_hypernetworks", None)
        if isinstance(loaded, list):
            loaded.clear()  # whatever the host's own handler loaded would act a second time

    def _take_over_handler(self) -> None:
        current = extra_networks.extra_network_registry.get(TAG_TYPE)
        if current is not None and current is self.handler:
            return
        self.replaced_handler = current
        self.handler = HypernetExtraNetwork()
        extra_networks.register_extra_network(self.handler)

    def _take_over_page(self) -> None:
        pages = ui_extra_networks.extra_pages
        if self.page is not None and self.page in pages:
            return
        self.removed_pages = [page for page in pages if page.name == PAGE_TITLE.lower()]
        for page in self.removed_pages:
            pages.remove(page)
        self.page = HypernetworksPage()
        ui_extra_networks.register_page(self.page)

    def _add_xyz_axis(self) -> None:
        module = find_xyz_module()
        if module is None:
            return
        if any(getattr(axis, "label", None) == XYZ_STRENGTH_LABEL for axis in module.axis_options):
            return
        axis = module.AxisOption(XYZ_STRENGTH_LABEL, float, apply_xyz_strength)
        module.axis_options.append(axis)
        self.xyz = (module, axis)

    def undo(self) -> None:
        EXTENSION.finish()
        registry = extra_networks.extra_network_registry
        if self.handler is not None and registry.get(TAG_TYPE) is self.handler:
            if self.replaced_handler is not None:
                registry[TAG_TYPE] = self.replaced_handler
            else:
                del registry[TAG_TYPE]
        pages = ui_extra_networks.extra_pages
        if self.page is not None and self.page in pages:
            pages.remove(self.page)
            pages.extend(page for page in self.removed_pages if page not in pages)
        if self.xyz is not None:
            module, axis = self.xyz
            if axis in module.axis_options:
                module.axis_options.remove(axis)
        self.handler = self.replaced_handler = self.page = self.xyz = None
        self.removed_pages = []


PATCH = HostPatch()


# --- settings, API, registration ---------------------------------------------------------------------


HOST_AUTO_ADD_SETTING = "sd_hypernetwork"


def add_settings() -> None:
    for setting in SETTINGS:
        info = shared.OptionInfo(
            setting.default, setting.label, component_class(setting.kind), dict(setting.args), section=SECTION
        )
        if setting.info:
            info = info.info(setting.info)
        shared.opts.add_option(setting.key, info)
    if HOST_AUTO_ADD_SETTING not in shared.opts.data_labels:  # Forge Classic removed A1111's
        shared.opts.add_option(HOST_AUTO_ADD_SETTING, auto_add_option())


def auto_add_option():
    """A1111's "Add hypernetwork to prompt" (``sd_hypernetwork``), under its key, for hosts that removed it."""
    info = shared.OptionInfo(
        "None",
        "Add hypernetwork to prompt",
        gr.Dropdown,
        lambda: {"choices": ["None", *sorted(EXTENSION.prompt_names())]},
        refresh=EXTENSION.library.refresh,
        section=SECTION,
    )
    return info.info("added to every prompt with the default multiplier, as A1111's setting of this name does")


def add_api_routes(demo, app) -> None:
    credentials = api.parse_credentials(getattr(shared.cmd_opts, "api_auth", None))
    api.add_routes(app, EXTENSION.library, credentials=credentials or None)


def on(register: Callable, callback: Callable, name: str) -> None:
    """``script_callbacks.on_...(callback, name=name)``; Forge Classic's take no name (A1111 1.9 added it)."""
    if "name" in inspect.signature(register).parameters:
        register(callback, name=name)
    else:
        register(callback)


def register_generation() -> None:
    on(script_callbacks.on_before_ui, PATCH.apply, "hypernetworks")
    on(script_callbacks.on_script_unloaded, PATCH.undo, "hypernetworks")
    on(script_callbacks.on_ui_settings, add_settings, "hypernetworks")
    on(script_callbacks.on_app_started, add_api_routes, "hypernetworks")
    on(script_callbacks.on_infotext_pasted, EXTENSION.infotext_pasted, "hypernetworks")
    on(script_callbacks.on_model_loaded, EXTENSION.model_loaded, "hypernetworks")
    on(script_callbacks.on_cfg_denoiser, EXTENSION.cfg_denoiser, "hypernetworks")


# Other parts of the extension (training) add their own registration function here.
REGISTRATIONS: list[Callable[[], None]] = [register_generation]


def register_all() -> None:
    for register in REGISTRATIONS:
        register()
