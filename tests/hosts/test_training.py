"""Training in the real host (A1111, Forge, reForge, Forge Classic): a network created for the loaded checkpoint,
trained 20 steps at 64 px on a small generated dataset through the routes and through the Train
tab in headless Chromium (the loss at fixed noise falls, a preview appears, Interrupt keeps the step reached), and
the result rendered by its tag in the same server while the image without a tag stays the same.
Seconds per training step are written to ``training-figures.json`` with the artifacts."""

from __future__ import annotations

import json
import os
import re
import statistics
import time
from pathlib import Path

import pytest

import hypernetwork_ext as hx
from tests.hosts.browser import open_page, screenshot, screenshot_on_failure
from tests.hosts.jobs import Progress, ended, from_status, from_tab, reached, wait_for
from tests.hosts.real_host import WITHOUT_TRAIN_TAB, HttpError, max_difference
from tests.hosts.training_data import finite_training_set

PREFIX = "hnx-train-"
ROUTES_NAME, TAB_NAME = f"{PREFIX}routes", f"{PREFIX}tab"
STEPS = 20
PREVIEW_EVERY = 10
PREVIEW = {
    "preview_from_txt2img": True,
    "preview_negative_prompt": "",
    "preview_steps": 4,
    "preview_sampler_name": "Euler",
    "preview_cfg_scale": 7.0,
    "preview_seed": 1234,
    "preview_width": 64,
    "preview_height": 64,
}
TRAINING_IMAGES = 4


def cleanup(folder: Path) -> None:
    for path in folder.glob(f"{PREFIX}*"):
        path.unlink()


@pytest.fixture(scope="module")
def dataset(suite) -> Path:
    """Captioned pictures whose captions this host renders finitely with this checkpoint."""
    folder = suite.config.artifacts / "training-data"
    finite_training_set(suite.server, folder, TRAINING_IMAGES)
    cleanup(suite.config.hypernetwork_dir)
    yield folder
    cleanup(suite.config.hypernetwork_dir)


def extra_options() -> dict:
    """Settings every training run of the suite adds, from ``HNX_HOST_TRAINING_OPTIONS`` (a JSON object):
    ``{"gradient_checkpointing": true}`` where a host computes float16 weights in float32 on a CPU and
    the float32 copies kept for the backward pass would not fit the machine (the full SDXL in Forge Classic)."""
    text = os.environ.get("HNX_HOST_TRAINING_OPTIONS", "").strip()
    options = json.loads(text) if text else {}
    if not isinstance(options, dict):
        raise ValueError(f"HNX_HOST_TRAINING_OPTIONS must be a JSON object, not {text!r}")
    return options


def payload(suite, dataset: Path, name: str, **changes) -> dict:
    values = {
        "hypernetwork_name": name,
        "data_root": str(dataset),
        "log_directory": str(suite.config.artifacts / "training-logs"),
        "learn_rate": "0.005",
        "training_width": 64,
        "training_height": 64,
        "steps": STEPS,
        "create_image_every": PREVIEW_EVERY,
        "save_hypernetwork_every": PREVIEW_EVERY,
        "template_filename": "filewords.txt",
        "seed": 7,
        **PREVIEW,
        "preview_prompt": suite.plain,
        **extra_options(),
    }
    values.update(changes)
    return values


def follow(server, job_id: str, until, what: str) -> tuple[dict, list[tuple[float, int]]]:
    """Poll a job until ``until(progress)``; fails at once if it ends otherwise (see ``jobs.wait_for``).
    Returns its full status and the (time, step) seen."""
    trace: list[tuple[float, int]] = []

    def read() -> Progress:
        progress = from_status(server.get(f"/hypernetworks/v1/jobs/{job_id}?history=false", timeout=120))
        if not trace or trace[-1][1] != progress.step:
            trace.append((time.monotonic(), progress.step))
        return progress

    wait_for(read, until, f"{what} (job {job_id})")
    return server.get(f"/hypernetworks/v1/jobs/{job_id}", timeout=120), trace


