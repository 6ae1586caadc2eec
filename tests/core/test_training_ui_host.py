"""The training tab under a host (HostHooks): the Train button carries a task id first and the
txt2img values last, wired to the host's client-side function; built on the installed gradio."""

from __future__ import annotations

import gradio as gr
import pytest

from hypernetwork_ext.training.jobs import TrainingJobs, TrainingServices
from hypernetwork_ext.ui.training import TXT2IMG_PREVIEW_FIELDS, HostHooks, build_training_tab, txt2img_preview


class RecordingJobs(TrainingJobs):
    """Jobs that record what the tab starts instead of training."""

    def __init__(self, services):
        super().__init__(services)
        self.started = []

    def start(self, config, *, task_id=None):
        self.started.append((config, task_id))
        return "job1"


def handlers(blocks):
    fns = blocks.fns.values() if isinstance(blocks.fns, dict) else blocks.fns
    return [(f.fn, d.get("js")) for f, d in zip(fns, blocks.get_config_file()["dependencies"], strict=True)]


@pytest.fixture
def hosted(tmp_path):
    services = TrainingServices(str(tmp_path), make_backend=lambda: None, network_names=lambda: ["b", "a/sub"])
    jobs = RecordingJobs(services)
    with gr.Blocks() as blocks:
        txt2img = [gr.Textbox(label=name) for name in TXT2IMG_PREVIEW_FIELDS]
        tab = build_training_tab(jobs, blocks=blocks, host=HostHooks(txt2img, "hnxStartTraining"))
    return tab, jobs, blocks


def test_the_train_button_runs_the_hosts_script_then_the_handler(hosted):
    tab, _jobs, blocks = hosted
    starts = [(fn, js) for fn, js in handlers(blocks) if js == "hnxStartTraining"]
    assert len(starts) == 1 and starts[0][0] == tab.start_from_host
    assert tab.network_names() == ["b", "a/sub"]  # the host's names (its folders), not a folder scan


def test_txt2img_values_replace_the_preview_options_when_asked(hosted):
    tab, jobs, _blocks = hosted
    values = [component.value for component in tab.train_inputs.values()]
    txt2img = ["a red cube", "blurry", 12.0, "Euler a", 6.5, 42.0, 640, 768]
    assert "started" in tab.start_from_host("task(x1)", "style", "none.txt", *values, True, *txt2img)
    config, task_id = jobs.started[-1]
    assert task_id == "task(x1)" and config.preview_from_txt2img is True
    assert (config.preview_prompt, config.preview_steps, config.preview_seed) == ("a red cube", 12, 42)
    assert (config.preview_sampler_name, config.preview_cfg_scale) == ("Euler a", 6.5)
    assert (config.preview_width, config.preview_height) == (640, 768)
    tab.start_from_host("", "style", "none.txt", *values, False, *txt2img)
    config, task_id = jobs.started[-1]
    assert task_id is None and config.preview_from_txt2img is False and config.preview_prompt == ""


def test_empty_txt2img_numbers_keep_the_defaults():
    typed = txt2img_preview(["p", None, "", "", None, -1, 512.0, None])
    assert typed["preview_steps"] == 20 and typed["preview_cfg_scale"] == 7.0 and typed["preview_seed"] == -1
    assert typed["preview_width"] == 512 and typed["preview_height"] == 512 and typed["preview_negative_prompt"] == ""
