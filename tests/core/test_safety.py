"""Hostile and broken files: refused with the project's error, naming the file and the problem; nothing runs."""

import io
import pickle
from pathlib import Path

import pytest
import torch

import hypernetwork_ext as hx
from hypernetwork_ext.formats import safe_pickle
from hypernetwork_ext.formats.pt import network_to_dict
from tests.support import files


def _write(path, data):
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_pickle_calling_os_system_is_refused_before_anything_runs(tmp_path, legacy):
    marker = tmp_path / "pwned"
    path = _write(tmp_path / "evil.pt", files.hostile_torch_file(str(marker), legacy=legacy))
    with pytest.raises(hx.UnsafeFileError) as caught:
        hx.load(path)
    assert not marker.exists()
    message = str(caught.value)
    assert path in message and "system" in message


@pytest.mark.parametrize(
    "make", [files.protocol4_pickle, files.inst_opcode_pickle], ids=["stack_global", "inst_opcode"]
)
def test_other_pickle_constructs_are_refused(tmp_path, make):
    marker = tmp_path / "pwned"
    path = _write(tmp_path / "evil.pt", files.hostile_zip(make(str(marker))))
    with pytest.raises(hx.UnsafeFileError):
        hx.load(path)
    assert not marker.exists()


@pytest.fixture(params=["weights_only", "allow_list"])
def second_guard(request, monkeypatch):
    """Both second guards: torch's weights_only unpickler, and the allow-list unpickler used on
    torch before 2.5 (A1111 1.10 ships torch 2.1.2, which has no ``safe_globals``)."""
    if request.param == "allow_list":
        monkeypatch.delattr(torch.serialization, "safe_globals")
    return request.param


def test_torch_weights_only_is_a_second_guard(tmp_path, monkeypatch, second_guard):
    marker = tmp_path / "pwned"
    data = files.hostile_torch_file(str(marker))
    monkeypatch.setattr(safe_pickle, "check_torch_bytes", lambda *args: None)
    with pytest.raises(hx.UnsafeFileError):
        safe_pickle.load_torch_bytes(data, "evil.pt")
    assert not marker.exists()


def test_memoised_strings_resolve_for_stack_global():
    data = pickle.dumps([print, print], protocol=4)  # the second reference goes through the memo
    found = safe_pickle.scan_pickle(io.BytesIO(data), "x")
    assert ("builtins", "print") in found.globals


def test_a_plain_torch_state_dict_passes_the_scan():
    data = files.torch_bytes({"a": torch.zeros(2), "b": [1, 2.0, "x", None, (True,)], "c": {1, 2}})
    safe_pickle.check_torch_bytes(data, "ok.pt")


@pytest.mark.parametrize(
    "content,message",
    [
        (b"", "empty"),
        (b"hello, not a torch file", "not a torch file"),
    ],
)
def test_garbage_files(tmp_path, content, message):
    path = _write(tmp_path / "junk.pt", content)
    with pytest.raises(hx.FileFormatError) as caught:
        hx.load(path)
    assert path in str(caught.value) and message in str(caught.value)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_truncated_pt(tmp_path, legacy):
    data = files.torch_bytes(network_to_dict(hx.create([16], seed=0)), legacy=legacy)
    path = _write(tmp_path / "cut.pt", data[: len(data) // 2])
    with pytest.raises(hx.FileFormatError) as caught:
        hx.load(path)
    assert path in str(caught.value) and ("truncated" in str(caught.value) or "damaged" in str(caught.value))


def test_truncated_safetensors(tmp_path):
    full = tmp_path / "full.safetensors"
    hx.save(hx.create([16], seed=0), full)
    data = full.read_bytes()
    for cut in (4, 40, len(data) - 10):
        path = _write(tmp_path / f"cut{cut}.safetensors", data[:cut])
        with pytest.raises(hx.FileFormatError) as caught:
            hx.load(path)
        assert path in str(caught.value)


@pytest.mark.parametrize(
    "content,hint",
    [
        ({"string_to_param": {"*": torch.zeros(1, 768)}, "name": "emb"}, "embedding"),
        ({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}}, "checkpoint"),
        ({"lora_unet_down.weight": torch.zeros(1)}, "LoRA"),
        ({}, "empty dict"),
        ([torch.zeros(2)], "list"),
    ],
)
def test_not_a_hypernetwork(tmp_path, content, hint):
    path = _write(tmp_path / "other.pt", files.torch_bytes(content))
    with pytest.raises(hx.FileFormatError) as caught:
        hx.load(path)
    assert "not a hypernetwork" in str(caught.value) and hint in str(caught.value) and path in str(caught.value)


def test_lora_safetensors_is_rejected_loudly(tmp_path):
    from safetensors.torch import save_file

    path = str(tmp_path / "style_lora.safetensors")
    save_file(
        {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320)},
        path,
        metadata={"ss_network_module": "networks.lora"},
    )
    with pytest.raises(hx.FileFormatError) as caught:
        hx.load(path)
    assert "not a hypernetwork" in str(caught.value) and "LoRA" in str(caught.value)