def seconds_per_step(trace: list[tuple[float, int]], first: int = 1, last: int = PREVIEW_EVERY - 1) -> float:
    """Between the first sight of two steps that have no preview or copy between them (the earliest and
    latest of them seen: a slow host's answers can skip a step)."""
    seen = {step: moment for moment, step in trace if first <= step <= last}
    low, high = min(seen), max(seen)
    return (seen[high] - seen[low]) / (high - low)


def record_figure(suite, key: str, value) -> None:
    path = suite.config.artifacts / "training-figures.json"
    figures = json.loads(path.read_text()) if path.exists() else {}
    figures.setdefault(suite.checkpoint.path.name, {})[key] = value
    path.write_text(json.dumps(figures, indent=1))


def step_loss_medians(losses: list) -> tuple[float, float]:
    """Medians of the first and last five steps' losses: a figure, not a test (each step's loss swings
    with its random timestep more than 20 steps move it: on a random SDXL it rose while the network learned)."""
    values = [loss for _step, loss in losses]
    return statistics.median(values[:5]), statistics.median(values[-5:])


def learned(status: dict) -> bool:
    """The loss at fixed noise, timesteps and captions after the last step below the one before the
    first: the same samples measured twice, so it moves only as the network does."""
    fixed = status.get("fixed_losses") or []
    return len(fixed) >= 2 and fixed[0][0] == 0 and fixed[-1][0] == STEPS and fixed[-1][1] < fixed[0][1]


# --- through the routes ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def routes_run(suite, dataset):
    created = suite.server.post("/hypernetworks/v1/create", {"name": ROUTES_NAME, "overwrite_old": True})
    body = payload(suite, dataset, ROUTES_NAME, fixed_loss_every=STEPS)
    job_id = suite.server.post("/hypernetworks/v1/train", body)["job_id"]
    status, trace = follow(suite.server, job_id, ended("finished", STEPS), f"finished step {STEPS}")
    return created, job_id, status, trace


def test_create_makes_a_network_for_the_loaded_checkpoint(suite, routes_run):
    created, *_ = routes_run
    assert created["widths"] == list(suite.checkpoint.widths), created
    assert hx.load(created["path"]).info.model_family in ("sd1", "sd2", "sdxl")


def test_twenty_steps_through_the_routes_learn_and_draw_previews(suite, routes_run):
    _created, job_id, status, trace = routes_run
    assert status["state"] == "finished", status["message"]
    assert status["step"] == STEPS and len(status["losses"]) == STEPS
    losses = {"losses": status["losses"], "fixed_losses": status["fixed_losses"]}
    (suite.config.artifacts / "training-routes-losses.json").write_text(json.dumps(losses))
    record_figure(
        suite, "step_loss_medians_first_last_five", [round(v, 4) for v in step_loss_medians(status["losses"])]
    )
    record_figure(suite, "fixed_noise_loss_before_after", [round(loss, 5) for _step, loss in status["fixed_losses"]])
    assert learned(status), status["fixed_losses"]
    assert len(status["previews"]) == STEPS // PREVIEW_EVERY
    png = suite.server.get(f"/hypernetworks/v1/jobs/{job_id}/preview", raw=True)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    result = Path(status["result_path"])
    assert result.name == f"{ROUTES_NAME}-{STEPS}.pt" and hx.load(result).step == STEPS
    assert result.with_suffix(".preview.png").is_file()
    record_figure(suite, "seconds_per_step_routes", round(seconds_per_step(trace), 3))


def test_the_result_renders_by_its_tag_at_once_and_no_tag_is_unchanged(suite, routes_run):
    tagged = suite.server.txt2img(f"{suite.plain} <hypernet:{ROUTES_NAME}-{STEPS}:1>")
    suite.save("trained-by-routes", tagged)
    assert max_difference(tagged, suite.before_tags) > 0
    assert "Hypernet hashes" in tagged.infotext
    plain = suite.server.txt2img(suite.plain)
    assert max_difference(plain, suite.before_tags) == 0


