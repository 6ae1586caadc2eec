"""A restorable stand-in of the WebUI's ``modules`` package, for importing the real entry script.

Built from an explicit list of the names and signatures of AUTOMATIC1111 v1.10.1 (commit 82a973c)
that the extension touches, read in the host's source: ``modules/extra_networks.py``,
``ui_extra_networks.py``, ``ui_extra_networks_user_metadata.py``, ``script_callbacks.py``,
``scripts.py``, ``shared.py``/``options.py``, ``processing.py``, ``sd_samplers_cfg_denoiser.py``,
``infotext_utils.py``, ``errors.py``, ``paths_internal.py`` and ``scripts/xyz_grid.py``. Behaviour
follows the host (the registries' semantics, the prompt regex, callback order and error
reporting, the CFG batch layout); nothing accepts arbitrary names. Forge keeps the same API;
``forge=True`` gives gradio-4 widgets the way Forge's gradio shim does. ``classic=True`` is Forge
Classic (Haoming02/sd-webui-forge-classic 1f95d71): reForge's patcher and gradio 3.41, without what
its commits "hypernet" (cde9f50) and "debloat" removed: ``--hypernetwork-dir``, ``--lowvram``/
``--medvram``, ``--textual-inversion-templates-dir``, ``modules.hypernetworks``, ``modules.lowvram``,
``shared.hypernetworks``/``loaded_hypernetworks``/``reload_hypernetworks``, the ``sd_hypernetwork``
option, the built-in ``hypernet`` handler and page, and the Train tab.

``install(monkeypatch, tmp_path)`` puts the modules into ``sys.modules`` (undone after the test)
and returns a :class:`Host` that loads the entry script as the WebUI does, starts and reloads the
UI, and runs generations through the host's order of calls.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import runpy
import sys
import types
from collections import defaultdict
from dataclasses import dataclass, field

import gradio as gr

from tests.support import webui_processing as wp

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENTRY_SCRIPT = os.path.join(ROOT, "scripts", "hypernetworks.py")
GRADIO_4 = int(gr.__version__.split(".")[0]) >= 4


def _js(code):
    return {"js": code} if GRADIO_4 else {"_js": code}


def module(name: str, **attributes) -> types.ModuleType:
    result = types.ModuleType(name)
    for key, value in attributes.items():
        setattr(result, key, value)
    return result


# --- modules.errors ---------------------------------------------------------------------------


class Errors:
    def __init__(self):
        self.reported: list[str] = []

    def report(self, message, *, exc_info=False):
        self.reported.append(str(message) + (f": {sys.exc_info()[1]!r}" if exc_info else ""))

    def display(self, e, task, *, full_traceback=False):
        self.reported.append(f"{task}: {e!r}")


# --- modules.options / shared ---------------------------------------------------------------------


class OptionInfo:
    def __init__(
        self,
        default=None,
        label="",
        component=None,
        component_args=None,
        onchange=None,
        section=None,
        refresh=None,
        comment_before="",
        comment_after="",
        infotext=None,
        restrict_api=False,
        category_id=None,
    ):
        self.default = default
        self.label = label
        self.component = component
        self.component_args = component_args
        self.onchange = onchange
        self.section = section
        self.category_id = category_id
        self.refresh = refresh
        self.do_not_save = False
        self.comment_before = comment_before
        self.comment_after = comment_after
        self.infotext = infotext
        self.restrict_api = restrict_api

    def link(self, label, url):
        self.comment_before += f"[<a href='{url}' target='_blank'>{label}</a>]"
        return self

    def info(self, info):
        self.comment_after += f"<span class='info'>({info})</span>"
        return self

    def needs_reload_ui(self):
        return self

    def needs_restart(self):
        return self


class Options:
    """The host's Options: values in ``data``, registered options in ``data_labels``; unknown names raise."""

    def __init__(self, data_labels: dict):
        super().__setattr__("data_labels", data_labels)
        super().__setattr__("data", {k: v.default for k, v in data_labels.items()})

    def __setattr__(self, key, value):
        if key in self.data_labels:
            self.data[key] = value
            return
        super().__setattr__(key, value)

    def __getattr__(self, item):
        data = self.__dict__["data"]
        if item in data:
            return data[item]
        labels = self.__dict__["data_labels"]
        if item in labels:
            return labels[item].default
        raise AttributeError(f"'Options' object has no attribute '{item}'")

    def add_option(self, key, info):
        self.data_labels[key] = info
        if key not in self.data and not info.do_not_save:
            self.data[key] = info.default

    def set(self, key, value, is_api=False, run_callbacks=True):
        if key not in self.data_labels:
            return False
        if self.data.get(key) == value:
            return False
        self.data[key] = value
        if run_callbacks and self.data_labels[key].onchange is not None:
            self.data_labels[key].onchange()
        return True

    def onchange(self, key, func, call=True):
        self.data_labels[key].onchange = func
        if call:
            func()


def options_section(section_identifier, options_dict):
    for value in options_dict.values():
        value.section = section_identifier
    return options_dict


