"""The local web app in headless Chromium (Debian's chromium driven by Playwright): generate with a
tag and see the image, browse the cards, start a short training, watch the chart move, interrupt it."""

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import hypernetwork_ext as hx
from hypernetwork_ext.standalone.tiny import TINY_WIDTHS, procedural_images

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for(url: str, process: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the app exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError("the app did not start in time")


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    folder = tmp_path_factory.mktemp("app")
    hx.save(hx.create(TINY_WIDTHS, activation="relu", seed=1, name="inky"), folder / "nets" / "inky.safetensors")
    procedural_images(folder / "data", 4, seed=1, colour="red")
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    command = [
        sys.executable,
        "-m",
        "hypernetwork_ext.standalone.app",
        "--hypernetwork-dir",
        "nets",
        "--output-dir",
        "out",
        "--port",
        str(port),
        "--device",
        "cpu",
    ]
    log = open(folder / "app.log", "w")  # noqa: SIM115 (closed at teardown)
    process = subprocess.Popen(command, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_for(f"http://127.0.0.1:{port}/", process)
        yield f"http://127.0.0.1:{port}/", folder
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def page(app):
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"the browser tests need Debian's chromium at {CHROMIUM} (tools/dev.py test installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.set_default_timeout(60_000)
        page.goto(app[0])
        yield page
        browser.close()


def _fill_number(page, elem_id: str, value) -> None:
    field = page.locator(f"#{elem_id} input[type=number]").first
    if field.count() == 0:
        field = page.locator(f"#{elem_id} input, #{elem_id} textarea").first
    field.fill(str(value))
    field.press("Tab")


def test_generate_with_a_tag_shows_the_image_and_reports_a_missing_one(page, app):
    page.locator("#hnx_app_prompt textarea").fill("a red circle <hypernet:inky:0.8> <hypernet:missing>")
    _fill_number(page, "hnx_app_steps", 3)
    page.locator("#hnx_app_generate").click()
    page.locator("#hnx_app_gallery img").first.wait_for()
    infotext = page.locator("#hnx_app_infotext textarea").input_value()
    assert f'Hypernet hashes: "inky: {hx.file_sha256(app[1] / "nets" / "inky.safetensors")[:10]}"' in infotext
    assert "no hypernetwork named 'missing'" in page.locator("#hnx_app_messages").inner_text()


def test_cards_list_networks_and_clicking_one_adds_its_tag(page):
    page.locator("#hnx_app_prompt textarea").fill("a blue square")
    page.get_by_role("tab", name="Hypernetworks").click()
    cards = page.locator("#hnx_app_cards")
    cards.get_by_text("inky").first.wait_for()
    cards.locator("img").first.click()
    page.locator("#hnx_app_card_details").get_by_text('"widths"').first.wait_for()
    page.get_by_role("tab", name="Generate").click()
    assert page.locator("#hnx_app_prompt textarea").input_value() == "a blue square <hypernet:inky:1>"


def test_training_shows_progress_chart_preview_and_can_be_interrupted(page, app):
    folder = app[1]
    page.get_by_role("tab", name="Train", exact=True).click()
    page.get_by_role("tab", name="Train hypernetwork").click()
    page.locator("#hnx_train_learn_rate textarea, #hnx_train_learn_rate input").first.fill("0.001")
    page.locator("#hnx_train_data_root textarea, #hnx_train_data_root input").first.fill(str(folder / "data"))
    page.locator("#hnx_train_log_directory textarea, #hnx_train_log_directory input").first.fill(
        str(folder / "out" / "logs")
    )
    for elem_id, value in (
        ("hnx_train_training_width", 64),
        ("hnx_train_training_height", 64),
        ("hnx_train_steps", 5000),
        ("hnx_train_create_image_every", 3),
        ("hnx_train_save_hypernetwork_every", 0),
    ):
        _fill_number(page, elem_id, value)
    page.locator("#hnx_train_start").click()
    page.locator("#hnx_train_message").get_by_text("Training started").wait_for()
    progress = page.locator("#hnx_train_progress")
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        match = re.search(r"step (\d+)/", progress.inner_text())
        if match and int(match[1]) >= 4:
            break
        time.sleep(1)
    else:
        raise AssertionError(f"training did not progress: {progress.inner_text()!r}")
    page.locator("#hnx_train_loss_chart svg polyline").first.wait_for()
    first_label = page.locator("#hnx_train_loss_chart").inner_text()
    page.locator("#hnx_train_gallery img").first.wait_for()
    page.wait_for_function(
        "label => !document.querySelector('#hnx_train_loss_chart').innerText.includes(label)", arg=first_label
    )
    page.locator("#hnx_train_interrupt").click()
    progress.get_by_text("interrupted").first.wait_for(timeout=120_000)
    saved = [p.name for p in (folder / "nets").iterdir() if re.fullmatch(r"inky-\d+\.safetensors", p.name)]
    assert len(saved) == 1 and hx.load(folder / "nets" / saved[0]).step >= 4


def test_cards_of_one_name_in_two_formats_get_distinct_labels_and_tags(tmp_path):
    from types import SimpleNamespace

    from hypernetwork_ext.library import Library
    from hypernetwork_ext.standalone.app import card_details, card_items

    for suffix in ("pt", "safetensors"):
        hx.save(hx.create(TINY_WIDTHS, seed=1, name="demo-trained"), tmp_path / "nets" / f"demo-trained.{suffix}")
    state = SimpleNamespace(library=Library([str(tmp_path / "nets")]), output_dir=str(tmp_path / "out"))
    labels = [label for _, label in card_items(state)]
    assert labels == ["demo-trained.pt", "demo-trained.safetensors"]
    details, prompt = card_details(state, labels, 1, "a cat")
    assert prompt == "a cat <hypernet:demo-trained.safetensors:1>"
    assert '"format": "safetensors"' in details
