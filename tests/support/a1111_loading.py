"""What A1111 1.10.1 does to torch, process-wide, while it loads a checkpoint (``sd_models.load_model``).

Re-created from ``modules/sd_disable_initialization.py``: ``DisableInitialization`` turns three
``torch.nn.init`` helpers into no-ops, ``InitializeOnMeta`` creates every Linear/Conv2d on the meta
device and turns ``Module.to`` into a no-op, and ``LoadStateDictOnMeta`` wraps
``Module.load_state_dict`` in a function without ``assign`` and ``_load_from_state_dict`` in one that
takes tensors from the checkpoint being loaded. The WebUI answers HTTP requests meanwhile (at start
the model loads in a background thread), so anything the extension does then runs under them.
"""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def a1111_checkpoint_loading(monkeypatch, checkpoint: dict | None = None):
    checkpoint = {} if checkpoint is None else checkpoint

    def do_nothing(*args, **kwargs):
        pass

    for name in ("kaiming_uniform_", "_no_grad_normal_", "_no_grad_uniform_"):
        monkeypatch.setattr(torch.nn.init, name, do_nothing)

    for cls in (torch.nn.Linear, torch.nn.Conv2d):
        original_init = cls.__init__

        def on_meta(self, *args, _init=original_init, **kwargs):
            _init(self, *args, **{**kwargs, "device": "meta"})

        monkeypatch.setattr(cls, "__init__", on_meta)
    monkeypatch.setattr(torch.nn.Module, "to", lambda *args, **kwargs: None)

    original_load = torch.nn.Module.load_state_dict
    original_from = torch.nn.Module._load_from_state_dict

    def load_state_dict(module, state_dict, strict=True):  # A1111's signature: no assign
        return original_load(module, state_dict, strict=strict)

    def load_from_state_dict(module, state_dict, prefix, *args, **kwargs):
        for name in module._parameters:
            value = checkpoint.pop(prefix + name, None)
            if value is not None:
                state_dict[prefix + name] = value
        return original_from(module, state_dict, prefix, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "load_state_dict", load_state_dict)
    for cls in (torch.nn.Module, torch.nn.Linear, torch.nn.LayerNorm):
        monkeypatch.setattr(cls, "_load_from_state_dict", load_from_state_dict)
    try:
        yield
    finally:
        monkeypatch.undo()
