"""The training engine on small real models: ldm LatentDiffusion, an sgm-shaped engine, diffusers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import hypernetwork_ext as hx
from hypernetwork_ext.training import (
    DiffusersBackend,
    LdmBackend,
    SgmBackend,
    TrainingCallbacks,
    train,
)
from tests.support.fixtures import one_torch_thread  # noqa: F401 (autouse fixture)
from tests.support.models import LDM_WIDTHS
from tests.support.training_models import (
    LDM_CONTEXT,
    SGM_CONTEXT,
    dataset_folder,
    tiny_diffusion_engine,
    tiny_latent_diffusion,
    training_config,
)

WIDTHS = (LDM_CONTEXT, *LDM_WIDTHS)


@pytest.fixture(scope="module")
def ldm_model():
    return tiny_latent_diffusion(0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return dataset_folder(tmp_path_factory.mktemp("data"), 4)


def new_network(tmp_path, name="style", **kwargs):
    network = hx.create(WIDTHS, (1, 2, 1), kwargs.pop("activation", "relu"), seed=1, name=name, **kwargs)
    path = tmp_path / f"{name}.pt"
    hx.save(network, path)
    return hx.load(path)


config = training_config


def weights(network):
    return {k: v.detach().clone() for k, v in network.state_dict().items()}


def evaluation_loss(model, network, data, seed=5) -> float:
    """An independent measure: the denoising loss on every image at fixed noise and timesteps."""
    backend = LdmBackend(model)
    from hypernetwork_ext.training.data import load_pixels, scan_images

    total = 0.0
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad(), hx.apply(model.model.diffusion_model, [network]):
        network.eval()
        for path, words, _size in scan_images(str(data)):
            pixels, _alpha = load_pixels(path, (64, 64), keep_aspect=False, with_alpha=False)
            mean, _std = backend.encode_images(pixels[None])
            cond = backend.encode_text([words], (64, 64))
            for t in (100, 400, 700):
                noise = torch.randn(mean.shape, generator=generator)
                ab = model.alphas_cumprod[t].float()
                noisy = ab.sqrt() * mean + (1 - ab).sqrt() * noise
                prediction = model.apply_model(noisy, torch.tensor([t]), cond)
                total += float(((prediction - noise) ** 2).mean())
    return total


def test_loss_goes_down_on_a_fixed_dataset(tmp_path, ldm_model, data):
    network = new_network(tmp_path)
    before = evaluation_loss(ldm_model, network, data)
    result = train(
        network,
        LdmBackend(ldm_model),
        config(tmp_path, data, steps=24, batch_size=4, learn_rate="0.01"),
        progress_bar=False,
    )
    after = evaluation_loss(ldm_model, network, data)
    assert result.stopped == "finished" and result.step == 24
    assert after < before * 0.97, (before, after)
    assert os.path.exists(result.path) and result.path.endswith("style-24.pt")
    saved = hx.load(result.path)
    assert saved.step == 24 and saved.name == "style-24"


def test_resuming_from_a_copy_continues_exactly(tmp_path, ldm_model, data):
    options = dict(
        steps=6,
        save_hypernetwork_every=3,
        save_optimizer_state=True,
        latent_sampling_method="random",
        shuffle_tags=True,
        batch_size=2,
    )
    whole = new_network(tmp_path, dropout_structure=(0, 0.2, 0))
    first = train(whole, LdmBackend(ldm_model), config(tmp_path / "a", data, **options), progress_bar=False)
    copy_at_3 = next(c for c in first.copies if c.endswith("style-3.pt"))
    assert os.path.exists(copy_at_3 + ".optim")
    resumed = train(
        None,
        LdmBackend(ldm_model),
        config(tmp_path / "b", data, resume_from=copy_at_3, **options),
        output_dir=str(tmp_path / "b"),
        progress_bar=False,
    )
    assert resumed.start_step == 3 and resumed.step == 6
    assert first.losses[3:] == resumed.losses
    for key, value in weights(first.network).items():
        assert torch.equal(value, weights(resumed.network)[key]), key


def test_an_interruption_saves(tmp_path, ldm_model, data):
    seen = []
    callbacks = TrainingCallbacks(on_progress=seen.append, should_stop=lambda: len(seen) >= 2)
    network = new_network(tmp_path)
    source_bytes = (tmp_path / "style.pt").read_bytes()
    result = train(network, LdmBackend(ldm_model), config(tmp_path, data, steps=50), callbacks, progress_bar=False)
    assert result.stopped == "interrupted" and result.step == 2
    assert hx.load(result.path).step == 2
    assert (tmp_path / "style.pt").read_bytes() == source_bytes  # the source is never overwritten


class NaNAt:
    """Wraps a backend so its prediction becomes NaN from a given call on."""

    def __init__(self, backend, call):
        self.backend, self.call, self.calls = backend, call, 0

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def predict(self, noisy, timesteps, cond):
        self.calls += 1
        out = self.backend.predict(noisy, timesteps, cond)
        return out * float("nan") if self.calls >= self.call else out


def trained(tmp_path, model, data, steps, **changes):
    """What a run that does not diverge holds after ``steps`` steps."""
    network = new_network(tmp_path / "reference")
    train(network, LdmBackend(model), config(tmp_path / "reference", data, steps=steps, **changes), progress_bar=False)
    return network


def assert_same_weights(a, b):
    for key, value in weights(a).items():
        assert torch.equal(value, weights(b)[key]), key


def test_the_nan_guard_keeps_the_last_weights_with_a_normal_loss(tmp_path, ldm_model, data):
    """The third loss (of the weights after step 2) is NaN: those weights are suspect, step 1's are kept."""
    network = new_network(tmp_path)
    result = train(network, NaNAt(LdmBackend(ldm_model), 3), config(tmp_path, data, steps=5), progress_bar=False)
    assert result.stopped == "non-finite" and result.step == 1
    assert "the loss became nan at step 3" in result.message and "weights of step 1" in result.message
    assert_same_weights(trained(tmp_path, ldm_model, data, 1), hx.load(result.path))


