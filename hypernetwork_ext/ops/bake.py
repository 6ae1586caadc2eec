"""Folding hypernetworks into a checkpoint's attention projections, and exporting them as LoRA.

For an affine stack ``f(x) = A x + c`` in front of a projection ``W``: ``W f(x) = (W A) x + W c``.
The constant needs no bias to stay exact. On the key path it shifts every key by the same
vector, which softmax attention ignores (``q·(k_j + k0)`` adds the same ``q·k0`` to every logit).
On the value path it shifts the attention output by ``W_v c`` (the weights of a softmax sum to 1),
which ``to_out`` turns into a constant: it folds into ``to_out.0.bias``. Baking is therefore
exact for every affine network. A LoRA has no bias, so only the value shift is lost there and
is reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..errors import IncompatibleNetworkError
from ..network import Hypernetwork
from .affine import Affine, StackAffines, stack_affines, stack_output
from .checkpoints import UnetWeights, diffusers_module_path

_ERROR_SAMPLES = 256


@dataclass
class LayerReport:
    path: str
    width: int
    error: float  # relative error of the network's effect on this layer's projections (0 when exact)


@dataclass
class FoldReport:
    layers: list[LayerReport] = field(default_factory=list)
    fit_errors: dict[str, float] = field(default_factory=dict)

    @property
    def max_error(self) -> float:
        """The worst layer: its projections' outputs against what the networks make them give."""
        return max([layer.error for layer in self.layers] + [0.0])

    def summary(self) -> str:
        touched = len(self.layers)
        lines = [f"attention layers changed: {touched}"]
        if self.fit_errors:
            worst = max(self.fit_errors.items(), key=lambda item: item[1])
            lines.append(f"affine fit of nonlinear modules: worst relative error {worst[1]:.3g} ({worst[0]})")
        if touched:
            mean = sum(layer.error for layer in self.layers) / touched
            lines.append(f"relative error of the network's effect per layer: max {self.max_error:.3g}, mean {mean:.3g}")
        return "\n".join(lines)


class _Reference:
    """Gaussian probe inputs per width and what the networks themselves make of them (computed once
    per width and path: many layers share a width)."""

    def __init__(self, entries: Sequence[tuple[Hypernetwork, float]], seed: int):
        self.entries = entries
        self.seed = seed
        self._probes: dict[int, torch.Tensor] = {}
        self._outputs: dict[tuple[int, str], torch.Tensor] = {}

    def probe(self, width: int) -> torch.Tensor:
        if width not in self._probes:
            generator = torch.Generator().manual_seed(self.seed + width)
            self._probes[width] = torch.randn(_ERROR_SAMPLES, width, generator=generator, dtype=torch.float64)
        return self._probes[width]

    def residual(self, width: int, path: str) -> torch.Tensor:
        """``f(x) - x`` of the networks on the probe inputs."""
        if (width, path) not in self._outputs:
            probe = self.probe(width)
            self._outputs[width, path] = stack_output(self.entries, width, path, probe) - probe
        return self._outputs[width, path]

    def fold_error(self, weight: torch.Tensor, width: int, path: str, affine: Affine) -> float:
        """Relative error of ``W f(x)`` when the fitted map stands in for the networks."""
        weight = weight.to(torch.float64)
        probe = self.probe(width)
        target = self.residual(width, path) @ weight.T
        got = (affine(probe) - probe) @ weight.T
        return float((got - target).norm() / target.norm().clamp_min(1e-30))


def bake(
    weights: UnetWeights, entries: Sequence[tuple[Hypernetwork, float]], *, approximate: bool = False, seed: int = 0
) -> tuple[dict[str, torch.Tensor], FoldReport]:
    """New UNet tensors with the networks folded in, and a report (errors are those of the affine
    fit of nonlinear networks; the fold itself is exact)."""
    maps = stack_affines(entries, approximate=approximate, seed=seed)
    changed: dict[str, torch.Tensor] = {}
    report = FoldReport(fit_errors=maps.fit_errors)
    reference = _Reference(entries, seed) if maps.fit_errors else None  # exact folds have nothing to measure
    for path in weights.attention_paths():
        tensors = weights.tensors
        width = tensors[f"{path}.to_k.weight"].shape[1]
        key_map, value_map = maps.key.get(width), maps.value.get(width)
        if key_map is None and value_map is None:
            continue
        errors = [0.0]
        for projection, affine in (("to_k", key_map), ("to_v", value_map)):
            if affine is None:
                continue
            offset_target = f"{path}.to_out.0" if projection == "to_v" else None
            _fold_projection(tensors, changed, f"{path}.{projection}", affine, offset_target=offset_target)
            if reference is not None:
                kind = "key" if projection == "to_k" else "value"
                errors.append(reference.fold_error(tensors[f"{path}.{projection}.weight"], width, kind, affine))
        report.layers.append(LayerReport(path, width, max(errors)))
    if not report.layers:
        raise IncompatibleNetworkError("none of the networks' widths occur in this model's attention layers")
    return changed, report


