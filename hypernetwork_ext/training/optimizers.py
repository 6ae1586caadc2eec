"""Optimizers: AdamW, 8-bit AdamW (bitsandbytes, CUDA only), Lion and Prodigy.

Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms") and Prodigy (Mishchenko &
Defazio 2023, "Prodigy: An Expeditiously Adaptive Parameter-Free Learner", Adam variant) are
implemented here from their papers, so no extra package is needed inside the WebUI. Any other
``torch.optim`` class name is accepted too, as A1111 accepts it from a saved ``.optim`` file.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from ..errors import InvalidConfigError

OPTIMIZERS = ("AdamW", "AdamW8bit", "Lion", "Prodigy")


class Lion(torch.optim.Optimizer):
    """Sign of an interpolated momentum; decoupled weight decay. Use about 3-10x smaller rates than AdamW."""

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.99), weight_decay: float = 0.0):
        if lr <= 0:
            raise ValueError(f"Lion: learning rate must be positive, got {lr}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, decay = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                momentum = state["exp_avg"]
                p.mul_(1 - lr * decay)
                direction = momentum.mul(beta1).add_(p.grad, alpha=1 - beta1).sign_()
                p.add_(direction, alpha=-lr)
                momentum.mul_(beta2).add_(p.grad, alpha=1 - beta2)
        return loss


class Prodigy(torch.optim.Optimizer):
    """Adam whose step size ``d`` is estimated on the fly; keep the learning rate near 1.0.

    ``d`` starts at ``d0`` and grows to ``max(d, r / |s|_1)`` where ``r`` accumulates
    ``<g, x0 - x>`` and ``s`` the gradients, both weighted by ``lr * d^2`` and decayed by
    ``beta3 = sqrt(beta2)``. Both are kept divided by ``d0``, which leaves their ratio unchanged and
    keeps the numbers in range.
    """

    def __init__(
        self,
        params,
        lr: float = 1.0,
        betas=(0.9, 0.999),
        beta3: float | None = None,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        d0: float = 1e-6,
        d_coef: float = 1.0,
    ):
        if lr <= 0 or d0 <= 0:
            raise ValueError(f"Prodigy: learning rate and d0 must be positive, got {lr}, {d0}")
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "beta3": beta3,
            "eps": eps,
            "weight_decay": weight_decay,
            "d": d0,
            "d0": d0,
            "d_max": d0,
            "d_numerator": 0.0,
            "d_coef": d_coef,
            "k": 0,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        first = self.param_groups[0]
        beta1, beta2 = first["betas"]
        beta3 = first["beta3"] if first["beta3"] is not None else math.sqrt(beta2)
        d, d0, d_max = first["d"], first["d0"], first["d_max"]
        lr = max(group["lr"] for group in self.param_groups)
        dlr = d * lr
        numerator = first["d_numerator"] * beta3
        denominator = 0.0
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["s"] = torch.zeros_like(p).flatten()
                    state["p0"] = p.detach().flatten().clone()
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                if group["lr"] <= 0:
                    continue
                flat_grad = grad.flatten()
                numerator += (d / d0) * dlr * torch.dot(flat_grad, state["p0"] - p.flatten()).item()
                state["exp_avg"].mul_(beta1).add_(grad, alpha=d * (1 - beta1))
                state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=d * d * (1 - beta2))
                state["s"].mul_(beta3).add_(flat_grad, alpha=(d / d0) * dlr)
                denominator += state["s"].abs().sum().item()
        if denominator == 0:
            return loss
        d_hat = first["d_coef"] * numerator / denominator
        if d == d0:
            d = max(d, d_hat)
        d_max = max(d_max, d_hat)
        d = d_max
        for group in self.param_groups:
            group.update(d_numerator=numerator, d=d, d_max=d_max, d_hat=d_hat)
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                state["step"] += 1
                denom = state["exp_avg_sq"].sqrt().add_(d * group["eps"])
                if group["weight_decay"]:
                    p.add_(p, alpha=-group["weight_decay"] * dlr)
                p.addcdiv_(state["exp_avg"], denom, value=-dlr)
            group["k"] += 1
        return loss


def optimizer_problem(name: str) -> str | None:
    """Why an optimizer name cannot be used here, or None."""
    if name in ("AdamW", "Lion", "Prodigy"):
        return None
    if name == "AdamW8bit":
        return _bitsandbytes_problem()
    cls = getattr(torch.optim, name, None)
    if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer):
        return None
    return f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)} (or a torch.optim class name)"


def _bitsandbytes_problem() -> str | None:
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # ImportError, or a broken native library
        return f"8-bit AdamW needs the bitsandbytes package, which is not available here ({type(exc).__name__}: {exc})"
    if not torch.cuda.is_available():
        return "8-bit AdamW needs a CUDA GPU (bitsandbytes' 8-bit optimizers do not run on this device)"
    return None


def build_optimizer(
    name: str, params: Iterable[torch.nn.Parameter], lr: float, *, weight_decay: float, betas: tuple[float, float]
) -> torch.optim.Optimizer:
    params = list(params)
    problem = optimizer_problem(name)
    if problem:
        raise InvalidConfigError(problem)
    if name == "AdamW":
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
    if name == "Lion":
        return Lion(params, lr=lr, betas=(betas[0], 0.99), weight_decay=weight_decay)
    if name == "Prodigy":
        return Prodigy(params, lr=lr, betas=betas, weight_decay=weight_decay)
    if name == "AdamW8bit":
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(params, lr=lr, betas=betas, weight_decay=weight_decay)
    return getattr(torch.optim, name)(params, lr=lr)
