"""What a card's metadata view and editor show, as plain rows and HTML (no host objects)."""

from __future__ import annotations

from ..families import FAMILIES
from ..syntax import format_number


def pretty_bytes(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"


def family_label(info: dict) -> str:
    family = info.get("family")
    if family not in FAMILIES:
        return "unknown"
    label = FAMILIES[family].label
    return label if info.get("family_declared") else f"{label} (from its widths)"


def metadata_rows(description: dict) -> list[tuple[str, str]]:
    """Label/value pairs for one file, from :meth:`Library.describe`."""
    info = description.get("metadata") or {}
    rows = [
        ("File", f"{description.get('relative_path')}.{description.get('format')}"),
        ("Format", str(description.get("format"))),
        ("Size", pretty_bytes(int(description.get("size") or 0))),
        ("Hash", description.get("short_hash") or "not computed yet"),
    ]
    if info.get("error"):
        return [*rows, ("Error", info["error"])]
    structure = ", ".join(format_number(v) for v in info.get("layer_structure", []))
    dropout = info.get("dropout_structure") or []
    rows += [
        ("Widths", ", ".join(str(w) for w in info.get("widths", []))),
        ("Model family", family_label(info)),
        ("Layer structure", structure),
        ("Activation", str(info.get("activation")) + (" (also on the output)" if info.get("activate_output") else "")),
        ("Layer norm", "yes" if info.get("layer_norm") else "no"),
        ("Dropout", ", ".join(format_number(v) for v in dropout) if any(dropout) else "none"),
        ("Step", str(info.get("step", 0))),
        ("Trained on", _trained_on(info)),
        ("Parameters", f"{int(info.get('parameters', 0)):,}"),
    ]
    if info.get("optional_info"):
        rows.append(("Notes in the file", str(info["optional_info"])))
    return rows


def _trained_on(info: dict) -> str:
    name, short = info.get("sd_checkpoint_name"), info.get("sd_checkpoint")
    if name and short:
        return f"{name} [{short}]"
    return name or short or "unknown"