class SpikeAt(NaNAt):
    """Predictions 1,000 times too large from a given call on: a loss jump without NaN."""

    def predict(self, noisy, timesteps, cond):
        self.calls += 1
        out = self.backend.predict(noisy, timesteps, cond)
        return out * 1000.0 if self.calls >= self.call else out


@pytest.mark.parametrize("ema_decay", [0.0, 0.9])
def test_a_loss_far_above_its_recent_level_stops_on_the_weights_from_before(tmp_path, ldm_model, data, ema_decay):
    network = new_network(tmp_path)
    backend = SpikeAt(LdmBackend(ldm_model), 6)
    result = train(network, backend, config(tmp_path, data, steps=8, ema_decay=ema_decay), progress_bar=False)
    assert result.stopped == "diverged" and result.step == 4
    assert "the loss jumped to" in result.message and "at step 6" in result.message
    assert_same_weights(trained(tmp_path, ldm_model, data, 4, ema_decay=ema_decay), network)
    saved = hx.load(result.path)
    assert saved.step == 4 and result.path.endswith("style-4.pt")


def largest(network) -> float:
    return max(value.abs().max().item() for value in weights(network).values())


def test_learn_rate_1e6_stops_at_the_first_step_and_saves_nothing(tmp_path, ldm_model, data):
    """It used to save weights of 1e10 (the step moved them by 1e6, the next loss was NaN)."""
    network = new_network(tmp_path)
    source = weights(network)
    messages = []
    callbacks = TrainingCallbacks(on_message=messages.append)
    result = train(
        network, LdmBackend(ldm_model), config(tmp_path, data, learn_rate="1e6"), callbacks, progress_bar=False
    )
    assert result.stopped == "diverged" and result.step == 0 and result.path is None
    assert all(torch.equal(value, weights(network)[key]) for key, value in source.items())
    assert "the learn rate is far too high" in messages[-1] and "the weights it started from are kept" in messages[-1]
    assert sorted(os.listdir(tmp_path)) == ["logs", "style.pt"]


def test_learn_rate_jumping_to_1e6_keeps_the_weights_from_before(tmp_path, ldm_model, data):
    network = new_network(tmp_path)
    source = largest(network)
    result = train(
        network, LdmBackend(ldm_model), config(tmp_path, data, learn_rate="0.001:2, 1e6"), progress_bar=False
    )
    assert result.stopped == "diverged" and result.step == 2
    saved = hx.load(result.path)
    assert largest(saved) < 10 * source  # was 1e10
    assert_same_weights(trained(tmp_path, ldm_model, data, 2), saved)


