"""Attaching hypernetworks to the attention modules of any torch model.

An attention module here is any module with ``to_k`` and ``to_v`` children: ldm/sgm
``CrossAttention`` (A1111, Forge's ldm path), diffusers ``Attention``. The input of ``to_k`` and
the input of ``to_v`` are rewritten, through forward pre-hooks, by each network in list order,
each choosing its (key, value) module pair by the width of the input; the query is untouched.
Nothing else in the model changes, so removing the hooks restores it exactly; the hooks run
under every attention kernel because every kernel calls ``to_k``/``to_v`` itself.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import IncompatibleNetworkError, InvalidConfigError
from .network import Hypernetwork, HypernetworkModule
from .strength import CROSS, KEY, SELF, VALUE, Strength

NetworkSpec = Hypernetwork | tuple[Hypernetwork, float | Strength]


@dataclass(eq=False)
class AttentionSite:
    """One attention module and what decides the strength there."""

    name: str
    module: nn.Module
    kind: str  # "self" or "cross"
    block: str | None  # "IN04", "M00", "OUT03"; None when the model's layout is unknown

    @property
    def key_projection(self) -> nn.Module:
        return self.module.to_k

    @property
    def value_projection(self) -> nn.Module:
        return self.module.to_v


_LDM_BLOCK = re.compile(r"(?:^|\.)(input_blocks|output_blocks)\.(\d+)\.|(?:^|\.)middle_block\.")
_DIFFUSERS_BLOCK = re.compile(r"^(?:(.*)\.)?(down_blocks|up_blocks)\.(\d+)\.attentions\.(\d+)\.|(?:^|\.)mid_block\.")


def find_attention_sites(model: nn.Module) -> list[AttentionSite]:
    sites = []
    for name, module in model.named_modules():
        to_k, to_v = getattr(module, "to_k", None), getattr(module, "to_v", None)
        if isinstance(to_k, nn.Module) and isinstance(to_v, nn.Module):
            sites.append(AttentionSite(name, module, _attention_kind(name, module), _block_id(model, name)))
    return sites


def _attention_kind(name: str, module: nn.Module) -> str:
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "attn1":
        return SELF
    if leaf == "attn2":
        return CROSS
    declared = getattr(module, "is_cross_attention", None)
    if isinstance(declared, bool):
        return CROSS if declared else SELF
    query_width = getattr(getattr(module, "to_q", None), "in_features", None)
    key_width = getattr(module.to_k, "in_features", None)
    return CROSS if query_width is not None and key_width is not None and query_width != key_width else SELF


def _block_id(model: nn.Module, name: str) -> str | None:
    match = _LDM_BLOCK.search(name)
    if match:
        if match[1] is None:
            return "M00"
        return f"{'IN' if match[1] == 'input_blocks' else 'OUT'}{int(match[2]):02d}"
    match = _DIFFUSERS_BLOCK.search(name)
    if not match:
        return None
    if match[2] is None:
        return "M00"
    prefix = f"{match[1]}." if match[1] else ""
    return _diffusers_block_id(model, prefix, match[2], int(match[3]), int(match[4]))


def _diffusers_block_id(model: nn.Module, prefix: str, kind: str, index: int, attention: int) -> str | None:
    """Map a diffusers (level, layer) position to the ldm block numbering used by block weights.

    ldm numbers input blocks from 1 after the input conv: each level's layers, then its
    downsampler; output blocks count each level's layers, the upsampler sharing the last one.
    """
    try:
        levels = model.get_submodule(prefix + kind)
    except AttributeError:
        return None
    if kind == "down_blocks":
        before = sum(
            len(levels[i].resnets) + (1 if getattr(levels[i], "downsamplers", None) else 0) for i in range(index)
        )
        return f"IN{1 + before + attention:02d}"
    before = sum(len(levels[i].resnets) for i in range(index))
    return f"OUT{before + attention:02d}"


@dataclass
class Runtime:
    """What only the sampler knows: how far sampling is, and which batch rows are the negative pass."""

    progress: float | None = None
    uncond_rows: torch.Tensor | None = None  # bool per batch row


@dataclass
class _Stage:
    module: HypernetworkModule
    factor: float
    strength: Strength


@dataclass
class KVRewriter:
    """Rewrites key/value inputs with a list of networks; the computation behind every hook."""

    entries: list[tuple[Hypernetwork, Strength]]
    compute_dtype: torch.dtype | None = None
    runtime: Runtime = field(default_factory=Runtime)

    def __post_init__(self) -> None:
        self._plans: dict[tuple, list[_Stage]] = {}
        self._copies: dict[tuple, HypernetworkModule] = {}

    def plan(self, kind: str, block: str | None, path: str, width: int) -> list[_Stage]:
        key = (kind, block, path, width)
        stages = self._plans.get(key)
        if stages is None:
            stages = []
            for network, strength in self.entries:
                pair = network.layers.get(width)
                factor = strength.site_factor(kind, block, path)
                if pair is not None and factor != 0.0:
                    stages.append(_Stage(pair[0] if path == KEY else pair[1], factor, strength))
            self._plans[key] = stages
        return stages

    def rewrite(self, x: torch.Tensor, path: str, *, kind: str, block: str | None = None) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            return x
        stages = self.plan(kind, block, path, x.shape[-1])
        if not stages:
            return x
        dtype = self.compute_dtype or _parameter_dtype(stages[0].module)
        y = x.to(dtype)
        changed = False
        for stage in stages:
            multiplier = self._multiplier(stage, y)
            if isinstance(multiplier, float) and multiplier == 0.0:
                continue
            y = self._module_on(stage.module, y.device, dtype)(y, multiplier=multiplier)
            changed = True
        return y.to(x.dtype) if changed else x

    def rewrite_pair(
        self, key_input: torch.Tensor, value_input: torch.Tensor, *, kind: str, block: str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rewrite the key input and the value input of one attention call (Forge-style patches)."""
        return (
            self.rewrite(key_input, KEY, kind=kind, block=block),
            self.rewrite(value_input, VALUE, kind=kind, block=block),
        )

    def _multiplier(self, stage: _Stage, y: torch.Tensor) -> float | torch.Tensor:
        base = stage.factor * stage.strength.time_factor(self.runtime.progress)
        rows = self.runtime.uncond_rows
        if stage.strength.uncond == 1.0 or rows is None or base == 0.0 or rows.shape[0] != y.shape[0]:
            return base
        per_row = torch.where(rows.to(y.device), stage.strength.uncond, 1.0).to(y.dtype) * base
        return per_row.reshape(-1, *([1] * (y.dim() - 1)))

    def _module_on(self, module: HypernetworkModule, device: torch.device, dtype: torch.dtype) -> HypernetworkModule:
        reference = next(module.parameters(), None)
        if reference is None or (reference.device == device and reference.dtype == dtype):
            return module
        key = (id(module), device, dtype)
        copy = self._copies.get(key)
        if copy is None:
            copy = _copy_module(module).to(device=device, dtype=dtype)
            self._copies[key] = copy
        return copy

    def reset(self, entries: list[tuple[Hypernetwork, Strength]]) -> None:
        self.entries = entries
        self._plans.clear()
        self._copies.clear()