def test_shapes_that_disagree_with_the_structure(tmp_path):
    content = network_to_dict(hx.create([16], (1, 2, 1), seed=0))
    content["layer_structure"] = [1, 3, 1]
    path = _write(tmp_path / "mismatch.pt", files.torch_bytes(content))
    with pytest.raises(hx.FileFormatError) as caught:
        hx.load(path)
    message = str(caught.value)
    assert path in message and "shape" in message and "width 16" in message


def test_missing_and_extra_keys(tmp_path):
    content = network_to_dict(hx.create([16], (1, 2, 1), "relu", seed=0))
    content["activation_func"] = None  # the keys now skip an index the file does not have
    path = _write(tmp_path / "keys.pt", files.torch_bytes(content))
    with pytest.raises(hx.FileFormatError) as caught:
        hx.load(path)
    assert "disagree with the declared structure" in str(caught.value)


def test_unknown_activation_in_a_file(tmp_path):
    content = network_to_dict(hx.create([16], (1, 2, 1), "relu", seed=0))
    content["activation_func"] = "quantumrelu"
    path = _write(tmp_path / "act.pt", files.torch_bytes(content))
    with pytest.raises(hx.FileFormatError) as caught:
        hx.load(path)
    assert path in str(caught.value) and "unknown activation 'quantumrelu'" in str(caught.value)


def test_width_entry_that_is_not_a_pair(tmp_path):
    path = _write(tmp_path / "pair.pt", files.torch_bytes({768: torch.zeros(3), "name": "x"}))
    with pytest.raises(hx.FileFormatError) as caught:
        hx.load(path)
    assert "pair of state dicts" in str(caught.value)


def test_non_tensor_weights(tmp_path):
    content = network_to_dict(hx.create([16], seed=0))
    content[16][0]["linear.0.weight"] = "not a tensor"
    path = _write(tmp_path / "str.pt", files.torch_bytes(content))
    with pytest.raises(hx.FileFormatError) as caught:
        hx.load(path)
    assert "not a tensor" in str(caught.value)


def test_safetensors_named_pt_and_pt_named_safetensors_load_by_content(tmp_path):
    net = hx.create([16], seed=0)
    st = hx.save(net, tmp_path / "a.safetensors")
    pt = hx.save(net, tmp_path / "a.pt")
    (tmp_path / "swapped.pt").write_bytes(Path(st).read_bytes())
    assert hx.content_hash(hx.load(tmp_path / "swapped.pt")) == hx.content_hash(net)
    (tmp_path / "swapped.safetensors").write_bytes(Path(pt).read_bytes())
    with pytest.raises(hx.FileFormatError) as caught:
        hx.load(tmp_path / "swapped.safetensors")
    assert "not a safetensors file" in str(caught.value)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(hx.FileFormatError, match="no such file"):
        hx.load(tmp_path / "nope.pt")
    with pytest.raises(hx.FileFormatError, match="folder"):
        hx.load(tmp_path)


def test_safetensors_without_our_header(tmp_path):
    from safetensors.torch import save_file

    path = str(tmp_path / "bare.safetensors")
    save_file({"hypernetwork.16.key.linear.0.weight": torch.zeros(32, 16)}, path)
    with pytest.raises(hx.FileFormatError, match="metadata header"):
        hx.load(path)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_every_layout_loads_the_same_through_either_guard(tmp_path, monkeypatch, legacy):
    net = hx.create([16, 8], (1, 2, 1), "relu", layer_norm=True, seed=3)
    content = {**network_to_dict(net), "novelai": files.novelai_dict(widths=(16,), seed=1)}
    data = files.torch_bytes(content, legacy=legacy)
    expected = safe_pickle.load_torch_bytes(data, "net.pt")
    monkeypatch.delattr(torch.serialization, "safe_globals")
    got = safe_pickle.load_torch_bytes(data, "net.pt")
    assert got.keys() == expected.keys()
    for key in (16, 8):
        for a, b in zip(got[key], expected[key], strict=True):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert got["layer_structure"] == expected["layer_structure"] and got["novelai"].keys() == expected["novelai"].keys()


def test_numpy_scalars_and_arrays_load(second_guard):
    import numpy

    data = files.torch_bytes({"step": numpy.int64(7), "beta": numpy.float64(0.9), "table": numpy.arange(3)})
    loaded = safe_pickle.load_torch_bytes(data, "numpy.pt")
    assert loaded["step"] == 7 and loaded["beta"] == 0.9 and list(loaded["table"]) == [0, 1, 2]
