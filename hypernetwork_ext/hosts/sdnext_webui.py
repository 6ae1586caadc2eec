"""Glue for SD.Next (diffusers backend): its extra-network handler, its networks page, settings,
infotext paste and the routes, through SD.Next's own machinery.

SD.Next removed hypernetworks in July 2025: it has no ``hypernet`` handler (its parser drops the
tag and logs "Skipping unknown extra network") and no page, but its networks panel still lists a
*Hypernetwork* tab title among its defaults. ``register_all()`` runs when SD.Next loads the entry
script (it clears callbacks before each load); in ``on_before_ui`` one :class:`SdnextPatch`
registers the handler and the page, and its ``undo()`` runs on script unload.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from datetime import datetime

from modules import extra_networks, script_callbacks, scripts, shared, ui_extra_networks

from ..library import NetworkEntry, preferred_multiplier_of
from ..syntax import TAG_TYPE, format_number
from ..ui.settings import SECTION, SETTINGS, component_class
from . import api
from .extension import EXTENSION, api_credentials, option
from .held_memory import ModelMoveWatch

PAGE_TITLE = "Hypernetwork"  # the title SD.Next's networks panel lists among its default pages
SCRIPT_TITLE = "Hypernetworks"
FAMILY_LABELS = {"sd1": "SD 1.5", "sd2": "SD 2", "sdxl": "SDXL"}  # SD.Next's version labels on cards


def loaded_pipeline():
    """The pipeline SD.Next has loaded, or None. Not ``shared.sd_model`` alone: reading it while no model
    is loaded makes SD.Next load the configured one (and warn "Model locked" while one loads), so
    listing the networks would load a model."""
    try:
        from modules.modeldata import model_data
    except ImportError:  # an SD.Next from before modules.modeldata (2024)
        return shared.sd_model
    return model_data.sd_model


def report_error(exc: Exception, task: str) -> None:
    try:
        from modules.errors import display
    except ImportError:
        print(f"[Hypernetworks] {task}: {exc!r}")
        return
    display(exc, task)


class HypernetExtraNetwork(extra_networks.ExtraNetwork):
    """``<hypernet:...>``: SD.Next calls ``activate`` before the prompt is encoded (once per pass,
    hires included, with an empty list when the prompt has no tag) and ``deactivate`` after the
    last pass."""

    def __init__(self) -> None:
        super().__init__(TAG_TYPE)

    def activate(self, p, params_list, step: int = 0, **kwargs) -> None:
        EXTENSION.activate(p, [list(params.items) for params in params_list])

    def deactivate(self, p, force: bool = False, **kwargs) -> None:
        EXTENSION.finish()


class HypernetworkPage(ui_extra_networks.ExtraNetworksPage):
    """The *Hypernetwork* tab of SD.Next's networks panel: a card per file, SD.Next's details view
    (description in ``name.txt``, user metadata in ``name.json``, the network's facts as its
    embedded metadata), previews found as SD.Next finds them."""

    def __init__(self) -> None:
        super().__init__(PAGE_TITLE)

    def refresh(self) -> None:
        EXTENSION.library.refresh()

    def list_items(self):
        items = []
        with EXTENSION.library.deferred_cache_writes():
            for name, entry in EXTENSION.prompt_names().items():
                item = self.create_item(name, entry)
                if item is not None:
                    items.append(item)
        self.update_all_previews(items)
        return items

    def create_item(self, prompt_name: str, entry: NetworkEntry) -> dict | None:
        library = EXTENSION.library
        info = library.info(entry)
        if not option("hypernetwork_show_all") and not EXTENSION.fits_loaded_model(info, loaded_pipeline()):
            return None
        user = library.user_metadata(entry)
        sha = library.cached_sha256(entry)
        preferred = preferred_multiplier_of(user)
        multiplier = preferred if preferred is not None else option("hypernetwork_default_multiplier")
        prompt = f" <{TAG_TYPE}:{prompt_name}:{format_number(float(multiplier))}>"
        if user.get("activation text"):
            prompt += f" {user['activation text']}"
        description = library.describe(entry, compute_hash=False)
        alias = str(user.get("alias") or "")
        item = {
            "type": PAGE_TITLE,
            "name": prompt_name,
            "alias": alias or entry.name,
            "filename": entry.path,
            "prompt": json.dumps(prompt),
            "metadata": json.dumps(description, indent=2, default=str),
            "mtime": datetime.fromtimestamp(entry.mtime),  # as SD.Next's own pages give it
            "size": entry.size,
            "version": FAMILY_LABELS.get(info.get("family"), ""),
            "info": user,
            "description": self.find_description(entry.path, user),
            "search_term": " ".join(term for term in (entry.relpath, alias, sha or "") if term),
            "local_preview": f"{os.path.splitext(entry.path)[0]}.{shared.opts.samples_format}",
        }
        if sha:  # the details view shows N/A for a hash not computed yet
            item["hash"] = sha[:10]
        return item

    def allowed_directories_for_previews(self):
        return EXTENSION.library.folders()


class HypernetworkScript(scripts.Script):
    """Always on, without controls: takes the networks off after each generation, also one that
    ended before SD.Next's ``deactivate`` (an interrupted or failed pass)."""

    def title(self):
        return SCRIPT_TITLE

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def postprocess(self, p, processed, *args):
        EXTENSION.finish()


