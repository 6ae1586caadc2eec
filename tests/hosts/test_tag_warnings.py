"""An unknown or malformed tag reaches API users of the real host (A1111, Forge, reForge): the image
is rendered without it, and the response's ``info`` says why under ``Hypernet warnings`` (in
``extra_generation_params`` and in the infotext); PNG Info reads that infotext back without it."""

from __future__ import annotations

import base64
import io
import json

from PIL.PngImagePlugin import PngInfo

from tests.hosts.real_host import DEFAULT_SETTINGS, decode_image, max_difference

KEY = "Hypernet warnings"
BAD_TAGS = "<hypernet:nope:1> <hypernet:hnx-linear:abc>"


def test_unknown_and_malformed_tags_are_in_the_response_and_a_paste_drops_them(suite):
    prompt = f"{suite.plain} {BAD_TAGS}"
    result = suite.server.post("/sdapi/v1/txt2img", {**DEFAULT_SETTINGS, "prompt": prompt})
    info = json.loads(result["info"])
    image = decode_image(result["images"][0])
    warning = info["extra_generation_params"].get(KEY)
    (suite.config.artifacts / "tag-warnings.json").write_text(json.dumps({"warning": warning, "info": info}, indent=1))
    assert warning, f"no {KEY} in the response: {info['extra_generation_params']}"
    assert "<hypernet:nope:1>" in warning and "'nope'" in warning
    assert "<hypernet:hnx-linear:abc>" in warning and "'abc'" in warning
    assert str(suite.config.folder) not in warning  # no local paths in what users share
    infotext = info["infotexts"][0]
    assert f"{KEY}: " in infotext
    assert max_difference(suite.before_tags.pixels, _pixels(image)) == 0  # rendered as without the tags

    png = io.BytesIO()
    metadata = PngInfo()
    metadata.add_text("parameters", infotext)
    image.save(png, format="PNG", pnginfo=metadata)
    parsed = suite.server.post("/sdapi/v1/png-info", {"image": base64.b64encode(png.getvalue()).decode()})
    assert KEY not in parsed["parameters"], parsed["parameters"]
    assert parsed["parameters"].get("Prompt") == prompt


def _pixels(image):
    import numpy as np

    return np.asarray(image.convert("RGB"), dtype=np.int16)
