"""What A1111 and Forge users of the HTTP API see of a tag that cannot apply: ``Hypernet warnings``
in the generation's parameters (``info``'s ``extra_generation_params`` and every infotext), which
a paste drops. Shared by the A1111 and Forge stand-in tests."""

from __future__ import annotations

from tests.support.webui_standin import StableDiffusionProcessing

KEY = "Hypernet warnings"
BAD_TAGS = "<hypernet:nope:1> <hypernet:anime:abc>"


def generate_with(host, prompt: str, run_unet, inputs, **kwargs) -> StableDiffusionProcessing:
    from tests.support.webui_generation import generate

    p = StableDiffusionProcessing(sd_model=host.shared.sd_model, prompt=prompt, **kwargs)
    generate(host, p, inputs, run_unet)
    return p


def check_reported_and_dropped_by_a_paste(host, p) -> str:
    """The warning names each bad tag and its problem, sits in the infotext, holds no folder path,
    and the parameters read back from that infotext hold neither it nor anything else new."""
    warning = p.extra_generation_params[KEY]
    assert "<hypernet:nope:1>" in warning and "no hypernetwork named 'nope'" in warning
    assert "<hypernet:anime:abc>" in warning and "'abc'" in warning
    assert str(host.hypernetwork_dir) not in warning and "hypernetworks" in warning
    text = host.infotext(p)
    assert f"{KEY}: " in text
    params = host.parse_generation_parameters(text)
    assert KEY not in params
    without = host.parse_generation_parameters(text.replace(f", {KEY}: {host.quote(warning)}", ""))
    assert params == without  # nothing else of the paste changes
    return warning
