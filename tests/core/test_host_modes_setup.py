"""The real-host suite's host modes leave the host as they found it, also when a render fails: options
set back through /sdapi/v1/options (never left to override_settings, which A1111 keeps), the
refiner's second checkpoint name removed."""

import pytest

from tests.hosts import host_modes
from tests.hosts.suite_files import Checkpoint


class FakeServer:
    def __init__(self, options):
        self.options = dict(options)
        self.calls = []

    def get(self, path, **kwargs):
        assert path == "/sdapi/v1/options"
        return dict(self.options)

    def post(self, path, body=None, **kwargs):
        self.calls.append((path, body))
        if path == "/sdapi/v1/options":
            self.options.update(body)


def mode(name):
    return next(m for m in host_modes.MODES if m.name == name)


@pytest.mark.parametrize("name", ["fp8", "token-merging"])
def test_options_are_set_for_the_mode_and_back_after_a_failure(name):
    server = FakeServer({"fp8_storage": "Disable", "token_merging_ratio": 0.0, "other": 1})
    before = dict(server.options)
    with pytest.raises(RuntimeError), host_modes.mode_set_up(server, mode(name), checkpoint=None):
        assert all(server.options[key] == value for key, value in mode(name).options.items())
        raise RuntimeError("a render failed")
    assert server.options == before


def test_the_refiner_link_exists_only_during_the_mode(tmp_path):
    path = tmp_path / "models" / "sd15.safetensors"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"weights")
    checkpoint = Checkpoint("sd15", path, "0" * 64, 768, (320, 640, 1280))
    server = FakeServer({})
    link = path.with_name(f"{host_modes.REFINER_STEM}.safetensors")
    with host_modes.mode_set_up(server, mode("refiner-switch"), checkpoint):
        assert link.read_bytes() == b"weights" and link.stat().st_ino == path.stat().st_ino  # a hard link
    assert not link.exists() and path.exists()
    assert [call[0] for call in server.calls] == ["/sdapi/v1/refresh-checkpoints"] * 2


def test_every_mode_has_its_reference_cases_and_a_recorded_request():
    names = [case for m in host_modes.MODES for case, _ in host_modes.cases(m, "a red circle")]
    assert len(names) == len(set(names))
    batch = mode("batch-of-two")
    assert [case for case, _ in host_modes.cases(batch, "a red circle")][-2:] == [
        "mode-batch-of-two-tag0-0",
        "mode-batch-of-two-tag0-1",
    ]
    record = mode("inpainting").record()
    assert len(record["payload"]["mask"]) == 16 and record["payload"]["inpainting_fill"] == 1
