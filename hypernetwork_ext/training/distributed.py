"""Data-parallel training across processes (``accelerate launch``/``torchrun``): every process
trains on its own micro-batches and the network's gradients are averaged before each step, so
the weights stay identical everywhere; only the main process writes files."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _group_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size() -> int:
    return torch.distributed.get_world_size() if _group_ready() else 1


def rank() -> int:
    return torch.distributed.get_rank() if _group_ready() else 0


def is_main() -> bool:
    return rank() == 0


def average_gradients(parameters: Sequence[torch.nn.Parameter]) -> None:
    """Average each gradient over the processes (a no-op in a single process)."""
    size = world_size()
    if size == 1:
        return
    for parameter in parameters:
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
        torch.distributed.all_reduce(parameter.grad, op=torch.distributed.ReduceOp.SUM)
        parameter.grad.div_(size)


def average(value: float, device: torch.device) -> float:
    size = world_size()
    if size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return float(tensor.item()) / size


def broadcast_parameters(parameters: Sequence[torch.nn.Parameter]) -> None:
    """Start every process from the main process's weights (a new network's random init differs)."""
    if world_size() == 1:
        return
    with torch.no_grad():
        for parameter in parameters:
            torch.distributed.broadcast(parameter.data, src=0)
