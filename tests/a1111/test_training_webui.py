"""Training from the WebUI, end to end through the A1111 1.10.1 stand-in on a real ldm LatentDiffusion:
the Train sub-tab and its handlers, shared.state progress and live preview, the queue lock, the
host's progress task, previews through the host's txt2img processing, Interrupt buttons, the
model restored bit for bit, the library and cards refreshed, refusals, and the routes with auth."""

from __future__ import annotations

import os
import sys
import threading
import time

import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

import hypernetwork_ext as hx
from hypernetwork_ext.training import PreviewRequest
from tests.support.models import LDM_CONTEXT, LDM_WIDTHS
from tests.support.training_models import dataset_folder, tiny_diffusion_engine, tiny_latent_diffusion
from tests.support.webui_standin import Host

WIDTHS = (LDM_CONTEXT, *LDM_WIDTHS)
TASK = "task(hnxtest1)"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return dataset_folder(tmp_path_factory.mktemp("data"), 2)


@pytest.fixture
def host(monkeypatch, tmp_path):
    host = Host(monkeypatch, tmp_path)
    hx.save(hx.create(WIDTHS, (1, 2, 1), "relu", seed=1, name="style"), host.hypernetwork_dir / "style.pt")
    host.start()
    host.load_checkpoint(tiny_latent_diffusion(0), "tiny.safetensors", "sd1")
    yield host
    assert host.errors.reported == []


def training():
    return sys.modules["hypernetwork_ext.hosts.webui_training"]


def handlers(interface):
    """(function, client-side js) of every event of a Blocks, on gradio 3.41 and 4.x."""
    fns = interface.fns.values() if isinstance(interface.fns, dict) else interface.fns
    return [(f.fn, d.get("js")) for f, d in zip(fns, interface.get_config_file()["dependencies"], strict=True)]


def built_tab(host):
    """The host builds its Train tab; our sub-tab's TrainingTab is the owner of the Train handler."""
    interface, preview = host.build_train_interface()
    starts = [fn for fn, js in handlers(interface) if js == "hnxStartTraining"]
    assert len(starts) == 1
    return starts[0].__self__, interface, preview


def tab_values(tab, data, tmp_path, **changes):
    values = {name: component.value for name, component in tab.train_inputs.items()}
    values.update(
        learn_rate="0.001",
        data_root=str(data),
        log_directory=str(tmp_path / "logs"),
        training_width=64,
        training_height=64,
        steps=3,
        create_image_every=2,
        save_hypernetwork_every=2,
        seed=11,
        training_write_csv_every=1,
    )
    values.update(changes)
    return [values[name] for name in tab.train_inputs]


def model_state(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        {name: m.training for name, m in model.named_modules()},
        {name: (p.requires_grad, p.device, p.dtype) for name, p in model.named_parameters()},
        {name: (len(m._forward_pre_hooks), len(m._forward_hooks)) for name, m in model.named_modules()},
    )


def assert_same_model(before, after):
    for key in before[0]:
        assert torch.equal(before[0][key], after[0][key]), key
    assert before[1:] == after[1:]


