"""The hypernetwork model, built exactly as AUTOMATIC1111 v1.10.1 builds it.

For each attention width a pair of residual MLPs rewrites the key input and the value input of
attention: ``k_in = x + m * mlp_k(x)``, ``v_in = x + m * mlp_v(x)``. The layer order inside each
MLP, and therefore the ``linear.<index>`` keys of its state dict, follow the host:
Linear, then the activation (unless none, or the output layer without ``activate_output``), then
LayerNorm, then Dropout, for every Linear.
"""

from __future__ import annotations

import copy
import inspect
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from .errors import InvalidConfigError
from .families import FAMILIES, infer_family

# The host's historical names first (``swish`` is Hardswish there, not SiLU), then every class of
# torch.nn.modules.activation by lower-case name, as A1111 builds its table.
_HISTORICAL_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "leakyrelu": nn.LeakyReLU,
    "elu": nn.ELU,
    "swish": nn.Hardswish,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}
ACTIVATIONS: dict[str, type[nn.Module]] = dict(_HISTORICAL_ACTIVATIONS)
ACTIVATIONS.update(
    {
        name.lower(): cls
        for name, cls in inspect.getmembers(torch.nn.modules.activation, inspect.isclass)
        if cls.__module__ == "torch.nn.modules.activation"
    }
)
NO_ACTIVATION = "linear"
WEIGHT_INITS = ("Normal", "XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal")
DEFAULT_WIDTHS = (768, 320, 640, 1280)


def activation_names() -> list[str]:
    """Every activation name a network may declare, in the order A1111's dropdown shows them."""
    historical = [NO_ACTIVATION, *_HISTORICAL_ACTIVATIONS]
    return historical + [name for name in ACTIVATIONS if name not in historical]


def usable_activation_names() -> list[str]:
    """Activation names that can actually be built and keep the width (for menus)."""
    return [name for name in activation_names() if _activation_problem(name) is None]


def is_no_activation(name: str | None) -> bool:
    return name is None or name == NO_ACTIVATION


def _activation_problem(name: str | None) -> str | None:
    """Why an activation cannot be used, or None when it can."""
    if is_no_activation(name):
        return None
    cls = ACTIVATIONS.get(name)
    if cls is None:
        return f"unknown activation {name!r} (known: {', '.join(activation_names())})"
    try:
        module = cls()
    except Exception as exc:  # constructors that need arguments (Threshold, MultiheadAttention)
        return f"activation {name!r} cannot be built without arguments ({exc})"
    probe = torch.zeros(1, 2, 8)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # softmax & co. warn about their implicit dimension
            out = module(probe)
    except Exception as exc:
        return f"activation {name!r} fails on a (batch, tokens, width) input ({exc})"
    if not isinstance(out, torch.Tensor) or out.shape != probe.shape:
        return f"activation {name!r} changes the shape of its input, so the next layer cannot follow"
    return None


def parse_dropout_structure(
    layer_structure: Sequence[float], use_dropout: bool, last_layer_dropout: bool
) -> list[float]:
    """The legacy rule that turns ``use_dropout``/``last_layer_dropout`` into per-layer probabilities."""
    if not use_dropout:
        return [0.0] * len(layer_structure)
    values = [0.0] + [0.3] * (len(layer_structure) - 3)
    values.append(0.3 if last_layer_dropout else 0.0)
    values.append(0.0)
    return values


