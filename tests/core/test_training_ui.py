"""The training tab builds on the installed gradio and its handlers work without a browser."""

from __future__ import annotations

import gradio as gr
import pytest

from hypernetwork_ext.training.jobs import TrainingJobs, TrainingServices
from hypernetwork_ext.ui.training import CREATE_FIELDS, TrainingTab, build_training_tab, loss_chart_html


class NoBackend:
    def __call__(self):
        raise AssertionError("no training in these tests")


@pytest.fixture
def tab(tmp_path) -> TrainingTab:
    services = TrainingServices(
        hypernetwork_dir=str(tmp_path / "hn"),
        make_backend=NoBackend(),
        model_family=lambda: "sdxl",
        presets_dir=str(tmp_path / "presets"),
    )
    with gr.Blocks() as blocks:
        built = build_training_tab(TrainingJobs(services), blocks=blocks)
    return built


def create_values(tab, **changes):
    values = {name: component.value for name, component in tab.create_inputs.items()}
    values.update(changes)
    return [values[name] for name in CREATE_FIELDS]


def test_defaults_follow_the_loaded_model_family(tab):
    assert tab.create_inputs["enable_sizes"].value == ["2048", "640", "1280"]
    assert "learn_rate" in tab.train_inputs and tab.train_inputs["learn_rate"].value == "0.00001"


def test_create_explains_invalid_input_next_to_each_field(tab):
    message, *errors, _dropdown = tab.create(
        *create_values(tab, name="", layer_structure="1, two, 1", activation_func="nope")
    )
    by_field = dict(zip(CREATE_FIELDS, errors, strict=True))
    assert "Not created" in message
    assert by_field["name"] and by_field["layer_structure"] and by_field["activation_func"]
    assert not by_field["file_format"]
    message, *errors, _dropdown = tab.create(*create_values(tab, name="mine", weight_init_seed=4))
    assert "Created" in message and not any(errors)
    assert tab.network_names() == ["mine"]


def test_start_reports_problems_and_presets_round_trip(tab):
    values = [component.value for component in tab.train_inputs.values()]
    message = tab.start("", "style_filewords.txt", *values)
    assert "hypernetwork_name" in message and "data_root" in message
    learn_rate_index = list(tab.train_inputs).index("learn_rate")
    values[learn_rate_index] = "1e-4:10, 1e-5"
    assert "saved" in tab.save_preset_file("mine", "", "style_filewords.txt", *values)
    assert tab.preset_names() == ["mine"]
    defaults = [component.value for component in tab.train_inputs.values()]
    loaded = tab.load_preset_file("mine", "", "style_filewords.txt", *defaults)
    assert "loaded" in loaded[0] and loaded[2 + learn_rate_index] == "1e-4:10, 1e-5"


def test_refresh_without_jobs_and_loss_chart(tab):
    progress, _chart, gallery = tab.refresh()
    assert "No training" in progress and gallery == []
    svg = loss_chart_html([(1, 0.5), (2, 0.4), (3, 0.45)], [(2, 0.6)])
    assert svg.count("<polyline") == 2 and "step 3" in svg


def test_refresh_shows_the_loss_at_fixed_noise_when_measured(tab):
    from hypernetwork_ext.training.jobs import JobStatus

    tab.jobs.jobs["j"] = JobStatus(
        id="j", state="running", step=20, max_steps=20, fixed_losses=[(0, 1.25), (20, 1.125)]
    )
    progress, _chart, _gallery = tab.refresh()
    assert "Loss at fixed noise: 1.2500000 at step 0, 1.1250000 at step 20" in progress
    tab.jobs.jobs["k"] = JobStatus(id="k", state="running", step=3, max_steps=20)
    assert "fixed noise" not in tab.refresh()[0]


@pytest.fixture
def tiny_tab(tmp_path) -> tuple[TrainingTab, gr.Blocks]:
    from hypernetwork_ext.shape import ModelShape

    services = TrainingServices(
        hypernetwork_dir=str(tmp_path / "hn"),
        make_backend=NoBackend(),
        model_shape=lambda: ModelShape(48, (32, 64), ()),
        presets_dir=str(tmp_path / "presets"),
    )
    with gr.Blocks() as blocks:
        built = build_training_tab(TrainingJobs(services), blocks=blocks)
    return built, blocks


def test_create_offers_and_ticks_the_loaded_models_widths(tiny_tab):
    """A model of no known family (the tiny one) used to get SD1's widths, not even offering its own."""
    tab, _blocks = tiny_tab
    sizes = tab.create_inputs["enable_sizes"]
    assert sizes.value == ["48", "32", "64"]
    assert [choice[0] for choice in sizes.choices][:3] == ["48", "32", "64"]
    assert tab.default_sizes()["value"] == ["48", "32", "64"]
    message, *_ = tab.create(*create_values(tab, name="mine"))
    assert "Created" in message


def test_lists_are_fresh_when_the_page_loads(tiny_tab, tmp_path):
    """After a reload the network list showed what existed when the app started, until "Refresh lists"."""
    import hypernetwork_ext as hx

    tab, blocks = tiny_tab
    hx.save(hx.create([48, 32, 64], name="later"), tmp_path / "hn" / "later.pt")
    on_load = [
        fn
        for fn in blocks.fns.values()
        if any(trigger == "load" for _block, trigger in fn.targets) and tab.list_components[0] in fn.outputs
    ]
    assert len(on_load) == 1
    network_update, _templates, _presets = on_load[0].fn()
    assert network_update["choices"] == ["later"]


def test_the_poll_shows_no_pending_state_and_the_chart_fits_its_column(tmp_path):
    """The progress, chart and gallery are refreshed every second: with gradio's pending state they
    kept an orange outline for as long as the page was open (A1111). The chart stretched to 480 px
    whatever its column, cutting its line and label there."""
    services = TrainingServices(hypernetwork_dir=str(tmp_path), make_backend=NoBackend())
    with gr.Blocks() as blocks:
        build_training_tab(TrainingJobs(services), blocks=blocks)
    config = blocks.get_config_file()
    ids = {c["id"]: c["props"].get("elem_id") for c in config["components"]}
    polls = [d for d in config["dependencies"] if "hnx_train_progress" in {ids.get(o) for o in d["outputs"]}]
    assert polls and all(d["show_progress"] == "hidden" for d in polls)
    chart = loss_chart_html([(step, 1.0 / step) for step in range(1, 21)])
    assert "width: 100%" in chart and "preserveAspectRatio='none'" in chart and " width='" not in chart
    assert "non-scaling-stroke" in chart and "class='hnx-loss-label'" in chart
