"""What the extension keeps for the UNet on A1111, against the 1.10.1 stand-in: bounded by the
setting, let go before the host moves the UNet off its device (--medvram's decode, --lowvram, the
unload button, checkpoint switches and the checkpoint cache), never keeping the UNet's weights; and
shown in the console and at GET /hypernetworks/v1/memory."""

import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient

import hypernetwork_ext as hx
from tests.support import models as M
from tests.support.networks import webui_network
from tests.support.webui_generation import LatentDiffusion, generate
from tests.support.webui_standin import StableDiffusionProcessing

TAG = "<hypernet:flat:0.8>"


@pytest.fixture
def flat(host):
    """An affine network (A1111's default ``linear``), the kind that is folded."""
    hx.save(webui_network(seed=3, activation="linear"), host.hypernetwork_dir / "flat.pt")
    return host


def p_for(host, prompt, **kwargs):
    return StableDiffusionProcessing(sd_model=host.shared.sd_model, prompt=prompt, **kwargs)


def run_model(p):
    unet = p.sd_model.model.diffusion_model
    return lambda x, t, context: unet(x, t, context=context)


def held(host):
    return host.extension.applier.memory()


def storages(module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in module.parameters()}


def held_storages(host) -> set[int]:
    attachment = host.extension.applier.attachment
    return {t.untyped_storage().data_ptr() for _, t in attachment.held_tensors()} if attachment else set()


def use_medvram(host):
    host.shared.cmd_opts.medvram = True
    host.shared.sd_model.lowvram = True  # lowvram.setup_for_low_vram marks the model


def medvram_decode(host, seen):
    """A1111's decode under --medvram: the VAE's hook sends the UNet to the CPU (here: new tensors,
    so that the old ones would be freed unless something still held them)."""

    def decode(p):
        unet = p.sd_model.model.diffusion_model
        seen.append((held(host).total, set(storages(unet))))
        for parameter in unet.parameters():
            parameter.data = parameter.data.clone()

    return decode


def test_folds_are_kept_between_generations_within_the_limit(flat, inputs):
    first = generate(flat, p_for(flat, TAG), inputs, run_model)
    kept = held(flat)
    assert 0 < kept.kinds()["folds"] <= 256 << 20 and kept.folds == 14
    stats = flat.extension.applier.attachment.stats
    folds = stats["folds"]
    assert generate(flat, p_for(flat, TAG), inputs, run_model)[0].equal(first[0])
    assert stats["folds"] == folds  # the next generation reused them


