import pytest

import hypernetwork_ext as hx
from tests.support import models as M
from tests.support.fixtures import one_torch_thread  # noqa: F401 (autouse fixture)
from tests.support.networks import webui_network
from tests.support.webui_generation import LatentDiffusion
from tests.support.webui_generation import sampling_inputs as inputs  # noqa: F401 (fixture)
from tests.support.webui_standin import Host


@pytest.fixture
def host(monkeypatch, tmp_path):
    host = Host(monkeypatch, tmp_path)
    folder = host.hypernetwork_dir
    (folder / "styles").mkdir()
    hx.save(webui_network(seed=1), folder / "anime.pt")
    hx.save(webui_network(seed=2, activation="tanh"), folder / "styles" / "ink.safetensors")
    host.start()
    host.set_model(LatentDiffusion(M.ldm_unet(0)))
    yield host
    assert host.errors.reported == []
