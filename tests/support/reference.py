"""An independent implementation of A1111 v1.10.1's hypernetwork semantics, written from the
host's rules with plain tensor functions, to check the package against.

It shares no code with ``hypernetwork_ext``: it walks a module's raw state dict in the host's
layer order (Linear, activation, LayerNorm, Dropout) and computes ``x + m * mlp(x)``.
"""

from __future__ import annotations

import collections
import io
import pickle
import re
import zipfile

import torch
import torch.nn.functional as F


def _legacy_softmax_dim(x: torch.Tensor) -> int:
    # nn.Softmax() without dim picks 0 for 0-, 1- and 3-dimensional inputs (torch's legacy rule).
    return 0 if x.dim() in (0, 1, 3) else 1


FUNCTIONS = {
    "relu": F.relu,
    "leakyrelu": lambda x: F.leaky_relu(x, 0.01),
    "elu": F.elu,
    "swish": F.hardswish,  # A1111's historical name: Hardswish, not SiLU
    "hardswish": F.hardswish,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "gelu": F.gelu,
    "silu": F.silu,
    "mish": F.mish,
    "softplus": F.softplus,
    "celu": F.celu,
    "selu": F.selu,
    "relu6": F.relu6,
    "hardtanh": F.hardtanh,
    "logsigmoid": F.logsigmoid,
    "softsign": F.softsign,
    "tanhshrink": lambda x: x - torch.tanh(x),
    "hardsigmoid": F.hardsigmoid,
    "softshrink": lambda x: F.softshrink(x, 0.5),
    "hardshrink": lambda x: F.hardshrink(x, 0.5),
    "rrelu": lambda x: F.leaky_relu(x, (1.0 / 8 + 1.0 / 3) / 2),  # eval mode: the mean slope
    "softmax": lambda x: F.softmax(x, dim=_legacy_softmax_dim(x)),
    "softmin": lambda x: F.softmin(x, dim=_legacy_softmax_dim(x)),
    "logsoftmax": lambda x: F.log_softmax(x, dim=_legacy_softmax_dim(x)),
}


def reference_mlp(
    state: dict, layer_structure, activation, layer_norm, dropout_structure, activate_output, *, modules=False
):
    """A callable computing the MLP of one module from its state dict; checks the key indices.

    ``modules`` computes the Linear and LayerNorm layers as ``torch.nn`` modules rather than
    functions, so that a host replacing those classes' ``forward`` (A1111's ``manual_cast``) acts on
    them as it acts on its own networks' layers."""
    consumed: set[str] = set()
    steps = []
    index = 0
    count = len(layer_structure) - 1
    has_activation = activation not in (None, "linear")
    for i in range(count):
        weight, bias = state[f"linear.{index}.weight"], state[f"linear.{index}.bias"]
        consumed |= {f"linear.{index}.weight", f"linear.{index}.bias"}
        steps.append(("linear", weight, bias))
        index += 1
        if has_activation and (i < count - 1 or activate_output):
            if activation == "prelu":
                slope = state[f"linear.{index}.weight"]
                consumed.add(f"linear.{index}.weight")
                steps.append(("fn", lambda x, s=slope: F.prelu(x, s.to(_weight_dtype(x)))))
            else:
                steps.append(("fn", FUNCTIONS[activation]))
            index += 1
        if layer_norm:
            ln_w, ln_b = state[f"linear.{index}.weight"], state[f"linear.{index}.bias"]
            consumed |= {f"linear.{index}.weight", f"linear.{index}.bias"}
            steps.append(("layer_norm", ln_w, ln_b))
            index += 1
        if dropout_structure[i + 1] > 0:
            index += 1  # a Dropout takes an index; identity at inference
    assert consumed == set(state), f"state keys {sorted(state)} != expected {sorted(consumed)}"

    if modules:
        steps = [("fn", _module_of(step)) if step[0] != "fn" else step for step in steps]

    def run(x):
        for step in steps:
            if step[0] == "linear":
                dtype = _weight_dtype(x)
                x = F.linear(x, step[1].to(dtype), step[2].to(dtype))
            elif step[0] == "layer_norm":
                dtype = _weight_dtype(x)
                x = F.layer_norm(x, (step[1].shape[0],), step[1].to(dtype), step[2].to(dtype))
            else:
                x = step[1](x)
        return x

    return run


