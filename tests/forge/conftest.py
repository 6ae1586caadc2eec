import pytest
import torch

import hypernetwork_ext as hx
from tests.support import forge_standin
from tests.support import models as M
from tests.support.webui_generation import SamplingInputs
from tests.support.webui_standin import Host


def network(widths=(M.LDM_CONTEXT, *M.LDM_WIDTHS), seed=0, activation="relu"):
    net = hx.create(widths, (1, 2, 1), activation, "XavierNormal", seed=seed, name=f"net{seed}")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.Linear):
                module.bias.normal_(0.0, 0.1, generator=generator)
    return net


@pytest.fixture(autouse=True)
def _one_thread():
    """The small models of these tests run several times faster on one thread than on two busy
    cores (the 2-core machine runs other work too)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def forge(monkeypatch, tmp_path):
    host = Host(monkeypatch, tmp_path, forge=True)
    forge_standin.install(monkeypatch)
    hx.save(network(seed=1), host.hypernetwork_dir / "anime.pt")
    hx.save(network(seed=2, activation="tanh"), host.hypernetwork_dir / "ink.safetensors")
    host.start()
    unet = M.ldm_unet(0)
    host.runner = forge_standin.ForgeUnetRunner(unet)
    host.plain_unet = M.ldm_unet(0)  # same weights, ldm's own blocks: the A1111 computation
    host.set_model(forge_standin.ForgeModel(unet))
    yield host
    assert host.errors.reported == []


@pytest.fixture
def inputs():
    generator = torch.Generator().manual_seed(5)
    return SamplingInputs(
        cond=torch.randn(1, 7, M.LDM_CONTEXT, generator=generator),
        uncond=torch.randn(1, 7, M.LDM_CONTEXT, generator=generator),
        x=torch.randn(1, 4, 8, 8, generator=generator),
    )
