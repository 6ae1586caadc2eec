"""The memory options: text encoder and VAE off the device during steps, gradient checkpointing of
the UNet's blocks, the caption cache kept off the device. What each saves and costs is measured
by benchmarks/training.py (docs/speed.md#training); these tests pin what each does."""

from __future__ import annotations

import pytest
import torch

import hypernetwork_ext as hx
from hypernetwork_ext.training import LdmBackend, TrainingConfig, train
from hypernetwork_ext.training.checkpointing import checkpoint_targets, gradient_checkpointing
from hypernetwork_ext.training.engine import ConditioningCache
from tests.support.fixtures import one_torch_thread  # noqa: F401 (autouse fixture)
from tests.support.models import LDM_WIDTHS
from tests.support.training_models import LDM_CONTEXT, dataset_folder, tiny_latent_diffusion, training_config

WIDTHS = (LDM_CONTEXT, *LDM_WIDTHS)
ON, OFF = torch.device("cpu", 0), torch.device("cpu")  # "the device" and "the host's memory", both the CPU here


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return dataset_folder(tmp_path_factory.mktemp("data"), 4)


def network(tmp_path):
    net = hx.create(WIDTHS, (1, 2, 1), "relu", seed=1, name="style")
    hx.save(net, tmp_path / "style.pt")
    return hx.load(tmp_path / "style.pt")


class Placements(LdmBackend):
    """An ldm backend that computes on ``ON`` and records where its text encoder and VAE are sent
    (both are CPU devices here, told apart by their index), and where they are when the UNet runs
    and when a preview is drawn."""

    computes_off_host = True

    def __init__(self, model):
        super().__init__(model)
        self.device = ON
        self.where = {"text": "device", "image": "device"}
        self.seen_by_unet: set[tuple[str, str]] = set()
        self.seen_by_previews: list[dict] = []
        self.text_encodings = 0
        for kind in self.where:
            for module in self.encoder_modules(kind):
                module.to = self._recorder(kind, module.to)
        model.cond_stage_model.register_forward_pre_hook(self._text_encoder_runs)
        self.preview_generator = self._preview

    def _recorder(self, kind, move):
        def to(device, *args, **kwargs):
            self.where[kind] = "device" if torch.device(device) == ON else "host"
            return move(device, *args, **kwargs)

        return to

    def _text_encoder_runs(self, module, args):
        self.text_encodings += 1
        assert self.where["text"] == "device"

    def predict(self, noisy, timesteps, cond):
        self.seen_by_unet.update(self.where.items())
        return super().predict(noisy, timesteps, cond)

    def _preview(self, request):
        self.seen_by_previews.append(dict(self.where))


def test_unloading_keeps_the_encoders_off_the_device_while_the_unet_runs(tmp_path, data):
    backend = Placements(tiny_latent_diffusion(0))
    config = training_config(
        tmp_path, data, steps=4, shuffle_tags=True, create_image_every=2, unload_models_when_training=True
    )
    result = train(network(tmp_path), backend, config, progress_bar=False)
    assert result.stopped == "finished"
    assert backend.seen_by_unet == {("text", "host"), ("image", "host")}
    assert len(backend.seen_by_previews) >= 2
    assert all(seen == {"text": "device", "image": "device"} for seen in backend.seen_by_previews)
    assert backend.text_encodings >= 2  # new captions during the run: encoded on the device, then sent back
    assert backend.where == {"text": "host", "image": "host"}  # the session's guard puts the weights back


def test_without_unloading_nothing_moves(tmp_path, data):
    backend = Placements(tiny_latent_diffusion(0))
    train(network(tmp_path), backend, training_config(tmp_path, data, steps=2), progress_bar=False)
    assert backend.seen_by_unet == {("text", "device"), ("image", "device")}


def test_nothing_is_unloaded_on_a_cpu_or_where_the_host_does_it(tmp_path, data):
    model = tiny_latent_diffusion(0)
    assert not LdmBackend(model).start_unloading()  # computes on the CPU: nowhere else to go
    refused = Placements(model)
    refused.unload_refusal = "--medvram already keeps the text encoder and VAE off the GPU between their uses"
    messages = []
    config = training_config(tmp_path, data, steps=1, unload_models_when_training=True)
    train(
        network(tmp_path),
        refused,
        config,
        hx.training.TrainingCallbacks(on_message=messages.append),
        progress_bar=False,
    )
    assert refused.seen_by_unet == {("text", "device"), ("image", "device")}
    assert any("--medvram already keeps" in text for text in messages)


def test_the_caption_cache_rests_in_the_hosts_memory():
    """Rows of SDXL-style conditioning (dicts) are kept on the CPU and sent to the device per batch
    (a CUDA device in use; both are the CPU here, so this pins the flow, not the saving)."""
    moved = []

    class Row(torch.Tensor):
        def to(self, *args, **kwargs):
            moved.append(torch.device(args[0]) if args else kwargs.get("device"))
            return super().to(*args, **kwargs)

    class Encoder:
        device = ON

        def encode_text(self, texts, size):
            return {"crossattn": torch.ones(len(texts), 3, 2).as_subclass(Row), "vector": torch.ones(len(texts), 4)}

        def encoder_modules(self, kind):
            return []

    cache = ConditioningCache(Encoder())
    cond = cache.get(["a", "b"], (64, 64))
    assert cond["crossattn"].shape == (2, 3, 2) and cond["vector"].shape == (2, 4)
    assert moved[:2] == [OFF, OFF] and moved[-1] == ON  # each row into the cache, the batch to the device


def test_checkpointing_wraps_the_residual_and_transformer_blocks():
    unet = tiny_latent_diffusion(0).model.diffusion_model
    kinds = {type(module).__name__ for module in checkpoint_targets(unet)}
    assert kinds == {"ResBlock", "BasicTransformerBlock"}
    with gradient_checkpointing(unet) as wrapped:
        assert all("forward" in module.__dict__ for module in wrapped)
    assert not any("forward" in module.__dict__ for module in wrapped)


def test_the_option_is_a_training_option():
    assert TrainingConfig(unload_models_when_training=True).problems().keys() == {"hypernetwork_name", "data_root"}
