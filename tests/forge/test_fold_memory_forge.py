"""What the extension keeps for the UNet on Forge and reForge follows the UNet: their memory managers
call ``to(device)`` on the sampling patcher's patches when they load the UNet and when they unload
it to its offload device (Forge: ``LoadedModel.model_unload``; reForge: ``ModelPatcher.detach``);
the patches then let go of what is held elsewhere. The manager is also told, before sampling, the
memory the fast paths will add, and a checkpoint switch lets everything go.

Here the offload device is ``meta`` (the stand-in's manager empties the weights it moves off), so
"off the device" is visible on a CPU-only machine."""

import pytest
import torch

import hypernetwork_ext as hx
from tests.support import forge_engine, forge_standin
from tests.support import models as M
from tests.support.networks import webui_network
from tests.support.webui_generation import generate
from tests.support.webui_standin import Host, StableDiffusionProcessing

TAG = "<hypernet:anime:0.8>"


@pytest.fixture(params=["forge", "reforge"])
def host(request, monkeypatch, tmp_path):
    reforge = request.param == "reforge"
    host = Host(monkeypatch, tmp_path, forge=True, reforge=reforge)
    forge_standin.install(monkeypatch, reforge=reforge)
    hx.save(webui_network(seed=1), host.hypernetwork_dir / "anime.pt")
    host.start()
    unet = M.ldm_unet(0)
    host.runner = forge_standin.ForgeUnetRunner(unet)
    host.set_model(forge_model(unet))
    host.manager = forge_engine.MemoryManager(capacity=1)
    yield host
    assert host.errors.reported == []


def forge_model(unet):
    """The model with a patcher the memory manager can load, offloading to ``meta``."""
    model = forge_standin.ForgeModel(unet)
    patcher = forge_engine.UnetPatcher(forge_standin.KModel(unet), "cpu", torch.device("meta"))
    model.forge_objects = forge_standin.ForgeObjects(patcher, None, None, None)
    model.forge_objects_original = model.forge_objects.shallow_copy()
    model.forge_objects_after_applying_lora = model.forge_objects.shallow_copy()
    return model


def p_for(host, prompt):
    return StableDiffusionProcessing(sd_model=host.shared.sd_model, prompt=prompt)


def with_manager(host, patchers):
    """Sampling as Forge's ``sampling_prepare`` starts it: the sampling's patcher loaded first."""

    def run(p):
        inner = host.runner.run(p)

        def call(x, t, context):
            patcher = p.sd_model.forge_objects.unet
            if not patchers or patchers[-1] is not patcher:
                patchers.append(patcher)
            host.manager.load_models_gpu([patcher])
            return inner(x, t, context)

        return call

    return run


def held(host):
    return host.extension.applier.memory()


def network_bytes(host):
    return sum(p.numel() * p.element_size() for p in hx.load(host.hypernetwork_dir / "anime.pt").parameters())


def test_unloading_the_unet_takes_what_is_held_along(host, inputs):
    patchers = []
    (first,) = generate(host, p_for(host, TAG), inputs, with_manager(host, patchers))
    kept = held(host).on("cpu")
    assert kept > 0 and held(host).folds == 0  # nothing is folded on Forge: contexts, composites...
    assert patchers[0].extra_preserved_memory_during_sampling == network_bytes(host)  # before anything was held
    host.manager.unload_all_models()  # e.g. to make room for the VAE or another model
    assert held(host).total == 0
    assert host.extension.memory.releases[-1] == {**host.extension.memory.releases[-1], "bytes": kept}
    assert "moved the UNet to meta" in host.extension.memory.releases[-1]["reason"]
    (again,) = generate(host, p_for(host, TAG), inputs, with_manager(host, patchers))
    torch.testing.assert_close(again, first, rtol=1e-5, atol=1e-6)
    assert patchers[1].extra_preserved_memory_during_sampling == kept  # what it held last time, released since
    generate(host, p_for(host, TAG), inputs, with_manager(host, patchers))
    assert patchers[2].extra_preserved_memory_during_sampling == 0  # still held: already counted as used
    assert held(host).on("cpu") == kept


def test_loading_onto_the_same_device_keeps_everything(host, inputs):
    patchers = []
    generate(host, p_for(host, TAG), inputs, with_manager(host, patchers))
    kept = held(host).total
    patchers[0].model_patches_to(torch.device("cpu"))
    patchers[0].model_patches_to(torch.float16)  # the dtype call changes nothing
    assert held(host).total == kept


def test_the_patch_survives_the_patchers_deep_copy_as_itself(host, inputs):
    patchers = []
    generate(host, p_for(host, TAG), inputs, with_manager(host, patchers))
    clone = patchers[0].clone()
    patches = clone.model_options["transformer_options"]["patches"]
    applier = host.extension.applier
    assert patches["attn1_patch"] == [applier.attn1_patch] and patches["attn2_patch"][0] is applier.attn2_patch


def test_a_checkpoint_switch_lets_everything_go(host, inputs, capsys):
    generate(host, p_for(host, TAG), inputs, with_manager(host, []))
    assert held(host).total > 0
    unet = M.ldm_unet(1)
    host.runner = forge_standin.ForgeUnetRunner(unet)
    host.set_model(forge_standin.ForgeModel(unet))
    assert held(host).total == 0 and "another checkpoint was loaded" in capsys.readouterr().err


def test_the_unload_button_lets_go_even_where_the_unet_stays(host, inputs):
    """Forge's unload (the settings button, POST /sdapi/v1/unload-checkpoint) unloads every model; on
    a CPU-only Forge the UNet stays where it is, but what is held for it goes all the same."""
    generate(host, p_for(host, TAG), inputs, with_manager(host, []))
    assert held(host).total > 0
    host.sd_models.unload_model_weights()
    assert held(host).total == 0 and host.extension.memory.releases[-1]["reason"] == "the checkpoint was unloaded"
