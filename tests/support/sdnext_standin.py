"""A restorable stand-in of SD.Next's ``modules`` package (diffusers backend), for importing the real
entry script and driving a real diffusers pipeline the way SD.Next does.

Written from an explicit list of the names and signatures of SD.Next master 058a7f0 (2026-07-23)
that the extension touches, read in the host's source: ``modules/extra_networks.py`` (registry,
``ExtraNetworkParams``, ``activate`` passing ``step=`` and calling every registered handler with an
empty list, ``deactivate(p, force=)``, the ``<(\\w+):([^>]+)>`` parser), ``script_callbacks.py``
(``on_*`` take only the callback), ``scripts_manager.py`` (``Script``, ``AlwaysVisible``),
``ui_extra_networks.py`` (``ExtraNetworksPage``, ``register_page`` into ``shared.extra_networks``,
``find_description`` reading ``name.txt`` then ``description`` of ``name.json``), ``shared.py``,
``options.py`` (``OptionInfo``), ``shared_state.py`` (``begin`` returns an id, ``end(id)``),
``paths.py``, ``call_queue.py``, ``progress.py``, ``processing.py`` (``get_sampler_name``) and
``processing_diffusers.py`` (``process_base``: parse the prompts, activate the networks, call the
pipeline with the prompt embeddings, deactivate). Nothing accepts arbitrary names.

``install(monkeypatch, tmp_path, pipeline)`` puts the modules into ``sys.modules`` (undone after the
test) and returns a :class:`Host` that loads the entry script, builds the UI callbacks and runs
generations in SD.Next's order of calls.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import runpy
import sys
import threading
import types
from collections import defaultdict

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENTRY_SCRIPT = os.path.join(ROOT, "scripts", "hypernetworks.py")


def module(name: str, **attributes) -> types.ModuleType:
    result = types.ModuleType(name)
    for key, value in attributes.items():
        setattr(result, key, value)
    return result


# --- shared, options, state ---------------------------------------------------------------------


class ModelData:
    """``modules.modeldata.model_data``: the loaded pipeline, and here how often a load was asked for."""

    def __init__(self):
        self.sd_model = None
        self.load_requests = 0


def unload_model_weights(modeldata):
    """``sd_models.unload_model_weights``: the unload button and ``/sdapi/v1/unload-checkpoint``."""

    def unload(op="model"):
        if op == "model":
            modeldata.model_data.sd_model = None

    return unload


class Shared(types.ModuleType):
    """SD.Next's ``modules.shared`` class (``modules.modeldata.Shared``): reading ``sd_model`` while none
    is loaded loads the configured checkpoint (counted here), and warns "Model locked" while one loads."""

    @property
    def sd_model(self):
        data = self.model_data_module.model_data
        if data.sd_model is None:
            data.load_requests += 1
        return data.sd_model

    @sd_model.setter
    def sd_model(self, value):
        self.model_data_module.model_data.sd_model = value


class OptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None, section=None,
                 refresh=None, folder=False, submit=None, comment_before="", comment_after="", category_id=None,
                 *args, **kwargs):  # fmt: skip
        self.default, self.label, self.component, self.component_args = default, label, component, component_args
        self.section = section
        self.comment_after = comment_after

    def info(self, info):
        self.comment_after += f"<span class='info'>({info})</span>"
        return self

    def needs_reload_ui(self):
        return self


class Options:
    def __init__(self):
        self.data: dict = {}
        self.data_labels: dict = {}
        self.samples_format = "png"

    def add_option(self, key, info):
        self.data_labels[key] = info


class State:
    def __init__(self):
        self.interrupted = False
        self.job, self.job_no, self.job_count, self.textinfo = "", 0, 0, None
        self.current_image = None
        self.ids = 0

    def begin(self, title="", task_id=0, api=None):
        self.interrupted = self.interrupted if title.startswith("Save") else False
        self.job, self.job_count = title, 1
        self.ids += 1
        return self.ids

    def end(self, task_id=None, api=None):
        self.job = ""

    def interrupt(self):
        self.interrupted = True

    def assign_current_image(self, image):
        self.current_image = image


# --- extra_networks (modules/extra_networks.py) -----------------------------------------------------


class ExtraNetworkParams:
    def __init__(self, items=None):
        self.items = items or []
        self.positional, self.named = [], {}
        for item in self.items:
            parts = item.split("=", 2) if isinstance(item, str) else [item]
            if len(parts) == 2:
                self.named[parts[0]] = parts[1]
            else:
                self.positional.append(item)


class ExtraNetwork:
    def __init__(self, name: str):
        self.name = name

    def activate(self, p, params_list, *args, **kwargs):
        raise NotImplementedError

    def deactivate(self, p, force=False):
        raise NotImplementedError


RE_EXTRA_NET = re.compile(r"<(\w+):([^>]+)>")


def make_extra_networks(errors: list) -> types.ModuleType:
    registry: dict = {}

    def register_extra_network(extra_network):
        registry[extra_network.name] = extra_network

    def _call_activate(network, p, args, step):
        signature = list(inspect.signature(network.activate).parameters)
        if "include" in signature and "exclude" in signature:
            network.activate(p, args, step=step, include=[], exclude=[])
        else:
            network.activate(p, args, step=step)

    def activate(p, extra_network_data=None, step=0, include=None, exclude=None):
        if p.disable_extra_networks:
            return
        extra_network_data = extra_network_data or p.network_data
        for name, args in extra_network_data.items():
            network = registry.get(name)
            if network is None:
                continue  # SD.Next: "Skipping unknown extra network"
            try:
                _call_activate(network, p, args, step)
            except Exception as exc:  # SD.Next reports and goes on
                errors.append(f"Activating network: type={name}: {exc!r}")
        for name, network in registry.items():
            if name in extra_network_data:
                continue
            try:
                _call_activate(network, p, [], 0)
            except Exception as exc:
                errors.append(f"Activating network: type={name}: {exc!r}")
        p.network_data = extra_network_data

    def deactivate(p, extra_network_data=None, force=None):
        if p.disable_extra_networks:
            return
        for network in registry.values():
            try:
                network.deactivate(p, force=bool(force))
            except Exception as exc:
                errors.append(f"deactivating extra network {network.name}: {exc!r}")

    def parse_prompt(prompt):
        found = defaultdict(list)

        def take(match):
            found[match[1]].append(ExtraNetworkParams(items=match[2].split(":")))
            return ""

        return re.sub(RE_EXTRA_NET, take, prompt), found

    def parse_prompts(prompts, extra_data=None):
        updated, extra_data = [], extra_data or defaultdict(list)
        for prompt in prompts:
            text, parsed = parse_prompt(prompt)
            if not extra_data or parsed:
                extra_data = parsed
            updated.append(text)
        return updated, extra_data

    return module(
        "modules.extra_networks",
        extra_network_registry=registry,
        register_extra_network=register_extra_network,
        ExtraNetwork=ExtraNetwork,
        ExtraNetworkParams=ExtraNetworkParams,
        activate=activate,
        deactivate=deactivate,
        parse_prompt=parse_prompt,
        parse_prompts=parse_prompts,
    )


# --- script_callbacks, scripts ------------------------------------------------------------------------

CALLBACKS = ("before_ui", "script_unloaded", "ui_settings", "app_started", "infotext_pasted", "model_loaded",
             "after_component", "ui_tabs")  # fmt: skip


def make_script_callbacks() -> types.ModuleType:
    lists: dict[str, list] = {name: [] for name in CALLBACKS}
    attributes = {"callbacks": lists}
    for name in CALLBACKS:
        attributes[f"on_{name}"] = lambda callback, _list=lists[name]: _list.append(callback)
    return module("modules.script_callbacks", **attributes)


class AlwaysVisible:
    pass


class Script:
    def title(self):
        raise NotImplementedError

    def show(self, is_img2img):
        return True


# --- ui_extra_networks ------------------------------------------------------------------------------


def make_ui_extra_networks(shared) -> types.ModuleType:
    class ExtraNetworksPage:
        def __init__(self, title: str):
            self.title, self.name = title, title.lower()
            self.items, self.metadata = [], {}
            self.refresh_time = self.page_time = 0

        def refresh(self):
            pass

        def create_items(self, tabname: str):
            self.items = list(self.list_items())
            for item in self.items:
                self.metadata[item["name"]] = item.get("metadata", {})

        def list_items(self):
            raise NotImplementedError

        def allowed_directories_for_previews(self):
            return []

        def find_description(self, path, info=None):
            if path is not None:
                text_file = os.path.splitext(path)[0] + ".txt"
                if os.path.exists(text_file):
                    with open(text_file, encoding="utf-8", errors="replace") as handle:
                        return re.sub("[<>]", "", handle.read())
            return (info or {}).get("description", "") if isinstance(info, dict) else ""

        def update_all_previews(self, items):
            for item in items:
                base = os.path.splitext(item["filename"])[0]
                for suffix in (".thumb.jpg", ".png", ".preview.png", ".jpg"):
                    if os.path.exists(base + suffix):
                        item["preview"] = f"/sdapi/v1/network/thumb?filename={base}{suffix}"
                        break
                item.setdefault("preview", "/sdapi/v1/network/thumb?filename=ui/assets/missing.png")

    def register_page(page):
        if page not in shared.extra_networks:
            shared.extra_networks.append(page)

    return module("modules.ui_extra_networks", ExtraNetworksPage=ExtraNetworksPage, register_page=register_page)


# --- processing ------------------------------------------------------------------------------------------


class StableDiffusionProcessing:
    """The fields SD.Next's ``StableDiffusionProcessing`` gives a handler; ``sd_model`` is ``shared.sd_model``."""

    def __init__(self, shared, prompt="", negative_prompt="", seed=1234, steps=2, cfg_scale=7.0):
        self._shared = shared
        self.prompt, self.negative_prompt = prompt, negative_prompt
        self.all_prompts, self.prompts = [prompt], [prompt]
        self.negative_prompts = [negative_prompt]
        self.seed, self.steps, self.cfg_scale = seed, steps, cfg_scale
        self.network_data: dict = {}
        self.disable_extra_networks = False
        self.extra_generation_params: dict = {}
        self.comments: dict = {}

    @property
    def sd_model(self):
        return self._shared.sd_model

    def comment(self, text):
        self.comments[text] = 1


