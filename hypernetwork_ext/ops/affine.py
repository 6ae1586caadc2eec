"""Hypernetwork modules as affine maps ``x -> A x + c``: exact when the network is affine, fitted
by least squares (on request) when it is not."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import IncompatibleNetworkError
from ..network import Hypernetwork, HypernetworkModule


@dataclass
class Affine:
    """``y = matrix @ x + offset`` for inputs of one width (float64)."""

    matrix: torch.Tensor
    offset: torch.Tensor

    @classmethod
    def identity(cls, width: int) -> Affine:
        return cls(torch.eye(width, dtype=torch.float64), torch.zeros(width, dtype=torch.float64))

    def then(self, other: Affine) -> Affine:
        """The map that applies ``self`` first, then ``other``."""
        return Affine(other.matrix @ self.matrix, other.matrix @ self.offset + other.offset)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.float64) @ self.matrix.T + self.offset


def module_affine(module: HypernetworkModule, multiplier: float) -> Affine:
    """The exact affine map of an affine module at a multiplier: ``x + m (A_mlp x + c_mlp)``."""
    width = module.width
    mlp = Affine.identity(width)
    for layer in module.linear:
        if isinstance(layer, nn.Linear):
            weight = layer.weight.detach().to(torch.float64)
            bias = (
                layer.bias.detach().to(torch.float64)
                if layer.bias is not None
                else torch.zeros(weight.shape[0], dtype=torch.float64)
            )
            mlp = mlp.then(Affine(weight, bias))
        elif not isinstance(layer, nn.Dropout):  # dropout is the identity at inference
            raise IncompatibleNetworkError(f"layer {type(layer).__name__} is not affine")
    return Affine(torch.eye(width, dtype=torch.float64) + multiplier * mlp.matrix, multiplier * mlp.offset)


def fitted_affine(
    module: HypernetworkModule, multiplier: float, *, samples: int, scale: float, seed: int
) -> tuple[Affine, float]:
    """The least-squares affine fit of a (nonlinear) module over Gaussian inputs, and its relative
    error on fresh inputs (error of the fitted residual over the size of the true residual)."""
    width = module.width
    generator = torch.Generator().manual_seed(seed)
    fit_inputs = torch.randn(samples, width, generator=generator, dtype=torch.float64) * scale
    test_inputs = torch.randn(samples, width, generator=generator, dtype=torch.float64) * scale
    with torch.no_grad():
        fit_outputs = _module_output(module, fit_inputs, multiplier)
        design = torch.cat([fit_inputs, torch.ones(samples, 1, dtype=torch.float64)], dim=1)
        solution = torch.linalg.lstsq(design, fit_outputs).solution  # (width + 1, width)
        affine = Affine(solution[:-1].T.contiguous(), solution[-1].clone())
        expected = _module_output(module, test_inputs, multiplier)
        residual = expected - test_inputs
        error = (affine(test_inputs) - expected).norm() / residual.norm().clamp_min(1e-30)
    return affine, float(error)


def _module_output(module: HypernetworkModule, x: torch.Tensor, multiplier: float) -> torch.Tensor:
    was_training = module.training
    module.eval()
    try:
        dtype = next(module.parameters()).dtype
        return module(x.to(dtype), multiplier).to(torch.float64)
    finally:
        module.train(was_training)


def stack_output(entries: Sequence[tuple[Hypernetwork, float]], width: int, path: str, x: torch.Tensor) -> torch.Tensor:
    """What the networks themselves (applied in order) make of inputs ``x`` of one width on the
    ``"key"`` or ``"value"`` path, in float64: the reference an affine fit is measured against."""
    out = x.to(torch.float64)
    for network, multiplier in entries:
        pair = network.layers.get(width)
        if pair is not None:
            out = _module_output(pair[0 if path == "key" else 1], out, multiplier)
    return out


@dataclass
class StackAffines:
    """Per width, the affine maps of the key path and the value path of a stack of networks."""

    key: dict[int, Affine]
    value: dict[int, Affine]
    fit_errors: dict[str, float]  # "768.key" -> relative error, for fitted (nonlinear) modules


def stack_affines(
    entries: Sequence[tuple[Hypernetwork, float]],
    *,
    approximate: bool = False,
    samples: int = 4096,
    scale: float = 1.0,
    seed: int = 0,
) -> StackAffines:
    """Compose the networks (applied in order) into one affine map per width and path.

    Nonlinear networks are refused unless ``approximate``; then each of their modules is replaced
    by its least-squares affine fit and the fit's error is reported.
    """
    nonlinear = [net.name for net, _ in entries if not net.is_affine]
    if nonlinear and not approximate:
        raise IncompatibleNetworkError(
            f"{', '.join(nonlinear)}: not affine (an activation between its layers or layer norm), so it "
            "cannot be folded exactly; ask for an approximation (--approximate) to fit an affine map and see its error"
        )
    key: dict[int, Affine] = {}
    value: dict[int, Affine] = {}
    errors: dict[str, float] = {}
    for network, multiplier in entries:
        for width, pair in network.layers.items():
            for path, maps, module in (("key", key, pair[0]), ("value", value, pair[1])):
                if network.is_affine:
                    step = module_affine(module, multiplier)
                else:
                    step, error = fitted_affine(module, multiplier, samples=samples, scale=scale, seed=seed)
                    label = f"{network.name}.{width}.{path}"
                    errors[label] = max(errors.get(label, 0.0), error)
                maps[width] = maps.get(width, Affine.identity(width)).then(step)
    return StackAffines(key, value, errors)
