"""What a user sees in the real SD.Next, in headless Chromium: the Hypernetwork tab of its networks panel,
a click inserting the tag, its details view (the network's facts as embedded metadata, the
description editor) and its Restore button mapping pasted parameters to local networks by hash.
SD.Next (with its default Modern UI) opens on its Control tab, whose prompt and panel these use."""

from __future__ import annotations

import re

import pytest

from tests.hosts import browser
from tests.hosts import suite_files as files
from tests.hosts.browser import open_page

TAB = "control"  # SD.Next's unified generation tab, the one its UI opens on


@pytest.fixture(scope="module")
def page(suite):
    if suite.kind != "sdnext":
        pytest.skip("SD.Next only (the other hosts: test_pages.py)")
    with open_page(suite.config.url, ready="attached") as page:
        prompt(page).wait_for()
        yield page


def screenshot(suite, page, name: str) -> None:
    browser.screenshot(suite.config.artifacts, page, name)


def prompt(page):
    return page.locator(f"#{TAB}_prompt textarea")


def open_cards(page):
    page.locator(f"#{TAB}_extra_tabs button", has_text=re.compile(r"^\s*Hypernetwork\s*$")).first.click()
    cards = page.locator(f"#{TAB}_hypernetwork_cards")
    cards.locator(".card[data-name='hnx-relu-ln']").wait_for()
    return cards


def open_details(page, name: str):
    card = open_cards(page).locator(f".card[data-name='{name}']")
    card.hover()
    card.locator(".details").click()
    details = page.locator(f"#{TAB}_extra_details")
    details.get_by_text(name).first.wait_for()
    return details


def close_details(page) -> None:
    page.locator(f"#{TAB}_extra_details_close").click()


def test_cards_show_the_networks_and_a_click_inserts_the_tag(suite, page):
    prompt(page).fill(suite.plain)
    cards = open_cards(page)
    names = cards.locator(".card").evaluate_all("cards => cards.map(c => c.dataset.name)")
    screenshot(suite, page, "cards")
    assert {spec.name for spec in files.NETWORKS} <= set(names)
    assert cards.locator(".card[data-name='hnx-relu-ln']").get_attribute("data-version") == "SD 1.5"
    cards.locator(".card[data-name='hnx-relu-ln']").click()
    page.wait_for_function(f"() => document.querySelector('#{TAB}_prompt textarea').value.includes('<hypernet:')")
    assert re.search(r"<hypernet:hnx-relu-ln:1(\.0)?>", prompt(page).input_value()), prompt(page).input_value()


def test_details_show_the_networks_facts(suite, page):
    details = open_details(page, "hnx-swish-dropout")
    details.locator("button", has_text="Embedded metadata").first.click()
    page.wait_for_timeout(1000)
    text = details.inner_text()
    screenshot(suite, page, "metadata")
    close_details(page)
    for fact in ("activation", "swish", "activate_output", "widths", "layer_structure"):
        assert fact in text, (fact, text[:2000])


def test_details_save_a_description(suite, page):
    details = open_details(page, "hnx-linear")
    details.locator("button", has_text="Description").first.click()
    details.get_by_placeholder("Network description...").fill("written by the real-host suite")
    screenshot(suite, page, "editor")
    page.locator(f"#{TAB}_extra_details_save_desc").click()
    sidecar = suite.config.hypernetwork_dir / files.SUITE_FOLDER / "hnx-linear.txt"
    page.wait_for_timeout(2000)
    assert sidecar.exists() and sidecar.read_text() == "written by the real-host suite"
    described = suite.server.get("/sdapi/v1/network/desc?page=hypernetwork&item=hnx-linear")
    assert described["description"] == "written by the real-host suite"


def test_restore_maps_pasted_parameters_to_the_local_network_by_hash(suite, page):
    """Parameters of an image made with a network another user named differently, pasted into the prompt
    and restored with SD.Next's Restore button: the local name, found by the hash in ``Hypernet hashes``."""
    rendered = suite.server.txt2img(f"{suite.plain} <hypernet:hnx-relu-ln:0.8>")
    foreign = rendered.infotext.replace("hnx-relu-ln", "their-name-for-it")
    prompt(page).fill(foreign)
    page.locator(f"#{TAB}_paste").click()
    page.wait_for_function(
        f"() => document.querySelector('#{TAB}_prompt textarea').value.includes('<hypernet:hnx-relu-ln:0.8>')"
    )
    screenshot(suite, page, "pasted")
    assert "their-name-for-it" not in prompt(page).input_value()
