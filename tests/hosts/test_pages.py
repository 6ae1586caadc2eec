"""What a user sees in the real host, in headless Chromium: the Hypernetworks cards, a click inserting
the tag, the metadata view, the user-metadata editor, and pasted parameters finding local networks.
A screenshot of each page is kept with the artifacts."""

from __future__ import annotations

import io
import json
import re

import pytest
from PIL.PngImagePlugin import PngInfo

from tests.hosts import browser
from tests.hosts import suite_files as files
from tests.hosts.browser import open_page


@pytest.fixture(scope="module")
def page(suite):
    if suite.kind == "sdnext":
        pytest.skip("SD.Next's networks panel, details view and Restore button: test_pages_sdnext.py")
    with open_page(suite.config.url) as page:
        yield page


def screenshot(suite, page, name: str) -> None:
    browser.screenshot(suite.config.artifacts, page, name)


def open_cards(page):
    page.locator("#txt2img_extra_tabs button", has_text=re.compile(r"^\s*Hypernetworks\s*$")).first.click()
    cards = page.locator("#txt2img_hypernetworks_cards")
    cards.locator(".card[data-name='hnx-relu-ln']").wait_for()
    return cards


def close_popup(page) -> None:
    """The host's own closePopup(): its close button can lie under a long metadata table."""
    page.evaluate("() => { if (typeof closePopup === 'function') closePopup(); }")


def prompt_text(page) -> str:
    return page.locator("#txt2img_prompt textarea").input_value()


def test_cards_show_the_networks_and_a_click_inserts_the_tag(suite, page):
    page.locator("#txt2img_prompt textarea").fill(suite.plain)
    cards = open_cards(page)
    names = cards.locator(".card").evaluate_all("cards => cards.map(c => c.dataset.name)")
    screenshot(suite, page, "cards")
    assert {spec.name for spec in files.NETWORKS} <= set(names)
    cards.locator(".card[data-name='hnx-relu-ln']").click()
    page.wait_for_function("() => document.querySelector('#txt2img_prompt textarea').value.includes('<hypernet:')")
    assert re.search(r"<hypernet:hnx-relu-ln:1(\.0)?>", prompt_text(page)), prompt_text(page)


def test_metadata_view_shows_the_networks_facts(suite, page):
    cards = open_cards(page)
    card = cards.locator(".card[data-name='hnx-swish-dropout']")
    card.hover()
    card.locator(".metadata-button").click()
    # A1111, Forge and reForge draw a table; Forge Classic shows the JSON in a <pre>
    popup = page.locator(".global-popup .popup-table, .global-popup .popup-metadata").first
    popup.wait_for()
    text = popup.inner_text()
    screenshot(suite, page, "metadata")
    close_popup(page)
    assert re.search(r'activation"?:?\s+"?swish', text) and re.search(r'activate_output"?:?\s+true', text), text
    assert "widths" in text


def test_user_metadata_editor_saves_a_description(suite, page):
    cards = open_cards(page)
    card = cards.locator(".card[data-name='hnx-linear']")
    card.hover()
    card.locator(".edit-button").click()
    editor = page.locator("#txt2img_hypernetworks_edit_user_metadata")
    editor.wait_for()
    description = editor.locator("label", has_text=re.compile(r"^\s*Description")).locator("textarea")
    description.fill("written by the real-host suite")
    screenshot(suite, page, "editor")
    editor.locator("button", has_text="Save").click()
    close_popup(page)
    sidecar = suite.config.hypernetwork_dir / files.SUITE_FOLDER / "hnx-linear.json"
    page.wait_for_timeout(2000)
    assert sidecar.exists() and json.loads(sidecar.read_text())["description"] == "written by the real-host suite"
    described = suite.server.get("/hypernetworks/v1/networks/hnx-linear")
    assert described["user_metadata"]["description"] == "written by the real-host suite"


def test_pasted_parameters_find_the_local_network_by_hash(suite, page, tmp_path):
    """An image made with a network another user named differently: PNG Info → txt2img writes the
    local name, found by the hash in ``Hypernet hashes``."""
    rendered = suite.server.txt2img(f"{suite.plain} <hypernet:hnx-relu-ln:0.8>")
    foreign = rendered.infotext.replace("hnx-relu-ln", "their-name-for-it")
    info = PngInfo()
    info.add_text("parameters", foreign)
    image_path = tmp_path / "foreign.png"
    buffer = io.BytesIO()
    rendered.image.save(buffer, format="PNG", pnginfo=info)
    image_path.write_bytes(buffer.getvalue())
    page.locator("#tabs button", has_text=re.compile(r"^\s*PNG Info\s*$")).first.click()
    page.locator("#pnginfo_image input[type=file]").set_input_files(str(image_path))
    page.locator("#tab_pnginfo").get_by_text("their-name-for-it").first.wait_for()
    page.locator("#tab_pnginfo button", has_text=re.compile(r"^\s*Send to txt2img\s*$")).first.click()
    page.wait_for_function(
        "() => document.querySelector('#txt2img_prompt textarea').value.includes('<hypernet:hnx-relu-ln:0.8>')"
    )
    screenshot(suite, page, "pasted")
    assert "their-name-for-it" not in prompt_text(page)