def wait_for(predicate, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


class Observer:
    """Reads the host's state each time the trainer hands it a live preview image."""

    def __init__(self, host, monkeypatch):
        self.host = host
        self.seen = []
        state = host.shared.state
        original = state.assign_current_image

        def assign(image):
            original(image)
            lock_free = host.call_queue.queue_lock.acquire(blocking=False)
            if lock_free:
                host.call_queue.queue_lock.release()
            request = host.progress.ProgressRequest(id_task=TASK, id_live_preview=-1)
            self.seen.append(
                {
                    "job": state.job,
                    "job_no": state.job_no,
                    "job_count": state.job_count,
                    "textinfo": state.textinfo,
                    "image": image,
                    "lock_free": lock_free,
                    "progress": host.progress.progressapi(request),
                    "parallel": host.shared.parallel_processing_allowed,
                }
            )

        monkeypatch.setattr(state, "assign_current_image", assign)


# --- the tab ---------------------------------------------------------------------------------------


def test_the_tab_is_a_train_sub_tab_and_the_hosts_own_controls_step_aside(host):
    tab, interface, _preview = built_tab(host)
    config = interface.get_config_file()
    by_id = {c["props"].get("elem_id"): c["props"] for c in config["components"] if c["props"].get("elem_id")}
    assert "hnx_train_tab" in by_id and "hnx_train_preview_from_txt2img_tab" in by_id
    for elem_id in ("train_new_hypernetwork_name", "train_create_hypernetwork", "train_hypernetwork"):
        assert by_id[elem_id]["visible"] is False
    for elem_id in ("train_hypernetwork_learn_rate", "train_train_hypernetwork"):
        assert by_id[elem_id]["visible"] is False
    dropout = [c["props"] for c in config["components"] if str(c["props"].get("label", "")).startswith("Enter hyper")]
    assert dropout and dropout[0]["visible"] is False
    assert by_id["train_train_embedding"]["visible"] is True and by_id["train_interrupt_training"]["visible"] is True
    assert "Hypernetworks</b> sub-tab" in by_id["hnx_moved_note"]["value"]
    assert tab.network_names() == ["style"] and "filewords.txt" in tab.template_names()
    assert tab.create_inputs["enable_sizes"].value == ["768", "320", "640", "1280"]  # the loaded model is SD1

    host.shared.opts.data["hypernetwork_hide_host_training"] = False  # Settings, then Reload UI
    host.reload_ui()
    _tab, interface, _preview = built_tab(host)
    props = {c["props"].get("elem_id"): c["props"] for c in interface.get_config_file()["components"]}
    assert props["train_train_hypernetwork"]["visible"] is True and "hnx_moved_note" not in props


def test_templates_and_networks_come_from_the_hosts_folders(host, tmp_path):
    (host.templates_dir / "mine.txt").write_text("a [name] picture of [filewords]\n")
    (host.templates_dir / "filewords.txt").write_text("host's own [filewords]\n")
    extra = tmp_path / "more-networks" / "inks"
    extra.mkdir(parents=True)
    hx.save(hx.create(WIDTHS, seed=3, name="ink"), extra / "ink.safetensors")
    host.shared.opts.data["hypernetwork_extra_folders"] = str(tmp_path / "more-networks")
    sys.modules["hypernetwork_ext.hosts.webui"].EXTENSION.library.refresh()
    tab, _interface, _preview = built_tab(host)
    assert "mine.txt" in tab.template_names() and "style_filewords.txt" in tab.template_names()
    assert tab.jobs.services.templates()["filewords.txt"] == str(host.templates_dir / "filewords.txt")
    assert tab.network_names() == ["ink", "style"]
    assert tab.jobs.services.network_path("ink") == str(extra / "ink.safetensors")


def test_a_run_from_the_tab_on_the_hosts_model(host, data, tmp_path, monkeypatch):
    tab, _interface, preview = built_tab(host)
    observer = Observer(host, monkeypatch)
    model = host.shared.sd_model
    before = model_state(model)
    torch.manual_seed(1234)
    rng_before = torch.get_rng_state()

    txt2img = [component.value for component in preview]
    message = tab.start_from_host(TASK, "style", "filewords.txt", *tab_values(tab, data, tmp_path), True, *txt2img)
    assert "Training started" in message
    job = tab.jobs.wait(tab.current_job, 300)
    assert job.state == "finished", job.message

    # the host's state moved with the steps while the run held the queue (a step's preview comes
    # before its report, as in A1111), and was handed back
    assert [seen["job_no"] for seen in observer.seen] == [1]
    seen = observer.seen[0]
    assert seen["job"] == "train-hypernetwork" and seen["job_count"] == 3 and seen["lock_free"] is False
    assert "Loss: " in seen["textinfo"] and "Step: 1" in seen["textinfo"] and "Last prompt: " in seen["textinfo"]
    assert seen["progress"]["active"] and seen["progress"]["progress"] == pytest.approx(1 / 3)
    assert seen["progress"]["live_preview"] is seen["image"] and seen["parallel"] is False
    state = host.shared.state
    assert state.jobs_begun == ["train-hypernetwork"] and state.job == "" and state.job_no == 3
    assert "saved to" in state.textinfo
    assert host.progress.current_task is None and TASK in host.progress.finished_tasks
    assert TASK not in host.progress.pending_tasks and host.shared.parallel_processing_allowed is True
    assert host.call_queue.queue_lock.acquire(blocking=False)
    host.call_queue.queue_lock.release()

    # copies, logs, result and card image where the tab said
    result = host.hypernetwork_dir / "style-3.pt"
    assert job.result_path == str(result) and hx.load(result).step == 3 and hx.load(result).name == "style-3"
    logs = next((tmp_path / "logs").glob("*/style"))
    assert (logs / "hypernetworks" / "style-2.pt").is_file() and (logs / "hypernetwork_loss.csv").is_file()
    assert list(logs.glob("settings-*.json"))
    image = Image.open(logs / "images" / "style-2.png")
    assert image.size == (64, 80)  # the txt2img tab's width and height, not the training size
    assert (host.hypernetwork_dir / "style-3.preview.png").read_bytes() == (
        logs / "images" / "style-2.png"
    ).read_bytes()

    # the network appears everywhere at once: tags, cards page with its preview, the host's own list
    extension = sys.modules["hypernetwork_ext.hosts.webui"].EXTENSION
    assert extension.library.resolve("style-3").entry.path == str(result)
    page = next(p for p in host.ui_extra_networks.extra_pages if p.name == "hypernetworks")
    page.create_html("txt2img")
    assert "style-3.preview.png" in page.items["style-3"]["preview"]
    assert host.shared.hypernetworks["style-3"] == str(result)
    assert "style-3" in tab.network_names()

    # the model exactly as found; the trainer's random draws did not move the caller's generator
    assert_same_model(before, model_state(model))
    assert torch.equal(torch.get_rng_state(), rng_before)

    # the preview is the host's txt2img render of the step-2 weights, with the network in our hooks
    request = PreviewRequest(prompt="a red cube", negative_prompt="blurry", steps=3, sampler_name="Euler a")
    request.cfg_scale, request.seed, request.width, request.height = 5.0, 11, 64, 80
    copy = hx.load(logs / "hypernetworks" / "style-2.pt")
    with hx.apply(model.model.diffusion_model, [copy]):
        again = training().render_preview(request)
    plain = training().render_preview(request)
    assert list(again.getdata()) == list(image.convert("RGB").getdata())
    assert list(plain.getdata()) != list(again.getdata())


@pytest.mark.parametrize("button", ["host", "tab"])
def test_interrupt_buttons_stop_it_and_the_model_is_restored(host, data, tmp_path, button):
    tab, _interface, _preview = built_tab(host)
    model = host.shared.sd_model
    before = model_state(model)
    values = tab_values(tab, data, tmp_path, steps=500, create_image_every=0, save_hypernetwork_every=0)
    tab.start_from_host(TASK, "style", "filewords.txt", *values, False, *[None] * 8)
    wait_for(lambda: tab.jobs.status(tab.current_job).step >= 1)
    if button == "host":
        host.shared.state.interrupt()  # the Train tab's Interrupt, txt2img's, /sdapi/v1/interrupt
    else:
        assert "Interrupting" in tab.interrupt()
    job = tab.jobs.wait(tab.current_job, 120)
    assert job.state == "interrupted" and 1 <= job.step < 500
    assert hx.load(job.result_path).step == job.step
    assert_same_model(before, model_state(model))


def test_an_error_is_reported_and_the_model_is_restored(host, data, tmp_path):
    tab, _interface, _preview = built_tab(host)
    model = host.shared.sd_model
    before = model_state(model)
    calls = []

    def fail_on_the_second_step(module, args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("CUDA error: device-side assert triggered")

    hook = model.model.diffusion_model.register_forward_pre_hook(fail_on_the_second_step)
    values = tab_values(tab, data, tmp_path, create_image_every=0)
    tab.start_from_host(TASK, "style", "filewords.txt", *values, False, *[None] * 8)
    job = tab.jobs.wait(tab.current_job, 120)
    hook.remove()
    assert job.state == "failed" and "device-side assert" in job.message and "step 1" in job.message
    assert hx.load(host.hypernetwork_dir / "style-1.pt").step == 1  # the last good step is kept
    assert_same_model(before, model_state(model))
    assert host.shared.state.job == "" and host.progress.current_task is None
    assert host.call_queue.queue_lock.acquire(blocking=False)
    host.call_queue.queue_lock.release()


def test_training_and_generation_never_run_at_once(host, data, tmp_path):
    tab, _interface, _preview = built_tab(host)
    lock = host.call_queue.queue_lock
    values = tab_values(tab, data, tmp_path, steps=4, create_image_every=0, save_hypernetwork_every=0)

    lock.acquire()  # a generation is running
    try:
        tab.start_from_host(TASK, "style", "filewords.txt", *values, False, *[None] * 8)
        time.sleep(0.5)
        status = tab.jobs.status(tab.current_job)
        assert status.state == "queued" and status.step == 0
        assert TASK in host.progress.pending_tasks  # the progress bar says "In queue"
        assert not host.progress.progressapi(host.progress.ProgressRequest(id_task=TASK))["active"]
    finally:
        lock.release()
    wait_for(lambda: tab.jobs.status(tab.current_job).state != "queued")

    generated = []  # the training's step when a generation started now gets to run
    generation = host.call_queue.wrap_gradio_gpu_call(lambda: generated.append(tab.jobs.status(tab.current_job).step))
    thread = threading.Thread(target=generation)
    thread.start()
    job = tab.jobs.wait(tab.current_job, 120)
    thread.join(60)
    assert job.state == "finished" and generated == [4]  # it waited for the whole training


def test_the_hosts_attention_optimisation_stays_on(host, data, tmp_path, monkeypatch):
    """A1111 replaces CrossAttention.forward with its kernel (sdp here); the trainer leaves it there
    and the network learns through it (its hooks sit on to_k/to_v, which every kernel calls)."""
    from ldm.modules.attention import CrossAttention

    calls = []

    def sdp_forward(self, x, context=None, mask=None, **kwargs):
        calls.append(1)
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        b, n, _ = q.shape
        q, k, v = (t.reshape(b, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2) for t in (q, k, v))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))

    monkeypatch.setattr(CrossAttention, "forward", sdp_forward)
    tab, _interface, _preview = built_tab(host)
    values = tab_values(tab, data, tmp_path, steps=1, create_image_every=0, save_hypernetwork_every=0)
    tab.start_from_host(TASK, "style", "filewords.txt", *values, False, *[None] * 8)
    job = tab.jobs.wait(tab.current_job, 120)
    assert job.state == "finished" and calls
    assert CrossAttention.forward is sdp_forward
    trained, source = hx.load(job.result_path), hx.load(host.hypernetwork_dir / "style.pt")
    assert any(not torch.equal(a, b) for a, b in zip(trained.parameters(), source.parameters(), strict=True))