# --- modules.script_callbacks -------------------------------------------------------------------


@dataclass
class ScriptCallback:
    script: str
    callback: object
    name: str = "unnamed"


class UiTrainTabParams:
    def __init__(self, txt2img_preview_params):
        self.txt2img_preview_params = txt2img_preview_params


class CFGDenoiserParams:
    def __init__(
        self, x, image_cond, sigma, sampling_step, total_sampling_steps, text_cond, text_uncond, denoiser=None
    ):
        self.x = x
        self.image_cond = image_cond
        self.sigma = sigma
        self.sampling_step = sampling_step
        self.total_sampling_steps = total_sampling_steps
        self.text_cond = text_cond
        self.text_uncond = text_uncond
        self.denoiser = denoiser


CALLBACK_CATEGORIES = (
    "app_started",
    "model_loaded",
    "ui_tabs",
    "ui_train_tabs",
    "ui_settings",
    "before_image_saved",
    "image_saved",
    "extra_noise",
    "cfg_denoiser",
    "cfg_denoised",
    "cfg_after_cfg",
    "before_component",
    "after_component",
    "image_grid",
    "infotext_pasted",
    "script_unloaded",
    "before_ui",
    "on_reload",
    "list_optimizers",
    "list_unets",
    "before_token_counter",
)
REGISTRATION_NAMES = {
    "app_started": "on_app_started",
    "model_loaded": "on_model_loaded",
    "ui_tabs": "on_ui_tabs",
    "ui_train_tabs": "on_ui_train_tabs",
    "ui_settings": "on_ui_settings",
    "before_image_saved": "on_before_image_saved",
    "image_saved": "on_image_saved",
    "extra_noise": "on_extra_noise",
    "cfg_denoiser": "on_cfg_denoiser",
    "cfg_denoised": "on_cfg_denoised",
    "cfg_after_cfg": "on_cfg_after_cfg",
    "before_component": "on_before_component",
    "after_component": "on_after_component",
    "image_grid": "on_image_grid",
    "infotext_pasted": "on_infotext_pasted",
    "script_unloaded": "on_script_unloaded",
    "before_ui": "on_before_ui",
    "on_reload": "on_before_reload",
    "list_optimizers": "on_list_optimizers",
    "list_unets": "on_list_unets",
    "before_token_counter": "on_before_token_counter",
}


def make_script_callbacks(errors: Errors, *, named: bool = True) -> types.ModuleType:
    """``named=False``: Forge Classic's ``on_*(callback)``, which take no ``name`` (A1111 1.9 added it)."""
    callback_map = {f"callbacks_{category}": [] for category in CALLBACK_CATEGORIES}

    def add_callback(callbacks, fun, *, name=None, category="unknown", filename=None):
        callback_name = f"ext/{category}" + (f"/{name}" if name else "")
        unique, index = callback_name, 0
        while any(c.name == unique for c in callbacks):
            index += 1
            unique = f"{callback_name}-{index}"
        callbacks.append(ScriptCallback(filename or "scripts/hypernetworks.py", fun, unique))

    def clear_callbacks():
        for callbacks in callback_map.values():
            callbacks.clear()

    def fire(category, *args, reverse=False):
        callbacks = callback_map[f"callbacks_{category}"]
        for c in reversed(callbacks) if reverse else list(callbacks):
            try:
                c.callback(*args)
            except Exception:
                errors.report(f"Error executing callback {category} for {c.script}", exc_info=True)

    def fire_component(category, component, kwargs):
        for c in list(callback_map[f"callbacks_{category}"]):
            try:
                c.callback(component, **kwargs)
            except Exception:
                errors.report(f"Error executing callback {category} for {c.script}", exc_info=True)

    def ui_tabs():
        """Each callback's (blocks, label, id) tabs, in order; a failing one is reported and skipped."""
        tabs = []
        for c in list(callback_map["callbacks_ui_tabs"]):
            try:
                tabs += c.callback() or []
            except Exception:
                errors.report(f"Error executing callback ui_tabs for {c.script}", exc_info=True)
        return tabs

    def registration(category):
        def register(callback, *, name=None):
            add_callback(callback_map[f"callbacks_{category}"], callback, name=name, category=category)

        def register_unnamed(callback):
            add_callback(callback_map[f"callbacks_{category}"], callback, category=category)

        register = register if named else register_unnamed
        register.__name__ = REGISTRATION_NAMES[category]
        return register

    result = module(
        "modules.script_callbacks",
        callback_map=callback_map,
        add_callback=add_callback,
        clear_callbacks=clear_callbacks,
        ScriptCallback=ScriptCallback,
        CFGDenoiserParams=CFGDenoiserParams,
        app_started_callback=lambda demo, app: fire("app_started", demo, app),
        model_loaded_callback=lambda sd_model: fire("model_loaded", sd_model),
        ui_settings_callback=lambda: fire("ui_settings"),
        cfg_denoiser_callback=lambda params: fire("cfg_denoiser", params),
        infotext_pasted_callback=lambda infotext, params: fire("infotext_pasted", infotext, params),
        ui_train_tabs_callback=lambda params: fire("ui_train_tabs", params),
        ui_tabs_callback=lambda: ui_tabs(),
        after_component_callback=lambda component, **kwargs: fire_component("after_component", component, kwargs),
        UiTrainTabParams=UiTrainTabParams,
        script_unloaded_callback=lambda: fire("script_unloaded", reverse=True),
        before_ui_callback=lambda: fire("before_ui", reverse=True),
    )
    for category, registration_name in REGISTRATION_NAMES.items():
        setattr(result, registration_name, registration(category))
    return result


