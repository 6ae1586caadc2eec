"""Training on Forge and reForge through the real entry script, on the stand-in of their loaded model
(tests/support/forge_engine.py): inference-tensor weights (Forge), transformer blocks adding in
place (Forge), a memory manager that moves models off the device when another one loads, LoRA
merged by the patcher, sampling inside ``torch.inference_mode()``. Forge gets a top-level Train
tab, reForge the sub-tab of its A1111 Train tab; both the routes; previews come from the host's
txt2img with the network being trained; the model is left exactly as it was."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient

import hypernetwork_ext as hx
from hypernetwork_ext.training import TrainingConfig, train
from hypernetwork_ext.training.backends.forge import ForgeBackend
from tests.core.test_training_ui_host import (  # noqa: F401  (pytest collects the imported tests)
    handlers,
    hosted,
    test_the_train_button_runs_the_hosts_script_then_the_handler,
    test_txt2img_values_replace_the_preview_options_when_asked,
)
from tests.support import forge_engine, forge_standin
from tests.support.models import LDM_CONTEXT, LDM_WIDTHS, SDXL_CONTEXT
from tests.support.training_models import dataset_folder
from tests.support.webui_standin import Host

WIDTHS = (LDM_CONTEXT, *LDM_WIDTHS)
TASK = "task(hnxforge1)"
SMALL_RUN = {"learn_rate": "0.002", "training_width": 64, "training_height": 64, "seed": 11}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return dataset_folder(tmp_path_factory.mktemp("data"), 2)


def make_host(monkeypatch, tmp_path, *, reforge=False, classic=False, memory=None, lazy=False):
    """A host with ``style.pt`` and the stand-in model; on Forge the checkpoint may still wait for
    its first generation (``lazy``), as after Forge starts. ``classic``: Forge Classic (reForge's
    patcher, none of A1111's hypernetwork names)."""
    memory = memory or forge_engine.MemoryManager(capacity=1)
    host = Host(monkeypatch, tmp_path, forge=not (reforge or classic), reforge=reforge, classic=classic)
    forge_standin.install(monkeypatch, reforge=reforge or classic, memory=memory)
    hx.save(hx.create(WIDTHS, (1, 2, 1), "relu", seed=1, name="style"), host.hypernetwork_dir / "style.pt")
    host.start()
    host.memory = memory
    host.engine = forge_engine.build(0, reforge=reforge, classic=classic, memory=memory)
    if lazy:
        info = host.sd_models.CheckpointInfo("tiny.safetensors", "0123456789")
        host.sd_models.register(info)
        host.engine.sd_checkpoint_info, host.engine.sd_model_hash = info, info.shorthash
        host.shared.opts.data["sd_model_checkpoint"] = info.title
        host.sd_models.forge_pending = host.engine
        host.sd_models.on_forge_load = host.script_callbacks.model_loaded_callback
    else:
        host.load_checkpoint(host.engine, "tiny.safetensors", "sd1")
    return host


@pytest.fixture
def forge(monkeypatch, tmp_path):
    host = make_host(monkeypatch, tmp_path)
    yield host
    assert host.errors.reported == []


def forge_tab(host):
    """Forge builds its UI: our top-level Train tab, and the TrainingTab behind its Train button."""
    tabs, preview = host.build_ui_tabs()
    assert [(label, tab_id) for _blocks, label, tab_id in tabs] == [("Train", "hnx_train")]
    blocks = tabs[0][0]
    (start,) = [fn for fn, js in handlers(blocks) if js == "hnxStartTraining"]
    return start.__self__, blocks, preview


def reforge_tab(host):
    interface, preview = host.build_train_interface()
    (start,) = [fn for fn, js in handlers(interface) if js == "hnxStartTraining"]
    return start.__self__, interface, preview


def tab_values(tab, data, tmp_path, **changes):
    values = {name: component.value for name, component in tab.train_inputs.items()}
    values.update(
        data_root=str(data),
        log_directory=str(tmp_path / "logs"),
        steps=3,
        create_image_every=2,
        save_hypernetwork_every=2,
        shuffle_tags=True,  # captions change between steps: the text encoder loads in the middle of the run
        **SMALL_RUN,
    )
    values.update(changes)
    return [values[name] for name in tab.train_inputs]


def txt2img(host, prompt: str) -> np.ndarray:
    """A generation as the host's txt2img runs it (extra networks, always-on scripts)."""
    p = host.processing.StableDiffusionProcessingTxt2Img(
        sd_model=host.shared.sd_model, prompt=prompt, steps=3, seed=5, width=64, height=64, cfg_scale=5.0
    )
    p.scripts = host
    return np.asarray(host.processing.process_images(p).images[0])


def unet_state(host):
    """Every weight of the UNet, as tensor objects and values (moved onto the device to read them)."""
    unet = host.engine.forge_objects_original.unet
    with torch.inference_mode():  # where the host loads its models
        host.memory.load_models_gpu([unet])
    model = unet.model.diffusion_model
    return {name: (tensor, tensor.detach().clone()) for name, tensor in model.named_parameters()}


def assert_same_unet(before, after):
    assert before.keys() == after.keys()
    for name, (tensor, value) in before.items():
        assert after[name][0] is tensor, name
        assert torch.equal(after[name][1], value), name


def wait_for(predicate, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# --- where the training is ------------------------------------------------------------------------


def test_forge_gets_a_top_level_train_tab_and_the_routes(forge, tmp_path):
    callbacks = forge.script_callbacks.callback_map
    assert callbacks["callbacks_ui_train_tabs"] == []  # Forge has no Train tab to join
    tab, blocks, _preview = forge_tab(forge)
    ids = {c["props"].get("elem_id") for c in blocks.get_config_file()["components"]}
    assert {"hnx_train_tab", "hnx_train_preview_from_txt2img_tab", "hnx_train_progress", "hnx_train_gallery"} <= ids
    assert tab.network_names() == ["style"]
    app = FastAPI()
    forge.script_callbacks.app_started_callback(None, app)
    client = TestClient(app)
    created = client.post("/hypernetworks/v1/create", json={"name": "new", "enable_sizes": list(WIDTHS)})
    assert created.status_code == 200 and created.json()["widths"] == list(WIDTHS)
    assert client.post("/hypernetworks/v1/train", json={"steps": 0}).status_code == 422
    assert client.get("/hypernetworks/v1/jobs/nosuch").status_code == 404


def test_reforge_joins_its_a1111_train_tab(monkeypatch, tmp_path):
    host = make_host(monkeypatch, tmp_path, reforge=True)
    _tab, interface, _preview = reforge_tab(host)
    props = {c["props"].get("elem_id"): c["props"] for c in interface.get_config_file()["components"]}
    assert "hnx_train_tab" in props and props["train_train_hypernetwork"]["visible"] is False
    assert host.script_callbacks.ui_tabs_callback() == []
    assert host.errors.reported == []


# --- a run ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", ["forge", "reforge"])
def test_a_run_trains_previews_with_the_hosts_txt2img_and_leaves_the_model_as_it_was(
    monkeypatch, tmp_path, data, flavour
):
    host = make_host(monkeypatch, tmp_path, reforge=flavour == "reforge", lazy=flavour == "forge")
    tab, _blocks, preview = (reforge_tab if flavour == "reforge" else forge_tab)(host)
    values = tab_values(tab, data, tmp_path)
    message = tab.start_from_host(TASK, "style", "filewords.txt", *values, True, *[c.value for c in preview])
    assert "Training started" in message
    job = tab.jobs.wait(tab.current_job, 300)
    assert job.state == "finished", job.message
    assert host.shared.sd_model is host.engine  # Forge loaded the chosen checkpoint for the run

    memory, engine = host.memory, host.engine
    unet_module = engine.forge_objects_original.unet.model
    clip_module = engine.forge_objects.clip.patcher.model
    # the memory manager moved the models in turn (one fits on the device), and the UNet came back
    # after each of the host's own calls (text encoder for new captions, VAE, the preview's txt2img)
    order = [m for m in memory.loads if m in (unet_module, clip_module)]
    assert order.count(unet_module) >= 3 and order.count(clip_module) >= 2

    trained, source = hx.load(job.result_path), hx.load(host.hypernetwork_dir / "style.pt")
    assert trained.step == 3 and all(np.isfinite(loss) for _step, loss in job.losses)
    assert any(not torch.equal(a, b) for a, b in zip(trained.parameters(), source.parameters(), strict=True))
    assert (host.hypernetwork_dir / "style-3.preview.png").is_file() and len(job.previews) == 1

    # the result works by its tag at once, in the same process; without a tag nothing changed
    plain_after = txt2img(host, "a red cube")
    tagged = txt2img(host, "a red cube <hypernet:style-3:1>")
    assert np.abs(tagged.astype(int) - plain_after.astype(int)).max() > 0
    host.memory.unload_all_models()
    assert np.array_equal(txt2img(host, "a red cube"), plain_after)


def test_the_preview_is_the_tag_render_of_the_copy_and_the_no_tag_image_is_unchanged(forge, tmp_path, data):
    """The preview of step 2 is what txt2img draws with the step-2 copy by its tag; the image
    without a tag is bit-identical before and after the run."""
    tab, _blocks, preview = forge_tab(forge)
    settings = {c.elem_id: c.value for c in preview}
    plain_before = txt2img(forge, settings["txt2img_prompt"])
    values = tab_values(tab, data, tmp_path, save_hypernetwork_every=2)
    tab.start_from_host(TASK, "style", "filewords.txt", *values, True, *[c.value for c in preview])
    job = tab.jobs.wait(tab.current_job, 300)
    assert job.state == "finished", job.message
    (copy,) = (tmp_path / "logs").glob("*/style/hypernetworks/style-2.pt")
    (forge.hypernetwork_dir / "copy2.pt").write_bytes(copy.read_bytes())
    p = forge.processing.StableDiffusionProcessingTxt2Img(
        sd_model=forge.shared.sd_model,
        prompt=settings["txt2img_prompt"] + " <hypernet:copy2:1>",
        negative_prompt=settings["txt2img_neg_prompt"],
        steps=settings["txt2img_steps"],
        seed=settings["txt2img_seed"],
        cfg_scale=settings["txt2img_cfg_scale"],
        width=settings["txt2img_width"],
        height=settings["txt2img_height"],
    )
    p.scripts = forge
    by_tag = forge.processing.process_images(p).images[0]
    from PIL import Image

    drawn = Image.open(job.previews[0]).convert("RGB")
    assert drawn.size == (64, 80) and list(drawn.getdata()) == list(by_tag.convert("RGB").getdata())
    assert np.array_equal(txt2img(forge, settings["txt2img_prompt"]), plain_before)


def test_the_run_trains_on_the_checkpoint_and_loras_of_earlier_generations_keep_working(forge, tmp_path, data):
    engine = forge.engine
    to_k = engine.forge_objects_original.unet.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn2.to_k
    checkpoint_weight = to_k.weight.detach().clone()
    forge_engine.add_lora(engine)
    with_lora = txt2img(forge, "a red cube")
    forge_engine.remove_lora(engine)
    without = txt2img(forge, "a red cube")
    assert not np.array_equal(with_lora, without)
    lora = forge_engine.add_lora(engine)  # the last generation before training used the LoRA: it is merged
    assert np.array_equal(txt2img(forge, "a red cube"), with_lora)
    assert not torch.equal(to_k.weight, checkpoint_weight)

    seen = []
    hook = to_k.register_forward_pre_hook(lambda module, args: seen.append(module.weight.detach().clone()))
    tab, _blocks, _preview = forge_tab(forge)
    tab.start_from_host(TASK, "style", "filewords.txt", *tab_values(tab, data, tmp_path, create_image_every=0), False)
    job = tab.jobs.wait(tab.current_job, 300)
    hook.remove()
    assert job.state == "finished", job.message
    assert seen and all(torch.equal(weight, checkpoint_weight) for weight in seen)  # no LoRA in the training
    assert engine.forge_objects_after_applying_lora.unet is lora and engine.forge_objects.unet is lora
    assert np.array_equal(txt2img(forge, "a red cube"), with_lora)  # the LoRA still applies
    forge_engine.remove_lora(engine)
    assert np.array_equal(txt2img(forge, "a red cube"), without)


@pytest.mark.parametrize("ending", ["interrupt", "error"])
def test_an_interrupted_or_failed_run_saves_its_step_and_leaves_the_model_as_it_was(forge, tmp_path, data, ending):
    before = unet_state(forge)
    tab, _blocks, _preview = forge_tab(forge)
    unet = forge.engine.forge_objects_original.unet.model.diffusion_model
    calls = []

    def fail_on_the_second_step(module, args, kwargs):
        calls.append(1)
        if ending == "error" and len(calls) == 2:
            raise RuntimeError("CUDA error: device-side assert triggered")

    hook = unet.register_forward_pre_hook(fail_on_the_second_step, with_kwargs=True)
    values = tab_values(tab, data, tmp_path, steps=500, create_image_every=0, save_hypernetwork_every=0)
    tab.start_from_host(TASK, "style", "filewords.txt", *values, False)
    if ending == "interrupt":
        wait_for(lambda: tab.jobs.status(tab.current_job).step >= 1)
        forge.shared.state.interrupt()
    job = tab.jobs.wait(tab.current_job, 300)
    hook.remove()
    if ending == "interrupt":
        assert job.state == "interrupted" and 1 <= job.step < 500
    else:
        assert job.state == "failed" and "device-side assert" in job.message and job.step == 1
    assert hx.load(job.result_path or forge.hypernetwork_dir / "style-1.pt").step == job.step
    assert_same_unet(before, unet_state(forge))
    assert all(t.is_inference() for t in unet.parameters())  # Forge's own tensors, no views left


def test_a_partial_load_is_refused_with_a_clear_message(monkeypatch, tmp_path, data):
    host = make_host(monkeypatch, tmp_path, memory=forge_engine.MemoryManager(capacity=1, partial=True))
    before = unet_state(host)
    tab, _blocks, _preview = forge_tab(host)
    tab.start_from_host(TASK, "style", "filewords.txt", *tab_values(tab, data, tmp_path, create_image_every=0), False)
    job = tab.jobs.wait(tab.current_job, 300)
    assert job.state == "failed" and "only part of the UNet" in job.message and "--always-low-vram" in job.message
    assert not (host.hypernetwork_dir / "style-1.pt").exists()
    assert_same_unet(before, unet_state(host))
    assert host.errors.reported == []


# --- the backend itself ------------------------------------------------------------------------------


class Memory:
    def __init__(self, manager):
        self.manager = manager

    def load(self, patchers):
        with torch.inference_mode():
            self.manager.load_models_gpu(list(patchers))

    def fully_loaded(self, patcher):
        return True


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("classic", [False, True])
def test_gradients_through_forges_unet_equal_those_through_a1111s(tmp_path, classic, checkpointing):
    """Forge's UNet (inference-tensor weights, blocks adding in place) gives the network exactly the
    gradients of the same UNet run by ldm's own blocks with the network in to_k/to_v hooks; with
    gradient checkpointing too (in the real Forge Classic, whose blocks add in place, the recomputation
    found its saved block inputs modified: every run failed at step 0)."""
    from hypernetwork_ext.training.checkpointing import gradient_checkpointing
    from tests.support import models as M

    engine = forge_engine.build(0, classic=classic)
    backend = ForgeBackend(engine, Memory(engine.memory))
    plain = M.ldm_unet(0)  # the same configuration: the weights come from Forge's UNet
    with torch.inference_mode():
        state = {k: v.clone() for k, v in backend.unet.state_dict().items()}
    plain.load_state_dict({k: v.clone() for k, v in state.items()})
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    t = torch.tensor([10, 700])
    with torch.inference_mode():  # the host's conditioning is an inference tensor
        context = torch.randn(2, 7, LDM_CONTEXT, generator=generator)

    def gradients(run):
        network = hx.create(WIDTHS, (1, 2, 1), "relu", seed=4)
        network.train()
        run(network)
        return [p.grad.clone() for p in network.parameters()]

    def through_forge(network):  # backward inside the run, as the trainer's steps do
        with backend.attach(network), gradient_checkpointing(backend.unet, checkpointing):
            backend.predict(x, t, context.clone()).pow(2).mean().backward()

    def through_a1111(network):
        with hx.apply(plain, [network]):
            plain(x, t, context=context.clone()).pow(2).mean().backward()

    for forge_grad, a1111_grad in zip(gradients(through_forge), gradients(through_a1111), strict=True):
        torch.testing.assert_close(forge_grad, a1111_grad, rtol=1e-4, atol=1e-6)
    if not classic:
        assert all(p.is_inference() for p in backend.unet.parameters())  # Forge's own tensors are back


@pytest.mark.parametrize("reforge", [False, True])
def test_sdxl_trains_with_the_pooled_and_size_conditioning(tmp_path, data, reforge):
    engine = forge_engine.build(0, reforge=reforge, family="sdxl")
    backend = ForgeBackend(engine, Memory(engine.memory), model_family="sdxl")
    vectors = []
    unet = backend.unet
    hook = unet.label_emb.register_forward_pre_hook(lambda module, args: vectors.append(args[0].shape))
    network = hx.create((SDXL_CONTEXT, *LDM_WIDTHS), (1, 2, 1), "relu", seed=1, name="xl")
    settings = TrainingConfig(
        hypernetwork_name="xl",
        data_root=str(data),
        log_directory=str(tmp_path / "logs"),
        steps=2,
        create_image_every=0,
        save_hypernetwork_every=0,
        template_filename="filewords.txt",
        **SMALL_RUN,
    )
    before = [p.detach().clone() for p in network.parameters()]
    result = train(network, backend, settings, output_dir=str(tmp_path), progress_bar=False)
    hook.remove()
    assert result.stopped == "finished" and result.step == 2
    assert vectors and vectors[0] == (1, SDXL_CONTEXT + 6)
    assert any(not torch.equal(a, b) for a, b in zip(before, network.parameters(), strict=True))
    assert hx.load(result.path).info.model_family == "sdxl"


@pytest.mark.parametrize("reforge", [False, True])
def test_the_noise_schedule_and_prediction_come_from_the_hosts_sampler(reforge):
    from hypernetwork_ext.errors import HypernetworkError
    from hypernetwork_ext.training.backends.forge import noise_schedule

    eps, v = (forge_engine.KModel(torch.nn.Linear(1, 1), reforge=reforge, v_prediction=flag) for flag in (0, 1))
    prediction, alphas = noise_schedule(eps)
    assert prediction == "epsilon" and noise_schedule(v)[0] == "v_prediction"
    torch.testing.assert_close(alphas, forge_engine.Prediction().alphas_cumprod)  # from the sigmas, either host
    other = forge_engine.KModel(torch.nn.Linear(1, 1), reforge=reforge)
    if reforge:  # a sampling without EPS or V_PREDICTION (EDM, flows)
        other.model_sampling = forge_engine.ModelSamplingDiscrete()
    else:
        other.predictor.prediction_type = "const"  # Forge's flow models (SD3, Flux)
    with pytest.raises(HypernetworkError, match="epsilon or v prediction"):
        noise_schedule(other)


def test_the_trainers_fixes_hold_on_forge(tmp_path, data):
    """Resume continues exactly as the uninterrupted run, and the NaN guard keeps the last good
    weights, on Forge's model with its memory manager moving models in the middle of the run."""
    from tests.core.test_training_engine import NaNAt, weights

    def run(folder, network, *, nan_at=None, **changes):
        engine = forge_engine.build(0)
        backend = ForgeBackend(engine, Memory(engine.memory), model_family="sd1")
        settings = TrainingConfig(
            hypernetwork_name="style",
            data_root=str(data),
            log_directory=str(folder / "logs"),
            template_filename="filewords.txt",
            steps=4,
            create_image_every=0,
            save_hypernetwork_every=1,
            save_optimizer_state=True,
            shuffle_tags=True,
            latent_sampling_method="random",
            **SMALL_RUN,
        ).replace(**changes)
        wrapped = backend if nan_at is None else NaNAt(backend, nan_at)
        return train(network, wrapped, settings, output_dir=str(folder), progress_bar=False)

    hx.save(hx.create(WIDTHS, (1, 2, 1), "relu", seed=1, name="style"), tmp_path / "style.pt")

    def network():
        return hx.load(tmp_path / "style.pt")

    whole = run(tmp_path / "a", network())
    copy = next(c for c in whole.copies if c.endswith("style-2.pt"))
    resumed = run(tmp_path / "b", None, resume_from=copy)
    assert resumed.start_step == 2 and whole.losses[2:] == resumed.losses
    assert all(torch.equal(v, weights(resumed.network)[k]) for k, v in weights(whole.network).items())

    stopped = run(tmp_path / "c", network(), nan_at=3)  # the loss of step 2's weights is NaN: step 1's are kept
    assert stopped.stopped == "non-finite" and stopped.step == 1
    at_one = weights(hx.load(next(c for c in whole.copies if c.endswith("style-1.pt"))))
    assert all(torch.equal(v, weights(hx.load(stopped.path))[k]) for k, v in at_one.items())


def test_unloading_leaves_the_text_encoder_and_vae_to_forges_memory_manager(tmp_path, data):
    """With a GPU the run asks the memory manager to unload everything but the UNet once the dataset
    is encoded and after every host call (captions not seen before, previews): the manager loads the
    text encoder and VAE for the host's own calls."""

    class Recording(Memory):
        unloads = 0

        def unload_others(self, patcher):
            assert patcher is backend.patcher
            self.unloads += 1

    class OnAGpu(ForgeBackend):
        computes_off_host = True  # the stand-in computes on the CPU

    engine = forge_engine.build(0)
    memory = Recording(engine.memory)
    backend = OnAGpu(engine, memory, model_family="sd1")
    hx.save(hx.create(WIDTHS, (1, 2, 1), "relu", seed=1, name="style"), tmp_path / "style.pt")
    settings = TrainingConfig(
        hypernetwork_name="style",
        data_root=str(data),
        log_directory=str(tmp_path / "logs"),
        template_filename="filewords.txt",
        steps=2,
        create_image_every=0,
        save_hypernetwork_every=0,
        unload_models_when_training=True,
        **SMALL_RUN,
    )
    result = train(hx.load(tmp_path / "style.pt"), backend, settings, output_dir=str(tmp_path), progress_bar=False)
    assert result.stopped == "finished" and backend.unloading
    assert memory.unloads >= 2  # when unloading starts, and after the captions' encoding


def test_the_hosts_memory_manager_is_asked_to_keep_only_the_unet():
    from types import SimpleNamespace

    from hypernetwork_ext.hosts.forge_training import HostMemory

    calls = []
    unet, vae = SimpleNamespace(load_device="cuda:0"), SimpleNamespace(load_device="cuda:0")
    loaded = [SimpleNamespace(model=vae), SimpleNamespace(model=unet)]
    module = SimpleNamespace(
        current_loaded_models=loaded,
        free_memory=lambda required, device, keep_loaded=(): calls.append((required, device, keep_loaded)),
    )
    HostMemory(module).unload_others(unet)
    assert calls == [(1e30, torch.device("cuda:0"), [loaded[1]])]
    HostMemory(module).unload_others(SimpleNamespace(load_device="cpu"))  # nothing to unload on a CPU
    assert len(calls) == 1