@dataclass(frozen=True)
class Architecture:
    """Everything that decides the shape and behaviour of each module of a network.

    Values are kept as the file or the caller gave them (``layer_structure`` may hold ints or
    floats), so that saving writes them back unchanged.
    """

    layer_structure: tuple[float, ...] = (1, 2, 1)
    activation_func: str | None = None
    is_layer_norm: bool = False
    dropout_structure: tuple[float, ...] = (0, 0, 0)
    activate_output: bool = False
    weight_initialization: str = "Normal"
    use_dropout: bool = False
    last_layer_dropout: bool = False

    @property
    def activation(self) -> str:
        """The activation name with "no activation" spelled ``linear``."""
        return NO_ACTIVATION if is_no_activation(self.activation_func) else str(self.activation_func)

    @property
    def is_affine(self) -> bool:
        """True when each module is an affine map of its input (at inference, dropout being off)."""
        return is_no_activation(self.activation_func) and not self.is_layer_norm

    @property
    def has_dropout(self) -> bool:
        return any(p > 0 for p in self.dropout_structure[1 : len(self.layer_structure)])

    def hidden_widths(self, width: int) -> list[int]:
        return [int(width * factor) for factor in self.layer_structure]

    def problems(self, *, strict: bool = True) -> list[str]:
        """What is wrong with this architecture; empty when it can be built.

        ``strict`` applies the rules for new networks. Loading is as lenient as the host: negative
        dropout entries mean "no dropout" there, so they are accepted when not strict.
        """
        found: list[str] = []
        structure = self.layer_structure
        if len(structure) < 2:
            found.append(f"layer structure {list(structure)} needs at least two entries")
        elif structure[0] != 1 or structure[-1] != 1:
            found.append(f"layer structure {list(structure)} must start and end with 1")
        for factor in structure:
            if (
                not isinstance(factor, (int, float))
                or isinstance(factor, bool)
                or not math.isfinite(factor)
                or factor <= 0
            ):
                found.append(f"layer structure entry {factor!r} must be a positive number")
        dropout = self.dropout_structure
        if len(dropout) < len(structure):
            found.append(
                f"dropout structure {list(dropout)} has {len(dropout)} entries, layer structure has {len(structure)}"
            )
        elif strict and len(dropout) != len(structure):
            found.append(f"dropout structure {list(dropout)} must have one entry per layer structure entry")
        for p in dropout[1 : len(structure)]:
            if p >= 1 or (strict and p < 0) or not math.isfinite(p):
                found.append(f"dropout probability {p!r} must be in [0, 1)")
        problem = _activation_problem(self.activation_func)
        if problem:
            found.append(problem)
        if strict and self.weight_initialization not in WEIGHT_INITS:
            found.append(
                f"weight initialisation {self.weight_initialization!r} is not one of {', '.join(WEIGHT_INITS)}"
            )
        return found

    def check(self, *, strict: bool = True) -> None:
        found = self.problems(strict=strict)
        if found:
            raise InvalidConfigError("; ".join(found))

    def check_width(self, width: int) -> None:
        if not isinstance(width, int) or isinstance(width, bool) or width <= 0:
            raise InvalidConfigError(f"width {width!r} must be a positive integer")
        hidden = self.hidden_widths(width)
        if min(hidden) < 1:
            raise InvalidConfigError(
                f"layer structure {list(self.layer_structure)} gives a layer of width 0 at width {width}: {hidden}"
            )


class HypernetworkModule(nn.Module):
    """One residual MLP: ``x + m * linear(x)``; the multiplier is ignored while training."""

    def __init__(self, width: int, architecture: Architecture, *, device: torch.device | str | None = None):
        super().__init__()
        self.width = width
        self.multiplier = 1.0
        self.linear = nn.Sequential(*_build_layers(width, architecture, device))

    def forward(self, x: torch.Tensor, multiplier: float | torch.Tensor | None = None) -> torch.Tensor:
        if self.training:
            return x + self.linear(x)
        m = self.multiplier if multiplier is None else multiplier
        return x + self.linear(x) * m


def _build_layers(width: int, arch: Architecture, device) -> list[nn.Module]:
    hidden = arch.hidden_widths(width)
    count = len(hidden) - 1
    activation = None if is_no_activation(arch.activation_func) else ACTIVATIONS[arch.activation_func]
    layers: list[nn.Module] = []
    for i in range(count):
        layers.append(nn.Linear(hidden[i], hidden[i + 1], device=device))
        is_output = i >= count - 1
        if activation is not None and not (is_output and not arch.activate_output):
            layers.append(activation())
        if arch.is_layer_norm:
            layers.append(nn.LayerNorm(hidden[i + 1], device=device))
        p = arch.dropout_structure[i + 1]
        if p > 0:
            layers.append(nn.Dropout(p=p))
    return layers