# --- modules.extra_networks -------------------------------------------------------------------


class ExtraNetworkParams:
    def __init__(self, items=None):
        self.items = items or []
        self.positional = []
        self.named = {}
        for item in self.items:
            parts = item.split("=", 2) if isinstance(item, str) else [item]
            if len(parts) == 2:
                self.named[parts[0]] = parts[1]
            else:
                self.positional.append(item)

    def __eq__(self, other):
        return self.items == other.items


class ExtraNetwork:
    def __init__(self, name):
        self.name = name

    def activate(self, p, params_list):
        raise NotImplementedError

    def deactivate(self, p):
        raise NotImplementedError


def make_extra_networks(errors: Errors, shared) -> types.ModuleType:
    registry: dict = {}
    aliases: dict = {}

    class BuiltinExtraNetworkHypernet(ExtraNetwork):
        """The host's own handler: it would load networks into shared.loaded_hypernetworks."""

        def __init__(self):
            super().__init__("hypernet")

        def activate(self, p, params_list):
            shared.loaded_hypernetworks.clear()
            shared.loaded_hypernetworks.extend(params.items[0] for params in params_list)

        def deactivate(self, p):
            pass

    def register_extra_network(extra_network):
        registry[extra_network.name] = extra_network

    def lookup_extra_networks(extra_network_data):
        res = {}
        for name, args in list(extra_network_data.items()):
            extra_network = registry.get(name) or aliases.get(name)
            if extra_network is None:
                continue
            res.setdefault(extra_network, []).extend(args)
        return res

    def activate(p, extra_network_data):
        activated = []
        for extra_network, args in lookup_extra_networks(extra_network_data).items():
            try:
                extra_network.activate(p, args)
                activated.append(extra_network)
            except Exception as e:
                errors.display(e, f"activating extra network {extra_network.name} with arguments {args}")
        for name, extra_network in registry.items():
            if extra_network in activated:
                continue
            try:
                extra_network.activate(p, [])
            except Exception as e:
                errors.display(e, f"activating extra network {name}")

    def deactivate(p, extra_network_data):
        data = lookup_extra_networks(extra_network_data)
        for extra_network in data:
            extra_network.deactivate(p)
        for extra_network in registry.values():
            if extra_network not in data:
                extra_network.deactivate(p)

    re_extra_net = re.compile(r"<(\w+):([^>]+)>")

    def parse_prompt(prompt):
        res = defaultdict(list)

        def found(m):
            res[m.group(1)].append(ExtraNetworkParams(items=m.group(2).split(":")))
            return ""

        return re.sub(re_extra_net, found, prompt), res

    def parse_prompts(prompts):
        res, extra_data = [], None
        for prompt in prompts:
            updated, parsed = parse_prompt(prompt)
            if extra_data is None:
                extra_data = parsed
            res.append(updated)
        return res, extra_data

    def get_user_metadata(filename, lister=None):
        if filename is None:
            return {}
        path = os.path.splitext(filename)[0] + ".json"
        if not os.path.exists(path):
            return {}
        try:
            with open(path, encoding="utf8") as handle:
                return json.load(handle)
        except Exception as e:
            errors.display(e, f"reading extra network user metadata from {path}")
            return {}

    return module(
        "modules.extra_networks",
        extra_network_registry=registry,
        extra_network_aliases=aliases,
        initialize=lambda: (registry.clear(), aliases.clear()),
        register_extra_network=register_extra_network,
        register_extra_network_alias=lambda extra_network, alias: aliases.__setitem__(alias, extra_network),
        register_default_extra_networks=lambda: register_extra_network(BuiltinExtraNetworkHypernet()),
        ExtraNetworkParams=ExtraNetworkParams,
        ExtraNetwork=ExtraNetwork,
        lookup_extra_networks=lookup_extra_networks,
        activate=activate,
        deactivate=deactivate,
        re_extra_net=re_extra_net,
        parse_prompt=parse_prompt,
        parse_prompts=parse_prompts,
        get_user_metadata=get_user_metadata,
        BuiltinExtraNetworkHypernet=BuiltinExtraNetworkHypernet,
    )


# --- modules.ui_extra_networks ----------------------------------------------------------------