def test_networks_left_on_by_a_failed_generation_come_off_before_training(host, data, tmp_path):
    extension = sys.modules["hypernetwork_ext.hosts.webui"].EXTENSION
    p = host.processing.StableDiffusionProcessingTxt2Img(sd_model=host.shared.sd_model, prompt="x")
    extension.activate(p, [["style", "1"]])  # the generation then raised before its postprocess
    unet = host.shared.sd_model.model.diffusion_model
    sites = len(hx.find_attention_sites(unet))
    seen = []
    counter = unet.register_forward_pre_hook(
        lambda m, a: seen.append(sum(len(x._forward_pre_hooks) for x in unet.modules()))
    )
    tab, _interface, _preview = built_tab(host)
    values = tab_values(tab, data, tmp_path, steps=1, create_image_every=0, save_hypernetwork_every=0)
    tab.start_from_host(TASK, "style", "filewords.txt", *values, False, *[None] * 8)
    assert tab.jobs.wait(tab.current_job, 120).state == "finished"
    counter.remove()
    assert seen and set(seen) == {2 * sites + 1}  # the trained network's to_k/to_v hooks and the counter


def test_networks_a1111s_own_trainer_left_loaded_do_not_act_on_a_run(host, data, tmp_path):
    """A1111's trainer leaves its network in shared.loaded_hypernetworks, which A1111's attention
    applies; during our run the list is empty (steps and previews), and afterwards it is as found."""
    leftover = object()
    host.shared.loaded_hypernetworks.append(leftover)
    unet = host.shared.sd_model.model.diffusion_model
    seen = []
    watch = unet.register_forward_pre_hook(lambda m, a: seen.append(list(host.shared.loaded_hypernetworks)))
    tab, _interface, _preview = built_tab(host)
    values = tab_values(tab, data, tmp_path, steps=2, save_hypernetwork_every=0)
    tab.start_from_host(TASK, "style", "filewords.txt", *values, False, *[None] * 8)
    job = tab.jobs.wait(tab.current_job, 120)
    watch.remove()
    assert job.state == "finished" and job.previews
    assert seen and all(loaded == [] for loaded in seen)
    assert host.shared.loaded_hypernetworks == [leftover]