def _parameter_dtype(module: nn.Module) -> torch.dtype:
    reference = next(module.parameters(), None)
    return reference.dtype if reference is not None else torch.float32


def _copy_module(module: HypernetworkModule) -> HypernetworkModule:
    import copy

    twin = copy.deepcopy(module)
    twin.eval()
    for parameter in twin.parameters():
        parameter.requires_grad_(False)
    return twin


def normalise_networks(networks: Iterable[NetworkSpec]) -> list[tuple[Hypernetwork, Strength]]:
    entries = []
    for item in networks:
        if isinstance(item, Hypernetwork):
            entries.append((item, Strength()))
            continue
        if not isinstance(item, Sequence) or len(item) != 2 or not isinstance(item[0], Hypernetwork):
            raise InvalidConfigError(f"expected a Hypernetwork or a (Hypernetwork, multiplier) pair, found {item!r}")
        entries.append((item[0], Strength.of(item[1])))
    return entries


class Attachment:
    """Networks attached to one model; a context manager and a handle with ``remove()``.

    ``attach()`` and ``remove()`` are idempotent; ``update()`` swaps the networks without
    re-hooking. With no networks nothing is attached at all.
    """

    def __init__(
        self, model: nn.Module, networks: Iterable[NetworkSpec] = (), *, compute_dtype: torch.dtype | None = None
    ):
        self.model = model
        self.sites = find_attention_sites(model)
        if not self.sites:
            raise IncompatibleNetworkError(
                f"{type(model).__name__} has no attention modules with to_k/to_v projections to attach to"
            )
        _refuse_fused_projections(self.sites)
        self.rewriter = KVRewriter(normalise_networks(networks), compute_dtype)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    @property
    def runtime(self) -> Runtime:
        return self.rewriter.runtime

    @property
    def networks(self) -> list[tuple[Hypernetwork, Strength]]:
        return list(self.rewriter.entries)

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> Attachment:
        if self._handles or not self.rewriter.entries:
            return self
        for site in self.sites:
            for path, projection in ((KEY, site.key_projection), (VALUE, site.value_projection)):
                hook = _make_hook(self.rewriter, path, site.kind, site.block)
                self._handles.append(projection.register_forward_pre_hook(hook, with_kwargs=True))
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def update(self, networks: Iterable[NetworkSpec]) -> Attachment:
        self.rewriter.reset(normalise_networks(networks))
        if self.rewriter.entries:
            self.attach()
        else:
            self.remove()
        return self

    def __enter__(self) -> Attachment:
        return self.attach()

    def __exit__(self, *exc_info) -> None:
        self.remove()


def _make_hook(rewriter: KVRewriter, path: str, kind: str, block: str | None):
    def hook(module, args, kwargs):
        if args:
            return (rewriter.rewrite(args[0], path, kind=kind, block=block), *args[1:]), kwargs
        if "input" in kwargs:
            return args, {**kwargs, "input": rewriter.rewrite(kwargs["input"], path, kind=kind, block=block)}
        return None

    return hook


def _refuse_fused_projections(sites: list[AttentionSite]) -> None:
    for site in sites:
        if getattr(site.module, "fused_projections", False):
            raise IncompatibleNetworkError(
                f"attention {site.name} uses fused QKV projections, which bypass to_k/to_v; "
                "call unfuse_qkv_projections() on the model first"
            )


def apply(
    model: nn.Module, networks: Iterable[NetworkSpec] = (), *, compute_dtype: torch.dtype | None = None
) -> Attachment:
    """Attach networks to ``model`` now; use the result as a context manager or call ``remove()``."""
    return Attachment(model, networks, compute_dtype=compute_dtype).attach()