def make_ui_extra_networks(shared, extra_networks, metadata_module) -> types.ModuleType:
    extra_pages: list = []
    allowed_dirs: set = set()

    def quote_js(s):
        s = s.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{s}"'

    def allowed_preview_extensions():
        return {"png", "jpg", "jpeg", "webp", "gif", shared.opts.samples_format}

    def register_page(page):
        extra_pages.append(page)
        allowed_dirs.clear()
        allowed_dirs.update(d for x in extra_pages for d in x.allowed_directories_for_previews())

    def path_is_parent(parent_path, child_path):
        return os.path.abspath(child_path).startswith(os.path.abspath(parent_path))

    class ExtraNetworksPage:
        def __init__(self, title):
            self.title = title
            self.name = title.lower()
            self.extra_networks_tabname = self.name.replace(" ", "_")
            self.allow_prompt = True
            self.allow_negative_prompt = False
            self.metadata = {}
            self.items = {}

        def refresh(self):
            pass

        def read_user_metadata(self, item, use_cache=True):
            metadata = extra_networks.get_user_metadata(item.get("filename"))
            if metadata.get("description") is not None:
                item["description"] = metadata["description"]
            item["user_metadata"] = metadata

        def link_preview(self, filename):
            mtime = os.path.getmtime(filename)
            return f"./sd_extra_networks/thumb?filename={filename.replace(os.sep, '/')}&mtime={mtime}"

        def search_terms_from_path(self, filename, possible_directories=None):
            abspath = os.path.abspath(filename)
            dirs = possible_directories if possible_directories is not None else self.allowed_directories_for_previews()
            for parentdir in dirs:
                parentdir = os.path.dirname(os.path.abspath(parentdir))
                if abspath.startswith(parentdir):
                    return os.path.relpath(abspath, parentdir)
            return ""

        def create_html(self, tabname, *, empty=False):
            """The host's bookkeeping of create_html: items by name, metadata by name (no HTML)."""
            self.metadata = {}
            self.items = {x["name"]: x for x in ([] if empty else self.list_items())}
            for item in self.items.values():
                if item.get("metadata"):
                    self.metadata[item["name"]] = item["metadata"]
                if "user_metadata" not in item:
                    self.read_user_metadata(item)
            return "".join(f"<div class='card' data-name='{name}'></div>" for name in self.items)

        def create_item(self, name, index=None):
            raise NotImplementedError()

        def list_items(self):
            raise NotImplementedError()

        def allowed_directories_for_previews(self):
            return []

        def get_sort_keys(self, path):
            stat = os.stat(path)
            return {
                "date_created": int(stat.st_mtime),
                "date_modified": int(stat.st_ctime),
                "name": os.path.basename(path).lower(),
                "path": str(path).lower(),
            }

        def find_preview(self, path):
            for ext in sorted(allowed_preview_extensions()):
                for file in (f"{path}.{ext}", f"{path}.preview.{ext}"):
                    if os.path.exists(file):
                        return self.link_preview(file)
            return None

        def find_description(self, path):
            for file in (f"{path}.txt", f"{path}.description.txt"):
                if os.path.exists(file):
                    with open(file, encoding="utf-8", errors="replace") as handle:
                        return handle.read()
            return None

        def create_user_metadata_editor(self, ui, tabname):
            return metadata_module.UserMetadataEditor(ui, tabname, self)

    class ExtraNetworksPageHypernetworks(ExtraNetworksPage):
        """The host's built-in page (which the extension replaces)."""

        def __init__(self):
            super().__init__("Hypernetworks")

        def list_items(self):
            return []

        def allowed_directories_for_previews(self):
            return [shared.cmd_opts.hypernetwork_dir]

    class ExtraNetworksPageCheckpoints(ExtraNetworksPage):
        def __init__(self):
            super().__init__("Checkpoints")

        def list_items(self):
            return []

    def register_default_pages():
        register_page(ExtraNetworksPageHypernetworks())
        register_page(ExtraNetworksPageCheckpoints())

    def register_checkpoints_page():  # Forge Classic's default pages (and textual inversion's)
        register_page(ExtraNetworksPageCheckpoints())

    return module(
        "modules.ui_extra_networks",
        extra_pages=extra_pages,
        allowed_dirs=allowed_dirs,
        register_page=register_page,
        initialize=extra_pages.clear,
        register_default_pages=register_default_pages,
        register_checkpoints_page=register_checkpoints_page,
        quote_js=quote_js,
        allowed_preview_extensions=allowed_preview_extensions,
        path_is_parent=path_is_parent,
        ExtraNetworksPage=ExtraNetworksPage,
        ExtraNetworksPageHypernetworks=ExtraNetworksPageHypernetworks,
    )


