"""A bad sample never ends a run: latents or conditioning that are not finite are recomputed in
float32 where that helps, otherwise the sample is named, skipped and counted; only a loss that
diverges on finite inputs stops a run.

The tiny real ldm LatentDiffusion is used throughout. Half-precision overflow is real where it
can be made real here (a VAE in float16 whose first convolution overflows float16's range while
float32 holds it); a text encoder that gives NaN for some captions (a random checkpoint's does,
see docs/training.md) is a damaged token embedding: every caption holding that word is NaN in any
precision.
"""

from __future__ import annotations

import pytest
import torch

import hypernetwork_ext as hx
from hypernetwork_ext.errors import HypernetworkError
from hypernetwork_ext.training import LdmBackend, TrainingCallbacks, train
from hypernetwork_ext.training.samples import NON_FINITE_CONDITIONING, NON_FINITE_LATENT, finite_rows
from tests.support.fixtures import one_torch_thread  # noqa: F401 (autouse fixture)
from tests.support.models import LDM_WIDTHS
from tests.support.training_models import LDM_CONTEXT, dataset_folder, tiny_latent_diffusion, training_config

WIDTHS = (LDM_CONTEXT, *LDM_WIDTHS)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # captions: "a red diamond on a black background", "a red diamond on a grey background",
    # "a red triangle on a black background", "a red triangle at the bottom on a black background"
    return dataset_folder(tmp_path_factory.mktemp("data"), 4)


def network(tmp_path):
    net = hx.create(WIDTHS, (1, 2, 1), "relu", seed=1, name="style")
    path = tmp_path / "style.pt"
    hx.save(net, path)
    return hx.load(path)


def damage_word(model, word: str) -> None:
    """The text encoder's embedding of ``word`` made NaN: every caption holding it encodes to NaN."""
    encoder = model.cond_stage_model
    token = encoder.tokenizer(word, add_special_tokens=False).input_ids[0]
    with torch.no_grad():
        encoder.transformer.get_input_embeddings().weight[token] = float("nan")


def run(tmp_path, data, backend, **changes):
    messages = []
    result = train(
        network(tmp_path),
        backend,
        training_config(tmp_path, data, **changes),
        TrainingCallbacks(on_message=messages.append),
        progress_bar=False,
    )
    return result, messages


def test_a_caption_with_non_finite_conditioning_is_skipped_and_counted(tmp_path, data):
    model = tiny_latent_diffusion(0)
    damage_word(model, "triangle")
    result, messages = run(tmp_path, data, LdmBackend(model), steps=6, batch_size=2)
    assert result.stopped == "finished" and result.step == 6, result.message
    assert all(torch.isfinite(torch.tensor(loss)) for _step, loss in result.losses)
    skipped = {(item["image"], item["caption"], item["reason"]) for item in result.skipped_samples}
    assert (
        skipped
        <= {
            ("0002-red-triangle.png", "a red triangle on a black background", NON_FINITE_CONDITIONING),
            ("0003-red-triangle.png", "a red triangle at the bottom on a black background", NON_FINITE_CONDITIONING),
        }
        and skipped
    ), result.skipped_samples
    count = sum(item["count"] for item in result.skipped_samples)
    assert f"{count} sample(s) skipped" in result.message and "triangle" in result.message
    warnings = [text for text in messages if text.startswith("Warning: skipping")]
    assert len(warnings) == len(skipped), messages  # one warning per sample, then counted


def test_a_batch_with_no_usable_sample_gives_way_to_the_next(tmp_path, data):
    """Batch 1: the triangles' batches have nothing to train on; the run still makes every step."""
    model = tiny_latent_diffusion(0)
    damage_word(model, "triangle")
    result, _messages = run(tmp_path, data, LdmBackend(model), steps=5, batch_size=1)
    assert result.stopped == "finished" and result.step == 5
    assert result.skipped_samples and all(item["reason"] == NON_FINITE_CONDITIONING for item in result.skipped_samples)


def test_a_dataset_without_a_usable_caption_fails_clearly(tmp_path, data):
    model = tiny_latent_diffusion(0)
    damage_word(model, "red")
    with pytest.raises(HypernetworkError, match=r"no usable sample.*non-finite conditioning"):
        run(tmp_path, data, LdmBackend(model), steps=3)


