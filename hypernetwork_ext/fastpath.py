"""Fast ways to compute what :class:`~hypernetwork_ext.attach.KVRewriter` computes.

Every function here gives the same result as the plain per-module computation
``y = x + m * mlp(x)`` (stage after stage) up to float rounding; they only do less work:

- multipliers are kept apart per batch row group (:class:`Mult`), so rows whose multiplier is
  zero (the negative pass with ``uncond=0``) are not computed at all;
- an affine network (no activation, no layer norm) is one matrix ``A`` and one vector ``a``:
  :meth:`Engine.affine` composes its Linears once, which is cheaper to apply than the layers;
- the key and value modules of one network receive the same input, so their first Linears run as
  one batched GEMM (:class:`_PairPlan`) where it gives the bits of two separate ones, and the
  host's second call (``to_v`` after ``to_k``) takes the result computed with the first;
- the text context does not change during sampling: :class:`ContextCache` keeps the rewritten
  context per (path, stages, multipliers) and recognises the context by value, because samplers
  rebuild the conditioning batch with ``torch.cat`` every step;
- on ``to_k``/``to_v`` Linears of self-attention, a trailing run of affine networks is folded into
  the projection itself (:class:`FoldedProjection`): ``W (M x + c) + b = (W M) x + (W c + b)``.

Nothing here runs while gradients are needed: :func:`needs_autograd` sends those calls to the
plain path, which is differentiable and ignores multipliers in training mode as the host does.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .memory import FoldBudget
from .network import HypernetworkModule

# These normalise over a dimension that, for the host's 3-D inputs, is the batch (the legacy
# implicit-dim rule): rows interact, so a subset of rows cannot be computed alone.
ROW_COUPLING_ACTIVATIONS: tuple[type[nn.Module], ...] = (nn.Softmax, nn.Softmin, nn.LogSoftmax, nn.Softmax2d)

CONTEXTS_KEPT = 8
OUTPUTS_PER_CONTEXT = 64
MISSES_BEFORE_BYPASS = 16
FOLDS_PER_PROJECTION = 2
UNSTABLE_AFTER_REFOLDS = 3


# -- multipliers ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Mult:
    """The multiplier of one stage for one call: ``cond`` for most rows, ``uncond`` for the rows
    flagged in ``rows`` (the negative pass). ``rows`` is None when every row has ``cond``."""

    cond: float
    uncond: float
    rows: torch.Tensor | None = None
    rows_key: tuple[bool, ...] | None = None

    @property
    def is_zero(self) -> bool:
        return self.cond == 0.0 and (self.rows is None or self.uncond == 0.0)

    @property
    def key(self) -> tuple:
        return (self.cond,) if self.rows is None else (self.cond, self.uncond, self.rows_key)

    def value_for(self, y: torch.Tensor) -> float | torch.Tensor:
        """A float, or a per-row tensor shaped to broadcast over ``y``."""
        if self.rows is None:
            return self.cond
        per_row = torch.where(self.rows.to(y.device), self.uncond, self.cond).to(y.dtype)
        return per_row.reshape(-1, *([1] * (y.dim() - 1)))

    def only_cond(self) -> Mult:
        return Mult(self.cond, self.cond)


def combine(x: torch.Tensor, g: torch.Tensor, mult: Mult) -> torch.Tensor:
    """``x + g * m`` rounded as A1111's ``x + linear(x) * m`` rounds it: the product first, then
    the sum. A fused ``torch.add(x, g, alpha=m)`` rounds once; its 1e-6 differences grew to 6/255
    over four sampling steps in the real SD.Next (``<hypernet:...:-0.7>``), for an extra pass over
    ``g`` that costs well under 1% of a step (docs/speed.md)."""
    value = mult.value_for(x)
    if isinstance(value, float) and value == 1.0:
        return x + g
    return x + g * value


# -- what a module is made of ---------------------------------------------------------------------
@dataclass(eq=False)
class ModuleInfo:
    """Facts about one hypernetwork module that decide which fast path may serve it."""

    module: HypernetworkModule
    params: list[torch.Tensor]
    affine: bool
    row_independent: bool
    mlp_macs_per_row: int
    width: int

    @classmethod
    def of(cls, module: HypernetworkModule) -> ModuleInfo:
        layers = list(module.linear)
        kinds = [type(layer) for layer in layers]
        linears = [layer for layer in layers if isinstance(layer, nn.Linear)]
        return cls(
            module=module,
            params=list(module.parameters()),
            affine=all(issubclass(kind, (nn.Linear, nn.Dropout)) for kind in kinds),
            row_independent=not any(issubclass(kind, ROW_COUPLING_ACTIVATIONS) for kind in kinds),
            mlp_macs_per_row=sum(layer.in_features * layer.out_features for layer in linears),
            width=module.width,
        )

    def token(self) -> tuple:
        """Changes whenever a parameter is replaced or modified in place."""
        return tuple((p.data_ptr(), version_of(p), p.dtype, p.device) for p in self.params)

    def needs_grad(self) -> bool:
        return self.module.training or any(p.requires_grad for p in self.params)

    @property
    def composite_is_cheaper(self) -> bool:
        """Applying the composed matrix costs width² per row; the layers cost their MACs."""
        return self.affine and self.width * self.width < self.mlp_macs_per_row


def needs_autograd(x: torch.Tensor, infos: Sequence[ModuleInfo], extra: Sequence[torch.Tensor] = ()) -> bool:
    """Whether this call must keep the plain, differentiable computation."""
    if any(info.module.training for info in infos):
        return True
    if not torch.is_grad_enabled():
        return False
    return x.requires_grad or any(info.needs_grad() for info in infos) or any(t.requires_grad for t in extra)


def version_of(tensor: torch.Tensor) -> int | None:
    """``tensor._version``, or None for an inference tensor, which has no version counter.

    Forge and reForge sample inside ``torch.inference_mode()``, where every new tensor (row flags,
    hidden states, copies of networks moved there) is one; reading ``_version`` raises. Such a
    tensor can be changed in place only inside inference mode, which nothing of ours does to the
    tensors keyed here (our own copies, row flags, the input of one attention call); the text
    context cache compares them by value instead.
    """
    return None if tensor.is_inference() else tensor._version


# -- the engine -------------------------------------------------------------------------------------
@dataclass(eq=False)
class _Pending:
    """The other path's output, computed together with this one, waiting for its own call."""

    site: tuple
    source: torch.Tensor
    version: int | None
    key: tuple
    output: torch.Tensor