class UserMetadataEditor:
    """The host's card editor, with its default widgets (gr.Box on gradio 3; Forge's shim makes it a Group)."""

    def __init__(self, ui, tabname, page):
        self.ui = ui
        self.tabname = tabname
        self.page = page
        self.id_part = f"{self.tabname}_{self.page.extra_networks_tabname}_edit_user_metadata"
        self.box = None
        self.edit_name_input = None
        self.button_edit = None
        self.edit_name = None
        self.edit_description = None
        self.edit_notes = None
        self.html_filedata = None
        self.html_preview = None
        self.html_status = None
        self.button_cancel = None
        self.button_replace_preview = None
        self.button_save = None

    def get_user_metadata(self, name):
        item = self.page.items.get(name, {})
        user_metadata = item.get("user_metadata", None)
        if not user_metadata:
            user_metadata = {"description": item.get("description", "")}
            item["user_metadata"] = user_metadata
        return user_metadata

    def create_default_editor_elems(self):
        with gr.Row():
            with gr.Column(scale=2):
                self.edit_name = gr.HTML(elem_classes="extra-network-name")
                self.edit_description = gr.Textbox(label="Description", lines=4)
                self.html_filedata = gr.HTML()
            with gr.Column(scale=1, min_width=0):
                self.html_preview = gr.HTML()

    def create_default_buttons(self):
        with gr.Row(elem_classes="edit-user-metadata-buttons"):
            self.button_cancel = gr.Button("Cancel")
            self.button_replace_preview = gr.Button("Replace preview", variant="primary")
            self.button_save = gr.Button("Save", variant="primary")
        self.html_status = gr.HTML(elem_classes="edit-user-metadata-status")
        self.button_cancel.click(fn=None, **_js("closePopup"))

    def get_card_html(self, name):
        return "<div class='card standalone-card-preview'></div>"

    def get_metadata_table(self, name):
        item = self.page.items.get(name, {})
        stats = os.stat(item["filename"])
        return [("Filename: ", os.path.basename(item["filename"])), ("File size: ", str(stats.st_size))]

    def put_values_into_components(self, name):
        user_metadata = self.get_user_metadata(name)
        params = self.get_metadata_table(name)
        table = (
            '<table class="file-metadata">'
            + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in params if v is not None)
            + "</table>"
        )
        return (
            name,
            user_metadata.get("description", ""),
            table,
            self.get_card_html(name),
            user_metadata.get("notes", ""),
        )

    def write_user_metadata(self, name, metadata):
        item = self.page.items.get(name, {})
        with open(os.path.splitext(item["filename"])[0] + ".json", "w", encoding="utf8") as file:
            json.dump(metadata, file, indent=4, ensure_ascii=False)

    def save_user_metadata(self, name, desc, notes):
        user_metadata = self.get_user_metadata(name)
        user_metadata["description"] = desc
        user_metadata["notes"] = notes
        self.write_user_metadata(name, user_metadata)

    def setup_save_handler(self, button, func, components):
        button.click(fn=func, inputs=[self.edit_name_input, *components], outputs=[]).then(
            fn=None, inputs=[self.edit_name_input], outputs=[], **_js("function(name){closePopup();}")
        )

    def create_editor(self):
        self.create_default_editor_elems()
        self.edit_notes = gr.TextArea(label="Notes", lines=4)
        self.create_default_buttons()
        self.button_edit.click(
            fn=self.put_values_into_components,
            inputs=[self.edit_name_input],
            outputs=[self.edit_name, self.edit_description, self.html_filedata, self.html_preview, self.edit_notes],
        ).then(fn=lambda: gr.update(visible=True), inputs=[], outputs=[self.box])
        self.setup_save_handler(self.button_save, self.save_user_metadata, [self.edit_description, self.edit_notes])

    def create_ui(self):
        container = gr.Group if GRADIO_4 else gr.Box
        with container(visible=False, elem_id=self.id_part, elem_classes="edit-user-metadata") as box:
            self.box = box
            self.edit_name_input = gr.Textbox(
                "Edit user metadata card id", visible=False, elem_id=f"{self.id_part}_name"
            )
            self.button_edit = gr.Button("Edit user metadata", visible=False, elem_id=f"{self.id_part}_button")
            self.create_editor()


# --- modules.scripts ----------------------------------------------------------------------------


class AlwaysVisible:
    pass


class Script:
    name = None
    section = None
    filename = None
    args_from = None
    args_to = None
    alwayson = False
    is_txt2img = False
    is_img2img = False
    tabname = None
    group = None
    create_group = True
    infotext_fields = None
    paste_field_names = None
    api_info = None
    setup_for_ui_only = False
    controls = None

    def title(self):
        raise NotImplementedError()

    def ui(self, is_img2img):
        pass

    def show(self, is_img2img):
        return True

    def process(self, p, *args):
        pass

    def process_before_every_sampling(self, p, *args, **kwargs):
        pass

    def post_sample(self, p, ps, *args):
        pass

    def before_hr(self, p, *args):
        pass

    def postprocess(self, p, processed, *args):
        pass


class ScriptRunner:
    """``modules.scripts.ScriptRunner``: the scripts one txt2img or img2img runs (here: always-on ones)."""

    def __init__(self):
        self.scripts = []
        self.selectable_scripts = []
        self.alwayson_scripts = []

    @property
    def script_instances(self):
        return self.alwayson_scripts


ScriptClassData = collections.namedtuple("ScriptClassData", ["script_class", "path", "basedir", "module"])