def host_state(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        {name: m.training for name, m in model.named_modules()},
        {name: p.requires_grad for name, p in model.named_parameters()},
        {name: (p.device, p.dtype) for name, p in model.named_parameters()},
        {name: m.checkpoint for name, m in model.named_modules() if hasattr(m, "checkpoint")},
        {name: dict(m._forward_pre_hooks) for name, m in model.named_modules() if m._forward_pre_hooks},
    )


class FailAt(NaNAt):
    def predict(self, noisy, timesteps, cond):
        self.calls += 1
        if self.calls >= self.call:
            raise RuntimeError("device lost")
        return self.backend.predict(noisy, timesteps, cond)


@pytest.mark.parametrize("ending", ["finished", "interrupted", "error"])
def test_the_host_model_is_left_exactly_as_it_was(tmp_path, data, ending):
    model = tiny_latent_diffusion(3, use_checkpoint=True)
    model.model.diffusion_model.output_blocks[0].train()  # an odd mix of modes, kept as found
    model.model.diffusion_model.time_embed.requires_grad_(True)
    model.cond_stage_model.transformer.requires_grad_(False)
    before = host_state(model)
    backend = LdmBackend(model)
    callbacks = None
    if ending == "error":
        backend = FailAt(backend, 2)
    if ending == "interrupted":
        callbacks = TrainingCallbacks(should_stop=lambda: True)
    network = new_network(tmp_path)
    if ending == "error":
        with pytest.raises(hx.HypernetworkError, match="device lost"):
            train(network, backend, config(tmp_path, data, steps=3), callbacks, progress_bar=False)
    else:
        train(network, backend, config(tmp_path, data, steps=2), callbacks, progress_bar=False)
    after = host_state(model)
    for key in before[0]:
        assert torch.equal(before[0][key], after[0][key]), key
    assert before[1:] == after[1:]


def test_gradient_checkpointing_keeps_the_network_gradients(tmp_path, data):
    """ldm's own checkpoint() (use_checkpoint=True) would drop them; ours recomputes correctly."""
    model = tiny_latent_diffusion(4, use_checkpoint=True)
    results = []
    for enabled in (False, True):
        network = new_network(tmp_path / str(enabled))
        start = weights(network)
        train(
            network,
            LdmBackend(model),
            config(tmp_path / str(enabled), data, steps=2, gradient_checkpointing=enabled),
            progress_bar=False,
        )
        changed = weights(network)
        assert any(not torch.equal(start[k], changed[k]) for k in start)
        results.append(torch.cat([(changed[k] - start[k]).flatten() for k in start]))
    # The same updates up to float rounding, which Adam magnifies where a gradient is near zero
    # (it steps by about the learning rate whatever the gradient's size): compare the directions.
    assert torch.nn.functional.cosine_similarity(results[0], results[1], dim=0) > 0.999


def test_sd2_v_prediction_trains_against_the_velocity(tmp_path, data):
    model = tiny_latent_diffusion(1, parameterization="v")
    backend = LdmBackend(model)
    assert backend.prediction_type == "v_prediction"
    result = train(new_network(tmp_path), backend, config(tmp_path, data, steps=2), progress_bar=False)
    assert result.step == 2 and all(torch.isfinite(torch.tensor(loss)) for _s, loss in result.losses)


def test_sdxl_engine_trains_with_dict_conditioning(tmp_path, data):
    engine = tiny_diffusion_engine(0, v_prediction=True)
    backend = SgmBackend(engine)
    assert backend.prediction_type == "v_prediction"
    cond = backend.encode_text(["a red circle", "a square"], (64, 48))
    assert set(cond) == {"crossattn", "vector"} and cond["crossattn"].shape[-1] == SGM_CONTEXT
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    mean, std = backend.encode_images(pixels)
    posterior = engine.first_stage_model.encode(pixels)
    torch.testing.assert_close(mean, posterior.mean * engine.scale_factor)
    torch.testing.assert_close(std, posterior.std * engine.scale_factor)
    network = hx.create((SGM_CONTEXT, *LDM_WIDTHS), (1, 2, 1), "relu", seed=1, name="xl")
    before = weights(network)
    result = train(
        network, backend, config(tmp_path, data, steps=2), source_path=str(tmp_path / "xl.pt"), progress_bar=False
    )
    assert result.step == 2
    assert any(not torch.equal(before[k], weights(network)[k]) for k in before)


