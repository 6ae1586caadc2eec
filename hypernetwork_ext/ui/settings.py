"""The extension's settings, described once; hosts turn them into their own option objects."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

SECTION = ("hypernetworks", "Hypernetworks")

UNKNOWN_WARN = "Warn on the generation and in the console"
UNKNOWN_CONSOLE = "Console only"
UNKNOWN_STOP = "Stop the generation"
MISMATCH_SKIP = "Skip with a message"
MISMATCH_FORCE = "Apply anyway"
DTYPES = {"Automatic": None, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Setting:
    key: str
    default: object
    label: str
    kind: str  # checkbox, slider, number, textbox, radio, dropdown
    args: dict = field(default_factory=dict)
    info: str = ""
    a1111_only: bool = False  # about A1111's own hypernetwork code, which Forge and reForge lack


SETTINGS = (
    Setting(
        "hypernetwork_default_multiplier",
        1.0,
        "Default multiplier",
        "slider",
        {"minimum": -2.0, "maximum": 2.0, "step": 0.05},
        "for <hypernet:name> without a number, and for cards without a preferred multiplier",
    ),
    Setting(
        "hypernetwork_extra_folders",
        "",
        "Extra folders with hypernetworks",
        "textbox",
        {"lines": 2},
        "one folder per line, besides --hypernetwork-dir; subfolders are included",
    ),
    Setting(
        "hypernetwork_cache_size",
        4,
        "Loaded networks kept in memory",
        "number",
        {"precision": 0, "minimum": 0},
        "besides the networks in use; 0 reads a network from disk again once it is no longer in the prompt",
    ),
    Setting(
        "hypernetwork_compute_dtype",
        "Automatic",
        "Precision of the hypernetwork layers",
        "dropdown",
        {"choices": list(DTYPES)},
        "Automatic computes as A1111's own hypernetworks: their float32 layers under the host's autocast "
        "(FP8 weights, GPUs), rounding where A1111 rounds; a dtype here keeps every fast path instead",
    ),
    Setting(
        "hypernetwork_fold_limit_mib",
        256,
        "Memory for folded weights (MiB)",
        "number",
        {"precision": 0, "minimum": -1},
        "affine networks are folded into the UNet's self-attention weights and kept on its device between "
        "generations (SD1.5: about 47 MiB, SDXL: 391 MiB in fp16); past the limit layers compute unfolded: "
        "the same image, a little slower; 0 never folds, -1 has no limit",
    ),
    Setting(
        "hypernetwork_unknown_name",
        UNKNOWN_WARN,
        "Unknown network names and malformed tags",
        "radio",
        {"choices": [UNKNOWN_WARN, UNKNOWN_CONSOLE, UNKNOWN_STOP]},
        "the other tags of the prompt apply in every case except Stop",
    ),
    Setting(
        "hypernetwork_family_mismatch",
        MISMATCH_SKIP,
        "Networks made for another model family (an SD1 network on SDXL)",
        "radio",
        {"choices": [MISMATCH_SKIP, MISMATCH_FORCE]},
    ),
    Setting("hypernetwork_add_hashes_to_infotext", True, "Add Hypernet hashes to infotext", "checkbox"),
    Setting(
        "hypernetwork_show_all",
        False,
        "Always show all networks on the Hypernetworks page",
        "checkbox",
        info="otherwise networks made for another model family are hidden",
    ),
    Setting(
        "hypernetwork_block_presets",
        "",
        "Block weight presets",
        "textbox",
        {"lines": 4},
        "one per line, NAME: v1, v2, ... (16 values for SD1/SD2, 11 for SDXL); use in a tag as bw=NAME",
    ),
    Setting(
        "hypernetwork_builtin_handler",
        False,
        "Let A1111's own code handle <hypernet:...> tags (for comparisons)",
        "checkbox",
        info="A1111's built-in hypernetworks, as without this extension: its .pt files in --hypernetwork-dir, "
        "name and multiplier only; for A/B comparisons and benchmarks/host_generation.py",
        a1111_only=True,
    ),
)
DEFAULTS = {setting.key: setting.default for setting in SETTINGS}


def component_class(kind: str):
    import gradio as gr

    return {
        "checkbox": gr.Checkbox,
        "slider": gr.Slider,
        "number": gr.Number,
        "textbox": gr.Textbox,
        "radio": gr.Radio,
        "dropdown": gr.Dropdown,
    }[kind]


def extra_folders(text: str) -> list[str]:
    parts = str(text or "").replace(";", "\n").splitlines()
    return [part.strip().strip('"') for part in parts if part.strip()]


def compute_dtype(value: object) -> torch.dtype | None:
    return DTYPES.get(str(value))
