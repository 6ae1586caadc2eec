"""Attaching hypernetworks to the attention modules of any torch model.

An attention module here is any module with ``to_k`` and ``to_v`` children: ldm/sgm
``CrossAttention`` (A1111, Forge's ldm path), diffusers ``Attention``. The input of ``to_k`` and
the input of ``to_v`` are rewritten by each network in list order, each choosing its (key, value)
module pair by the width of the input; the query is untouched. The rewrite runs in a forward
pre-hook on the projection, or, where a run of affine networks can be folded into a plain
``nn.Linear`` projection of self-attention, in a ``forward`` set on that projection instance
(see :class:`_FoldedForward`). Neither touches a parameter, so removing them restores the model
exactly; both run under every attention kernel because every kernel calls ``to_k``/``to_v``.
"""

from __future__ import annotations

import contextlib
import re
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .errors import IncompatibleNetworkError, InvalidConfigError
from .fastpath import (
    Engine,
    FoldState,
    ModuleInfo,
    Mult,
    autocast_state,
    combine,
    copy_module,
    fold_bytes,
    fold_dtype,
    fold_weights,
    foldable_projection,
    foldable_weight,
    is_torch_linear_forward,
    needs_autograd,
    version_of,
)
from .memory import DEFAULT_FOLD_LIMIT, FoldBudget, HeldMemory
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
    """What only the sampler knows: how far sampling is, and which batch rows are the negative pass.

    ``linear_projections`` tells whether a class-level ``nn.Linear.forward`` installed by the host
    (A1111's Lora) computes ``F.linear(x, weight, bias)`` once its bookkeeping is done: True (Lora
    merging into the weights, its default), False (Lora's functional mode: deltas added on the
    fly, so folding into the weight would lose them) or None (unknown: every folded call checks
    one row against ``F.linear``).

    ``lower_precision(device)``, given by a host whose own networks must be matched (A1111), tells
    whether the host computes in lower precision at this moment (its autocast, or casting layers
    itself). Then, with no compute dtype chosen, every network is computed as that host computes
    its own: ``x + mlp(x) * m`` on the input as it comes, under the host's casting, each rounding
    where the host's is (see ``KVRewriter._rewrite_as_host``).
    """

    progress: float | None = None
    uncond_rows: torch.Tensor | None = None  # bool per batch row
    linear_projections: bool | None = None
    lower_precision: Callable[[torch.device], bool] | None = None


@dataclass
class _Stage:
    module: HypernetworkModule
    factor: float
    strength: Strength


Active = list[tuple[ModuleInfo, Mult]]