@pytest.fixture(scope="module")
def tiny():
    from hypernetwork_ext.standalone.tiny import build_tiny_components

    return build_tiny_components(0)


def test_diffusers_run_with_every_option_writes_its_logs(tmp_path, data, tiny):
    from hypernetwork_ext.standalone.tiny import TINY_WIDTHS

    network = hx.create(TINY_WIDTHS, (1, 2, 1), "relu", seed=1, name="full")
    hx.save(network, tmp_path / "full.safetensors")
    network = hx.load(tmp_path / "full.safetensors")
    seen_previews = []
    options = config(
        tmp_path,
        data,
        steps=4,
        batch_size=2,
        gradient_step=2,
        create_image_every=2,
        save_hypernetwork_every=2,
        preview_steps=2,
        optimizer="Lion",
        learn_rate="1e-4:2, 5e-5",
        lr_scheduler="cosine_with_restarts",
        lr_warmup_steps=1,
        clip_grad_mode="norm",
        clip_grad_value="1.0:2, 0.5",
        ema_decay=0.9,
        min_snr_gamma=5.0,
        noise_offset=0.05,
        bucketing=True,
        keep_tags=1,
        tag_drop_out=0.2,
        validation_split=0.25,
        validation_every=2,
        training_enable_tensorboard=True,
        training_tensorboard_save_images=True,
    )
    result = train(
        network,
        DiffusersBackend.from_components(tiny),
        options,
        TrainingCallbacks(on_preview=lambda image, path: seen_previews.append(path)),
        progress_bar=False,
    )
    assert result.step == 4 and result.path.endswith("full-4.safetensors")
    assert [step for step, _ in result.validation_losses] == [2, 4]
    assert seen_previews == result.previews and len(result.previews) == 2
    assert result.preview_path == str(tmp_path / "full-4.preview.png") and os.path.exists(result.preview_path)
    log_dir = result.log_dir
    rows = Path(log_dir, "hypernetwork_loss.csv").read_text().strip().splitlines()
    assert rows[0] == "step,epoch,epoch_step,loss,learn_rate,validation_loss" and len(rows) == 5
    assert os.listdir(os.path.join(log_dir, "tensorboard"))
    settings = [n for n in os.listdir(log_dir) if n.startswith("settings-")]
    assert settings and '"optimizer": "Lion"' in Path(log_dir, settings[0]).read_text()
    assert sorted(os.listdir(os.path.join(log_dir, "hypernetworks"))) == ["full-2.safetensors", "full-4.safetensors"]


ATOMIC_KILL = textwrap.dedent(
    """
    import os, signal, sys
    import hypernetwork_ext as hx
    network = hx.load(sys.argv[1])
    network.step = 999
    def killed(*args, **kwargs):  # the process dies after the data is written, before the rename
        os.kill(os.getpid(), signal.SIGKILL)
    os.replace = killed
    hx.save(network, sys.argv[1], overwrite=True)
    """
)


def test_an_atomic_save_survives_a_kill_between_write_and_rename(tmp_path):
    network = hx.create(WIDTHS, (1, 2, 1), "relu", seed=1, name="keep")
    path = tmp_path / "keep.pt"
    hx.save(network, path)
    original = path.read_bytes()
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    process = subprocess.run([sys.executable, "-c", ATOMIC_KILL, str(path)], env=env, capture_output=True)
    assert process.returncode == -signal.SIGKILL
    assert path.read_bytes() == original
    assert hx.load(path).step == 0
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "keep.pt"]
    assert all(name.endswith(".partial") for name in leftovers) and leftovers