def _weight_dtype(x: torch.Tensor) -> torch.dtype:
    """Under autocast the layers' weights stay float32, as A1111's float32 modules are (its layer
    norm then computes in float32 with float32 weights); otherwise the input's dtype (float64 for a
    check against the exact formula, a host's bfloat16 where it computes in bfloat16)."""
    try:
        autocast = torch.is_autocast_enabled(x.device.type)
    except TypeError:  # torch before 2.4: one function per device
        autocast = torch.is_autocast_cpu_enabled() if x.device.type == "cpu" else torch.is_autocast_enabled()
    return torch.float32 if autocast else x.dtype


def _module_of(step) -> torch.nn.Module:
    kind, weight, bias = step
    layer = (
        torch.nn.Linear(weight.shape[1], weight.shape[0]) if kind == "linear" else torch.nn.LayerNorm(weight.shape[0])
    )
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    return layer.eval()


def reference_module(state, arch: dict, multiplier: float, *, modules: bool = False):
    """``x + mlp(x) * m``: in lower precision the product is rounded before the sum, as in A1111."""
    mlp = reference_mlp(
        state,
        arch["layer_structure"],
        arch["activation_func"],
        arch["is_layer_norm"],
        arch["dropout_structure"],
        arch["activate_output"],
        modules=modules,
    )
    return lambda x: x + mlp(x) * multiplier


def arch_of(network) -> dict:
    a = network.architecture
    return {
        "layer_structure": list(a.layer_structure),
        "activation_func": a.activation_func,
        "is_layer_norm": a.is_layer_norm,
        "dropout_structure": list(a.dropout_structure),
        "activate_output": a.activate_output,
    }


class RefProjection(torch.nn.Module):
    """Wraps a to_k/to_v projection: rewrites its input with reference modules, then projects."""

    def __init__(self, projection, stages):
        super().__init__()
        self.projection = projection
        self.stages = stages  # list of {width: callable}

    def forward(self, x):
        for by_width in self.stages:
            fn = by_width.get(x.shape[-1])
            if fn is not None:
                x = fn(x)
        return self.projection(x)


def reference_model(model, entries, *, key_factor=None, modules=False):
    """A deep copy of ``model`` whose to_k/to_v inputs go through the reference formula.

    ``entries`` is a list of (network, multiplier); ``key_factor(site_name, path)`` may scale the
    multiplier per attention module and path; ``modules``: see ``reference_mlp``.
    """
    import copy

    twin = copy.deepcopy(model)
    for name, module in twin.named_modules():
        if not (hasattr(module, "to_k") and hasattr(module, "to_v")):
            continue
        for path, attr, index in (("key", "to_k", 0), ("value", "to_v", 1)):
            stages = []
            for network, multiplier in entries:
                factor = key_factor(name, path) if key_factor else 1.0
                arch = arch_of(network)
                stages.append(
                    {
                        width: reference_module(
                            {k: v.detach().clone() for k, v in pair[index].state_dict().items()},
                            arch,
                            multiplier * factor,
                            modules=modules,
                        )
                        for width, pair in network.layers.items()
                    }
                )
            setattr(module, attr, RefProjection(getattr(module, attr), stages))
    return twin


# --- A1111 1.10.1's own file safety check and loader, re-implemented from its rules -------------

_A1111_ZIP_NAMES = re.compile(r"^([^/]+)/((data/\d+)|version|(data\.pkl))$")
_A1111_ALLOWED = {
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_device_tensor_from_numpy"),
    *(
        ("torch", n)
        for n in (
            "FloatStorage",
            "HalfStorage",
            "IntStorage",
            "LongStorage",
            "DoubleStorage",
            "ByteStorage",
            "float32",
            "BFloat16Storage",
        )
    ),
    ("torch.nn.modules.container", "ParameterDict"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy", "dtype"),
    ("numpy", "ndarray"),
    ("_codecs", "encode"),
    ("__builtin__", "set"),
}


class _A1111Unpickler(pickle.Unpickler):
    def persistent_load(self, saved_id):
        assert saved_id[0] == "storage"
        return torch.storage.TypedStorage(_internal=True)

    def find_class(self, module, name):
        if (module, name) not in _A1111_ALLOWED:
            raise pickle.UnpicklingError(f"global '{module}/{name}' is forbidden")
        if module == "collections":
            return collections.OrderedDict
        if module == "torch._utils":
            return getattr(torch._utils, name)
        if module == "torch":
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"unexpected global {module}.{name}")


def a1111_safety_check(path) -> None:
    """Raise as A1111 1.10.1's ``modules.safe.check_pt`` would for a file it refuses."""
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            if not _A1111_ZIP_NAMES.match(name):
                raise ValueError(f"bad file inside {path}: {name}")
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        assert len(pickles) == 1
        _A1111Unpickler(io.BytesIO(archive.read(pickles[0]))).load()
