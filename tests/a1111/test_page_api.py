"""The cards page, the metadata editor built with the profile's real gradio, the API through FastAPI's
test client with the host's auth, install.py against a stand-in ``launch``, and prefix rules."""

import ast
import base64
import json
import os
import re
import sys
import types

import gradio as gr
import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient

import hypernetwork_ext as hx
from tests.support import models as M
from tests.support.webui_generation import LatentDiffusion
from tests.support.webui_standin import ROOT


def read(path):
    with open(path, encoding="utf-8") as handle:
        return handle.read()


def page_of(host):
    return next(p for p in host.ui_extra_networks.extra_pages if p.name == "hypernetworks")


def test_cards_list_every_file_with_prompt_search_and_sort_keys(host):
    page = page_of(host)
    page.create_html("txt2img")
    assert sorted(page.items) == ["anime", "ink"]
    anime = page.items["anime"]
    assert anime["prompt"] == '"<hypernet:anime:" + opts.hypernetwork_default_multiplier + ">"'
    assert anime["metadata"]["widths"] == [M.LDM_CONTEXT, *M.LDM_WIDTHS]
    assert anime["metadata"]["activation"] == "relu"
    assert page.metadata["anime"] is anime["metadata"]
    assert "hypernetworks/anime.pt" in anime["search_terms"][0].replace(os.sep, "/")
    assert set(anime["sort_keys"]) >= {"default", "name", "path", "date_created", "date_modified", "hash"}
    assert page.items["ink"]["filename"].endswith(os.path.join("styles", "ink.safetensors"))


def test_card_uses_preferred_multiplier_activation_text_alias_and_preview(host):
    folder = host.hypernetwork_dir
    (folder / "anime.json").write_text(
        json.dumps({"preferred weight": 0.6, "activation text": "anime style", "alias": "an", "description": "d"})
    )
    (folder / "anime.preview.png").write_bytes(base64.b64decode(b"iVBORw0KGgo="))
    library = host.extension.library
    library.sha256(library.resolve("anime").entry)
    page = page_of(host)
    page.create_html("txt2img")
    item = page.items["anime"]
    assert item["prompt"] == '"<hypernet:anime:" + 0.6 + ">" + " anime style"'
    assert "an" in item["search_terms"] and item["shorthash"] and item["shorthash"] in item["search_terms"][2]
    assert item["description"] == "d" and "anime.preview.png" in item["preview"]


def test_shared_stems_get_path_names(host):
    hx.save(hx.load(host.hypernetwork_dir / "anime.pt"), host.hypernetwork_dir / "styles" / "anime.safetensors")
    host.extension.library.refresh()
    page = page_of(host)
    page.create_html("txt2img")
    assert sorted(page.items) == ["anime", "ink", "styles/anime"]
    assert page.items["styles/anime"]["prompt"].startswith('"<hypernet:styles/anime:"')


def test_one_name_in_two_formats_gets_two_cards_named_with_their_suffix(host):
    hx.save(hx.load(host.hypernetwork_dir / "anime.pt"), host.hypernetwork_dir / "anime.safetensors")
    host.extension.library.refresh()
    page = page_of(host)
    page.create_html("txt2img")
    assert sorted(page.items) == ["anime.pt", "anime.safetensors", "ink"]
    assert page.items["anime.safetensors"]["prompt"].startswith('"<hypernet:anime.safetensors:"')
    assert page.items["anime.pt"]["filename"].endswith("anime.pt")


def test_compatibility_filter_and_show_all(host):
    hx.save(hx.create((2048, 640, 1280), seed=0), host.hypernetwork_dir / "xl.safetensors")
    hx.save(hx.create((768, 320, 640, 1280), seed=0), host.hypernetwork_dir / "sd1.pt")
    host.extension.library.refresh()
    host.set_model(LatentDiffusion(M.ldm_unet(0, context_dim=768)))
    page = page_of(host)
    page.create_html("txt2img")
    assert "sd1" in page.items and "xl" not in page.items
    host.shared.opts.data["hypernetwork_show_all"] = True
    page.create_html("txt2img")
    assert {"sd1", "xl"} <= set(page.items)


def test_broken_file_gets_a_card_that_says_why(host):
    (host.hypernetwork_dir / "broken.pt").write_bytes(b"not a torch file")
    host.extension.library.refresh()
    page = page_of(host)
    page.create_html("txt2img")
    assert "broken.pt" in page.items["broken"]["metadata"]["error"]


def test_a_file_with_nan_weights_gets_a_card_that_counts_them(host):
    broken = hx.load(host.hypernetwork_dir / "anime.pt")
    with torch.no_grad():
        broken.layers[M.LDM_CONTEXT][0].linear[0].weight.view(-1)[:2] = float("inf")
    hx.save(broken, host.hypernetwork_dir / "inf.safetensors")
    host.extension.library.refresh()
    page = page_of(host)
    page.create_html("txt2img")
    metadata = page.items["inf"]["metadata"]
    assert "inf.safetensors" in metadata["error"] and "NaN or infinite" in metadata["error"]
    assert metadata["non_finite_weights"] == 2 and metadata["parameters"] == broken.parameter_count()