def test_a_checkpoint_chosen_while_training_is_not_loaded_by_the_previews(host, data, tmp_path):
    other = host.sd_models.CheckpointInfo("other.safetensors", "abcdef0123")
    host.sd_models.register(other)
    tab, _interface, _preview = built_tab(host)
    host.shared.opts.data["sd_model_checkpoint"] = other.title  # chosen in the UI; its reload waits for the queue
    values = tab_values(tab, data, tmp_path, steps=2, save_hypernetwork_every=0)
    tab.start_from_host(TASK, "style", "filewords.txt", *values, False, *[None] * 8)
    job = tab.jobs.wait(tab.current_job, 120)
    assert job.state == "finished" and job.previews
    assert host.sd_models.switches == [] and host.shared.opts.sd_model_checkpoint == other.title
    # a plain txt2img job would have loaded it (the case the override guards against)
    p = host.processing.StableDiffusionProcessingTxt2Img(sd_model=host.shared.sd_model, prompt="x", steps=1)
    p.width = p.height = 64
    host.processing.process_images(p)
    assert host.sd_models.switches == [other.title]


def test_medvram_starts_and_ends_with_nothing_on_the_gpu(host, data, tmp_path):
    host.shared.cmd_opts.medvram = True
    host.load_checkpoint(host.shared.sd_model, "tiny.safetensors", "sd1")
    tab, _interface, _preview = built_tab(host)
    backend = training().make_backend()
    assert backend.sd_model is host.shared.sd_model  # the loaded model itself, no copy
    assert backend.device is sys.modules["modules.devices"].device  # where the host computes
    values = tab_values(tab, data, tmp_path, steps=1, create_image_every=0, save_hypernetwork_every=0)
    tab.start_from_host(TASK, "style", "filewords.txt", *values, False, *[None] * 8)
    assert tab.jobs.wait(tab.current_job, 120).state == "finished"
    assert len(host.lowvram.sent_to_cpu) == 2 and host.lowvram.module_in_gpu is None