def test_an_interrupted_run_saves_the_step_it_reached(suite, dataset, routes_run):
    body = payload(suite, dataset, ROUTES_NAME, steps=1000, create_image_every=0, save_hypernetwork_every=0)
    job_id = suite.server.post("/hypernetworks/v1/train", body)["job_id"]
    follow(suite.server, job_id, reached(2), "running step 2")
    assert suite.server.post(f"/hypernetworks/v1/jobs/{job_id}/interrupt")["interrupted"] is True
    status, _trace = follow(suite.server, job_id, ended("interrupted"), "interrupted")
    assert 2 <= status["step"] < 1000, status["message"]
    assert hx.load(status["result_path"]).step == status["step"]
    assert suite.server.txt2img(suite.plain).pixels.tolist() == suite.before_tags.pixels.tolist()


def test_a_second_job_while_one_runs_is_refused(suite, dataset, routes_run):
    body = payload(suite, dataset, ROUTES_NAME, steps=1000, create_image_every=0, save_hypernetwork_every=0)
    job_id = suite.server.post("/hypernetworks/v1/train", body)["job_id"]
    try:
        with pytest.raises(HttpError) as refused:
            suite.server.post("/hypernetworks/v1/train", body)
        assert refused.value.status == 409
    finally:
        suite.server.post(f"/hypernetworks/v1/jobs/{job_id}/interrupt")
        follow(suite.server, job_id, lambda progress: not progress.active, "the end of the refused run's twin")


# --- through the Train tab -------------------------------------------------------------------------


def open_train_tab(suite, page):
    """Forge, Forge Classic, SD.Next: the top-level Train tab. A1111 and reForge: Train, then its Hypernetworks sub-tab."""
    modern_ui = page.locator("button[tabitemid*='tab_hnx_train']")  # SD.Next's default UI: its own sidebar
    if suite.kind == "sdnext":
        page.locator("#control_prompt textarea").wait_for()  # the UI it opens on is built, its sidebar too
    if suite.kind == "sdnext" and modern_ui.count():
        modern_ui.first.click()
    else:
        page.locator("#tabs > .tab-nav button", has_text=re.compile(r"^\s*Train\s*$")).first.click()
    if suite.kind not in WITHOUT_TRAIN_TAB:
        page.locator("#train_tabs > .tab-nav button", has_text=re.compile(r"^\s*Hypernetworks\s*$")).click()
    tab = page.locator("#hnx_train_tab")
    tab.wait_for()
    return tab


def fill(page, elem_id: str, value) -> None:
    field = page.locator(f"#{elem_id}").locator("textarea, input[type=number], input[type=text]").first
    field.fill(str(value))
    field.press("Tab")  # gradio takes the value on blur


def choose(page, elem_id: str, value: str) -> None:
    box = page.locator(f"#{elem_id} input").first
    box.click()
    box.fill(value)
    page.locator(f"[data-testid=dropdown-option][aria-label='{value}']").first.click()  # gradio 3.41 and 4.x


def progress_text(page) -> str:
    return page.locator("#hnx_train_progress").first.inner_text()  # gradio 3.41 gives the id to two elements


def start_in_tab(page, steps: int, until, what: str) -> Progress:
    """Click Start and follow the run the tab shows until ``until``; fails at once if the run ends
    otherwise. What the tab showed before the click, or a run of another length, is an earlier job."""
    before = progress_text(page)
    page.locator("#hnx_train_start").click()
    return follow_tab(page, steps, until, what, before)


def follow_tab(page, steps: int, until, what: str, before: str = "") -> Progress:
    def earlier_job(progress: Progress) -> bool:
        return progress.max_steps != steps or progress.text == " ".join(before.split())

    def read() -> Progress | None:
        return from_tab(progress_text(page), page.locator("#hnx_train_message").first.inner_text(), steps)

    return wait_for(read, until, what, ignore=earlier_job, poll=0.5)