def test_a_half_precision_vae_that_overflows_is_rerun_in_float32(tmp_path, data):
    """Float16 holds at most 65504: the first convolution's output overflows it, float32 holds it."""
    model = tiny_latent_diffusion(0)
    with torch.no_grad():
        model.first_stage_model.encoder.conv_in.weight.mul_(2e5)
    model.first_stage_model.half()
    backend = LdmBackend(model)
    pixels = torch.ones(1, 3, 64, 64)
    half_mean, _ = backend.encode_images(pixels)
    assert not any(finite_rows(half_mean))  # what float16 gives
    result, _messages = run(tmp_path, data, backend, steps=2)
    assert result.stopped == "finished" and not result.skipped_samples
    assert result.recomputed_in_float32 == {"latent": 4}
    assert next(model.first_stage_model.parameters()).dtype == torch.float16  # put back as found


def test_an_image_without_finite_latents_is_left_out(tmp_path, data):
    class OneBadImage(LdmBackend):
        """The second image's latent is NaN (in any precision)."""

        calls = 0

        def encode_images(self, pixels):
            mean, std = super().encode_images(pixels)
            self.calls += 1
            return (mean * float("nan"), std) if self.calls == 2 else (mean, std)

    backend = OneBadImage(tiny_latent_diffusion(0))
    result, messages = run(tmp_path, data, backend, steps=3)
    assert result.stopped == "finished"
    assert result.skipped_samples == [
        {"image": "0001-red-diamond.png", "caption": None, "reason": NON_FINITE_LATENT, "count": 1}
    ]
    assert any("0001-red-diamond.png" in text for text in messages)


def test_a_caption_half_precision_breaks_is_encoded_again_in_float32(tmp_path, data):
    class HalfTextEncoder(LdmBackend):
        """NaN for "triangle" captions while the text encoder computes in half precision."""

        def encode_text(self, texts, size):
            cond = super().encode_text(texts, size)
            half = next(self.sd_model.cond_stage_model.parameters()).dtype != torch.float32
            rows = torch.tensor([half and "triangle" in text for text in texts])
            cond = cond.float()  # what the float32 UNet takes
            return torch.where(rows[:, None, None], torch.full_like(cond, float("nan")), cond)

    model = tiny_latent_diffusion(0)
    model.cond_stage_model.to(torch.bfloat16)
    result, _messages = run(tmp_path, data, HalfTextEncoder(model), steps=4, batch_size=2)
    assert result.stopped == "finished" and not result.skipped_samples
    assert result.recomputed_in_float32["caption"] >= 1
    assert next(model.cond_stage_model.parameters()).dtype == torch.bfloat16


def test_a_loss_autocast_breaks_is_recomputed_without_it(tmp_path, data):
    class AutocastOverflow(LdmBackend):
        """The first prediction under autocast overflows; float32 does not."""

        calls = 0

        def predict(self, noisy, timesteps, cond):
            out = super().predict(noisy, timesteps, cond)
            self.calls += 1
            return out * float("inf") if torch.is_autocast_enabled("cpu") and self.calls == 1 else out

    backend = AutocastOverflow(tiny_latent_diffusion(0))
    result, _messages = run(tmp_path, data, backend, steps=3, mixed_precision="bf16")
    assert result.stopped == "finished" and result.recomputed_in_float32 == {"loss": 1}


def test_a_loss_that_diverges_on_finite_inputs_still_stops_the_run(tmp_path, data):
    class Overflow(LdmBackend):
        def predict(self, noisy, timesteps, cond):
            return super().predict(noisy, timesteps, cond) * float("inf")

    result, _messages = run(tmp_path, data, Overflow(tiny_latent_diffusion(0)), steps=3)
    assert result.stopped == "non-finite" and result.step == 0 and not result.skipped_samples


def test_a_caption_spoiled_only_by_its_batch_is_encoded_alone_and_kept(tmp_path, data):
    """A1111's emphasis rescales a batch's conditioning by one mean over all its rows, so a caption
    that overflows makes its batch companions non-finite too. In the real A1111 two captions the host
    renders finitely were skipped that way; the run now encodes a failed caption alone, as a prompt is."""

    class BatchMean(LdmBackend):
        def encode_text(self, texts, size):
            cond = super().encode_text(texts, size)
            if any("triangle at the bottom" in text for text in texts):  # this caption overflows
                original = cond.mean() * float("inf")
                cond = cond * (original / cond.mean())  # one mean for the batch: every row is NaN
            return cond

    result, _messages = run(tmp_path, data, BatchMean(tiny_latent_diffusion(0)), steps=6, batch_size=2)
    assert result.stopped == "finished" and result.step == 6, result.message
    skipped = {item["caption"] for item in result.skipped_samples}
    assert skipped == {"a red triangle at the bottom on a black background"}, result.skipped_samples
