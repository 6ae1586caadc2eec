"""What generating with a network will keep on the UNet's device, worked out before it runs.

The same kinds as :mod:`hypernetwork_ext.memory` measures, for one network on a model family's
full-size layout (:data:`hypernetwork_ext.families.FAMILIES`), as the fast paths build them on a
GPU, where the first layers of every key/value pair run as one batched GEMM. On a CPU fewer
self-attention pairs are batched (see ``Engine._batches_first_layers``), so less is kept. The tests
compare these figures with what the fast paths measurably hold on real UNets.
"""

from __future__ import annotations

from .families import ModelFamily
from .fastpath import ModuleInfo
from .memory import fold_set_bytes
from .network import Hypernetwork


def expected_bytes(
    network: Hypernetwork,
    family: ModelFamily,
    *,
    unet_element_size: int = 2,
    compute_element_size: int = 4,
    folding: bool = True,
) -> dict[str, int]:
    """Bytes per kind for ``network`` alone on ``family``: ``folds`` is one set (the bound and the
    number of multiplier sets decide how many are kept); ``compute_element_size`` is the networks'
    (float32 unless a compute precision is set); ``folding`` is False where the projections are
    not folded (Forge and reForge, whose patches rewrite the inputs)."""
    fold_element_size = max(unet_element_size, 4)  # folding runs in at least float32 (fastpath.fold_dtype)
    kept = {"folds": 0, "network_copies": 0, "composites": 0, "paired_layers": 0}
    for width, (key_module, value_module) in network.layers.items():
        if width == family.context_width:
            _pair(kept, ModuleInfo.of(key_module), ModuleInfo.of(value_module), compute_element_size)
        elif width in family.self_attention_widths:
            key, value = ModuleInfo.of(key_module), ModuleInfo.of(value_module)
            if folding and key.affine:
                kept["composites"] += _composite_bytes(key, fold_element_size) + _composite_bytes(
                    value, fold_element_size
                )
            else:
                _pair(kept, key, value, compute_element_size)
    if folding and network.is_affine:
        kept["folds"] = fold_set_bytes(family.self_attention_layers, network.widths, unet_element_size)
    return kept


def _module_bytes(info: ModuleInfo, element_size: int) -> int:
    return sum(p.numel() for p in info.params) * element_size


def _composite_bytes(info: ModuleInfo, element_size: int) -> int:
    return (info.width * info.width + info.width) * element_size


def _first_layer_pair_bytes(info: ModuleInfo, element_size: int) -> int:
    first = next(layer for layer in info.module.linear if hasattr(layer, "in_features"))
    return 2 * (first.in_features + 1) * first.out_features * element_size


def _pair(kept: dict, key: ModuleInfo, value: ModuleInfo, size: int) -> None:
    """A key/value pair computed together: composed matrices where cheaper, else the modules'
    copies, and the first layers stacked for the batched GEMM."""
    if key.composite_is_cheaper and value.composite_is_cheaper:
        kept["composites"] += _composite_bytes(key, size) + _composite_bytes(value, size)
        kept["paired_layers"] += 2 * _composite_bytes(key, size)
    else:
        kept["network_copies"] += _module_bytes(key, size) + _module_bytes(value, size)
        kept["paired_layers"] += _first_layer_pair_bytes(key, size)
