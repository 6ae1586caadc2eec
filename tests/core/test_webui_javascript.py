"""``javascript/hypernetworks.js`` in headless Chromium, on a page that provides the WebUI's JS API.

The page gives what A1111 1.10.1's ``script.js``/``ui.js``/``progressbar.js``/``extraNetworks.js``
give an extension script, with the host's behaviour (written here, not copied): ``gradioApp()``
(the ``gradio-app`` element, ``getElementById`` on it), ``onUiLoaded`` (once ``#txt2img_prompt``
exists), ``onUiUpdate`` (every mutation), ``onAfterUiUpdate`` (debounced 200 ms), ``opts``,
``randomId()``, ``requestProgress(...)`` and ``extraNetworksControlSortOnClick(...)`` (recorded).
The DOM is laid out the way gradio 3.41 renders it: a setting is ``#setting_<key>`` holding
``label > span`` with its label, the Hypernetworks settings page is ``#settings_hypernetworks``,
each cards page has ``#<tab>_hypernetworks_controls`` with the sort buttons, the card editor is
``.edit-user-metadata``. The labels come from the extension's own settings and training tab.
"""

from __future__ import annotations

import ast
import html
import json
import os

import gradio as gr
import pytest

from hypernetwork_ext.training.jobs import TrainingJobs, TrainingServices
from hypernetwork_ext.ui.settings import SETTINGS
from hypernetwork_ext.ui.training import TXT2IMG_PREVIEW_FIELDS, HostHooks, build_training_tab

playwright = pytest.importorskip("playwright.sync_api")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]

HOST_API = r"""
var opts = {live_preview_refresh_period: 500, show_progressbar: true};
var hostLog = {loaded: 0, progress: [], sorted: [], refreshed: [], errors: []};
var hostCallbacks = {loaded: [], update: [], after: []};
var hostLoadedOnce = false;
var hostAfterTimer = null;

function gradioApp() {
    var elems = document.getElementsByTagName("gradio-app");
    var elem = elems.length == 0 ? document : elems[0];
    if (elem !== document) {
        elem.getElementById = function(id) { return document.getElementById(id); };
    }
    return elem.shadowRoot ? elem.shadowRoot : elem;
}
function onUiLoaded(callback) { hostCallbacks.loaded.push(callback); }
function onUiUpdate(callback) { hostCallbacks.update.push(callback); }
function onAfterUiUpdate(callback) { hostCallbacks.after.push(callback); }
function hostRun(queue, arg) {
    queue.forEach(function(callback) {
        try { callback(arg); } catch (e) { hostLog.errors.push(String(e)); }
    });
}
document.addEventListener("DOMContentLoaded", function() {
    new MutationObserver(function(mutations) {
        if (!hostLoadedOnce && gradioApp().querySelector("#txt2img_prompt")) {
            hostLoadedOnce = true;
            hostLog.loaded += 1;
            hostRun(hostCallbacks.loaded);
        }
        hostRun(hostCallbacks.update, mutations);
        clearTimeout(hostAfterTimer);
        hostAfterTimer = setTimeout(function() { hostRun(hostCallbacks.after); }, 200);
    }).observe(gradioApp(), {childList: true, subtree: true});
});
function randomId() { return "task(" + Math.random().toString(36).slice(2, 9) + ")"; }
function requestProgress(id_task, progressbarContainer, gallery, atEnd, onProgress) {
    hostLog.progress.push({id: id_task, container: progressbarContainer && progressbarContainer.id,
                           gallery: gallery && gallery.id});
    hostLog.atEnd = atEnd;
}
function extraNetworksControlSortOnClick(event, tabname, extra_networks_tabname) {
    var self = event.currentTarget;
    self.parentElement.querySelectorAll(".extra-network-control--sort").forEach(function(x) {
        x.classList.remove("extra-network-control--enabled");
    });
    self.classList.add("extra-network-control--enabled");
    hostLog.sorted.push([tabname, extra_networks_tabname, self.dataset.sortkey]);
}
"""


