"""Forge Classic's stand-in (tests/support/webui_standin.py with ``classic=True``), run in the a1111
profile: Forge Classic pins A1111's gradio 3.41.2, fastapi 0.94.0, httpx 0.24.1 and pydantic 1.x."""

import pytest

import hypernetwork_ext as hx
from tests.support import forge_standin
from tests.support import models as M
from tests.support.fixtures import one_torch_thread  # noqa: F401 (autouse fixture)
from tests.support.networks import webui_network
from tests.support.webui_generation import sampling_inputs as inputs  # noqa: F401 (fixture)
from tests.support.webui_standin import Host


@pytest.fixture
def forge(monkeypatch, tmp_path):
    """Forge Classic with two networks in models/hypernetworks (it has no --hypernetwork-dir) and
    a small UNet run the way its ``ldm_patched`` transformer blocks run."""
    host = Host(monkeypatch, tmp_path, classic=True)
    forge_standin.install(monkeypatch, reforge=True)
    hx.save(webui_network(seed=1), host.hypernetwork_dir / "anime.pt")
    hx.save(webui_network(seed=2, activation="tanh"), host.hypernetwork_dir / "ink.safetensors")
    host.start()
    unet = M.ldm_unet(0)
    host.runner = forge_standin.ForgeUnetRunner(unet)
    host.plain_unet = M.ldm_unet(0)  # same weights, ldm's own blocks: the A1111 computation
    host.set_model(forge_standin.ForgeModel(unet))
    yield host
    assert host.errors.reported == []