def _fold_projection(tensors, changed, name: str, affine: Affine, offset_target: str | None) -> None:
    weight = tensors[f"{name}.weight"]
    folded = weight.to(torch.float64) @ affine.matrix
    changed[f"{name}.weight"] = folded.to(weight.dtype)
    shift = weight.to(torch.float64) @ affine.offset
    if f"{name}.bias" in tensors:
        bias = tensors[f"{name}.bias"]
        changed[f"{name}.bias"] = (bias.to(torch.float64) + shift).to(bias.dtype)
    elif offset_target is not None:
        out_weight = changed.get(f"{offset_target}.weight", tensors[f"{offset_target}.weight"])
        out_bias = changed.get(f"{offset_target}.bias", tensors.get(f"{offset_target}.bias"))
        if out_bias is None:
            raise IncompatibleNetworkError(f"{offset_target} has no bias to carry the value shift")
        changed[f"{offset_target}.bias"] = (out_bias.to(torch.float64) + out_weight.to(torch.float64) @ shift).to(
            out_bias.dtype
        )
    # a key shift without a bias is dropped: softmax attention is blind to it


def export_lora(
    weights: UnetWeights,
    entries: Sequence[tuple[Hypernetwork, float]],
    *,
    rank: int | None = None,
    approximate: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float16,
) -> tuple[dict[str, torch.Tensor], FoldReport]:
    """The weight delta of the networks as a LoRA in kohya's layout (``lora_unet_<module>``), which
    A1111, Forge, ComfyUI and diffusers load. Full rank is exact up to the value shift (which a
    LoRA cannot carry); a lower rank truncates the SVD. Errors are measured on Gaussian inputs."""
    maps = stack_affines(entries, approximate=approximate, seed=seed)
    lora: dict[str, torch.Tensor] = {}
    report = FoldReport(fit_errors=maps.fit_errors)
    reference = _Reference(entries, seed) if maps.fit_errors else None  # fitted: measure against the networks
    generator = torch.Generator().manual_seed(seed)
    uniform_rank = _uniform_rank(weights, maps, rank)
    for path in weights.attention_paths():
        width = weights.tensors[f"{path}.to_k.weight"].shape[1]
        name = "lora_unet_" + diffusers_module_path(weights, path).replace(".", "_")
        probe = torch.randn(_ERROR_SAMPLES, width, generator=generator, dtype=torch.float64)
        if reference is not None:
            probe = reference.probe(width)
        errors = []
        for projection, affine, keeps_shift in (
            ("to_k", maps.key.get(width), False),
            ("to_v", maps.value.get(width), True),
        ):
            if affine is None:
                continue
            weight = weights.tensors[f"{path}.{projection}.weight"].to(torch.float64)
            delta = weight @ (affine.matrix - torch.eye(width, dtype=torch.float64))
            up, down = _low_rank(delta, rank, uniform_rank)
            lora[f"{name}_{projection}.lora_up.weight"] = up.to(dtype).contiguous()
            lora[f"{name}_{projection}.lora_down.weight"] = down.to(dtype).contiguous()
            lora[f"{name}_{projection}.alpha"] = torch.tensor(float(down.shape[0]), dtype=dtype)
            target = probe @ delta.T + (weight @ affine.offset if keeps_shift else 0.0)
            if reference is not None:  # the networks' own effect; a key shift is still invisible to softmax
                residual = reference.residual(width, "value" if keeps_shift else "key") @ weight.T
                target = residual if keeps_shift else residual - weight @ affine.offset
            got = probe @ (up.to(dtype).to(torch.float64) @ down.to(dtype).to(torch.float64)).T
            errors.append(float((got - target).norm() / target.norm().clamp_min(1e-30)))
        if errors:
            report.layers.append(LayerReport(path, width, max(errors)))
    if not report.layers:
        raise IncompatibleNetworkError("none of the networks' widths occur in this model's attention layers")
    return lora, report


def _uniform_rank(weights: UnetWeights, maps: StackAffines, rank: int | None) -> int:
    """One rank (and alpha) for every module: loaders such as diffusers/peft mishandle files whose
    modules differ in rank, so smaller factors are padded with zeros, which changes nothing."""
    largest = 1
    for path in weights.attention_paths():
        weight = weights.tensors[f"{path}.to_k.weight"]
        if weight.shape[1] in maps.key or weight.shape[1] in maps.value:
            largest = max(largest, min(weight.shape))
    return largest if rank is None else max(1, min(int(rank), largest))


def _low_rank(delta: torch.Tensor, rank: int | None, padded_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    full = min(delta.shape)
    keep = full if rank is None else max(1, min(int(rank), full))
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    root = s[:keep].sqrt()
    up, down = u[:, :keep] * root, root[:, None] * vh[:keep]
    missing = padded_rank - keep
    if missing > 0:
        up = torch.cat([up, up.new_zeros(up.shape[0], missing)], dim=1)
        down = torch.cat([down, down.new_zeros(missing, down.shape[1])], dim=0)
    return up, down