def make_xyz_module() -> tuple[types.ModuleType, type]:
    """scripts/xyz_grid.py as the host loads it: module name "xyz_grid.py", AxisOption, axis_options."""

    class AxisOption:
        def __init__(self, label, type, apply, format_value=None, confirm=None, cost=0.0, choices=None, prepare=None):
            self.label = label
            self.type = type
            self.apply = apply
            self.format_value = format_value
            self.confirm = confirm
            self.cost = cost
            self.prepare = prepare
            self.choices = choices

    def apply_field(name):
        return lambda p, x, xs: setattr(p, name, x)

    xyz = module("xyz_grid.py", AxisOption=AxisOption)
    xyz.axis_options = [
        AxisOption("Nothing", str, lambda p, x, xs: None),
        AxisOption("Steps", int, apply_field("steps")),
    ]

    class XyzScript(Script):
        def title(self):
            return "X/Y/Z plot"

    XyzScript.__module__ = "xyz_grid.py"
    return xyz, XyzScript


# --- modules.processing -------------------------------------------------------------------------


@dataclass(repr=False)
class StableDiffusionProcessing:
    """The fields of A1111's StableDiffusionProcessing that extra networks and scripts use."""

    sd_model: object = None
    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 4
    batch_size: int = 1
    n_iter: int = 1
    enable_hr: bool = False
    hr_prompt: str = ""
    disable_extra_networks: bool = False
    scripts: object = None
    extra_generation_params: dict = field(default_factory=dict)
    is_hr_pass: bool = False
    iteration: int = 0

    def __post_init__(self):
        self.comments = {}
        self.all_prompts = None
        self.prompts = None
        self.extra_network_data = None
        self.hr_extra_network_data = None

    def comment(self, text):
        self.comments[text] = 1


# --- the host -----------------------------------------------------------------------------------


