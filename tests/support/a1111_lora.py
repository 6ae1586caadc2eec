"""A1111 1.10's built-in Lora extension, as far as it touches ``nn.Linear``, rebuilt from its rules.

What the host does (``extensions-builtin/Lora/networks.py`` and ``lora_patches.py``):
- at start-up it replaces ``torch.nn.Linear.forward`` and ``torch.nn.Linear._load_from_state_dict``
  at class level (and undoes it when unloaded);
- every module of the model gets ``network_layer_name`` (its dotted name with ``_``);
- default mode: on a Linear's forward, when the wanted set of networks (name and multipliers)
  differs from the one merged, it backs up ``weight``/``bias`` to the CPU once, restores them from
  the backup, adds each network's delta to ``weight`` IN PLACE, records the set, then runs the
  original forward;
- ``lora_functional`` mode: the forward restores the weights from any backup, drops the backup,
  runs the original forward and adds each network's ``up(down(x)) * multiplier * scale``;
- ``_load_from_state_dict`` drops the backup and the record before loading (checkpoint switches).

Only the LoRA module type is modelled; that is the one that matters for the attention projections.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LoraModule:
    """One layer's LoRA: ``delta W = up @ down * multiplier * alpha / rank``."""

    up: torch.Tensor  # [out, rank]
    down: torch.Tensor  # [rank, in]
    alpha: float
    network: LoraNetwork

    def scale(self) -> float:
        return self.alpha / self.down.shape[0] * self.network.unet_multiplier

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        return (self.up @ self.down).to(weight.dtype).reshape(weight.shape) * self.scale()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y + torch.nn.functional.linear(torch.nn.functional.linear(x, self.down), self.up) * self.scale()


@dataclass
class LoraNetwork:
    name: str
    unet_multiplier: float = 1.0
    te_multiplier: float = 1.0
    dyn_dim: float | None = None
    modules: dict[str, LoraModule] = field(default_factory=dict)

    def add(self, layer_name: str, out_features: int, in_features: int, rank: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        up = torch.randn(out_features, rank, generator=generator) * 0.2
        down = torch.randn(rank, in_features, generator=generator) * 0.2
        self.modules[layer_name] = LoraModule(up, down, alpha=float(rank), network=self)


class A1111Lora:
    """The class-level patches and the global state of the host's Lora extension."""

    def __init__(self) -> None:
        self.loaded_networks: list[LoraNetwork] = []
        self.functional = False
        self._original_forward = None
        self._original_load = None

    # -- lora_patches.LoraPatches.apply / undo -------------------------------------------------
    def apply(self) -> None:
        assert self._original_forward is None, "patched twice"
        self._original_forward = torch.nn.Linear.forward
        self._original_load = torch.nn.Linear._load_from_state_dict
        lora = self

        def network_Linear_forward(self, input):
            return lora.linear_forward(self, input)

        def network_Linear_load_state_dict(self, *args, **kwargs):
            lora.reset_cached_weight(self)
            return lora._original_load(self, *args, **kwargs)

        network_Linear_forward.__module__ = network_Linear_load_state_dict.__module__ = "networks"
        torch.nn.Linear.forward = network_Linear_forward
        torch.nn.Linear._load_from_state_dict = network_Linear_load_state_dict

    def undo(self) -> None:
        torch.nn.Linear.forward = self._original_forward
        torch.nn.Linear._load_from_state_dict = self._original_load
        self._original_forward = self._original_load = None

    @staticmethod
    def assign_names(model: torch.nn.Module) -> None:
        for name, module in model.named_modules():
            module.network_layer_name = name.replace(".", "_")

    # -- networks.py -----------------------------------------------------------------------------
    def linear_forward(self, module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        if self.functional:
            return self._functional_forward(module, x)
        self.apply_weights(module)
        return self._original_forward(module, x)

    def wanted_names(self) -> tuple:
        return tuple((n.name, n.te_multiplier, n.unet_multiplier, n.dyn_dim) for n in self.loaded_networks)

    def apply_weights(self, module: torch.nn.Linear) -> None:
        layer_name = getattr(module, "network_layer_name", None)
        if layer_name is None:
            return
        current = getattr(module, "network_current_names", ())
        wanted = self.wanted_names()
        if getattr(module, "network_weights_backup", None) is None and wanted != ():
            if current != ():
                raise RuntimeError(f"{layer_name} - no backup weights found and current weights are not unchanged")
            module.network_weights_backup = module.weight.to("cpu", copy=True)
        if getattr(module, "network_bias_backup", None) is None and wanted != ():
            module.network_bias_backup = None if module.bias is None else module.bias.to("cpu", copy=True)
        if current != wanted:
            self.restore_weights(module)
            for network in self.loaded_networks:
                lora = network.modules.get(layer_name)
                if lora is not None:
                    with torch.no_grad():
                        module.weight.copy_(module.weight + lora.delta(module.weight))
            module.network_current_names = wanted

    def restore_weights(self, module: torch.nn.Linear) -> None:
        weights = getattr(module, "network_weights_backup", None)
        bias = getattr(module, "network_bias_backup", None)
        if weights is None and bias is None:
            return
        with torch.no_grad():
            if weights is not None:
                module.weight.copy_(weights)
            if bias is None:
                module.bias = None
            else:
                module.bias.copy_(bias)

    @staticmethod
    def reset_cached_weight(module: torch.nn.Linear) -> None:
        module.network_current_names = ()
        module.network_weights_backup = None
        module.network_bias_backup = None

    def _functional_forward(self, module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        if not self.loaded_networks:
            return self._original_forward(module, x)
        self.restore_weights(module)
        self.reset_cached_weight(module)
        y = self._original_forward(module, x)
        layer_name = getattr(module, "network_layer_name", None)
        for network in self.loaded_networks:
            lora = network.modules.get(layer_name)
            if lora is not None:
                y = lora.forward(x, y)
        return y
