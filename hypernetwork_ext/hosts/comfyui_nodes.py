"""The ComfyUI nodes Load Hypernetwork and Hypernetworks from Prompt (Train Hypernetwork is in
``comfyui_training.py``; ``comfyui_pack.py`` lists them for ComfyUI). Nothing here runs at import but
class definitions.

Files come from ComfyUI's ``hypernetworks`` model folders (``models/hypernetworks`` and any
``extra_model_paths.yaml`` entry), through the same :class:`~hypernetwork_ext.library.Library`
as in the WebUIs: every ``.pt`` and ``.safetensors`` layout the core reads, names resolved as in
``<hypernet:...>`` tags, loaded networks cached.
"""

from __future__ import annotations

import logging
import os

from ..errors import HypernetworkError, IncompatibleNetworkError, NoSuchNetworkError
from ..library import SUFFIXES, Library, fit_problem
from ..strength import Strength, normalise_block_selector
from ..syntax import block_weights, find_tags, strip_tags
from .comfyui import patched_model, shape_of

FOLDER = "hypernetworks"  # ComfyUI's folder_paths key (models/hypernetworks)
CATEGORY = "loaders/hypernetworks"
LOG = logging.getLogger("hypernetworks")

_library: Library | None = None


def folder_paths():
    import folder_paths as module  # ComfyUI's

    return module


def library() -> Library:
    """The files of ComfyUI's hypernetwork folders (made on first use: no disk work at import)."""
    global _library
    if _library is None:
        _library = Library(lambda: folder_paths().get_folder_paths(FOLDER))
    return _library


def file_names() -> list[str]:
    """The choices of the file widget: ComfyUI's listing of the folders, our two suffixes only."""
    return [name for name in folder_paths().get_filename_list(FOLDER) if name.lower().endswith(SUFFIXES)]


def entry_named(name: str):
    """The file ComfyUI lists as ``name`` (``sub/name.pt``), found again after a refresh when it is new."""
    try:
        return library().resolve(name).entry
    except NoSuchNetworkError:
        library().refresh()
        return library().resolve(name).entry


def fit_or_raise(network, model, label: str) -> None:
    shape = shape_of(model)
    problem = fit_problem(network, shape.context_width, shape.self_widths)
    if problem:
        raise IncompatibleNetworkError(f"{label} {problem}")


def describe(entry) -> str:
    """What a user wants to know about a file, one fact a line (for Preview Any / Show Text)."""
    info = library().describe(entry)
    meta = info["metadata"]
    if "error" in meta:
        return f"{entry.relpath}{entry.suffix}: {meta['error']}"
    lines = [
        f"name: {entry.relpath}{entry.suffix} ({meta.get('internal_name')})",
        f"family: {meta.get('family') or 'unknown'}",
        f"widths: {', '.join(map(str, meta.get('widths', [])))}",
        f"structure: {', '.join(f'{f:g}' for f in meta.get('layer_structure', []))}",
        f"activation: {meta.get('activation')}{' (output activated)' if meta.get('activate_output') else ''}",
        f"layer norm: {'yes' if meta.get('layer_norm') else 'no'}",
        f"dropout: {', '.join(f'{p:g}' for p in meta.get('dropout_structure', [])) or 'none'} (training only)",
        f"steps trained: {meta.get('step')}",
        f"parameters: {meta.get('parameters'):,}",
        f"hash: {info['short_hash']} (sha256 {info['sha256']})",
    ]
    if meta.get("sd_checkpoint_name"):
        lines.append(f"trained on: {meta['sd_checkpoint_name']}")
    return "\n".join(lines)


def block_factors(text: str, model) -> tuple[tuple[str, float], ...]:
    """Block weights from a widget: a vector (``1,0,0.5,...``), a preset (``OUT``), or pairs
    (``in=0, OUT03=2``)."""
    text = (text or "").strip()
    if not text:
        return ()
    if "=" in text:
        pairs = []
        for part in (p for p in text.replace(";", ",").split(",") if p.strip()):
            selector, sep, value = part.partition("=")
            if not sep:
                raise HypernetworkError(f"block weights: {part.strip()!r} is not SELECTOR=FACTOR")
            try:
                pairs.append((normalise_block_selector(selector), float(value)))
            except ValueError:
                raise HypernetworkError(f"block weights: {value.strip()!r} is not a number") from None
        return tuple(pairs)
    return tuple(block_weights(text, model_blocks=shape_of(model).blocks).items())


STRENGTH = ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01})
FACTOR = ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.05})
FRACTION = ("FLOAT", {"min": 0.0, "max": 1.0, "step": 0.01})


