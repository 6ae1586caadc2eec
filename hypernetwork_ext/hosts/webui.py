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
from ..library import NetworkEntry, preferred_multiplier_of
from ..syntax import TAG_TYPE, find_tags, format_number
from ..syntax import set_multipliers as set_prompt_multipliers
from ..ui import compat
from ..ui.metadata import metadata_rows
from ..ui.settings import SECTION, SETTINGS, component_class
from . import api
from .a1111 import LdmApplier
from .extension import (
    EXTENSION,
    HOST_AUTO_ADD_SETTING,
    Extension,
    api_credentials,
    as_float,
    hypernetwork_folders,
    log,
    option,
    primary_folder,
)
from .held_memory import ModelMoveWatch

__all__ = [
    "EXTENSION",
    "SECTION",
    "Extension",
    "HypernetworkScript",
    "hypernetwork_dir",
    "hypernetwork_folders",
    "log",
    "option",
    "register_all",
]

hypernetwork_dir = primary_folder  # the training glue's name for it

PAGE_TITLE = "Hypernetworks"
XYZ_STRENGTH_LABEL = "[Hypernet] Strength"


# --- host objects -----------------------------------------------------------------------------------


class HypernetExtraNetwork(extra_networks.ExtraNetwork):
    """Replaces the host's ``hypernet`` handler: one handler, so a network is never applied twice."""

    def __init__(self) -> None:
        super().__init__(TAG_TYPE)

    def activate(self, p, params_list) -> None:
        builtin = PATCH.replaced_handler
        if option("hypernetwork_builtin_handler") and builtin is not None and isinstance(EXTENSION.applier, LdmApplier):
            EXTENSION.hand_back(p, lambda: builtin.activate(p, params_list))
            return
        EXTENSION.take_over()
        EXTENSION.activate(p, [list(params.items) for params in params_list])

    def deactivate(self, p) -> None:
        """Hooks come off in the script's postprocess, which runs even without tags."""


def _loaded():
    return getattr(shared, "sd_model", None)


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
        if enable_filter and not option("hypernetwork_show_all") and not EXTENSION.fits_loaded_model(info, _loaded()):
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
        preferred = as_float(user.get("preferred weight"), 0.0)
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

    def post_sample(self, p, ps, *args):
        EXTENSION.memory.after_sampling(p)

    def before_hr(self, p, *args):
        EXTENSION.memory.after_sampling(p)

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
        self.model_moves = ModelMoveWatch()

    def apply(self) -> None:
        self._take_over_handler()
        self._take_over_page()
        self._add_xyz_axis()
        self._watch_model_moves()
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

    def _watch_model_moves(self) -> None:
        try:
            from modules import sd_models
        except ImportError:
            return
        a1111 = isinstance(EXTENSION.applier, LdmApplier)
        self.model_moves.apply(sd_models, EXTENSION.memory, a1111=a1111, on_error=errors.display)

    def undo(self) -> None:
        EXTENSION.finish()
        self.model_moves.undo()
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


def add_settings() -> None:
    for setting in SETTINGS:
        if setting.a1111_only and not isinstance(EXTENSION.applier, LdmApplier):
            continue
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
    api.add_routes(app, EXTENSION.library, credentials=api_credentials(), memory=EXTENSION.memory.as_dict)


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
