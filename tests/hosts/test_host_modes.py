"""Host modes in the real A1111 1.10.1, each against A1111's own hypernetworks rendering the same
request: hires fix, img2img, inpainting, a batch of two, the refiner switch, token merging and
FP8 weights (where A1111 samples under bfloat16 autocast on the CPU). Figures per mode go to
``host-modes.json`` with the artifacts."""

from __future__ import annotations

import json

import pytest

from tests.hosts import host_modes
from tests.hosts.real_host import TOLERANCE, max_difference
from tests.hosts.test_render import VISIBLE
from tests.hosts.test_routes import rebaseline_after_the_switch


def reference_images(suite, mode, prompt_index):
    prompt = suite.plain if prompt_index is None else mode.prompts(suite.plain)[prompt_index]
    found = []
    for image_index in range(host_modes.images_per_request(mode)):
        case = host_modes.case_name(mode, prompt_index, image_index)
        image = suite.references.get(case, prompt, mode.record())
        if image is None:
            pytest.skip(f"no built-in reference for {case!r}: the A1111 run renders them first")
        found.append(image)
    return found


def record(suite, mode_name: str, figures: dict) -> None:
    path = suite.config.artifacts / "host-modes.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[mode_name] = figures
    path.write_text(json.dumps(data, indent=1))


@pytest.mark.parametrize("mode", host_modes.MODES, ids=host_modes.MODE_NAMES)
def test_mode_renders_as_a1111s_builtin_hypernetworks(suite, mode):
    if suite.kind != "a1111":
        pytest.skip("the modes are compared with A1111's own hypernetworks, which only A1111 has")
    plain = reference_images(suite, mode, None)
    figures = {}
    with host_modes.mode_set_up(suite.server, mode, suite.checkpoint):
        for prompt_index, prompt in enumerate(mode.prompts(suite.plain)):
            expected = reference_images(suite, mode, prompt_index)
            rendered, _ = host_modes.render(suite.server, mode, prompt)
            assert len(rendered) == len(expected), f"{len(rendered)} images for {len(expected)} expected"
            for image_index, (got, want, without) in enumerate(zip(rendered, expected, plain, strict=True)):
                suite.save(f"mode-{mode.name}-tag{prompt_index}-{image_index}", got)
                figures[f"{prompt}#{image_index}"] = {
                    "max_difference_to_builtin": max_difference(got, want),
                    "mean_difference_to_builtin": float(abs(got.pixels - want).mean()),
                    "effect_mean": float(abs(got.pixels - without).mean()),
                    "effect_max": max_difference(got, without),
                    "seconds": round(got.seconds, 2),
                }
    record(suite, mode.name, figures)
    for key, figure in figures.items():
        assert figure["effect_mean"] > VISIBLE, f"{key}: the network has no visible effect in {mode.name}: {figure}"
        assert figure["max_difference_to_builtin"] <= TOLERANCE, f"{key}: {figure}"
    if mode.refiner or "fp8_storage" in mode.options:
        rebaseline_after_the_switch(suite)  # the checkpoint was loaded again: drift held within the tolerance
    else:
        after = suite.server.txt2img(suite.plain)  # the mode's options are undone
        assert max_difference(after, suite.before_tags) == 0, "the host's no-tag image changed after the mode"