def test_metadata_editor_builds_and_saves(host):
    page = page_of(host)
    page.create_html("txt2img")
    with gr.Blocks():
        editor = page.create_user_metadata_editor(None, "txt2img")
        editor.create_ui()
    assert editor.edit_alias.elem_id == "txt2img_hypernetworks_edit_user_metadata_hnx_alias"
    values = editor.put_values_into_components("anime")
    assert len(values) == 8
    assert "Layer structure:" in values[2] and "relu" in values[2] and "Hash:" in values[2]
    editor.save_hypernetwork_metadata("anime", "desc", "notes", "myalias", 0.7, "trigger words")
    saved = json.loads((host.hypernetwork_dir / "anime.json").read_text())
    assert saved == {
        "description": "desc",
        "notes": "notes",
        "alias": "myalias",
        "preferred weight": 0.7,
        "activation text": "trigger words",
    }
    assert host.extension.library.resolve("myalias").entry.name == "anime"
    with pytest.raises(gr.Error, match="may not contain"):
        editor.save_hypernetwork_metadata("anime", "", "", "bad:alias", 0, "")
    host.errors.reported.clear()


def app_for(host, api_auth=None):
    host.shared.cmd_opts.api_auth = api_auth
    app = FastAPI()
    host.script_callbacks.app_started_callback(None, app)
    return TestClient(app)


def test_api_routes(host):
    client = app_for(host)
    listing = client.get("/hypernetworks/v1/networks")
    assert listing.status_code == 200
    by_name = {item["name"]: item for item in listing.json()}
    assert set(by_name) == {"anime", "ink"}
    assert by_name["ink"]["relative_path"] == "styles/ink" and by_name["ink"]["metadata"]["activation"] == "tanh"
    assert by_name["anime"]["sha256"] is None
    hashed = client.get("/hypernetworks/v1/networks", params={"hashes": "true"}).json()
    assert all(item["short_hash"] == item["sha256"][:10] for item in hashed)
    hx.save(hx.load(host.hypernetwork_dir / "anime.pt"), host.hypernetwork_dir / "new.pt")
    assert client.post("/hypernetworks/v1/refresh").json()["count"] == 3
    one = client.get("/hypernetworks/v1/networks/styles/ink")
    assert one.status_code == 200 and one.json()["resolved_by"] == "path" and one.json()["format"] == "safetensors"
    assert client.get("/hypernetworks/v1/networks/INK").json()["resolved_by"] == "case-insensitive name"
    missing = client.get("/hypernetworks/v1/networks/nosuch")
    assert missing.status_code == 404 and "no hypernetwork named 'nosuch'" in missing.json()["detail"]
    escape = client.get("/hypernetworks/v1/networks/..%2F..%2Fsecret")
    assert escape.status_code == 403 and "climbs out" in escape.json()["detail"]


def test_api_honours_the_hosts_api_auth(host):
    client = app_for(host, api_auth="alice:secret,bob:pw:with:colons")
    assert client.get("/hypernetworks/v1/networks").status_code == 401
    assert client.get("/hypernetworks/v1/networks", auth=("alice", "wrong")).status_code == 401
    assert client.get("/hypernetworks/v1/networks", auth=("alice", "secret")).status_code == 200
    assert client.post("/hypernetworks/v1/refresh", auth=("bob", "pw:with:colons")).status_code == 200
    assert client.get("/hypernetworks/v1/networks/anime").status_code == 401


def test_install_uses_the_hosts_pip_for_missing_packages_only(monkeypatch):
    calls = []
    installed = {"torch", "safetensors", "einops"}
    launch = types.ModuleType("launch")
    launch.is_installed = lambda name: name in installed
    launch.run_pip = lambda command, desc=None, live=False: calls.append(command)
    launch.args = types.SimpleNamespace(skip_install=False)
    monkeypatch.setitem(sys.modules, "launch", launch)
    sys.path.insert(0, ROOT)
    try:
        install = __import__("install")
    finally:
        sys.path.remove(ROOT)
    monkeypatch.setitem(sys.modules, "install", install)
    assert install.read_dependencies() == ["torch>=2.1", "safetensors>=0.4", "einops>=0.6", "gradio>=3.41"]
    text = read(os.path.join(ROOT, "pyproject.toml"))
    assert install._dependencies_without_tomllib(text) == install.read_dependencies()
    assert install.main() == 0
    assert calls == ['install "gradio>=3.41"']
    launch.args.skip_install = True
    calls.clear()
    assert install.main() == 0 and calls == []


def test_javascript_and_css_use_the_prefix():
    js = read(os.path.join(ROOT, "javascript", "hypernetworks.js"))
    top_level = re.findall(r"^(?:var|let|const|function)\s+(\w+)", js, re.M)
    assert top_level and all(name.startswith("hnx") for name in top_level)
    css = re.sub(r"/\*.*?\*/", "", read(os.path.join(ROOT, "style.css")), flags=re.S)  # comments hold commas
    selectors = [s.strip() for block in re.findall(r"([^{}]+)\{", css) for s in block.split(",")]
    assert selectors and all(".hnx-" in s or "#hnx" in s for s in selectors)


def test_host_code_imports_nothing_lazily_from_the_package():
    """The WebUI puts the extension on sys.path only while it imports the entry script, so an
    import of one of our modules inside a function would fail later in A1111."""
    for folder in ("hosts", "ui"):
        directory = os.path.join(ROOT, "hypernetwork_ext", folder)
        for name in os.listdir(directory):
            if not name.endswith(".py"):
                continue
            tree = ast.parse(read(os.path.join(directory, name)))
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    for inner in ast.walk(node):
                        if isinstance(inner, ast.ImportFrom):
                            assert inner.level == 0 and not (inner.module or "").startswith("hypernetwork_ext"), (
                                f"{folder}/{name}: {node.name} imports {inner.module} lazily"
                            )
