"""The node pack in ComfyUI's own front end (comfyui-frontend-package), in headless Chromium: a workflow
with the three nodes loads as a graph, every node known to the page; the screenshot is kept."""

from __future__ import annotations

import pytest

from tests.comfyui import graphs
from tests.comfyui.conftest import DATASET
from tests.hosts.browser import CHROMIUM, CHROMIUM_ARGS

OUR_NODES = ("HypernetworkLoaderA1111", "HypernetworksFromPrompt", "TrainHypernetwork")
PAGE_SETTINGS = {
    "Comfy.TutorialCompleted": True,  # a returning user's page: a first start opens the template browser
    "LiteGraph.Canvas.MinFontSizeForLOD": 0,  # titles and widgets drawn at any zoom, not grey boxes
    "Comfy.Minimap.Visible": False,
}
# Our nodes at 100% zoom, clear of the side bar and the tabs: returns their box on the page.
SHOW_OUR_NODES = """(types) => {
  const canvas = window.app.canvas, ds = canvas.ds, margin = 20, title = 30, left = 100, top = 140;
  const ours = window.app.graph.nodes.filter((n) => types.includes(n.type));
  const x0 = Math.min(...ours.map((n) => n.pos[0])) - margin;
  const y0 = Math.min(...ours.map((n) => n.pos[1])) - title - margin;
  const x1 = Math.max(...ours.map((n) => n.pos[0] + n.size[0])) + margin;
  const y1 = Math.max(...ours.map((n) => n.pos[1] + n.size[1])) + margin;
  ds.scale = 1;
  ds.offset[0] = left - x0;
  ds.offset[1] = top - y0;
  canvas.setDirty(true, true);
  const rect = canvas.canvas.getBoundingClientRect();
  return {x: rect.left + left, y: rect.top + top,
          width: Math.min(x1 - x0, innerWidth - rect.left - left), height: Math.min(y1 - y0, innerHeight - rect.top - top)};
}"""


def showcase(model) -> dict:
    """txt2img with tags in the prompt, a loader whose info goes to Preview as Text, and training."""
    text = "a red circle <hypernet:hnx-relu-ln:0.8:neg=0> <hypernet:hnx-linear:-0.5:start=0.25>"
    workflow = graphs.with_nodes(
        model.workflow(prompt=text),
        ("HypernetworksFromPrompt", {"text": text}),
        graphs.ours(model.listed("hnx-elu-deep"), 0.7, blocks="OUT", negative=0.0),
    ).build()
    workflow["info"] = {"class_type": "PreviewAny", "inputs": {"source": ["m1", 1]}}
    workflow["train"] = {
        "class_type": "TrainHypernetwork",
        "inputs": {
            "model": ["ckpt", 0], "clip": ["ckpt", 1], "vae": ["ckpt", 2], "folder": DATASET, "name": "my-style",
            "hypernetwork": "[new]", "steps": 1000, "learning_rate": "0.00001", "batch_size": 1, "width": 512,
            "height": 512, "seed": 0,
        },
    }  # fmt: skip
    workflow["loss"] = {"class_type": "LossGraphNode", "inputs": {"loss": ["train", 2], "filename_prefix": "loss"}}
    return workflow


def test_workflow_in_comfyuis_front_end(comfy):
    playwright_api = pytest.importorskip("playwright.sync_api")
    workflow = showcase(comfy.sd1)
    path = comfy.config.artifacts / "images" / "comfyui-workflow.png"
    close_up = path.with_name("comfyui-nodes.png")  # our nodes at 100% (docs/images/comfyui-nodes.png)
    path.parent.mkdir(parents=True, exist_ok=True)
    for setting, value in PAGE_SETTINGS.items():
        comfy.server.request("POST", f"/settings/{setting}", value, raw=True)
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 900})
            page.set_default_timeout(180_000)
            page.goto(comfy.config.url)
            page.wait_for_function("() => window.app && window.app.graph && window.app.vueAppReady !== false")
            page.wait_for_timeout(5000)
            close_dialogs(page)  # the first-run template browser
            page.evaluate("async (w) => { await window.app.loadApiJson(w, 'hypernetworks.json'); }", workflow)
            page.wait_for_timeout(3000)
            close_dialogs(page)
            types = page.evaluate("() => window.app.graph.nodes.map((n) => [n.type, n.has_errors === true])")
            page.evaluate(
                "async () => { window.app.graph.arrange(80); try {"
                " await window.app.extensionManager.command.execute('Comfy.Canvas.FitView'); } catch (e) {} }"
            )
            page.wait_for_timeout(2000)
            dialogs = page.locator(".p-dialog:visible").count()
            page.screenshot(path=str(path))
            page.set_viewport_size({"width": 2000, "height": 1400})
            page.wait_for_timeout(1000)
            box = page.evaluate(SHOW_OUR_NODES, list(OUR_NODES))
            page.wait_for_timeout(2000)
            page.screenshot(path=str(close_up), clip=box)
        finally:
            browser.close()
    print(
        f"\n[comfyui] front end: nodes {types}; screenshots {path}, {close_up} ({box['width']:.0f}x{box['height']:.0f})"
    )
    known = {node_type for node_type, _errors in types}
    assert set(OUR_NODES) <= known
    assert len(types) == len(workflow)
    assert not any(errors for _type, errors in types)
    assert dialogs == 0  # nothing covers the graph in the picture


def close_dialogs(page) -> None:
    page.keyboard.press("Escape")
    page.evaluate(
        "() => document.querySelectorAll('.p-dialog-close-button, .p-dialog button[aria-label=\"Close\"]')"
        ".forEach((button) => button.click())"
    )
    page.wait_for_timeout(1000)