def _initialise(module: HypernetworkModule, arch: Architecture, generator: torch.Generator | None) -> None:
    """A1111's initialisation, LayerNorm quirk included: its weight is drawn like a Linear's
    under "Normal", whatever option was chosen.

    The numbers are drawn with the tensors' own ``normal_``/``uniform_``, exactly as the
    ``torch.nn.init`` function of each scheme draws them, not through ``nn.init``: A1111 replaces
    those functions with no-ops process-wide while it loads a checkpoint (at start and at every
    switch), and a network created meanwhile would keep uninitialised memory. This also gives a
    seeded stream on torch before 2.2 (A1111 1.10 ships 2.1.2), whose ``nn.init`` takes no generator.
    """
    gain = nn.init.calculate_gain("leaky_relu" if arch.activation_func == "leakyrelu" else "relu", 0)
    with torch.no_grad():
        for layer in module.linear:
            if isinstance(layer, nn.PReLU):  # the one activation with a weight: torch's own start value
                layer.weight.fill_(layer.init)
            if type(layer) not in (nn.Linear, nn.LayerNorm):
                continue
            scheme = "Normal" if type(layer) is nn.LayerNorm else arch.weight_initialization
            _draw_weight(layer.weight, scheme, gain, generator)
            layer.bias.zero_()


def _draw_weight(weight: torch.Tensor, scheme: str, gain: float, generator: torch.Generator | None) -> None:
    if scheme == "Normal":
        weight.normal_(0.0, 0.01, generator=generator)
        return
    fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(weight)
    std = math.sqrt(2.0 / (fan_in + fan_out)) if scheme.startswith("Xavier") else gain / math.sqrt(fan_in)
    if scheme.endswith("Uniform"):
        bound = math.sqrt(3.0) * std
        weight.uniform_(-bound, bound, generator=generator)
    else:
        weight.normal_(0.0, std, generator=generator)


@dataclass
class NetworkInfo:
    """What a file says about a network besides its weights."""

    name: str = "hypernetwork"
    step: int = 0
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None
    optional_info: str | None = None
    model_family: str | None = None
    extra: dict = field(default_factory=dict)


