"""The precision a run computes in follows what the host's UNet computes in, not the dtype its weights
are stored in: Forge Classic started with ``--unet-in-fp16`` on a CPU keeps float16 weights and casts
them to float32 at each use; training under float16 autocast there ran every step's matrix products
in float16 on the CPU (84-93 s a step on the full SDXL) and coarser than the host's own generations.
On a GPU autocast still follows the stored weights: the layers then use them without copies."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import hypernetwork_ext as hx
from hypernetwork_ext.training import LdmBackend, TrainingCallbacks, TrainingConfig, train
from hypernetwork_ext.training.backends.base import TrainingBackend
from hypernetwork_ext.training.engine import CAST_COPIES_NOTE, resolve_precision
from tests.support.fixtures import one_torch_thread  # noqa: F401 (autouse fixture)
from tests.support.models import LDM_WIDTHS
from tests.support.training_models import LDM_CONTEXT, dataset_folder, tiny_latent_diffusion, training_config


class StoredAs(TrainingBackend):
    def __init__(self, stored: torch.dtype, computed: torch.dtype | None, device: str = "cpu"):
        self.unet = nn.Linear(4, 4).to(stored)
        self.compute_dtype = computed
        self.device = torch.device(device)


def precision(backend: TrainingBackend, wanted: str = "auto") -> tuple[torch.dtype | None, bool, str]:
    return resolve_precision(TrainingConfig(mixed_precision=wanted), backend)


def test_float16_weights_cast_to_float32_at_use_train_without_autocast():
    assert precision(StoredAs(torch.float16, torch.float32)) == (None, False, CAST_COPIES_NOTE)
    assert "float32 copies" in CAST_COPIES_NOTE and "gradient checkpointing" in CAST_COPIES_NOTE
    checkpointed = TrainingConfig(gradient_checkpointing=True)
    assert resolve_precision(checkpointed, StoredAs(torch.float16, torch.float32)) == (None, False, "")
    assert precision(StoredAs(torch.bfloat16, torch.float32))[0] == torch.bfloat16  # bf16 runs well on a CPU


def test_on_a_gpu_autocast_follows_the_stored_weights_so_layers_use_them_without_copies():
    assert precision(StoredAs(torch.float16, torch.float32, "cuda"))[:2] == (torch.float16, True)
    assert precision(StoredAs(torch.bfloat16, torch.float16, "cuda"))[0] == torch.bfloat16


def test_weights_computed_as_stored_still_force_their_autocast():
    dtype, scaler, note = precision(StoredAs(torch.float16, None))
    assert dtype == torch.float16 and scaler is False and "float16" in note
    assert precision(StoredAs(torch.bfloat16, torch.bfloat16), "no")[0] == torch.bfloat16
    assert precision(StoredAs(torch.float32, None)) == (None, False, "")


class CastAtUse(nn.Module):
    """ldm_patched's manual cast: the weight is kept in float16 and used in float32."""

    def forward(self, stored: torch.Tensor) -> torch.Tensor:
        return stored.float()


def stored_in_float16(unet: nn.Module) -> None:
    for module in list(unet.modules()):
        for name, tensor in list(module._parameters.items()):
            if tensor is not None:
                tensor.data = tensor.data.half()
                parametrize.register_parametrization(module, name, CastAtUse(), unsafe=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return dataset_folder(tmp_path_factory.mktemp("data"), 2)


def test_a_run_on_a_unet_cast_at_use_computes_as_the_host_does(tmp_path, data):
    model = tiny_latent_diffusion(0)
    stored_in_float16(model.model.diffusion_model)
    seen: list[bool] = []

    class HostCasts(LdmBackend):
        compute_dtype = torch.float32

        def predict(self, noisy, timesteps, cond):
            seen.append(torch.is_autocast_enabled("cpu"))
            assert noisy.dtype == torch.float32
            return super().predict(noisy, timesteps, cond)

    hx.save(hx.create((LDM_CONTEXT, *LDM_WIDTHS), (1, 2, 1), "relu", seed=1, name="style"), tmp_path / "style.pt")
    result = train(
        hx.load(tmp_path / "style.pt"),
        HostCasts(model),
        training_config(tmp_path, data, steps=2),
        TrainingCallbacks(),
        progress_bar=False,
    )
    assert result.stopped == "finished", result.message
    assert seen and not any(seen)
    assert {tensor.dtype for tensor in model.model.diffusion_model.parameters()} == {torch.float16}