def test_the_setting_bounds_the_folds_and_the_image_stays_the_same(flat, inputs):
    (unbounded,) = generate(flat, p_for(flat, TAG), inputs, run_model)
    full = held(flat).kinds()["folds"]
    for limit_mib, most in ((full / 2 / (1 << 20), full // 2), (0, 0)):
        flat.shared.opts.data["hypernetwork_fold_limit_mib"] = limit_mib
        (got,) = generate(flat, p_for(flat, TAG), inputs, run_model)
        torch.testing.assert_close(got, unbounded, rtol=1e-4, atol=1e-5)
        assert held(flat).kinds()["folds"] <= most and held(flat).fold_limit == int(limit_mib * (1 << 20))
    flat.shared.opts.data["hypernetwork_fold_limit_mib"] = -1
    generate(flat, p_for(flat, TAG), inputs, run_model)
    assert held(flat).kinds()["folds"] == full and held(flat).fold_limit is None


def test_medvram_lets_go_before_the_decode_and_keeps_nothing_of_the_unet(flat, inputs):
    (plain,) = generate(flat, p_for(flat, TAG), inputs, run_model)
    use_medvram(flat)
    seen = []
    for _ in range(2):
        (got,) = generate(flat, p_for(flat, TAG), inputs, run_model, decode=medvram_decode(flat, seen))
        torch.testing.assert_close(got, plain, rtol=1e-4, atol=1e-5)
        held_now, unet_before_the_move = seen[-1]
        assert held_now == 0  # post_sample let go before the UNet left
        assert held(flat).total == 0 and not held_storages(flat) & unet_before_the_move
    reasons = [release["reason"] for release in flat.extension.memory.releases]
    assert reasons.count("the host moves the UNet off its device (--medvram/--lowvram)") == 2


def test_medvram_hires_lets_go_before_the_second_pass(flat, inputs):
    use_medvram(flat)
    generate(flat, p_for(flat, TAG, enable_hr=True), inputs, run_model)
    assert len(flat.extension.memory.releases) == 2 and held(flat).total == 0  # before_hr, then post_sample


def test_lowvram_never_folds(flat, inputs):
    (plain,) = generate(flat, p_for(flat, TAG), inputs, run_model)
    flat.shared.cmd_opts.lowvram = True
    flat.shared.sd_model.lowvram = True
    seen = []
    (got,) = generate(flat, p_for(flat, TAG), inputs, run_model, decode=medvram_decode(flat, seen))
    torch.testing.assert_close(got, plain, rtol=1e-4, atol=1e-5)
    assert flat.extension.applier.attachment.stats["unfolded_over_limit"] > 0
    assert seen[0][0] == 0 and held(flat).total == 0


def test_unload_and_switches_let_go_first_and_keep_nothing_of_the_unet(flat, inputs):
    sd_models = flat.sd_models
    (first,) = generate(flat, p_for(flat, TAG), inputs, run_model)
    assert held(flat).kinds()["folds"] > 0
    sd_models.unload_model_weights()  # the settings button and POST /sdapi/v1/unload-checkpoint
    assert sd_models.moves[-1][0] == "cpu" and held(flat).total == 0
    (again,) = generate(flat, p_for(flat, TAG), inputs, run_model)
    torch.testing.assert_close(again, first, rtol=1e-4, atol=1e-5)
    old = flat.shared.sd_model
    unet = old.model.diffusion_model
    before = storages(unet)
    sd_models.send_model_to_trash(old)  # load_model and the checkpoint cache discard the old model
    assert all(p.device.type == "meta" for p in unet.parameters())
    assert held(flat).total == 0 and not held_storages(flat) & before
    flat.set_model(LatentDiffusion(M.ldm_unet(0)))
    (after,) = generate(flat, p_for(flat, TAG), inputs, run_model)
    torch.testing.assert_close(after, first, rtol=1e-4, atol=1e-5)
    assert len([r for r in flat.extension.memory.releases if r["bytes"]]) == 2


def test_a_move_of_another_model_lets_nothing_go(flat, inputs):
    generate(flat, p_for(flat, TAG), inputs, run_model)
    kept = held(flat).total
    flat.sd_models.send_model_to_cpu(LatentDiffusion(M.ldm_unet(1)))
    assert held(flat).total == kept


def test_console_line_once_per_change_and_the_route(flat, inputs, capsys):
    for _ in range(2):
        generate(flat, p_for(flat, TAG), inputs, run_model)
    lines = [line for line in capsys.readouterr().err.splitlines() if "holding" in line]
    assert len(lines) == 1 and "on cpu" in lines[0] and "folded weights" in lines[0] and "14 folds" in lines[0]
    app = FastAPI()
    flat.script_callbacks.app_started_callback(None, app)
    report = TestClient(app).get("/hypernetworks/v1/memory").json()
    assert report["host"] == "a1111" and report["devices"]["cpu"]["folds"] == held(flat).kinds()["folds"] > 0
    assert report["fold_limit_bytes"] == 256 << 20 and report["line"] == lines[0].split("] ", 1)[1]
    flat.sd_models.unload_model_weights()
    report = TestClient(app).get("/hypernetworks/v1/memory").json()
    assert report["total_bytes"] == 0 and report["releases"][-1]["bytes"] > 0


def test_script_unload_puts_the_host_functions_back(flat):
    wrapped = flat.sd_models.send_model_to_cpu
    assert getattr(wrapped, "hnx_wrapper", False)
    flat.script_callbacks.script_unloaded_callback()
    assert flat.sd_models.send_model_to_cpu is wrapped.__wrapped__
    flat.start()  # Reload UI: wrapped once again, not twice
    assert flat.sd_models.send_model_to_cpu.__wrapped__ is wrapped.__wrapped__
