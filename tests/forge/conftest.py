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
    host = Host(monkeypatch, tmp_path, forge=True)
    forge_standin.install(monkeypatch)
    hx.save(webui_network(seed=1), host.hypernetwork_dir / "anime.pt")
    hx.save(webui_network(seed=2, activation="tanh"), host.hypernetwork_dir / "ink.safetensors")
    host.start()
    unet = M.ldm_unet(0)
    host.runner = forge_standin.ForgeUnetRunner(unet)
    host.plain_unet = M.ldm_unet(0)  # same weights, ldm's own blocks: the A1111 computation
    host.set_model(forge_standin.ForgeModel(unet))
    yield host
    assert host.errors.reported == []