CPU_BATCHED_OUTPUT_LIMIT = 1 << 22  # elements (16 MiB in float32); see Engine._batches_first_layers


class Engine:
    """Computes stage lists quickly and keeps what can be reused (all caches die with ``clear``)."""

    # Whether the first layers of a key/value pair run as one batched GEMM; None: decide per call.
    batch_first_layers: bool | None = None

    def __init__(self) -> None:
        self.stats: collections.Counter[str] = collections.Counter()
        self.contexts = ContextCache(self.stats)
        self._infos: dict[int, ModuleInfo] = {}
        self._converted: dict[tuple, HypernetworkModule] = {}
        self._affine: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._pairs: dict[tuple, _PairPlan] = {}
        self._pairable: dict[tuple, tuple] = {}
        self._pending: _Pending | None = None
        self._pair_hits: dict[tuple, int] = {}
        self._pair_misses: dict[tuple, int] = {}
        self._unpaired: set[tuple] = set()

    def clear(self) -> None:
        self._infos.clear()
        self._converted.clear()
        self._affine.clear()
        self._pairs.clear()
        self._pairable.clear()
        self._pending = None
        self._pair_hits.clear()
        self._pair_misses.clear()
        self._unpaired.clear()
        self.contexts.clear()

    # -- what is kept, and letting it go ---------------------------------------------------------
    def held_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """``(kind, tensor)`` for every tensor the caches keep (kinds of :mod:`hypernetwork_ext.memory`)."""
        held = [("network_copies", p) for copy in self._converted.values() for p in copy.parameters()]
        held += [("composites", t) for pair in self._affine.values() for t in pair]
        held += [("paired_layers", t) for plan in self._pairs.values() for t in (plan.weights, plan.biases)]
        return held + [("contexts", t) for t in self.contexts.tensors()]

    def release(self, keep: set[torch.device] | None = None) -> None:
        """Drop what is kept on devices other than ``keep`` (everything when None); it is rebuilt
        when needed."""
        for cache in (self._converted, self._affine, self._pairs):
            for key in [key for key in cache if keep is None or key[-2] not in keep]:  # keys end (device, dtype)
                del cache[key]
        self.contexts.release(keep)
        self._pending = None

    # -- module facts and copies --------------------------------------------------------------
    def info(self, module: HypernetworkModule) -> ModuleInfo:
        info = self._infos.get(id(module))
        if info is None or info.module is not module:
            info = self._infos[id(module)] = ModuleInfo.of(module)
        return info

    def module_on(self, info: ModuleInfo, device: torch.device, dtype: torch.dtype) -> HypernetworkModule:
        """The module itself, or a cached eval-mode copy on another device/dtype."""
        reference = info.params[0] if info.params else None
        if reference is None or (reference.device == device and reference.dtype == dtype):
            return info.module
        key = (id(info.module), info.token(), device, dtype)
        copy = self._converted.get(key)
        if copy is None:
            copy = copy_module(info.module).to(device=device, dtype=dtype)
            self._converted[key] = copy
        return copy

    def affine(self, info: ModuleInfo, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, a)`` with ``mlp(x) = x @ A.T + a`` for an affine module (Dropout is off at inference)."""
        key = (id(info.module), info.token(), device, dtype)
        found = self._affine.get(key)
        if found is None:
            with torch.no_grad(), exact(device):
                matrix = vector = None
                for layer in info.module.linear:
                    if not isinstance(layer, nn.Linear):
                        continue
                    weight = layer.weight.to(device=device, dtype=dtype)
                    bias = layer.bias.to(device=device, dtype=dtype)
                    matrix = weight if matrix is None else weight @ matrix
                    vector = bias if vector is None else torch.addmv(bias, weight, vector)
                found = (matrix.contiguous(), vector.contiguous())
            self._affine[key] = found
        return found

    # -- running stages ---------------------------------------------------------------------------
    def mlp(self, x: torch.Tensor, info: ModuleInfo) -> torch.Tensor:
        """The module's network output before its multiplier and residual."""
        if info.composite_is_cheaper:
            matrix, vector = self.affine(info, x.device, x.dtype)
            return F.linear(x, matrix, vector)
        for layer in self.module_on(info, x.device, x.dtype).linear:
            x = layer.forward(x)  # not layer(x): no hooks on our own modules, less call overhead
        return x

    def can_pair(self, first: ModuleInfo, second: ModuleInfo) -> bool:
        key = (id(first.module), id(second.module))
        found = self._pairable.get(key)
        if found is None or found[0] is not first or found[1] is not second:
            found = self._pairable[key] = (first, second, _same_shape_modules(first, second))
        return found[2]

    def run_stage(self, x: torch.Tensor, info: ModuleInfo, mult: Mult) -> torch.Tensor:
        """One stage on one path: ``x + m * mlp(x)``; rows with a zero multiplier are skipped."""
        subset = _zero_row_subset([info], [mult], x)
        if subset is not None:
            return _on_rows(x, subset, lambda part: self.run_stage(part, info, mult.only_cond()))
        return combine(x, self.mlp(x, info), mult)

    def run_stages(self, x: torch.Tensor, stages: Sequence[tuple[ModuleInfo, Mult]]) -> torch.Tensor:
        if not stages:
            return x
        infos = [info for info, _ in stages]
        mults = [mult for _, mult in stages]
        subset = _zero_row_subset(infos, mults, x)
        if subset is not None:
            self.stats["zero_rows_skipped"] += 1
            cond_only = [(info, mult.only_cond()) for info, mult in stages]
            return _on_rows(x, subset, lambda part: self.run_stages(part, cond_only))
        for info, mult in stages:
            x = self.run_stage(x, info, mult)
        return x

    def run_two_paths(
        self, x: torch.Tensor, first: Sequence[tuple[ModuleInfo, Mult]], second: Sequence[tuple[ModuleInfo, Mult]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both paths from one input; their first stages share one GEMM when they come from the
        same network (the key and value modules of one width)."""
        (info_a, mult_a), (info_b, mult_b) = first[0], second[0]
        plan = None
        if mult_a.rows_key == mult_b.rows_key and _zero_row_subset([info_a, info_b], [mult_a, mult_b], x) is None:
            plan = self.batched_pair(info_a, info_b, x)
        if plan is None:
            return self.run_stages(x, first), self.run_stages(x, second)
        self.stats["paired_first_layers"] += 1
        g_a, g_b = plan.run(x)
        y_a, y_b = combine(x, g_a, mult_a), combine(x, g_b, mult_b)
        return self.run_stages(y_a, first[1:]), self.run_stages(y_b, second[1:])

    def batched_pair(self, info_a: ModuleInfo, info_b: ModuleInfo, x: torch.Tensor) -> _PairPlan | None:
        """The plan that runs both modules' first layers as one GEMM on ``x``, where that pays."""
        if not self.can_pair(info_a, info_b):
            return None
        plan = self.pair_plan(info_a, info_b, x.device, x.dtype)
        if not self._batches_first_layers(x, plan):
            return None
        if not plan.matches_apart(x):
            self.stats["pairs_unlike_apart"] += 1
            return None
        return plan

    def _batches_first_layers(self, x: torch.Tensor, plan: _PairPlan) -> bool:
        """One batched GEMM saves a launch on a GPU. On CPU, where the GEMMs are compute bound, it
        paid only while its output stays cache-sized: measured interleaved on SD1.5's UNet, it was
        4% of A1111's overhead better at 256x256 (2 threads) and 9% worse at 512x512 (1 thread),
        whose largest layers give 10.5 M-element outputs."""
        if self.batch_first_layers is not None:
            return self.batch_first_layers
        if x.device.type != "cpu":
            return True
        rows = x.numel() // max(x.shape[-1], 1)
        return 2 * rows * plan.weights.shape[-1] <= CPU_BATCHED_OUTPUT_LIMIT

    def pair_plan(self, info_a: ModuleInfo, info_b: ModuleInfo, device: torch.device, dtype: torch.dtype) -> _PairPlan:
        key = (id(info_a.module), id(info_b.module), info_a.token(), info_b.token(), device, dtype)
        plan = self._pairs.get(key)
        if plan is None:
            if info_a.composite_is_cheaper and info_b.composite_is_cheaper:
                plan = _PairPlan.for_affine(self.affine(info_a, device, dtype), self.affine(info_b, device, dtype))
            else:
                plan = _PairPlan.for_layers(
                    self.module_on(info_a, device, dtype), self.module_on(info_b, device, dtype)
                )
            self._pairs[key] = plan
        return plan

    # -- handing the other path's output to its own hook -------------------------------------------
    def pairs(self, site: tuple) -> bool:
        """Whether computing the other path along is worth it at this kind of site."""
        return site not in self._unpaired

    def offer(self, site: tuple, source: torch.Tensor, key: tuple, output: torch.Tensor) -> None:
        left = self._pending
        if left is not None:  # never asked for: this host calls to_k and to_v with other tensors here
            misses = self._pair_misses[left.site] = self._pair_misses.get(left.site, 0) + 1
            if misses >= 4 and not self._pair_hits.get(left.site):
                self._unpaired.add(left.site)
        self._pending = _Pending(site, source, version_of(source), key, output)

    def take(self, source: torch.Tensor, key: tuple) -> torch.Tensor | None:
        pending = self._pending
        if (
            pending is None
            or pending.source is not source
            or pending.version != version_of(source)
            or pending.key != key
        ):
            return None
        self._pending = None
        self._pair_hits[pending.site] = self._pair_hits.get(pending.site, 0) + 1
        self.stats["paired_calls"] += 1
        return pending.output

    def drop_pending(self) -> None:
        self._pending = None


def _same_shape_modules(a: ModuleInfo, b: ModuleInfo) -> bool:
    """The key and value modules of one network and width: built from the same architecture."""
    return (
        a.width == b.width
        and a.affine == b.affine
        and [type(layer) for layer in a.module.linear] == [type(layer) for layer in b.module.linear]
        and [p.shape for p in a.params] == [p.shape for p in b.params]
    )


def _zero_row_subset(infos: Sequence[ModuleInfo], mults: Sequence[Mult], x: torch.Tensor) -> tuple[int, ...] | None:
    """The rows to compute when every stage leaves the flagged rows alone (``uncond=0``)."""
    first = mults[0]
    if first.rows_key is None or any(m.rows_key != first.rows_key or m.uncond != 0.0 for m in mults):
        return None
    if not all(info.row_independent for info in infos):
        return None
    return tuple(index for index, flagged in enumerate(first.rows_key) if not flagged)


def _on_rows(x: torch.Tensor, rows: tuple[int, ...], compute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``compute`` on some batch rows, the others unchanged; index tensors, not masks, so that a
    GPU never has to report how many rows a mask selects."""
    if not rows:
        return x
    index = torch.tensor(rows, dtype=torch.long).to(x.device, non_blocking=True)
    return x.index_copy(0, index, compute(x.index_select(0, index)))


class _PairPlan:
    """The first Linear of two same-shaped modules on one input, as one batched GEMM.

    The result is laid out path by path (``[2, rows, hidden]``), so each path continues with its
    own layers on a contiguous tensor: a joint ``[rows, 2 * hidden]`` layout would make every
    following layer read strided halves or copy them (measured slower on CPU at 2048x320).
    """

    def __init__(self, weights: torch.Tensor, biases: torch.Tensor, rests: tuple, firsts: tuple):
        self.weights = weights  # [2, in, hidden]: transposed first-layer weights, one per path
        self.biases = biases  # [2, 1, hidden]
        self.rests = rests  # per path: the layers after the first Linear
        self.firsts = firsts  # per path: (weight, bias) as the unpaired path applies them (no copies)
        self._matches: dict[tuple, bool] = {}

    @classmethod
    def for_affine(cls, first: tuple[torch.Tensor, torch.Tensor], second: tuple[torch.Tensor, torch.Tensor]):
        weights = torch.stack([first[0].t(), second[0].t()]).contiguous()
        biases = torch.stack([first[1], second[1]]).unsqueeze(1)
        return cls(weights, biases, ((), ()), (first, second))

    @classmethod
    def for_layers(cls, first: HypernetworkModule, second: HypernetworkModule):
        layers = list(first.linear), list(second.linear)
        weights = torch.stack([layers[0][0].weight.detach().t(), layers[1][0].weight.detach().t()]).contiguous()
        biases = torch.stack([layers[0][0].bias.detach(), layers[1][0].bias.detach()]).unsqueeze(1)
        rests = tuple(tuple(layer.forward for layer in path_layers[1:]) for path_layers in layers)
        firsts = tuple((path_layers[0].weight.detach(), path_layers[0].bias.detach()) for path_layers in layers)
        return cls(weights, biases, rests, firsts)

    def matches_apart(self, x: torch.Tensor) -> bool:
        """Whether the batched GEMM gives, on inputs shaped like ``x``, the bits of the two separate
        ones: the fast paths round as A1111's formula does. A library may take another kernel for
        a batched GEMM (cuBLAS chooses per shape) whose sums round in another order; on CPU (torch
        2.13) it gave the same bits for every SD1.5 shape measured. Checked once per input shape."""
        key = (tuple(x.shape), x.device, x.dtype, autocast_state(x.device))
        found = self._matches.get(key)
        if found is None:
            paired = self._first_layers(x)
            found = all(
                torch.equal(output, F.linear(x, weight, bias))
                for output, (weight, bias) in zip(paired, self.firsts, strict=True)
            )
            if len(self._matches) >= 16:
                self._matches.clear()
            self._matches[key] = found
        return found

    def _first_layers(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = x.reshape(-1, x.shape[-1])
        joint = torch.baddbmm(self.biases, rows.expand(2, -1, -1), self.weights)
        shape = (*x.shape[:-1], joint.shape[-1])  # the input's dimensions: softmax's legacy dim
        return joint[0].view(shape), joint[1].view(shape)

    def run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        first, second = self._first_layers(x)
        for forward in self.rests[0]:
            first = forward(first)
        for forward in self.rests[1]:
            second = forward(second)
        return first, second


def copy_module(module: HypernetworkModule) -> HypernetworkModule:
    import copy

    twin = copy.deepcopy(module)
    twin.eval()
    for parameter in twin.parameters():
        parameter.requires_grad_(False)
    return twin


# -- the text context, recognised by value ---------------------------------------------------------
@dataclass(eq=False)
class _ContextEntry:
    copy: torch.Tensor
    seen: torch.Tensor
    seen_version: int | None
    outputs: collections.OrderedDict = field(default_factory=collections.OrderedDict)

    def matches(self, x: torch.Tensor) -> bool:
        return (
            self.copy.shape == x.shape
            and self.copy.dtype == x.dtype
            and self.copy.device == x.device
            and torch.equal(self.copy, x)
        )

    def get(self, key: tuple) -> torch.Tensor | None:
        found = self.outputs.get(key)
        if found is not None:
            self.outputs.move_to_end(key)
        return found

    def put(self, key: tuple, value: torch.Tensor) -> None:
        self.outputs[key] = value
        self.outputs.move_to_end(key)
        while len(self.outputs) > OUTPUTS_PER_CONTEXT:
            self.outputs.popitem(last=False)


class ContextCache:
    """Rewritten contexts, per context value; a few contexts are kept (cond/uncond run apart,
    regional prompts). The same tensor object is recognised without reading it; a new object is
    compared by value with the kept copy, once."""

    def __init__(self, stats: collections.Counter) -> None:
        self.stats = stats
        self._entries: list[_ContextEntry] = []
        self._misses_in_a_row = 0
        self.bypass = False

    def clear(self) -> None:
        self._entries.clear()
        self._misses_in_a_row = 0
        self.bypass = False

    def tensors(self) -> list[torch.Tensor]:
        return [t for entry in self._entries for t in (entry.copy, entry.seen, *entry.outputs.values())]

    def release(self, keep: set[torch.device] | None = None) -> None:
        self._entries = [entry for entry in self._entries if keep is not None and entry.copy.device in keep]

    def entry_for(self, x: torch.Tensor) -> _ContextEntry | None:
        if self.bypass:
            return None
        version = version_of(x)
        if version is not None:  # an inference tensor is recognised by value only
            for index, entry in enumerate(self._entries):
                if entry.seen is x and entry.seen_version == version:
                    return self._found(index)
        for index, entry in enumerate(self._entries):
            if entry.matches(x):
                entry.seen, entry.seen_version = x, version
                return self._found(index)
        self._misses_in_a_row += 1
        self.stats["context_misses"] += 1
        if self._misses_in_a_row > MISSES_BEFORE_BYPASS:
            # The input changes at every call: this is not a text context; stop paying for copies.
            self.bypass = True
            self._entries.clear()
            return None
        entry = _ContextEntry(x.detach().clone(), x, version)
        self._entries.insert(0, entry)
        del self._entries[CONTEXTS_KEPT:]
        return entry

    def _found(self, index: int) -> _ContextEntry:
        self._misses_in_a_row = 0
        entry = self._entries[index]
        if index:
            self._entries.insert(0, self._entries.pop(index))
        return entry


# -- folding into to_k / to_v -----------------------------------------------------------------------
def is_torch_linear_forward(function: object) -> bool:
    """torch's own ``nn.Linear.forward``, recognised by name because a host may have replaced the
    class attribute before this module was imported (A1111's Lora does at start-up)."""
    return (
        getattr(function, "__module__", None) == "torch.nn.modules.linear"
        and getattr(function, "__qualname__", None) == "Linear.forward"
    )


# float8 storage (A1111's and Forge's fp8 option) is cast at every call by the host; a fold stored
# in float8 would round the networks away.
FOLDABLE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def foldable_projection(projection: nn.Module) -> bool:
    """A plain Linear whose forward nobody has replaced on the instance."""
    return (
        isinstance(projection, nn.Linear)
        and "forward" not in projection.__dict__
        and foldable_weight(getattr(projection, "weight", None))
    )


def foldable_weight(weight: object) -> bool:
    """A weight a fold can follow: an inference tensor is not, because changes to it in place
    cannot be seen (see :func:`version_of`)."""
    return (
        isinstance(weight, torch.Tensor)
        and weight.dim() == 2
        and weight.dtype in FOLDABLE_DTYPES
        and weight.device.type != "meta"
        and not weight.is_inference()
    )


def fold_weights(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    affines: Sequence[tuple[torch.Tensor, torch.Tensor]],
    multipliers: Sequence[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``W' = W (I + m_n A_n) ... (I + m_1 A_1)`` and the matching bias, in the affines' dtype.

    Stage i maps ``x -> x + m_i (A_i x + a_i)``; walking from the last stage to the first keeps
    every product at ``out x width`` (never ``width x width`` chains).
    """
    dtype = affines[0][0].dtype
    with torch.no_grad(), exact(weight.device):
        return _fold(weight, bias, affines, multipliers, dtype)


def _fold(weight, bias, affines, multipliers, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    folded = weight.detach().to(dtype)
    folded_bias = (
        bias.detach().to(dtype) if bias is not None else torch.zeros(weight.shape[0], dtype=dtype, device=weight.device)
    )
    for (matrix, vector), m in zip(reversed(affines), reversed(multipliers), strict=True):
        folded_bias = torch.addmv(folded_bias, folded, vector, alpha=m)
        folded = torch.addmm(folded, folded, matrix, alpha=m)
    return folded.to(weight.dtype).contiguous(), folded_bias.to(weight.dtype)


def exact(device: torch.device):
    """No autocast: hosts sample under ``torch.autocast``, which would compute these products,
    made once and reused for the whole generation, in half precision."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:  # a device type autocast does not know has no autocast to turn off
        return contextlib.nullcontext()


def autocast_state(device: torch.device) -> tuple:
    """Whether, and in which dtype, autocast computes on this device now (part of cache keys)."""
    try:
        return torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type)
    except (TypeError, AttributeError, RuntimeError):  # torch before 2.4: one function per device
        if device.type == "cpu":
            return torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()
        return torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype()


def fold_dtype(weight: torch.Tensor) -> torch.dtype:
    """Fold in at least float32: half-precision products would round where the plain path does not."""
    return weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32


@dataclass(eq=False)
class _Fold:
    weight: torch.Tensor
    bias: torch.Tensor

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weight, self.bias))


class FoldState:
    """The folded weights of one projection, valid while its weight and the networks are unchanged.

    Every fold is registered with ``budget`` (:class:`~hypernetwork_ext.memory.FoldBudget`),
    which may refuse a new one or evict an old one (:meth:`evict`)."""

    def __init__(self, budget: FoldBudget | None = None) -> None:
        self.budget = budget if budget is not None else FoldBudget(None)
        self.projection_token: tuple | None = None
        self.network_token: tuple | None = None
        self.held: tuple[torch.Tensor, ...] = ()
        self.folds: collections.OrderedDict[tuple, _Fold] = collections.OrderedDict()
        self.first_seen: dict[tuple, float] = {}
        self.refolds_in_a_row = 0
        self.unstable = False

    def clear(self) -> None:
        self.projection_token = self.network_token = None
        self.held = ()
        self._drop_folds()
        self.first_seen.clear()
        self.refolds_in_a_row = 0
        self.unstable = False

    def _drop_folds(self) -> None:
        for signature in self.folds:
            self.budget.removed(self, signature)
        self.folds.clear()
        self.held = ()

    def revalidate(self, projection_token: tuple, network_token: tuple) -> None:
        """Forget folds made from other weights."""
        if projection_token == self.projection_token and network_token == self.network_token:
            return
        if projection_token != self.projection_token and self.folds:
            self.refolds_in_a_row += 1
            if self.refolds_in_a_row >= UNSTABLE_AFTER_REFOLDS:
                # The weights change before every call (offloading that moves them between
                # devices): a fold would cost a matrix product per call, more than the networks.
                # Hold nothing from now on, or offloaded weights would stay on the device.
                self.clear()
                self.unstable = True
                return
        self.projection_token, self.network_token = projection_token, network_token
        self._drop_folds()
        self.first_seen.clear()

    def holds_old_weights(self, current: Sequence[torch.Tensor | None]) -> bool:
        """Whether the tensors kept in ``held`` are no longer the projection's ``current`` ones."""
        pointers = {t.data_ptr() for t in current if t is not None}
        return any(t.data_ptr() not in pointers or t.device.type == "meta" for t in self.held)

    def lookup(self, signature: tuple) -> _Fold | None:
        fold = self.folds.get(signature)
        if fold is not None:
            self.folds.move_to_end(signature)
            self.refolds_in_a_row = 0
            self.budget.used_now(self, signature)
        return fold

    def worth_folding(self, signature: tuple, progress: float | None) -> bool:
        """Fold at once when nothing varies the multipliers over the steps (``progress`` None);
        otherwise when the same signature comes back at a later step: a plateau, not a fade, where
        every step has new multipliers and a fold would serve one call."""
        if self.unstable:
            return False
        if progress is None:
            return True
        if len(self.first_seen) > 64:
            self.first_seen.clear()
        return self.first_seen.setdefault(signature, progress) != progress

    def store(
        self, signature: tuple, weight: torch.Tensor, bias: torch.Tensor, held: tuple[torch.Tensor, ...]
    ) -> _Fold:
        """Keep a fold of the projection's current tensors ``held``. They are kept alive with the
        folds so that their addresses, part of the token, cannot be taken by other weights
        meanwhile; once the projection has other tensors (the host moved or replaced them),
        :meth:`holds_old_weights` tells, and the attachment drops this state at the end of the
        generation, or earlier when the host releases memory."""
        self.held = held
        fold = self.folds[signature] = _Fold(weight, bias)
        self.budget.added(self, signature, fold.nbytes)
        while len(self.folds) > FOLDS_PER_PROJECTION:
            oldest, _ = self.folds.popitem(last=False)
            self.budget.removed(self, oldest)
        return fold

    def evict(self, signature: tuple) -> None:
        """The budget took this fold back (it no longer counts it)."""
        self.folds.pop(signature, None)
        if not self.folds:
            self.held = ()

    def tensors(self) -> list[torch.Tensor]:
        return [t for fold in self.folds.values() for t in (fold.weight, fold.bias)]


def fold_bytes(weight: torch.Tensor) -> int:
    """What the fold of a ``[out, in]`` weight takes: the folded weight and its bias, in its dtype."""
    out_features, in_features = weight.shape
    return out_features * (in_features + 1) * weight.element_size()