def test_what_the_host_cannot_do_is_refused_clearly(host, data, tmp_path):
    tab, _interface, _preview = built_tab(host)
    values = tab_values(tab, data, tmp_path)
    txt2img = ["p", "", 3, "No such sampler", 5.0, 1, 64, 64]
    message = tab.start_from_host(TASK, "style", "filewords.txt", *values, True, *txt2img)
    assert "preview_sampler_name" in message and "DPM++ 2M" in message
    assert host.progress.finished_tasks[-1] == TASK and TASK not in host.progress.pending_tasks
    assert "k_euler_a" in host.sd_samplers.samplers_map and training().sampler_name("k_euler_a") == "Euler a"

    host.shared.cmd_opts.lowvram = True
    message = tab.start_from_host(TASK, "style", "filewords.txt", *values, False, *[None] * 8)
    assert "Not started" in message and "--lowvram" in message and "--medvram works" in message
    host.shared.cmd_opts.lowvram = False

    host.shared.sd_model.is_sd3 = True
    assert "SD3" in tab.start_from_host(TASK, "style", "filewords.txt", *values, False, *[None] * 8)
    host.shared.sd_model = None
    assert "No checkpoint is loaded" in tab.start_from_host(TASK, "style", "filewords.txt", *values, False, *[None] * 8)
    assert tab.jobs.jobs == {}