class Host:
    """SD.Next with the extension loaded, driving a real diffusers pipeline."""

    def __init__(self, modules: dict, pipeline):
        self.modules = modules
        self.shared = modules["modules.shared"]
        self.extra_networks = modules["modules.extra_networks"]
        self.callbacks = modules["modules.script_callbacks"].callbacks
        self.shared.sd_model = pipeline
        self.errors = modules["errors"]
        self.script = None

    # -- start
    def load_script(self) -> None:
        """As SD.Next's ``load_scripts``: callbacks cleared, the entry script run, its Script found."""
        for callbacks in self.callbacks.values():
            callbacks.clear()
        namespace = runpy.run_path(ENTRY_SCRIPT)
        scripts = [value for value in namespace.values() if isinstance(value, type) and issubclass(value, Script)]
        self.script = scripts[0]() if scripts else None

    def start_ui(self) -> None:
        for callback in self.callbacks["before_ui"]:
            callback()
        for callback in self.callbacks["ui_settings"]:
            callback()

    def start(self) -> Host:
        self.load_script()
        self.start_ui()
        return self

    def unload(self) -> None:
        for callback in self.callbacks["script_unloaded"]:
            callback()

    # -- generation (processing_diffusers.process_base, then the scripts' postprocess)
    def processing(self, prompt: str, **kwargs) -> StableDiffusionProcessing:
        return StableDiffusionProcessing(self.shared, prompt, **kwargs)

    def generate(self, p: StableDiffusionProcessing) -> torch.Tensor:
        p.prompts, p.network_data = self.extra_networks.parse_prompts(p.prompts, p.network_data)
        self.extra_networks.activate(p)
        pipeline = self.shared.sd_model
        generator = torch.Generator().manual_seed(p.seed)
        try:
            latents = pipeline(prompt=p.prompts, negative_prompt=p.negative_prompts, num_inference_steps=p.steps,
                               guidance_scale=p.cfg_scale, generator=generator, output_type="latent").images  # fmt: skip
        finally:
            self.extra_networks.deactivate(p)
            if self.script is not None:
                self.script.postprocess(p, None)
        return latents