def test_previews_show_the_training_batch_not_the_validation_caption(tmp_path, ldm_model, data):
    """Without txt2img settings a preview shows the last training batch's first caption; a
    validation pass in between must not replace it."""
    from PIL import Image

    from hypernetwork_ext.training.data import scan_images, split_validation

    captions = [words for _path, words, _size in scan_images(str(data))]
    _train, held_out = split_validation(len(captions), 0.25, 11)
    requests, progress = [], []

    def capture(request):
        requests.append(request)
        return Image.new("RGB", (request.width, request.height))

    backend = LdmBackend(ldm_model, preview_generator=capture)
    settings = config(tmp_path, data, steps=3, validation_split=0.25, validation_every=1, create_image_every=1)
    train(new_network(tmp_path), backend, settings, TrainingCallbacks(on_progress=progress.append), progress_bar=False)
    assert len(requests) == 3 and len(progress) == 3
    assert {captions[i] for i in held_out}.isdisjoint(r.prompt for r in requests)
    assert [r.prompt for r in requests] == [p.last_prompt for p in progress]
    assert all(r.prompt in captions for r in requests)


def test_a_run_shorter_than_the_preview_interval_still_leaves_its_card_a_preview(tmp_path, ldm_model, data):
    """A finished run of fewer steps than create_image_every draws one preview at its last step, so
    the new network's card has a picture; an interrupted one does not wait for a preview."""
    from PIL import Image

    requests = []

    def draw(request):
        requests.append(request)
        return Image.new("RGB", (request.width, request.height), (10, 20, 30))

    backend = LdmBackend(ldm_model, preview_generator=draw)
    result = train(new_network(tmp_path), backend, config(tmp_path, data, steps=2, create_image_every=500))
    assert result.stopped == "finished" and len(requests) == 1 and len(result.previews) == 1
    assert result.preview_path == str(tmp_path / "style-2.preview.png")
    assert Image.open(result.preview_path).getpixel((0, 0)) == (10, 20, 30)

    steps = []
    stopped = train(
        new_network(tmp_path, name="other"),
        backend,
        config(tmp_path, data, steps=20, create_image_every=500, hypernetwork_name="other"),
        TrainingCallbacks(on_progress=steps.append, should_stop=lambda: len(steps) >= 1),
        progress_bar=False,
    )
    assert stopped.stopped == "interrupted" and stopped.step == 1
    assert stopped.preview_path is None and len(requests) == 1


def test_an_unreadable_image_is_named_counted_and_the_run_goes_on(tmp_path, ldm_model):
    """A1111 skips a file it cannot read; so does a run here, but it names each one (a garbage file
    fails when opened, a truncated PNG only when decoded), counts them in its last message and its
    settings, and goes on with the others. With no readable image left it stops, saying so."""
    import json

    data = dataset_folder(tmp_path / "data", 3)
    (data / "broken.png").write_bytes(b"not a png at all")
    whole = next(data.glob("*.png")).read_bytes()
    (data / "half.png").write_bytes(whole[: len(whole) // 2])
    (data / "half.txt").write_text("a red triangle")
    messages = []
    result = train(
        new_network(tmp_path), LdmBackend(ldm_model), config(tmp_path, data, steps=2),
        TrainingCallbacks(on_message=messages.append), progress_bar=False,
    )  # fmt: skip
    assert result.stopped == "finished" and result.step == 2
    broken, half = str(data / "broken.png"), str(data / "half.png")
    assert result.skipped_images == [broken, half]
    warnings = [m for m in messages if m.startswith("warning:")]
    assert warnings[0].startswith(f"warning: {broken}: not an image file PIL can read")
    assert warnings[1].startswith(f"warning: {half}: cannot be decoded") and "skipped" in warnings[1]
    assert "2 unreadable files skipped: broken.png, half.png" in result.message  # the last word a tab shows
    settings = json.loads(Path(result.settings_path).read_text())
    assert settings["num_of_dataset_images"] == 3 and settings["skipped_dataset_files"] == [broken, half]
    for path in data.glob("0*.png"):
        path.write_bytes(b"garbage")
    with pytest.raises(hx.HypernetworkError, match="none of the 1 images of the dataset could be read"):
        train(new_network(tmp_path, name="other"), LdmBackend(ldm_model), config(tmp_path, data, steps=2),
              progress_bar=False)  # fmt: skip
