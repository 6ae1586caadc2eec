"""Headless Chromium on a real host's page (Debian's chromium through Playwright), with screenshots
kept under the artifacts folder."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
UI_TIMEOUT = 600_000  # ms: a busy CPU host builds its UI slowly
VIEWPORT = {"width": 1440, "height": 1000}


@contextlib.contextmanager
def open_page(url: str, *, ready: str = "visible") -> Iterator:
    """The host's UI, loaded (its txt2img prompt is there; ``ready="attached"``: in the page, where the
    host's UI opens on another tab, as SD.Next's Control tab)."""
    playwright_api = pytest.importorskip("playwright.sync_api")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"the page tests drive Debian's Chromium at {CHROMIUM}")
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.set_default_timeout(UI_TIMEOUT)
            page.goto(url)
            page.wait_for_selector("#txt2img_prompt textarea", state=ready)
            yield page
        finally:
            browser.close()


def screenshot(folder: Path, page, name: str, *, element: str | None = None) -> Path:
    """The whole page, or one element of it, as ``<folder>/screenshots/<name>.png``."""
    path = folder / "screenshots" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    if element:
        page.locator(element).first.screenshot(path=str(path))
    else:
        page.screenshot(path=str(path), full_page=True)
    return path


@contextlib.contextmanager
def screenshot_on_failure(folder: Path, page, name: str = "failure") -> Iterator[None]:
    """What the page showed when a step failed, kept with the artifacts."""
    try:
        yield
    except Exception:
        screenshot(folder, page, name)
        raise