def install(monkeypatch, tmp_path, pipeline) -> Host:
    """Put SD.Next's modules into ``sys.modules`` for this test and return the :class:`Host`."""
    errors: list[str] = []
    modeldata = module("modules.modeldata", model_data=ModelData())
    shared = module(
        "modules.shared",
        opts=Options(),
        cmd_opts=argparse.Namespace(hypernetwork_dir=None, api_auth=None),
        models_path=str(tmp_path / "models"),
        state=State(),
        extra_networks=[],
        OptionInfo=OptionInfo,
    )
    shared.__class__ = Shared  # as SD.Next does: ``sys.modules[__name__].__class__ = Shared``
    shared.model_data_module = modeldata
    extra_networks = make_extra_networks(errors)
    callbacks = make_script_callbacks()
    scripts = module("modules.scripts", Script=Script, AlwaysVisible=AlwaysVisible)
    ui_extra_networks = make_ui_extra_networks(shared)
    paths = module("modules.paths", data_path=str(tmp_path), models_path=shared.models_path)
    queue = module("modules.call_queue", queue_lock=threading.Lock())
    progress = module("modules.progress", add_task_to_queue=lambda task_id: None, start_task=lambda task_id: None,
                      finish_task=lambda task_id: None)  # fmt: skip
    processing = module("modules.processing", get_sampler_name=lambda index: sampler_names[index])
    sampler_names = ["Default", "Euler", "DPM++ 2M"]
    samplers = [types.SimpleNamespace(name=name) for name in sampler_names]
    sd_samplers = module(
        "modules.sd_samplers",
        find_sampler=lambda name: next((s for s in samplers if s.name.lower() == str(name).lower()), None),
        visible_samplers=lambda img=False: list(samplers),
    )
    package = module("modules", __path__=[])
    modules = {
        "modules": package,
        "modules.shared": shared,
        "modules.modeldata": modeldata,
        "modules.extra_networks": extra_networks,
        "modules.script_callbacks": callbacks,
        "modules.scripts": scripts,
        "modules.ui_extra_networks": ui_extra_networks,
        "modules.paths": paths,
        "modules.call_queue": queue,
        "modules.progress": progress,
        "modules.processing": processing,
        "modules.sd_samplers": sd_samplers,
        "modules.processing_diffusers": module("modules.processing_diffusers"),
        "modules.sd_models": module("modules.sd_models", unload_model_weights=unload_model_weights(modeldata)),
    }
    for name, value in modules.items():
        monkeypatch.setitem(sys.modules, name, value)
        if "." in name:
            monkeypatch.setattr(package, name.split(".", 1)[1], value, raising=False)
    for name in [n for n in sys.modules if n.startswith("hypernetwork_ext.hosts")]:
        monkeypatch.delitem(sys.modules, name)  # the glue is imported afresh against this host
    return Host({**modules, "errors": errors}, pipeline)


def read_json(path) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)