def test_sdxl_trains_through_the_sgm_backend(monkeypatch, tmp_path, data):
    from tests.support.training_models import SGM_CONTEXT

    host = Host(monkeypatch, tmp_path)
    hx.save(hx.create((SGM_CONTEXT, *LDM_WIDTHS), seed=2, name="xl"), host.hypernetwork_dir / "xl.safetensors")
    host.start()
    engine = host.load_checkpoint(tiny_diffusion_engine(0), "xl.safetensors", "sdxl")
    before = model_state(engine)
    tab, _interface, _preview = built_tab(host)
    assert tab.create_inputs["enable_sizes"].value == ["2048", "640", "1280"]
    assert type(training().make_backend()).__name__ == "SgmBackend"
    values = tab_values(tab, data, tmp_path, steps=2, create_image_every=0, save_hypernetwork_every=0)
    tab.start_from_host(TASK, "xl", "filewords.txt", *values, False, *[None] * 8)
    job = tab.jobs.wait(tab.current_job, 120)
    assert job.state == "finished" and job.result_path.endswith("xl-2.safetensors")
    assert hx.load(job.result_path).info.model_family == "sdxl"
    assert_same_model(before, model_state(engine))


# --- routes ---------------------------------------------------------------------------------------


def test_routes_under_the_hosts_auth_run_on_its_queue(host, data, tmp_path):
    host.shared.cmd_opts.api_auth = "alice:secret"
    app = FastAPI()
    host.script_callbacks.app_started_callback(None, app)
    client = TestClient(app)
    auth = ("alice", "secret")
    assert client.post("/hypernetworks/v1/create", json={"name": "new"}).status_code == 401
    created = client.post("/hypernetworks/v1/create", json={"name": "new", "weight_init_seed": 1}, auth=auth)
    assert created.status_code == 200 and created.json()["widths"] == [768, 320, 640, 1280]
    assert client.get("/hypernetworks/v1/networks/new", auth=auth).status_code == 200  # library refreshed

    body = {
        "hypernetwork_name": "style",
        "learn_rate": "0.001",
        "data_root": str(data),
        "log_directory": str(tmp_path / "api-logs"),
        "training_width": 64,
        "training_height": 64,
        "steps": 2,
        "create_image_every": 2,
        "save_hypernetwork_every": 0,
        "preview_steps": 2,
        "preview_width": 64,
        "preview_height": 64,
        "template_filename": "filewords.txt",
        "seed": 3,
    }
    assert client.post("/hypernetworks/v1/train", json=body).status_code == 401
    started = client.post("/hypernetworks/v1/train", json=body, auth=auth)
    assert started.status_code == 200, started.text
    job_id = started.json()["job_id"]
    training().jobs().wait(job_id, 120)
    status = client.get(f"/hypernetworks/v1/jobs/{job_id}", auth=auth).json()
    assert status["state"] == "finished" and status["step"] == 2 and status["preview_url"]
    assert status["result_path"] == os.path.join(str(host.hypernetwork_dir), "style-2.pt")
    preview = client.get(status["preview_url"], auth=auth)
    assert preview.status_code == 200 and preview.content.startswith(b"\x89PNG")
    assert host.shared.state.jobs_begun == ["train-hypernetwork"]  # it ran as a host job, under the queue
    assert client.post(f"/hypernetworks/v1/jobs/{job_id}/interrupt", auth=auth).json()["interrupted"] is False

    host.shared.cmd_opts.lowvram = True
    refused = client.post("/hypernetworks/v1/train", json=body, auth=auth)
    assert refused.status_code == 400 and "--lowvram" in refused.json()["detail"]