def constant_from(path: str, name: str) -> str:
    """A string constant of a host module (they import ``modules``, which this profile lacks)."""
    with open(os.path.join(ROOT, path), encoding="utf-8") as handle:
        tree = ast.parse(handle.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{name} not in {path}")


HIDE_SETTING = constant_from("hypernetwork_ext/hosts/webui_training.py", "HIDE_SETTING")
SETTING_LABELS = {setting.key: setting.label for setting in SETTINGS} | {
    HIDE_SETTING: constant_from("hypernetwork_ext/hosts/webui_training.py", "HIDE_LABEL")
}
CHECKBOXES = {setting.key for setting in SETTINGS if setting.kind == "checkbox"} | {HIDE_SETTING}
EDITOR_LABELS = ["Alias", "Preferred multiplier", "Activation text", "Description", "Notes"]


@pytest.fixture(scope="module")
def training_labels(tmp_path_factory):
    services = TrainingServices(str(tmp_path_factory.mktemp("hn")), make_backend=lambda: None)
    with gr.Blocks() as blocks:
        tab = build_training_tab(TrainingJobs(services), blocks=blocks)
    components = [*tab.create_inputs.values(), *tab.train_inputs.values()]
    return [component.label for component in components if component.label]


def label(text: str, checkbox: bool = False) -> str:
    text = html.escape(text)
    if checkbox:
        return f"<label><input type='checkbox'><span>{text}</span></label>"
    return f"<label><span data-testid='block-info'>{text}</span><input></label>"


def controls(tabname: str) -> str:
    sorts = "".join(
        f"<div id='{tabname}_hypernetworks_extra_sort_{key}' class='extra-network-control--sort"
        f"{' extra-network-control--enabled' if key == 'path' else ''}' data-sortkey='{key}'></div>"
        for key in ("path", "name", "date_created", "date_modified")
    )
    return (
        f"<div class='extra-network-control' id='{tabname}_hypernetworks_controls'>{sorts}"
        f"<div id='{tabname}_hypernetworks_extra_sort_dir' class='extra-network-control--sort-dir'></div></div>"
    )


def ui_html(training_labels) -> str:
    settings = "".join(
        f"<div id='setting_{key}' class='gradio-{'checkbox' if key in CHECKBOXES else 'textbox'}'>"
        f"{label(text, key in CHECKBOXES)}"
        "<div class='settings-comment'><span class='info'>(a comment added by the host)</span></div></div>"
        for key, text in SETTING_LABELS.items()
    )
    panes = "".join(
        f"<div id='{tab}_hypernetworks_pane' class='extra-network-pane'>{controls(tab)}</div>"
        f"<button id='{tab}_hypernetworks_extra_refresh_internal' style='display:none'></button>"
        for tab in ("txt2img", "img2img")
    )
    editor = "".join(label(text) for text in EDITOR_LABELS)
    training = "".join(label(text) for text in training_labels)
    return (
        "<textarea id='txt2img_prompt'></textarea>"
        f"<div id='tab_settings'><div id='settings_hypernetworks'>{settings}</div></div>{panes}"
        f"<div class='edit-user-metadata'>{editor}</div>"
        f"<div id='hnx_train_tab'>{training}<div id='hnx_train_progress'></div><div id='hnx_train_gallery'></div>"
        "<button id='hnx_train_refresh'>Refresh lists</button></div>"
    )


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is not installed")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, training_labels):
    page = browser.new_page()
    problems = []
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
    with open(os.path.join(ROOT, "javascript", "hypernetworks.js"), encoding="utf-8") as handle:
        script = handle.read()
    page.set_content(
        "<html><head>"
        f"<script>{HOST_API}</script>"
        "<script>var hostGlobals = Object.keys(window); hostGlobals.push('hostGlobals');</script>"
        f"<script>{script}</script>"
        "<script>window.extensionGlobals = Object.keys(window).filter(k => !hostGlobals.includes(k));</script>"
        "</head><body><gradio-app></gradio-app></body></html>"
    )
    # gradio renders the UI after the scripts ran; the host's observer sees it appear
    page.evaluate("markup => { document.querySelector('gradio-app').innerHTML = markup; }", ui_html(training_labels))
    page.wait_for_function("hostLog.loaded === 1", timeout=10000)
    yield page
    assert page.evaluate("hostLog.errors") == []
    assert problems == []
    page.close()


def titles(page, selector: str) -> dict:
    return page.evaluate(
        "selector => Object.fromEntries([...gradioApp().querySelectorAll(selector)]"
        ".map(n => [n.textContent.trim(), n.title]))",
        selector,
    )


def test_the_script_adds_only_prefixed_globals(page):
    names = page.evaluate("extensionGlobals")
    assert names and all(name.startswith("hnx") for name in names), names


def test_tooltips_appear_on_settings_editor_and_training_tab(page, training_labels):
    tooltips = page.evaluate("hnxTooltips")
    page.wait_for_function("gradioApp().querySelector('#settings_hypernetworks span').title !== ''", timeout=5000)
    settings = titles(page, "#settings_hypernetworks label span")
    assert settings == {text: tooltips[text] for text in SETTING_LABELS.values()}  # every setting has one
    editor = titles(page, ".edit-user-metadata span")
    assert all(editor[text] == tooltips[text] for text in ("Alias", "Preferred multiplier", "Activation text"))
    assert editor["Description"] == ""  # the host's own fields are left alone
    training = titles(page, "#hnx_train_tab span")
    explained = [text for text in training_labels if text in tooltips]
    assert len(explained) >= 15 and all(training[text] == tooltips[text] for text in explained)
    stale = set(tooltips) - set(SETTING_LABELS.values()) - set(EDITOR_LABELS) - set(training_labels)
    assert not stale, f"tooltips for labels that no longer exist: {stale}"
    page.hover("#settings_hypernetworks span")  # a real pointer over a label: the title is what shows
    assert page.evaluate("document.querySelector('#settings_hypernetworks span').title") in tooltips.values()


def test_hash_sort_control_on_both_pages_survives_the_hosts_refresh(page):
    for tab in ("txt2img", "img2img"):
        button = page.locator(f"#{tab}_hypernetworks_controls .hnx-sort-hash")
        assert button.count() == 1 and button.get_attribute("data-sortkey") == "hash"
        order = page.evaluate(
            f"[...gradioApp().querySelector('#{tab}_hypernetworks_controls').children].map(n => n.id)"
        )
        assert order.index("") == order.index(f"{tab}_hypernetworks_extra_sort_dir") - 1  # just before the direction
        button.click()
        assert "extra-network-control--enabled" in button.get_attribute("class")
    assert page.evaluate("hostLog.sorted") == [
        ["txt2img", "hypernetworks", "hash"],
        ["img2img", "hypernetworks", "hash"],
    ]
    # the host replaces a page's whole pane when it loads its cards and on every refresh
    page.evaluate(
        "markup => { gradioApp().querySelector('#txt2img_hypernetworks_pane').innerHTML = markup; }",
        controls("txt2img"),
    )
    page.wait_for_function(
        "gradioApp().querySelector('#txt2img_hypernetworks_controls .hnx-sort-hash') !== null", timeout=5000
    )
    page.wait_for_timeout(400)  # later updates must not add a second one
    assert page.locator("#txt2img_hypernetworks_controls .hnx-sort-hash").count() == 1


def test_train_button_follows_the_task_with_the_hosts_progress_bar_and_refreshes_after(page):
    page.evaluate(
        "() => { window.clicks = []; ['txt2img_hypernetworks_extra_refresh_internal', "
        "'img2img_hypernetworks_extra_refresh_internal', 'hnx_train_refresh'].forEach(id => "
        "document.getElementById(id).addEventListener('click', () => clicks.push(id))); }"
    )
    args = page.evaluate("hnxStartTraining('', 'style', 'filewords.txt', 0.001, true)")
    assert args[1:] == ["style", "filewords.txt", 0.001, True]
    assert args[0].startswith("task(") and args[0].endswith(")")
    assert page.evaluate("hostLog.progress") == [
        {"id": args[0], "container": "hnx_train_progress", "gallery": "hnx_train_gallery"}
    ]
    page.evaluate("hostLog.atEnd()")  # the host calls it when the task has completed
    assert page.evaluate("clicks") == [
        "txt2img_hypernetworks_extra_refresh_internal",
        "img2img_hypernetworks_extra_refresh_internal",
        "hnx_train_refresh",
    ]


def test_the_training_tab_wires_the_script_on_the_train_button(tmp_path):
    """The function name the tab hands the host is the one the script defines."""
    services = TrainingServices(str(tmp_path), make_backend=lambda: None)
    with gr.Blocks() as blocks:
        txt2img = [gr.Textbox() for _field in TXT2IMG_PREVIEW_FIELDS]
        build_training_tab(TrainingJobs(services), blocks=blocks, host=HostHooks(txt2img, "hnxStartTraining"))
    dependencies = json.loads(json.dumps(blocks.get_config_file()["dependencies"], default=str))
    assert [d.get("js") for d in dependencies if d.get("js")] == ["hnxStartTraining"]
    with open(os.path.join(ROOT, "javascript", "hypernetworks.js"), encoding="utf-8") as handle:
        assert "function hnxStartTraining(" in handle.read()