@dataclass
class KVRewriter:
    """Rewrites key/value inputs with a list of networks; the computation behind every hook.

    With ``fast`` (the default) the work is cut wherever the result stays the same (see
    :mod:`hypernetwork_ext.fastpath`); ``stats`` counts which ways calls took.
    """

    entries: list[tuple[Hypernetwork, Strength]]
    compute_dtype: torch.dtype | None = None
    runtime: Runtime = field(default_factory=Runtime)
    fast: bool = True

    def __post_init__(self) -> None:
        self._plans: dict[tuple, list[_Stage]] = {}
        self._copies: dict[tuple, HypernetworkModule] = {}
        self._engine = Engine()
        self._rows_memo: tuple = (None, -1, None, None)
        self._active_memo: dict[int, tuple] = {}
        self._learning_contexts: dict[tuple, tuple] = {}

    @property
    def stats(self):
        return self._engine.stats

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
        if not self.fast:
            return self._rewrite_plain(x, stages)
        infos = [self._engine.info(stage.module) for stage in stages]
        if needs_autograd(x, infos):
            self.stats["plain_calls"] += 1
            if kind == CROSS:
                return self._rewrite_learning_context(x, path, stages)
            return self._rewrite_plain(x, stages)
        active = self._active(stages, infos, x)
        if not active:
            return x
        if self._as_host(x):
            return self._rewrite_as_host(x, path, kind, active)
        dtype = self._dtype(stages)
        if kind == CROSS:
            return self._rewrite_context(x, path, kind, block, active, dtype)
        return self._rewrite_hidden(x, path, kind, block, active, dtype)

    def rewrite_pair(
        self, key_input: torch.Tensor, value_input: torch.Tensor, *, kind: str, block: str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rewrite the key input and the value input of one attention call (Forge-style patches).

        When both are the same tensor the value result is computed with the key result.
        """
        return (
            self.rewrite(key_input, KEY, kind=kind, block=block),
            self.rewrite(value_input, VALUE, kind=kind, block=block),
        )

    def held_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """``(kind, tensor)`` for what the fast paths keep (see :mod:`hypernetwork_ext.memory`)."""
        copies = [("network_copies", p) for copy in self._copies.values() for p in copy.parameters()]
        return copies + self._engine.held_tensors()

    def memory(self) -> HeldMemory:
        """What the rewriter alone holds (an attachment adds its folds)."""
        return HeldMemory.measure(self.held_tensors(), folding=False)

    def release(self, keep: set[torch.device] | None = None) -> None:
        """Drop what is kept on devices other than ``keep`` (everything when None); the networks
        stay, and what they need is rebuilt at the next call."""
        for key in [key for key in self._copies if keep is None or key[1] not in keep]:
            del self._copies[key]
        self._engine.release(keep)

    def reset(self, entries: list[tuple[Hypernetwork, Strength]]) -> None:
        self.entries = entries
        self._plans.clear()
        self._copies.clear()
        self._active_memo.clear()
        self._learning_contexts.clear()
        self._engine.clear()

    # -- while a network learns -----------------------------------------------------------------
    def _rewrite_learning_context(self, x: torch.Tensor, path: str, stages: list[_Stage]) -> torch.Tensor:
        """The text context, rewritten once per forward pass while the networks learn: every
        cross-attention layer of a width gets the same context tensor, so the layers share one
        result (autograd adds up the gradient of every use) instead of running the networks
        once each (16 times on SD1.5, as A1111 does). Only while every stage is in training mode
        (its multiplier is ignored, as the host does) and draws no dropout (a fresh mask per call)."""
        if _UNSHARED[0] or not all(stage.module.training and not _draws_dropout(stage.module) for stage in stages):
            return self._rewrite_plain(x, stages)
        key = (id(x), path, tuple(id(stage.module) for stage in stages))
        token = (version_of(x), torch.is_grad_enabled(), tuple(self._engine.info(s.module).token() for s in stages))
        entry = self._learning_contexts.get(key)
        if entry is not None and entry[0]() is x and entry[1] == token:
            self.stats["shared_learning_contexts"] += 1
            return entry[2]
        y = self._rewrite_plain(x, stages)
        # Kept while the context lives (to the end of the step), dropped with it.
        forget = self._learning_contexts.pop
        self._learning_contexts[key] = (weakref.ref(x, lambda _ref, key=key: forget(key, None)), token, y)
        return y

    # -- the plain path: one module call per stage, differentiable -------------------------------
    def _rewrite_plain(self, x: torch.Tensor, stages: list[_Stage]) -> torch.Tensor:
        if self._as_host(x) and not any(stage.module.training for stage in stages):
            y = x
            for stage in stages:
                multiplier = self._multiplier(stage, y)
                if not (isinstance(multiplier, float) and multiplier == 0.0):
                    y = self._host_stage(y, stage.module, multiplier)
            return y.to(x.dtype)
        dtype = self._dtype(stages)
        y = x.to(dtype)
        changed = False
        for stage in stages:
            multiplier = self._multiplier(stage, y)
            if isinstance(multiplier, float) and multiplier == 0.0:
                continue
            y = self._module_on(stage.module, y.device, dtype)(y, multiplier=multiplier)
            changed = True
        return y.to(x.dtype) if changed else x

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
            copy = copy_module(module).to(device=device, dtype=dtype)
            self._copies[key] = copy
        return copy

    # -- the host's own arithmetic ---------------------------------------------------------------------
    def _as_host(self, x: torch.Tensor) -> bool:
        """Whether this call computes as the host computes its own networks (see ``Runtime``)."""
        lower_precision = self.runtime.lower_precision
        return self.compute_dtype is None and lower_precision is not None and lower_precision(x.device)

    def _host_stage(
        self, y: torch.Tensor, module: HypernetworkModule, multiplier: float | torch.Tensor
    ) -> torch.Tensor:
        """One network as A1111 computes it: ``x + linear(x) * m``, the layers called on the input as it
        comes (in its dtype, the host's autocast or casting deciding each layer's precision), the
        product rounded before the sum. In lower precision every other order rounds differently,
        and sampling grows those differences into visible ones (5-6/255 with A1111's FP8 weights)."""
        own = next(module.parameters(), None)
        dtype = own.dtype if own is not None else y.dtype
        g = self._module_on(module, y.device, dtype).linear(y)
        return y + g * multiplier

    def _rewrite_as_host(self, x: torch.Tensor, path: str, kind: str, active: Active) -> torch.Tensor:
        """No fold, composed matrix or batched GEMM (each rounds otherwise than the host); the text
        context's result is still computed once per generation."""
        entry = self._engine.contexts.entry_for(x) if kind == CROSS else None
        key = None
        if entry is not None:
            signature = tuple((id(info.module), info.token(), mult.key) for info, mult in active)
            key = ("host", path, x.dtype, autocast_state(x.device), signature)
            found = entry.get(key)
            if found is not None:
                self.stats["context_hits"] += 1
                return found
        y = x
        for info, mult in active:
            y = self._host_stage(y, info.module, mult.value_for(y))
        out = y.to(x.dtype)
        self.stats["host_arithmetic_calls"] += 1
        if entry is not None:
            entry.put(key, out)
            self.stats["context_computed"] += 1
        return out

    # -- the fast paths -------------------------------------------------------------------------------
    def _dtype(self, stages: list[_Stage]) -> torch.dtype:
        if self.compute_dtype is not None:
            return self.compute_dtype
        params = self._engine.info(stages[0].module).params
        return params[0].dtype if params else torch.float32

    def _active(self, stages: list[_Stage], infos: list[ModuleInfo], x: torch.Tensor) -> Active:
        """The stages whose multiplier is not zero for this call, with their multipliers (the same
        for every call of a step, so kept per plan until the step or the rows change)."""
        progress = self.runtime.progress
        rows, rows_key = self._rows_for(x)
        memo_key = (progress, rows_key)
        memo = self._active_memo.get(id(stages))
        if memo is not None and memo[0] is stages and memo[1] == memo_key and memo[2] is rows:
            return memo[3]
        active = self._compute_active(stages, infos, progress, rows, rows_key)
        self._active_memo[id(stages)] = (stages, memo_key, rows, active)
        return active

    def _compute_active(self, stages, infos, progress, rows, rows_key) -> Active:
        active = []
        for stage, info in zip(stages, infos, strict=True):
            base = stage.factor * stage.strength.time_factor(progress)
            if base == 0.0:
                continue
            if rows is None or stage.strength.uncond == 1.0:
                active.append((info, Mult(base, base)))
            else:
                active.append((info, Mult(base, base * stage.strength.uncond, rows, rows_key)))
        return active

    def _rows_for(self, x: torch.Tensor) -> tuple[torch.Tensor | None, tuple | None]:
        rows = self.runtime.uncond_rows
        if rows is None or rows.dim() != 1 or rows.shape[0] != x.shape[0]:
            return None, None
        memo_rows, memo_version, as_bool, key = self._rows_memo
        version = version_of(rows)
        if memo_rows is not rows or memo_version != version:
            as_bool = rows.to(torch.bool)
            key = tuple(as_bool.tolist())
            self._rows_memo = (rows, version, as_bool, key)
        return as_bool, key

    def _other_path_active(self, path: str, kind: str, block: str | None, x: torch.Tensor) -> Active | None:
        other = VALUE if path == KEY else KEY
        stages = self.plan(kind, block, other, x.shape[-1])
        if not stages:
            return None
        infos = [self._engine.info(stage.module) for stage in stages]
        if needs_autograd(x, infos):
            return None
        return self._active(stages, infos, x) or None

    def _rewrite_hidden(
        self,
        x: torch.Tensor,
        path: str,
        kind: str,
        block: str | None,
        active: Active,
        dtype: torch.dtype,
        *,
        prefix_only: bool = False,
    ) -> torch.Tensor:
        """Hidden states change every call: compute, with the other path's result when the host
        will ask for it with the same tensor next (to_k and to_v of one attention call)."""
        engine = self._engine
        key = _pending_key(path, kind, block, x, dtype, active, prefix_only)
        taken = engine.take(x, key)
        if taken is not None:
            return taken
        other_path = VALUE if path == KEY else KEY
        site = (path, kind, block, x.shape[-1], prefix_only)
        other = self._other_path_active(path, kind, block, x) if engine.pairs(site) else None
        if other is not None and prefix_only:
            other = _nonaffine_prefix(other) or None
        y_in = x.to(dtype)
        if other is None:
            y = engine.run_stages(y_in, active)
        else:
            y, y_other = engine.run_two_paths(y_in, active, other)
            other_key = _pending_key(other_path, kind, block, x, dtype, other, prefix_only)
            engine.offer(site, x, other_key, y_other.to(x.dtype))
        self.stats["computed_calls"] += 1
        return y.to(x.dtype)

    def _rewrite_context(
        self, x: torch.Tensor, path: str, kind: str, block: str | None, active: Active, dtype: torch.dtype
    ) -> torch.Tensor:
        """The text context is the same at every step: keep what each stage made of it.

        Each stage's network output before its multiplier is kept under the stages that came
        before it, so a schedule that changes the multipliers every step only redoes the cheap
        ``x + m * g`` sums, not the networks.
        """
        engine = self._engine
        entry = engine.contexts.entry_for(x)
        if entry is None:
            return self._rewrite_hidden(x, path, kind, block, active, dtype)
        signature = tuple((id(info.module), info.token(), mult.key) for info, mult in active)
        precision = (x.dtype, dtype, autocast_state(x.device))
        final_key = ("out", path, precision, signature)
        found = entry.get(final_key)
        if found is not None:
            self.stats["context_hits"] += 1
            return found
        y = x.to(dtype)
        before: tuple = ()
        for index, (info, mult) in enumerate(active):
            g_key = ("mlp", id(info.module), info.token(), precision, before)
            g = entry.get(g_key)
            if g is None:
                g = self._context_mlp(entry, y, info, index, path, kind, block, x, precision)
                entry.put(g_key, g)
            y = combine(y, g, mult)
            before += ((id(info.module), mult.key),)
        out = y.to(x.dtype)
        entry.put(final_key, out)
        self.stats["context_computed"] += 1
        return out

    def _context_mlp(self, entry, y, info: ModuleInfo, index: int, path, kind, block, x, precision) -> torch.Tensor:
        """One stage's network output on the context; the first stage's for the other path too."""
        if index == 0:
            other = self._other_path_active(path, kind, block, x)
            if other is not None:
                other_info = other[0][0]
                g_key = ("mlp", id(other_info.module), other_info.token(), precision, ())
                plan = self._engine.batched_pair(info, other_info, y) if entry.get(g_key) is None else None
                if plan is not None:
                    g, g_other = plan.run(y)
                    entry.put(g_key, g_other)
                    self.stats["paired_first_layers"] += 1
                    return g
        return self._engine.mlp(y, info)

    # -- folding into the projection -------------------------------------------------------------------
    def _forward_folded(
        self, projection: nn.Module, x: torch.Tensor, path: str, kind: str, block: str | None, state: FoldState
    ) -> torch.Tensor:
        forward = type(projection).forward
        stages = self.plan(kind, block, path, x.shape[-1])
        if not stages:
            return forward(projection, x)
        infos = [self._engine.info(stage.module) for stage in stages]
        weights = [t for t in (projection.weight, projection.bias) if t is not None]
        if not self.fast or needs_autograd(x, infos, weights):
            self.stats["plain_calls"] += 1
            return forward(projection, self.rewrite(x, path, kind=kind, block=block))
        if state.unstable or not foldable_weight(projection.weight) or self._as_host(x):
            return forward(projection, self.rewrite(x, path, kind=kind, block=block))
        active = self._active(stages, infos, x)
        if not active:
            return forward(projection, x)
        dtype = self._dtype(stages)
        prefix = _nonaffine_prefix(active)
        suffix = active[len(prefix) :]
        if not suffix:
            return forward(projection, self._rewrite_hidden(x, path, kind, block, active, dtype))
        if prefix:
            x = self._rewrite_hidden(x, path, kind, block, prefix, dtype, prefix_only=True)
        if not self._is_linear_after_bookkeeping(projection, forward, x):
            self.stats["fold_refused"] += 1
            return forward(projection, self._apply_affine(x, suffix, dtype))
        scheduled = self.runtime.progress is not None and any(stage.strength.is_scheduled for stage in stages)
        return self._folded_linear(projection, x, suffix, dtype, state, scheduled)

    def _is_linear_after_bookkeeping(self, projection: nn.Module, forward, x: torch.Tensor) -> bool:
        """Whether ``forward`` computes ``F.linear`` with the projection's current weights.

        A class-level forward installed by the host still runs (on an empty or one-row input)
        so that its bookkeeping happens: A1111's Lora merges its deltas into ``weight`` in place
        on the first call with a new set of networks, and the fold follows the merged weight.
        """
        if is_torch_linear_forward(forward):
            return True
        hint = self.runtime.linear_projections
        if hint is False:
            return False
        rows = x.reshape(-1, x.shape[-1])
        if hint is True:
            forward(projection, rows[:0])
            return True
        probe = rows[:1]
        got = forward(projection, probe)
        try:
            expected = F.linear(probe, projection.weight, projection.bias)
        except RuntimeError:  # weights the host casts itself at every call
            return False
        return (
            isinstance(got, torch.Tensor)
            and got.shape == expected.shape
            and got.dtype == expected.dtype
            and torch.equal(got, expected)
        )

    def _folded_linear(
        self,
        projection: nn.Module,
        x: torch.Tensor,
        suffix: Active,
        dtype: torch.dtype,
        state: FoldState,
        scheduled: bool,
    ) -> torch.Tensor:
        weight, bias = projection.weight, projection.bias
        folding = fold_dtype(weight)
        state.revalidate(_tensor_token(weight) + _tensor_token(bias), (*(info.token() for info, _ in suffix), folding))
        progress = self.runtime.progress if scheduled else None
        outputs = []
        for rows, multipliers in _row_groups(suffix):
            part = x if rows is None else x.index_select(0, _index(rows, x.device))
            if not any(multipliers):  # e.g. the negative pass with uncond=0
                outputs.append((rows, F.linear(part, weight, bias)))
                continue
            fold = state.lookup(multipliers)
            if fold is None and state.worth_folding(multipliers, progress):
                if state.budget.admit(fold_bytes(weight)):
                    started = time.perf_counter()
                    affines = [self._engine.affine(info, weight.device, folding) for info, _ in suffix]
                    held = tuple(t.detach() for t in (weight, bias) if t is not None)
                    fold = state.store(multipliers, *fold_weights(weight, bias, affines, multipliers), held)
                    self.stats["folds"] += 1
                    self.stats["fold_seconds"] += time.perf_counter() - started  # host time (GPU: queued)
                else:
                    self.stats["unfolded_over_limit"] += 1
            if fold is not None:
                self.stats["folded_calls"] += 1
                outputs.append((rows, F.linear(part, fold.weight, fold.bias)))
            else:
                self.stats["composite_calls"] += 1
                scalar = [(info, Mult(m, m)) for (info, _), m in zip(suffix, multipliers, strict=True)]
                outputs.append((rows, F.linear(self._apply_affine(part, scalar, dtype), weight, bias)))
        if len(outputs) == 1:
            return outputs[0][1]
        result = outputs[0][1].new_empty(x.shape[:-1] + outputs[0][1].shape[-1:])
        for rows, output in outputs:
            result.index_copy_(0, _index(rows, x.device), output)
        return result

    def _apply_affine(self, x: torch.Tensor, suffix: Active, dtype: torch.dtype) -> torch.Tensor:
        """Affine stages through their composed matrices (one GEMM of width² per stage)."""
        y = x.to(dtype)
        for info, mult in suffix:
            matrix, vector = self._engine.affine(info, y.device, dtype)
            y = combine(y, F.linear(y, matrix, vector), mult)
        return y.to(x.dtype)


def _nonaffine_prefix(active: Active) -> Active:
    """The stages up to and including the last one that is not affine."""
    last = max((index for index, (info, _) in enumerate(active) if not info.affine), default=-1)
    return active[: last + 1]


def _pending_key(path, kind, block, x: torch.Tensor, dtype, active: Active, prefix_only: bool) -> tuple:
    return (path, kind, block, x.shape[-1], dtype, prefix_only, tuple((id(i.module), m.key) for i, m in active))


def _row_groups(suffix: Active) -> list[tuple[tuple[int, ...] | None, tuple[float, ...]]]:
    """(rows, multipliers) groups: all rows at once, or the cond and the uncond rows apart."""
    cond = tuple(mult.cond for _, mult in suffix)
    keys = {mult.rows_key for _, mult in suffix if mult.rows_key is not None}
    if not keys:
        return [(None, cond)]
    (rows_key,) = keys  # every per-row multiplier comes from the same runtime rows
    uncond = tuple(mult.uncond if mult.rows_key is not None else mult.cond for _, mult in suffix)
    if uncond == cond:
        return [(None, cond)]
    groups = []
    for flagged, multipliers in ((False, cond), (True, uncond)):
        rows = tuple(index for index, value in enumerate(rows_key) if value == flagged)
        if rows:
            groups.append((rows, multipliers))
    return groups


def _index(rows: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long).to(device, non_blocking=True)


def _tensor_token(tensor: torch.Tensor | None) -> tuple:
    if tensor is None:
        return (None,)
    return (tensor.data_ptr(), version_of(tensor), tensor.dtype, tensor.device, tuple(tensor.shape))


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


class _FoldedForward:
    """``forward`` of one ``to_k``/``to_v`` Linear instance of a self-attention module.

    Set on the instance rather than hooked, because a pre-hook cannot skip the projection it
    precedes: here the projection itself runs with folded weights. The host's class-level
    forward still runs first where one is installed (see ``_is_linear_after_bookkeeping``), and
    every call the fold cannot serve goes through it with the rewritten input, as a hook would.
    The host's weights are only read: A1111's Lora keeps a backup of them and restores it later.
    """

    def __init__(
        self, projection: nn.Module, rewriter: KVRewriter, path: str, kind: str, block: str | None, state: FoldState
    ):
        self.projection = projection
        self.rewriter = rewriter
        self.path, self.kind, self.block = path, kind, block
        self.state = state
        self.enabled = True

    def __call__(self, *args, **kwargs):
        projection = self.projection
        x = args[0] if args else kwargs.get("input")
        if not self.enabled or not isinstance(x, torch.Tensor) or x.dim() == 0 or len(args) + len(kwargs) != 1:
            return type(projection).forward(projection, *args, **kwargs)
        return self.rewriter._forward_folded(projection, x, self.path, self.kind, self.block, self.state)


@dataclass(eq=False)
class _Binding:
    projection: nn.Module
    handle: torch.utils.hooks.RemovableHandle | None = None
    folded: _FoldedForward | None = None

    def release(self) -> None:
        if self.handle is not None:
            self.handle.remove()
        if self.folded is not None:
            self.folded.enabled = False
            if self.projection.__dict__.get("forward") is self.folded:
                del self.projection.forward


class Attachment:
    """Networks attached to one model; a context manager and a handle with ``remove()``.

    ``attach()`` and ``remove()`` are idempotent; ``update()`` swaps the networks. Projections
    where no network acts (no module of that width, a zero factor) get nothing; with no networks
    nothing is attached at all. ``fast=False`` keeps the plain computation everywhere;
    ``fold=False`` keeps the other fast paths but folds nothing.

    Folded weights take up to ``fold_limit`` bytes (None: no bound; a full set is one copy of the
    self-attention key/value weights, about 50 MB for SD1.5 and 410 MB for SDXL in fp16); beyond
    it projections compute unfolded (:class:`~hypernetwork_ext.memory.FoldBudget`). They and the
    rewritten contexts survive ``remove()``/``attach()`` of the same handle, so attaching again for
    the next generation costs nothing, unless the model's weights moved off their device meanwhile:
    ``remove()`` lets go of whatever is on a device the model no longer uses, and ``release()``
    lets go of everything. ``memory()`` tells what is held; ``update()`` with other networks, or
    dropping the handle, frees it all.
    """

    def __init__(
        self,
        model: nn.Module,
        networks: Iterable[NetworkSpec] = (),
        *,
        compute_dtype: torch.dtype | None = None,
        fast: bool = True,
        fold: bool = True,
        fold_limit: int | None = DEFAULT_FOLD_LIMIT,
    ):
        self.model = model
        self.fold = fold
        self.sites = find_attention_sites(model)
        if not self.sites:
            raise IncompatibleNetworkError(
                f"{type(model).__name__} has no attention modules with to_k/to_v projections to attach to"
            )
        _refuse_fused_projections(self.sites)
        self.rewriter = KVRewriter(normalise_networks(networks), compute_dtype, fast=fast)
        self.budget = FoldBudget(fold_limit)
        self._bindings: list[_Binding] = []
        self._fold_states: dict[tuple[int, str], tuple[nn.Module, FoldState]] = {}

    @property
    def runtime(self) -> Runtime:
        return self.rewriter.runtime

    @property
    def networks(self) -> list[tuple[Hypernetwork, Strength]]:
        return list(self.rewriter.entries)

    @property
    def attached(self) -> bool:
        return bool(self._bindings)

    @property
    def stats(self):
        """How many calls took which way (folded, cached context, paired, plain...)."""
        return self.rewriter.stats

    @property
    def fold_limit(self) -> int | None:
        return self.budget.limit

    @fold_limit.setter
    def fold_limit(self, limit: int | None) -> None:
        self.budget.set_limit(limit)  # folds beyond a lower limit go at once

    def attach(self) -> Attachment:
        if self._bindings or not self.rewriter.entries:
            return self
        self.budget.new_epoch()
        for site in self.sites:
            for path, projection in ((KEY, site.key_projection), (VALUE, site.value_projection)):
                width = getattr(projection, "in_features", None)
                stages = self.rewriter.plan(site.kind, site.block, path, width) if isinstance(width, int) else None
                if stages == []:
                    continue  # no network acts here: nothing to pay per call
                self._bindings.append(self._bind(site, path, projection, stages))
        return self

    def _bind(self, site: AttentionSite, path: str, projection: nn.Module, stages: list[_Stage] | None) -> _Binding:
        # Only self-attention is folded: the text context of cross-attention is computed once
        # per generation anyway, and a fold would hold a second copy of those weights.
        if (
            self.fold
            and self.rewriter.fast
            and site.kind == SELF
            and stages
            and isinstance(stages[-1].module, HypernetworkModule)
            and _is_affine_module(stages[-1].module)
            and foldable_projection(projection)
        ):
            _, state = self._fold_states.setdefault((id(projection), path), (projection, FoldState(self.budget)))
            folded = _FoldedForward(projection, self.rewriter, path, site.kind, site.block, state)
            projection.forward = folded
            return _Binding(projection, folded=folded)
        hook = _make_hook(self.rewriter, path, site.kind, site.block)
        return _Binding(projection, handle=projection.register_forward_pre_hook(hook, with_kwargs=True))

    def remove(self) -> None:
        for binding in self._bindings:
            binding.release()
        self._bindings.clear()
        self.rewriter._engine.drop_pending()
        self.release(keep=self.model_devices())

    def update(self, networks: Iterable[NetworkSpec]) -> Attachment:
        entries = normalise_networks(networks)
        if same_entries(entries, self.rewriter.entries):
            return self.attach()  # keep folds and cached contexts
        self.remove()
        self.rewriter.reset(entries)
        self._clear_folds()
        return self.attach()

    # -- memory ------------------------------------------------------------------------------------
    def model_devices(self) -> set[torch.device]:
        """The devices the attention projections' weights are on now (none for meta tensors)."""
        devices = set()
        for site in self.sites:
            for projection in (site.key_projection, site.value_projection):
                weight = getattr(projection, "weight", None)
                if isinstance(weight, torch.Tensor) and weight.device.type != "meta":
                    devices.add(weight.device)
        return devices

    def held_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """``(kind, tensor)`` for everything kept between calls (see :mod:`hypernetwork_ext.memory`)."""
        held = [("folds", t) for _, state in self._fold_states.values() for t in state.tensors()]
        held += [
            ("old_unet_weights", t)
            for projection, state in self._fold_states.values()
            if state.holds_old_weights(_projection_tensors(projection))
            for t in state.held
        ]
        return held + self.rewriter.held_tensors()

    def memory(self) -> HeldMemory:
        """What the fast paths hold now, per device and kind."""
        return HeldMemory.measure(self.held_tensors(), folds=len(self.budget), fold_limit=self.budget.limit)

    def release(self, keep: set[torch.device] | None = None) -> int:
        """Let go of everything kept on devices other than ``keep`` (everything when None), and of
        every fold made from weights the projection no longer has; returns the bytes let go.
        Attached networks keep working: what they need is rebuilt at the next call."""
        before = self.memory().total
        for projection, state in self._fold_states.values():
            on_kept_device = keep is not None and all(t.device in keep for t in (*state.held, *state.tensors()))
            if not on_kept_device or state.holds_old_weights(_projection_tensors(projection)):
                state.clear()
        self.rewriter.release(keep)
        return before - self.memory().total

    def _clear_folds(self) -> None:
        for _, state in self._fold_states.values():
            state.clear()
        self._fold_states.clear()

    def __enter__(self) -> Attachment:
        return self.attach()

    def __exit__(self, *exc_info) -> None:
        self.remove()


def _projection_tensors(projection: nn.Module) -> tuple:
    return getattr(projection, "weight", None), getattr(projection, "bias", None)


def _is_affine_module(module: HypernetworkModule) -> bool:
    return all(isinstance(layer, (nn.Linear, nn.Dropout)) for layer in module.linear)


def same_entries(a: list[tuple[Hypernetwork, Strength]], b: list[tuple[Hypernetwork, Strength]]) -> bool:
    """The same network objects with equal strengths, in the same order."""
    return len(a) == len(b) and all(x[0] is y[0] and x[1] == y[1] for x, y in zip(a, b, strict=True))


_UNSHARED = [0]  # inside a recomputed (checkpointed) block: see unshared_contexts


@contextlib.contextmanager
def unshared_contexts():
    """Every call computes its own context: a gradient checkpoint recomputes its block in the
    backward pass and needs the same work done there as in the forward pass."""
    _UNSHARED[0] += 1
    try:
        yield
    finally:
        _UNSHARED[0] -= 1


def _draws_dropout(module: nn.Module) -> bool:
    return any(isinstance(layer, nn.Dropout) and layer.p > 0 for layer in module.modules())


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
    model: nn.Module,
    networks: Iterable[NetworkSpec] = (),
    *,
    compute_dtype: torch.dtype | None = None,
    fast: bool = True,
    fold: bool = True,
    fold_limit: int | None = DEFAULT_FOLD_LIMIT,
) -> Attachment:
    """Attach networks to ``model`` now; use the result as a context manager or call ``remove()``.

    ``fast=False`` computes every network at every call, the way A1111 does (for comparisons);
    ``fold=False`` never folds affine networks into the projections (saves their memory);
    ``fold_limit`` bounds the bytes of folded weights (None: no bound).
    """
    return Attachment(
        model, networks, compute_dtype=compute_dtype, fast=fast, fold=fold, fold_limit=fold_limit
    ).attach()