class LoadHypernetwork:
    """A file from models/hypernetworks acting on the MODEL, A1111's formula, with the optional controls."""

    DESCRIPTION = (
        "Applies a hypernetwork (A1111/NovelAI .pt or .safetensors) to the model's attention key and value "
        "inputs exactly as AUTOMATIC1111 does. Chain several to stack them in order."
    )
    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("model", "info")
    OUTPUT_TOOLTIPS = ("The model with the hypernetwork acting.", "The file's name, family, widths, structure, hash.")
    FUNCTION = "load"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "hypernetwork_name": (file_names(), {"tooltip": "A file in models/hypernetworks."}),
                "strength": (STRENGTH[0], {**STRENGTH[1], "tooltip": "A1111's multiplier."}),
            },
            "optional": {
                "key": (FACTOR[0], {**FACTOR[1], "tooltip": "Factor on the key path."}),
                "value": (FACTOR[0], {**FACTOR[1], "tooltip": "Factor on the value path."}),
                "self_attn": (FACTOR[0], {**FACTOR[1], "tooltip": "Factor in self-attention (320/640/1280)."}),
                "cross_attn": (FACTOR[0], {**FACTOR[1], "tooltip": "Factor in cross-attention (the text)."}),
                "blocks": (
                    "STRING",
                    {
                        "default": "",
                        "tooltip": "Per-block factors: in=0, OUT03=2; a vector of 16 (SD1) or 11 (SDXL) values; "
                        "or a preset (IN, MID, OUT, INOUT, ...).",
                    },
                ),
                "start": (FRACTION[0], {**FRACTION[1], "default": 0.0, "tooltip": "First step acted on (fraction)."}),
                "stop": (FRACTION[0], {**FRACTION[1], "default": 1.0, "tooltip": "Step it stops at (fraction)."}),
                "negative": (
                    FACTOR[0],
                    {**FACTOR[1], "tooltip": "Factor in the negative prompt's pass (0: positive only)."},
                ),
            },
        }

    @classmethod
    def IS_CHANGED(cls, hypernetwork_name: str = "", **_inputs):
        """A file replaced under the same name (trained again) is loaded again, not served from the cache."""
        try:
            stat = os.stat(folder_paths().get_full_path_or_raise(FOLDER, hypernetwork_name))
        except (OSError, FileNotFoundError):
            return ""
        return f"{stat.st_mtime_ns}:{stat.st_size}"

    def load(
        self,
        model,
        hypernetwork_name: str,
        strength: float,
        key: float = 1.0,
        value: float = 1.0,
        self_attn: float = 1.0,
        cross_attn: float = 1.0,
        blocks: str = "",
        start: float = 0.0,
        stop: float = 1.0,
        negative: float = 1.0,
    ):
        entry = entry_named(hypernetwork_name)
        network = library().load(entry)
        fit_or_raise(network, model, hypernetwork_name)
        chosen = Strength(
            multiplier=strength,
            key=key,
            value=value,
            self_attn=self_attn,
            cross_attn=cross_attn,
            blocks=block_factors(blocks, model),
            start=start,
            stop=stop,
            uncond=negative,
        )
        return (patched_model(model, [(network, chosen)]), describe(entry))


class HypernetworksFromPrompt:
    """``<hypernet:name:m:...>`` tags of a prompt acting on the MODEL; the prompt without them."""

    DESCRIPTION = (
        "Applies every <hypernet:name:multiplier:args> tag of the text (A1111 prompts and infotext, SwarmUI "
        "prompts) to the model, in order, and returns the text without the tags for the text encoder."
    )
    RETURN_TYPES = ("MODEL", "STRING", "STRING")
    RETURN_NAMES = ("model", "text", "info")
    OUTPUT_TOOLTIPS = (
        "The model with the tagged hypernetworks acting.",
        "The prompt without the tags.",
        "What each tag applied: name, hash, strength.",
    )
    FUNCTION = "apply"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "text": ("STRING", {"multiline": True, "dynamicPrompts": True}),
            }
        }

    def apply(self, model, text: str):
        tags = find_tags(text)
        if not tags:
            return (model, text, "no <hypernet:...> tags")
        shape = shape_of(model)

        def make():
            return library().plan(
                tags, model_blocks=shape.blocks, context_width=shape.context_width, self_widths=shape.self_widths
            )

        plan = make()
        if plan.names_not_found:
            library().refresh()  # a file added since the last listing (a network just trained)
            plan = make()
        if plan.problems:
            raise HypernetworkError("; ".join(plan.problems))
        for note in plan.notes:
            LOG.info("[Hypernetworks] %s", note)
        info = "\n".join(
            f"{item.mentioned}: {item.entry.relpath}{item.entry.suffix} [{item.short_hash}] {item.strength}"
            for item in plan.networks
        )
        return (patched_model(model, plan.entries), strip_tags(text), info)


def warn_about_other_copy(folder: str) -> None:
    """Two clones of this repository (or a WebUI's copy on ``sys.path``): the first one imported serves
    both; say which, so that nobody debugs the wrong folder."""
    serving = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if serving != os.path.abspath(folder):
        LOG.warning("[Hypernetworks] another copy of hypernetwork_ext was imported first (%s); not %s", serving, folder)
