"""The A1111 adapter tells the fast path what the process-wide Linear forward does."""

from hypernetwork_ext.hosts.a1111 import linear_projection_hint
from tests.support.a1111_lora import A1111Lora


def test_torch_forward_and_lora_modes():
    assert linear_projection_hint(False) is True
    lora = A1111Lora()
    lora.apply()
    try:
        assert linear_projection_hint(False) is True  # Lora merges into the weights, then F.linear
        assert linear_projection_hint(True) is False  # functional mode adds deltas on the fly
    finally:
        lora.undo()


def test_an_unknown_forward_is_checked_by_the_fast_path(monkeypatch):
    import torch

    def other_extension_forward(self, input):
        return torch.nn.functional.linear(input, self.weight, self.bias)

    monkeypatch.setattr(torch.nn.Linear, "forward", other_extension_forward)
    assert linear_projection_hint(False) is None