class Hypernetwork(nn.Module):
    """A set of (key, value) module pairs, one pair per attention width.

    ``layers`` maps each width to its ``(key_module, value_module)`` pair, in the order of the file.
    """

    def __init__(
        self,
        architecture: Architecture,
        widths: Iterable[int],
        info: NetworkInfo | None = None,
        *,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        architecture.check(strict=False)
        widths = list(widths)
        if len(set(widths)) != len(widths):
            raise InvalidConfigError(f"widths {widths} list the same width twice")
        for width in widths:
            architecture.check_width(width)
        self.architecture = architecture
        self.info = info or NetworkInfo()
        self.filename: str | None = None
        self.pairs = nn.ModuleDict(
            {
                str(width): nn.ModuleList([HypernetworkModule(width, architecture, device=device) for _ in range(2)])
                for width in widths
            }
        )
        self.eval()

    # -- structure -------------------------------------------------------------------------
    @property
    def layers(self) -> dict[int, tuple[HypernetworkModule, HypernetworkModule]]:
        return {int(width): (pair[0], pair[1]) for width, pair in self.pairs.items()}

    @property
    def widths(self) -> list[int]:
        return [int(width) for width in self.pairs]

    @property
    def name(self) -> str:
        return self.info.name

    @name.setter
    def name(self, value: str) -> None:
        self.info.name = value

    @property
    def step(self) -> int:
        return self.info.step

    @step.setter
    def step(self, value: int) -> None:
        self.info.step = int(value)

    @property
    def family(self) -> str | None:
        """The declared model family, or the one the widths imply."""
        return self.info.model_family or infer_family(self.widths)

    @property
    def is_affine(self) -> bool:
        return self.architecture.is_affine

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def set_multiplier(self, multiplier: float) -> Hypernetwork:
        for key_module, value_module in self.layers.values():
            key_module.multiplier = value_module.multiplier = multiplier
        return self

    def train(self, mode: bool = True) -> Hypernetwork:
        """Training mode also makes the weights trainable, evaluation mode freezes them (as A1111)."""
        super().train(mode)
        for parameter in self.parameters():
            parameter.requires_grad_(mode)
        return self

    def clone(self) -> Hypernetwork:
        twin = copy.deepcopy(self)
        twin.info = replace(self.info, extra=copy.deepcopy(self.info.extra))
        return twin

    # -- state -----------------------------------------------------------------------------
    def module_state_dicts(self) -> dict[int, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
        """Per width, the (key, value) state dicts with the host's ``linear.<index>.*`` keys."""
        return {width: (pair[0].state_dict(), pair[1].state_dict()) for width, pair in self.layers.items()}

    def describe(self) -> str:
        """A human-readable summary, one fact per line."""
        arch = self.architecture
        family = self.family
        family_label = FAMILIES[family].label if family in FAMILIES else "unknown"
        if self.info.model_family is None and family is not None:
            family_label += " (inferred from widths)"
        lines = [
            f"name: {self.name}",
            f"widths: {', '.join(str(w) for w in self.widths)}",
            f"layer structure: {', '.join(_format_number(f) for f in arch.layer_structure)}",
            f"activation: {arch.activation}" + (" (also on the output layer)" if arch.activate_output else ""),
            f"layer norm: {'yes' if arch.is_layer_norm else 'no'}",
            f"dropout: {', '.join(_format_number(p) for p in arch.dropout_structure)}"
            + ("" if arch.has_dropout else " (none)"),
            f"weight initialisation: {arch.weight_initialization}",
            f"step: {self.step}",
            f"trained on: {_trained_on(self.info)}",
            f"model family: {family_label}",
            f"parameters: {self.parameter_count():,}",
            f"affine (exactly foldable into the attention projections): {'yes' if self.is_affine else 'no'}",
        ]
        if self.info.optional_info:
            lines.append(f"info: {self.info.optional_info}")
        return "\n".join(lines)


def _format_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _trained_on(info: NetworkInfo) -> str:
    if info.sd_checkpoint_name and info.sd_checkpoint:
        return f"{info.sd_checkpoint_name} [{info.sd_checkpoint}]"
    return info.sd_checkpoint_name or info.sd_checkpoint or "unknown"


def new_architecture(
    layer_structure: Sequence[float] = (1, 2, 1),
    activation: str | None = NO_ACTIVATION,
    weight_init: str = "Normal",
    *,
    layer_norm: bool = False,
    dropout_structure: Sequence[float] | None = None,
    use_dropout: bool = False,
    last_layer_dropout: bool = False,
    activate_output: bool = False,
) -> Architecture:
    """The checked architecture of a new network (what :func:`create` builds; no widths needed yet)."""
    structure = tuple(layer_structure)
    if dropout_structure is None:
        dropout = tuple(parse_dropout_structure(structure, use_dropout, last_layer_dropout))
    else:
        dropout = tuple(dropout_structure)
        use_dropout = any(p > 0 for p in dropout)
    arch = Architecture(
        layer_structure=structure,
        activation_func=activation,
        is_layer_norm=bool(layer_norm),
        dropout_structure=dropout,
        activate_output=bool(activate_output),
        weight_initialization=weight_init,
        use_dropout=bool(use_dropout),
        last_layer_dropout=len(dropout) >= 2 and dropout[-2] != 0,
    )
    arch.check(strict=True)
    return arch


def create(
    widths: Iterable[int] = DEFAULT_WIDTHS,
    layer_structure: Sequence[float] = (1, 2, 1),
    activation: str | None = NO_ACTIVATION,
    weight_init: str = "Normal",
    *,
    layer_norm: bool = False,
    dropout_structure: Sequence[float] | None = None,
    use_dropout: bool = False,
    last_layer_dropout: bool = False,
    activate_output: bool = False,
    seed: int | None = None,
    name: str = "hypernetwork",
    model_family: str | None = None,
) -> Hypernetwork:
    """A new network, initialised as A1111 initialises it (optionally from a fixed seed).

    ``dropout_structure`` gives one probability per layer-structure entry; without it,
    ``use_dropout``/``last_layer_dropout`` derive one the legacy way.
    """
    if model_family is not None and model_family not in FAMILIES:
        raise InvalidConfigError(f"model family {model_family!r} is not one of {', '.join(FAMILIES)}")
    arch = new_architecture(
        layer_structure,
        activation,
        weight_init,
        layer_norm=layer_norm,
        dropout_structure=dropout_structure,
        use_dropout=use_dropout,
        last_layer_dropout=last_layer_dropout,
        activate_output=activate_output,
    )
    widths = list(widths)
    if not widths:
        raise InvalidConfigError("a hypernetwork needs at least one width")
    generator = torch.Generator().manual_seed(int(seed)) if seed is not None else None
    # On the meta device and materialised here: torch's default init must not move the caller's
    # RNG, and a host may force new Linears onto meta anyway (A1111's InitializeOnMeta).
    network = Hypernetwork(arch, widths, NetworkInfo(name=name, model_family=model_family), device="meta")
    network.to_empty(device="cpu")
    for key_module, value_module in network.layers.values():
        _initialise(key_module, arch, generator)
        _initialise(value_module, arch, generator)
    return network


def build_from_state(
    architecture: Architecture,
    states: Mapping[int, tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]]],
    info: NetworkInfo,
) -> Hypernetwork:
    """A network whose modules take the given tensors as they are (no copy, no random init).

    Raises InvalidConfigError naming the width, the module and the key when a tensor does not fit
    the structure the architecture declares.
    """
    network = Hypernetwork(architecture, states.keys(), info, device="meta")
    for width, (key_module, value_module) in network.layers.items():
        for role, module, state in (("key", key_module, states[width][0]), ("value", value_module, states[width][1])):
            _check_state(module, state, f"width {width}, {role} module")
            _assign(module, state)
    network.eval()
    return network