class SdnextPatch:
    """The handler and the page, registered in ``on_before_ui``; ``undo()`` takes them out again."""

    def __init__(self) -> None:
        self.handler: HypernetExtraNetwork | None = None
        self.replaced_handler = None
        self.page: HypernetworkPage | None = None
        self.removed_pages: list = []
        self.model_moves = ModelMoveWatch()

    def apply(self) -> None:
        self._watch_model_moves()
        registry = extra_networks.extra_network_registry
        if self.handler is None or registry.get(TAG_TYPE) is not self.handler:
            self.replaced_handler = registry.get(TAG_TYPE)
            self.handler = HypernetExtraNetwork()
            extra_networks.register_extra_network(self.handler)
        pages = shared.extra_networks
        if self.page is None or self.page not in pages:
            self.removed_pages = [page for page in pages if page.title == PAGE_TITLE]
            for page in self.removed_pages:
                pages.remove(page)
            self.page = HypernetworkPage()
            ui_extra_networks.register_page(self.page)

    def _watch_model_moves(self) -> None:
        """SD.Next's unload (button, ``/sdapi/v1/unload-checkpoint``) goes through
        ``sd_models.unload_model_weights``: what the networks hold for that UNet goes first (the real
        SD.Next kept 217 MiB, and the unloaded UNet's old weights, after an unload)."""
        try:
            from modules import sd_models
        except ImportError:
            return
        self.model_moves.apply(sd_models, EXTENSION.memory, a1111=False, on_error=report_error)

    def undo(self) -> None:
        EXTENSION.finish()
        self.model_moves.undo()
        registry = extra_networks.extra_network_registry
        if self.handler is not None and registry.get(TAG_TYPE) is self.handler:
            if self.replaced_handler is not None:
                registry[TAG_TYPE] = self.replaced_handler
            else:
                del registry[TAG_TYPE]
        pages = shared.extra_networks
        if self.page is not None and self.page in pages:
            pages.remove(self.page)
            pages.extend(page for page in self.removed_pages if page not in pages)
        self.handler = self.replaced_handler = self.page = None
        self.removed_pages = []


PATCH = SdnextPatch()


def add_settings() -> None:
    for setting in SETTINGS:
        if setting.a1111_only:  # SD.Next has no A1111 hypernetwork code to hand tags back to
            continue
        info = shared.OptionInfo(
            setting.default, setting.label, component_class(setting.kind), dict(setting.args), section=SECTION
        )
        if setting.info:
            info = info.info(setting.info)
        shared.opts.add_option(setting.key, info)


def add_api_routes(demo, app) -> None:
    api.add_routes(app, EXTENSION.library, credentials=api_credentials(), memory=EXTENSION.memory.as_dict)


def register_generation() -> None:
    script_callbacks.on_before_ui(PATCH.apply)
    script_callbacks.on_script_unloaded(PATCH.undo)
    script_callbacks.on_ui_settings(add_settings)
    script_callbacks.on_app_started(add_api_routes)
    script_callbacks.on_infotext_pasted(EXTENSION.infotext_pasted)
    script_callbacks.on_model_loaded(EXTENSION.model_loaded)


# The training part adds its registration here.
REGISTRATIONS: list[Callable[[], None]] = [register_generation]


def register_all() -> None:
    for register in REGISTRATIONS:
        register()