class Host:
    """The stand-in's modules plus the host's sequence of calls (startup, reload, generation)."""

    def __init__(self, monkeypatch, tmp_path, *, forge: bool = False, reforge: bool = False, classic: bool = False):
        self.tmp_path = tmp_path
        self.forge = forge or reforge or classic
        self.reforge = reforge
        self.classic = classic
        self.errors = Errors()
        self.hypernetwork_dir = tmp_path / "models" / "hypernetworks"
        self.hypernetwork_dir.mkdir(parents=True)
        self.data_path = tmp_path / "data"
        self.data_path.mkdir()
        self.templates_dir = tmp_path / "textual_inversion_templates"
        self.templates_dir.mkdir()
        self.shared = module(
            "modules.shared",
            opts=Options(
                {
                    "samples_format": OptionInfo("png"),
                    "sd_hypernetwork": OptionInfo("None"),
                    "sd_model_checkpoint": OptionInfo(None),
                }
            ),
            OptionInfo=OptionInfo,
            options_section=options_section,
            options_templates={},
            cmd_opts=argparse.Namespace(
                hypernetwork_dir=str(self.hypernetwork_dir),
                textual_inversion_templates_dir=str(self.templates_dir),
                api_auth=None,
                api=True,
                lowvram=False,
                medvram=False,
                medvram_sdxl=False,
            ),
            sd_model=None,
            state=wp.State(),
            parallel_processing_allowed=True,
            hypernetworks={},
            loaded_hypernetworks=[],
        )
        self.shared.reload_hypernetworks = self._reload_hypernetworks
        self.script_callbacks = make_script_callbacks(self.errors, named=not classic)
        self.extra_networks = make_extra_networks(self.errors, self.shared)
        self.metadata = module("modules.ui_extra_networks_user_metadata", UserMetadataEditor=UserMetadataEditor)
        self.ui_extra_networks = make_ui_extra_networks(self.shared, self.extra_networks, self.metadata)
        self.xyz, xyz_script = make_xyz_module()
        self.scripts = module(
            "modules.scripts",
            Script=Script,
            ScriptRunner=ScriptRunner,
            AlwaysVisible=AlwaysVisible,
            ScriptClassData=ScriptClassData,
            scripts_data=[],
            basedir=lambda: ROOT,
        )
        self.scripts.scripts_data.append(ScriptClassData(xyz_script, "scripts/xyz_grid.py", ROOT, self.xyz))
        self.sd_models = wp.make_sd_models(self.shared, forge=forge and not reforge, reforge=reforge)
        self.sd_samplers = wp.make_sd_samplers()
        self.progress = wp.make_progress(self.shared)
        self.call_queue = wp.make_call_queue(self.shared, self.progress)
        self.lowvram = wp.make_lowvram(self.shared)
        self.sd_models.lowvram = self.lowvram
        self.processing = wp.make_processing(self, StableDiffusionProcessing)
        self.devices = wp.make_devices()
        if classic:
            self._remove_hypernetwork_names()
        errors_module = module("modules.errors", report=self.errors.report, display=self.errors.display)
        paths_internal = module(
            "modules.paths_internal", data_path=str(self.data_path), models_path=str(tmp_path / "models")
        )
        package = module("modules", __path__=[])
        submodules = {
            "errors": errors_module,
            "shared": self.shared,
            "script_callbacks": self.script_callbacks,
            "extra_networks": self.extra_networks,
            "ui_extra_networks": self.ui_extra_networks,
            "ui_extra_networks_user_metadata": self.metadata,
            "scripts": self.scripts,
            "processing": self.processing,
            "paths_internal": paths_internal,
            "sd_models": self.sd_models,
            "sd_samplers": self.sd_samplers,
            "progress": self.progress,
            "call_queue": self.call_queue,
            "lowvram": self.lowvram,
            "devices": self.devices,
            # A1111's own hypernetwork code, which every host but Forge Classic keeps
            "hypernetworks": module("modules.hypernetworks", __path__=[]),
        }
        if classic:
            del submodules["lowvram"], submodules["hypernetworks"]
        monkeypatch.setitem(sys.modules, "modules", package)
        for name, value in submodules.items():
            setattr(package, name, value)
            monkeypatch.setitem(sys.modules, f"modules.{name}", value)
        # the extension's host modules bind to whichever `modules` they were imported with
        for name in [n for n in sys.modules if n.startswith("hypernetwork_ext.hosts")]:
            monkeypatch.delitem(sys.modules, name)
        self.script_instances: list = []
        self.entry_namespace: dict = {}

    # -- startup and Reload UI (webui.py / initialize.initialize_rest) --------------------------------
    def load_scripts(self):
        """``scripts.load_scripts``: callbacks cleared, every script file executed again."""
        self.script_callbacks.clear_callbacks()
        self.entry_namespace = runpy.run_path(ENTRY_SCRIPT, run_name="hypernetworks.py")
        script_classes = [
            value
            for value in self.entry_namespace.values()
            if isinstance(value, type) and issubclass(value, Script) and value is not Script
        ]
        self.script_instances = [cls() for cls in script_classes]

    def _remove_hypernetwork_names(self):
        """Forge Classic: every hypernetwork name of A1111 that the extension could touch is gone."""
        for name in ("hypernetwork_dir", "textual_inversion_templates_dir", "lowvram", "medvram", "medvram_sdxl"):
            delattr(self.shared.cmd_opts, name)
        for name in ("hypernetworks", "loaded_hypernetworks", "reload_hypernetworks"):
            delattr(self.shared, name)
        del self.shared.opts.data_labels["sd_hypernetwork"]
        self.shared.opts.data.pop("sd_hypernetwork", None)
        del self.extra_networks.register_default_extra_networks
        self.ui_extra_networks.register_default_pages = self.ui_extra_networks.register_checkpoints_page

    def start(self):
        self.load_scripts()
        self.ui_extra_networks.initialize()
        self.ui_extra_networks.register_default_pages()
        self.extra_networks.initialize()
        if not self.classic:
            self.extra_networks.register_default_extra_networks()
        self.script_callbacks.before_ui_callback()
        self.script_callbacks.ui_settings_callback()

    def _host_component(self, component_class, *args, **kwargs):
        """A component as the host's patched gradio constructors make it: ``after_component`` fires."""
        component = component_class(*args, **kwargs)
        self.script_callbacks.after_component_callback(component, **kwargs)
        return component

    def _txt2img_preview_components(self) -> list:
        """The txt2img controls A1111 hands to Train tabs (and Forge has with the same elem_ids)."""
        host = self._host_component
        return [
            host(gr.Textbox, label="Prompt", elem_id="txt2img_prompt", value="a red cube"),
            host(gr.Textbox, label="Negative prompt", elem_id="txt2img_neg_prompt", value="blurry"),
            host(gr.Slider, minimum=1, maximum=150, step=1, label="Sampling steps", value=3, elem_id="txt2img_steps"),
            host(
                gr.Dropdown,
                label="Sampling method",
                elem_id="txt2img_sampling",
                choices=["Euler a"],
                value="Euler a",
            ),
            host(
                gr.Slider,
                minimum=1.0,
                maximum=30.0,
                step=0.5,
                label="CFG Scale",
                value=5.0,
                elem_id="txt2img_cfg_scale",
            ),
            host(gr.Number, label="Seed", value=11, elem_id="txt2img_seed", precision=0),
            host(gr.Slider, minimum=64, maximum=2048, step=8, label="Width", value=64, elem_id="txt2img_width"),
            host(gr.Slider, minimum=64, maximum=2048, step=8, label="Height", value=80, elem_id="txt2img_height"),
        ]

    def build_ui_tabs(self):
        """``modules.ui.create_ui`` on Forge: the txt2img controls, then ``ui_tabs_callback``'s tabs."""
        with gr.Blocks(analytics_enabled=False):
            preview = self._txt2img_preview_components()
        return self.script_callbacks.ui_tabs_callback(), preview

    def build_train_interface(self):
        """``modules.ui.create_ui``'s txt2img preview components and Train tab: the host's own
        hypernetwork controls (firing ``after_component`` as its patched gradio constructors do),
        then ``ui_train_tabs_callback`` inside ``gr.Tabs(elem_id="train_tabs")``."""
        host = self._host_component
        with gr.Blocks(analytics_enabled=False) as interface:
            preview = self._txt2img_preview_components()
            with gr.Tabs(elem_id="train_tabs"):
                with gr.Tab(label="Create hypernetwork", id="create_hypernetwork"):
                    host(gr.Textbox, label="Name", elem_id="train_new_hypernetwork_name")
                    host(
                        gr.CheckboxGroup,
                        label="Modules",
                        value=["768"],
                        choices=["768", "1024"],
                        elem_id="train_new_hypernetwork_sizes",
                    )
                    host(
                        gr.Textbox,
                        "0, 0, 0",
                        label="Enter hypernetwork Dropout structure (or empty). Recommended : 0~0.35 incrementing sequence: 0, 0.05, 0.15",
                    )
                    host(gr.Button, value="Create hypernetwork", variant="primary", elem_id="train_create_hypernetwork")
                with gr.Tab(label="Train", id="train"):
                    host(gr.Dropdown, label="Embedding", elem_id="train_embedding", choices=[])
                    host(gr.Dropdown, label="Hypernetwork", elem_id="train_hypernetwork", choices=[])
                    host(
                        gr.Textbox,
                        label="Hypernetwork Learning rate",
                        value="0.00001",
                        elem_id="train_hypernetwork_learn_rate",
                    )
                    host(gr.Button, value="Train Embedding", variant="primary", elem_id="train_train_embedding")
                    host(gr.Button, value="Interrupt", elem_id="train_interrupt_training")
                    host(gr.Button, value="Train Hypernetwork", variant="primary", elem_id="train_train_hypernetwork")
                self.script_callbacks.ui_train_tabs_callback(self.script_callbacks.UiTrainTabParams(preview))
        return interface, preview

    def reload_ui(self):
        self.script_callbacks.script_unloaded_callback()
        self.start()

    def before_sampling(self, p, *, reset: bool = True):
        """``scripts.process_before_every_sampling``; Forge first resets the patchers to the post-Lora copy."""
        if reset and hasattr(p.sd_model, "forge_objects_after_applying_lora"):
            p.sd_model.forge_objects = p.sd_model.forge_objects_after_applying_lora.shallow_copy()
        for script in self.script_instances:
            script.process_before_every_sampling(p, x=None, noise=None, c=None, uc=None)

    @property
    def alwayson_scripts(self):
        """The host as its txt2img ScriptRunner: the extension's script is always on."""
        return self.script_instances

    @property
    def extension(self):
        return sys.modules["hypernetwork_ext.hosts.webui"].EXTENSION

    def set_model(self, sd_model):
        self.shared.sd_model = sd_model
        self.sd_models.model_data.sd_model = sd_model
        self.script_callbacks.model_loaded_callback(sd_model)

    def load_checkpoint(self, sd_model, name: str, family: str, shorthash: str = "0123456789"):
        """``sd_models.load_model``: the fields the host sets on a model it loads, then model_loaded."""
        info = self.sd_models.CheckpointInfo(name, shorthash)
        self.sd_models.register(info)
        for flag in ("is_sd1", "is_sd2", "is_sdxl", "is_ssd", "is_sd3"):
            setattr(sd_model, flag, flag == f"is_{family}")
        sd_model.latent_channels = 4
        sd_model.sd_model_hash = info.calculate_shorthash()
        sd_model.sd_model_checkpoint = info.filename
        sd_model.sd_checkpoint_info = info
        if not self.classic:  # Forge Classic has no modules.lowvram
            sd_model.lowvram = self.lowvram.is_needed(sd_model)
        self.shared.opts.data["sd_model_checkpoint"] = info.title
        self.set_model(sd_model)
        return sd_model

    def _reload_hypernetworks(self):
        """``shared.reload_hypernetworks``: the host's own list (``*.pt`` under --hypernetwork-dir)."""
        folder = self.shared.cmd_opts.hypernetwork_dir
        found = sorted(glob.iglob(os.path.join(folder, "**/*.pt"), recursive=True), key=str.lower)
        self.shared.hypernetworks = {os.path.splitext(os.path.basename(f))[0]: f for f in found}

    # -- infotext (processing.create_infotext / infotext_utils) ---------------------------------------
    @staticmethod
    def quote(text):
        text = str(text)
        if "," not in text and "\n" not in text and ":" not in text:
            return text
        return json.dumps(text, ensure_ascii=False)

    def infotext(self, p) -> str:
        params = {"Steps": p.steps, **p.extra_generation_params}
        line = ", ".join(f"{k}: {self.quote(v)}" for k, v in params.items() if v is not None)
        return f"{p.all_prompts[0]}\nNegative prompt: {p.negative_prompt}\n{line}"

    def parse_generation_parameters(self, text: str) -> dict:
        lines = text.strip().split("\n")
        last = lines[-1]
        prompt, negative = [], []
        for line in lines[:-1]:
            if line.startswith("Negative prompt:"):
                negative.append(line[16:].strip())
            else:
                (negative if negative else prompt).append(line)
        res = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
        for key, value in re.findall(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)', last):
            res[key] = json.loads(value) if value.startswith('"') else value
        self.script_callbacks.infotext_pasted_callback(text, res)
        return res