def _assign(module: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Make the checked tensors the module's parameters, as ``load_state_dict(assign=True)`` would.

    Not through ``load_state_dict``: A1111 replaces ``nn.Module.load_state_dict`` and
    ``_load_from_state_dict`` process-wide while it loads a checkpoint, with wrappers that take no
    ``assign`` and draw tensors from the checkpoint being loaded.
    """
    for key, tensor in state.items():
        owner_name, _, leaf = key.rpartition(".")
        owner = module.get_submodule(owner_name)
        if leaf in owner._parameters:
            owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=owner._parameters[leaf].requires_grad)
        else:
            owner._buffers[leaf] = tensor


def _check_state(module: nn.Module, state: Mapping[str, torch.Tensor], where: str) -> None:
    expected = {key: tuple(value.shape) for key, value in module.state_dict().items()}
    given = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise InvalidConfigError(f"{where}: entry {key!r} is a {type(value).__name__}, not a tensor")
        given[key] = tuple(value.shape)
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    if missing or unexpected:
        detail = []
        if missing:
            detail.append(f"missing {', '.join(missing)}")
        if unexpected:
            detail.append(f"unexpected {', '.join(unexpected)}")
        raise InvalidConfigError(
            f"{where}: the tensors disagree with the declared structure ({'; '.join(detail)}); "
            f"expected keys {', '.join(sorted(expected))}"
        )
    for key, shape in expected.items():
        if given[key] != shape:
            raise InvalidConfigError(
                f"{where}: {key} has shape {list(given[key])} but the declared structure needs {list(shape)}"
            )
    for key, value in state.items():
        if not value.is_floating_point():
            raise InvalidConfigError(f"{where}: {key} holds {value.dtype} values, not floating point")