def fill_training_form(page, suite, dataset: Path, steps: int) -> None:
    values = payload(suite, dataset, TAB_NAME, steps=steps)
    choose(page, "hnx_train_network", TAB_NAME)
    # The routes run's template and seed: the tab trains exactly what the routes trained (with the tab's
    # defaults, style_filewords.txt and a random seed, A1111's first step was NaN on a random checkpoint
    # where the routes run finished).
    choose(page, "hnx_train_template", values["template_filename"])
    for name in ("learn_rate", "data_root", "log_directory", "training_width", "training_height", "steps"):
        fill(page, f"hnx_train_{name}", values[name])
    for name in ("create_image_every", "save_hypernetwork_every"):
        fill(page, f"hnx_train_{name}", values[name])
    page.locator("#hnx_train_tab").get_by_text("Beyond A1111", exact=False).first.click()
    fill(page, "hnx_train_seed", values["seed"])
    for name, value in extra_options().items():
        if isinstance(value, bool):
            page.locator(f"#hnx_train_{name} input[type=checkbox]").set_checked(value)
        else:
            fill(page, f"hnx_train_{name}", value)
    page.locator("#hnx_train_tab").get_by_text("Preview", exact=True).first.click()
    page.locator("#hnx_train_preview_from_txt2img input[type=checkbox]").check()
    for name in ("prompt", "steps", "sampler_name", "cfg_scale", "seed", "width", "height"):
        fill(page, f"hnx_train_preview_{name}", values[f"preview_{name}"])


@pytest.mark.skipif(os.environ.get("HNX_HOST_TRAIN_BROWSER") == "0", reason="HNX_HOST_TRAIN_BROWSER=0")
def test_the_train_tab_creates_trains_shows_progress_and_interrupts(suite, dataset):
    artifacts = suite.config.artifacts
    ready = "attached" if suite.kind == "sdnext" else "visible"  # SD.Next opens on its Control tab
    with open_page(suite.config.url, ready=ready) as page, screenshot_on_failure(artifacts, page):
        tab = open_train_tab(suite, page)
        screenshot(artifacts, page, "train-tab")
        tab.locator(".tab-nav button", has_text="Create hypernetwork").first.click()
        fill(page, "hnx_create_name", TAB_NAME)
        page.locator("#hnx_create_button").click()
        page.wait_for_function("() => document.querySelector('#hnx_create_result').innerText.includes('Created')")
        screenshot(artifacts, page, "train-tab-created")

        tab.locator(".tab-nav button", has_text="Train hypernetwork").first.click()
        fill_training_form(page, suite, dataset, STEPS)
        screenshot(artifacts, page, "train-tab-form")
        start_in_tab(page, STEPS, reached(1), "running step 1")
        page.wait_for_selector("#hnx_train_loss_chart svg polyline")
        screenshot(artifacts, page, "train-tab-running")
        follow_tab(page, STEPS, ended("finished", STEPS), f"finished step {STEPS}")
        page.wait_for_selector("#hnx_train_gallery img")
        time.sleep(2)  # the next poll draws the final chart and gallery
        screenshot(artifacts, page, "train-tab-finished")
        screenshot(artifacts, page, "train-tab-progress-column", element="#hnx_train_progress")
        finished = progress_text(page)
        assert "saved to" in finished and f"{TAB_NAME}-{STEPS}" in finished, finished
        chart = page.locator("#hnx_train_loss_chart svg polyline").first.get_attribute("points")
        assert len(chart.split()) == STEPS
        assert page.locator("#hnx_train_gallery img").count() >= STEPS // PREVIEW_EVERY

        fill(page, "hnx_train_steps", 1000)
        start_in_tab(page, 1000, reached(2), "running step 2")
        page.locator("#hnx_train_interrupt").click()
        follow_tab(page, 1000, ended("interrupted"), "interrupted")
        time.sleep(2)
        screenshot(artifacts, page, "train-tab-interrupted")
        interrupted = progress_text(page)
    step = int(re.search(r"interrupted step (\d+)", interrupted)[1])
    saved = re.search(r"saved to (\S+\.pt)", interrupted)[1]
    assert 2 <= step < 1000 and hx.load(saved).step == step, interrupted
    tagged = suite.server.txt2img(f"{suite.plain} <hypernet:{TAB_NAME}-{STEPS}:1>")
    suite.save("trained-in-the-tab", tagged)
    assert max_difference(tagged, suite.before_tags) > 0
    assert max_difference(suite.server.txt2img(suite.plain), suite.before_tags) == 0
