"""Caption dropout: a share of samples trained on the conditioning of an empty negative prompt, as
the host samples it. On SDXL the hosts and StableDiffusionXLPipeline sample that pass with zeros,
which a network trained only on captions never sees (its style vanished under CFG); auto (-1)
turns dropout on there and leaves SD1/SD2 training exactly as it was."""

from __future__ import annotations

import pytest
import torch

import hypernetwork_ext as hx
from hypernetwork_ext.training import DiffusersBackend, TrainingConfig, train
from hypernetwork_ext.training.backends.base import text_part
from hypernetwork_ext.training.backends.ldm import SgmBackend
from tests.support.fixtures import one_torch_thread  # noqa: F401 (autouse fixture)
from tests.support.training_models import dataset_folder, tiny_diffusion_engine, training_config


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return dataset_folder(tmp_path_factory.mktemp("data"), 4)


@pytest.fixture(scope="module")
def xl_pipeline():
    from hypernetwork_ext.standalone.tiny import build_tiny_components

    pipe = build_tiny_components(0, variant="sdxl").pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd1_pipeline():
    from hypernetwork_ext.standalone.tiny import build_tiny_components

    return build_tiny_components(0).pipeline()


class Recording(DiffusersBackend):
    """The diffusers backend, counting the rows the UNet saw with an all-zero or an empty caption's context."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rows = self.zero_rows = self.empty_rows = 0
        self.empty = None

    def predict(self, noisy, timesteps, cond):
        context = text_part(cond)
        if self.empty is None:
            with torch.no_grad():
                self.empty = text_part(self.encode_text([""], (64, 64)))
        self.rows += len(context)
        self.zero_rows += int((context.flatten(1).abs().amax(1) == 0).sum())
        self.empty_rows += sum(torch.equal(row, self.empty[0]) for row in context)
        return super().predict(noisy, timesteps, cond)


def run(tmp_path, data, pipe, **changes):
    from hypernetwork_ext.shape import model_shape

    backend = Recording.from_components(pipe)
    network = hx.create(model_shape(pipe.unet).default_widths, (1, 2, 1), "relu", seed=1, name="style")
    result = train(
        network,
        backend,
        training_config(
            tmp_path,
            data,
            steps=12,
            batch_size=4,
            seed=3,
            training_write_csv_every=0,
            save_training_settings_to_txt=False,
            **changes,
        ),
        output_dir=str(tmp_path),
        progress_bar=False,
    )
    return backend, result


def test_the_sdxl_unconditional_is_what_the_pipeline_samples_an_empty_negative_with(xl_pipeline):
    backend = DiffusersBackend.from_components(xl_pipeline)
    uncond = backend.encode_unconditional(2, (64, 64))
    _p, negative, _pp, negative_pooled = xl_pipeline.encode_prompt(
        ["a red circle"] * 2, device="cpu", do_classifier_free_guidance=True, negative_prompt=None
    )
    torch.testing.assert_close(uncond["encoder_hidden_states"], negative)
    torch.testing.assert_close(uncond["text_embeds"], negative_pooled)
    assert not negative.any()  # zeros: the pipeline's force_zeros_for_empty_prompt
    assert uncond["time_ids"].tolist() == [[64, 64, 0, 0, 64, 64]] * 2  # the size is kept


def test_an_sdxl_pipeline_that_encodes_the_empty_prompt_is_followed(xl_pipeline):
    xl_pipeline.register_to_config(force_zeros_for_empty_prompt=False)
    try:
        backend = DiffusersBackend.from_components(xl_pipeline)
    finally:
        xl_pipeline.register_to_config(force_zeros_for_empty_prompt=True)
    uncond = backend.encode_unconditional(1, (64, 64))
    torch.testing.assert_close(
        uncond["encoder_hidden_states"], backend.encode_text([""], (64, 64))["encoder_hidden_states"]
    )


def test_sgm_zeroes_only_the_text_of_an_empty_negative_as_a1111_does():
    backend = SgmBackend(tiny_diffusion_engine(0))
    uncond = backend.encode_unconditional(1, (64, 64))
    empty = backend.encode_text([""], (64, 64))
    assert not uncond["crossattn"].any() and empty["crossattn"].any()
    assert uncond["vector"].any()  # the size embeddings stay


def test_auto_dropout_trains_the_zeroed_pass_on_sdxl(tmp_path, data, xl_pipeline):
    backend, result = run(tmp_path, data, xl_pipeline)
    assert result.step == 12
    share = backend.zero_rows / backend.rows
    assert 0.02 < share < 0.25, (backend.zero_rows, backend.rows)  # about 0.1 of 48 rows


def test_auto_dropout_leaves_sd1_training_exactly_as_it_was(tmp_path, data, sd1_pipeline):
    auto, auto_result = run(tmp_path / "auto", data, sd1_pipeline)
    _off, off_result = run(tmp_path / "off", data, sd1_pipeline, caption_dropout=0.0)
    assert auto.zero_rows == 0 and auto.empty_rows == 0
    assert auto_result.losses == off_result.losses


def test_explicit_dropout_on_sd1_trains_the_empty_caption(tmp_path, data, sd1_pipeline):
    backend, _result = run(tmp_path, data, sd1_pipeline, caption_dropout=0.5)
    assert 0.25 < backend.empty_rows / backend.rows < 0.75 and backend.zero_rows == 0


@pytest.mark.parametrize(("value", "valid"), [(-1.0, True), (0.0, True), (0.3, True), (1.0, False), (-0.5, False)])
def test_the_rate_is_checked(value, valid):
    problems = TrainingConfig(caption_dropout=value).problems()
    assert ("caption_dropout" not in problems) == valid, problems


class CountingBackend:
    """Encodes each caption as its length, the empty negative as zeros; counts the calls."""

    device = torch.device("cpu")

    def __init__(self):
        self.unconditional_calls = 0

    def encoder_modules(self, kind):
        return []

    def encode_text(self, texts, size):
        return torch.tensor([[[float(len(text) + 1)]] for text in texts])

    def encode_unconditional(self, count, size):
        self.unconditional_calls += 1
        return torch.zeros(count, 1, 1)


def test_the_empty_negative_outlives_a_full_caption_cache():
    """Shuffled tags make thousands of distinct captions: the cache evicts the oldest, never the
    unconditional conditioning, which is encoded once per size and decides the auto rate once."""
    from hypernetwork_ext.training.engine import ConditioningCache

    backend = CountingBackend()
    cache = ConditioningCache(backend, limit=2)
    assert cache.dropout_rate(-1.0, (64, 64)) == 0.1
    for text in ("a", "bb", "ccc"):
        cache.get([None, text], (64, 64))
    assert cache.get([None, "dddd"], (64, 64)).flatten().tolist() == [0.0, 5.0]
    assert cache.dropout_rate(-1.0, (64, 64)) == 0.1
    assert backend.unconditional_calls == 1
