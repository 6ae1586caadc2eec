"""Merging networks of the same structure: weighted sums and add-difference, with per-width factors.

Weights are combined tensor by tensor (as checkpoint mergers do); every network must share the
widths and the architecture, otherwise the merge is refused with the difference spelled out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

import torch

from ..errors import IncompatibleNetworkError, InvalidConfigError
from ..network import Hypernetwork, NetworkInfo, build_from_state


def _check_same_structure(networks: Sequence[Hypernetwork]) -> None:
    first = networks[0]
    for other in networks[1:]:
        if other.widths != first.widths and sorted(other.widths) != sorted(first.widths):
            raise IncompatibleNetworkError(f"{first.name} has widths {first.widths}, {other.name} has {other.widths}")
        a, b = first.architecture, other.architecture
        for field in ("layer_structure", "activation", "is_layer_norm", "activate_output"):
            va, vb = getattr(a, field), getattr(b, field)
            if field == "layer_structure":
                va, vb = [float(x) for x in va], [float(x) for x in vb]
            if va != vb:
                raise IncompatibleNetworkError(f"{first.name} and {other.name} differ in {field}: {va} vs {vb}")
        dropout_a = [i for i, p in enumerate(a.dropout_structure) if p > 0]
        dropout_b = [i for i, p in enumerate(b.dropout_structure) if p > 0]
        if dropout_a != dropout_b:
            raise IncompatibleNetworkError(
                f"{first.name} and {other.name} place dropout differently, so their layer indices differ"
            )


def _combine(networks: Sequence[Hypernetwork], coefficients_for_width, name: str, notes: str) -> Hypernetwork:
    _check_same_structure(networks)
    base = networks[0]
    sources = [network.module_state_dicts() for network in networks]
    states = {}
    for width in base.widths:
        coefficients = coefficients_for_width(width)
        pair = []
        for index in (0, 1):
            merged = {}
            for key, tensor in sources[0][width][index].items():
                total = torch.zeros_like(tensor, dtype=torch.float32)
                for coefficient, source in zip(coefficients, sources, strict=True):
                    total += coefficient * source[width][index][key].to(torch.float32)
                merged[key] = total.to(tensor.dtype)
            pair.append(merged)
        states[width] = tuple(pair)
    info = NetworkInfo(name=name, step=0, optional_info=notes, model_family=base.info.model_family)
    return build_from_state(replace(base.architecture), states, info)


def weighted_sum(
    entries: Sequence[tuple[Hypernetwork, float]],
    *,
    width_weights: Mapping[int, Sequence[float]] | None = None,
    name: str = "merged",
) -> Hypernetwork:
    """``Σ w_i θ_i``; ``width_weights`` gives other weights for some widths."""
    if len(entries) < 2:
        raise InvalidConfigError("a merge needs at least two networks")
    networks = [net for net, _ in entries]
    weights = [float(w) for _, w in entries]
    overrides = {int(w): [float(x) for x in ws] for w, ws in (width_weights or {}).items()}
    for width, values in overrides.items():
        if len(values) != len(networks):
            raise InvalidConfigError(f"per-width weights for {width} need {len(networks)} values, found {len(values)}")
        if width not in networks[0].widths:
            raise InvalidConfigError(f"width {width} is not in the networks (widths {networks[0].widths})")
    notes = "weighted sum: " + ", ".join(f"{n.name}×{w:g}" for n, w in zip(networks, weights, strict=True))
    return _combine(networks, lambda width: overrides.get(width, weights), name, notes)


def add_difference(
    a: Hypernetwork,
    b: Hypernetwork,
    c: Hypernetwork,
    multiplier: float,
    *,
    width_multipliers: Mapping[int, float] | None = None,
    name: str = "merged",
) -> Hypernetwork:
    """``A + (B − C)·m``; ``width_multipliers`` gives another ``m`` for some widths."""
    overrides = {int(w): float(m) for w, m in (width_multipliers or {}).items()}
    for width in overrides:
        if width not in a.widths:
            raise InvalidConfigError(f"width {width} is not in the networks (widths {a.widths})")

    def coefficients(width: int) -> list[float]:
        m = overrides.get(width, float(multiplier))
        return [1.0, m, -m]

    notes = f"add difference: {a.name} + ({b.name} - {c.name}) × {multiplier:g}"
    return _combine([a, b, c], coefficients, name, notes)
