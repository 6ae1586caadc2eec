"""Every file layout users have loads as the host loads it; our files load in the host; round trips."""

import os
import stat
import zipfile
from pathlib import Path

import pytest
import torch

import hypernetwork_ext as hx
from hypernetwork_ext.formats.optim import read_optimizer_sidecar, sidecar_path, write_optimizer_sidecar
from hypernetwork_ext.formats.pt import network_to_dict
from hypernetwork_ext.formats.safe_pickle import load_torch_file
from tests.support import files
from tests.support.reference import a1111_safety_check, arch_of, reference_mlp


def _write(path, data: bytes):
    path.write_bytes(data)
    return str(path)


def _assert_module_matches(network, width, index, state, structure, activation, layer_norm, dropout, activate_output):
    x = torch.randn(3, 4, width)
    reference = reference_mlp(state, structure, activation, layer_norm, dropout, activate_output)
    torch.testing.assert_close(network.layers[width][index](x, 0.8), x + 0.8 * reference(x), rtol=1e-5, atol=1e-6)


def test_novelai_layout_loads_as_two_layer_linear(tmp_path):
    content = files.novelai_dict()
    path = _write(tmp_path / "anime_2022.pt", files.torch_bytes(content))
    net = hx.load(path)
    assert net.name == "anime_2022" and net.step == 0
    assert net.widths == [768, 320, 640, 1280]
    assert net.architecture.layer_structure == (1, 2, 1) and net.architecture.activation == "linear"
    assert net.is_affine
    for width in net.widths:
        for index in (0, 1):
            renamed = {
                k.replace("linear1", "linear.0").replace("linear2", "linear.1"): v
                for k, v in content[width][index].items()
            }
            _assert_module_matches(net, width, index, renamed, (1, 2, 1), None, False, (0, 0, 0), True)


def test_legacy_file_without_activate_output_activates_the_output_layer(tmp_path):
    generator = torch.Generator().manual_seed(1)
    # Oct-2022: relu, 1,2,2,1, use_dropout without last_layer_dropout, no activate_output key.
    # Host order: Linear0 ReLU1 Dropout2 Linear3 ReLU4 Linear5 ReLU6 (output activated: key missing).
    sizes = {0: (16, 32), 3: (32, 32), 5: (32, 16)}
    state_k = files.sequential_state(sizes, activation_slots=(1, 4, 6), generator=generator)
    state_v = files.sequential_state(sizes, activation_slots=(1, 4, 6), generator=generator)
    content = {
        16: (state_k, state_v),
        "layer_structure": [1, 2, 2, 1],
        "activation_func": "relu",
        "use_dropout": True,
        "step": 120,
        "name": "oldie",
    }
    net = hx.load(_write(tmp_path / "oldie-120.pt", files.torch_bytes(content)))
    arch = net.architecture
    assert arch.activate_output is True and arch.dropout_structure == (0, 0.3, 0, 0)
    assert net.name == "oldie" and net.step == 120
    _assert_module_matches(net, 16, 0, state_k, (1, 2, 2, 1), "relu", False, (0, 0.3, 0, 0), True)
    _assert_module_matches(net, 16, 1, state_v, (1, 2, 2, 1), "relu", False, (0, 0.3, 0, 0), True)


def test_last_layer_dropout_legacy_rule(tmp_path):
    generator = torch.Generator().manual_seed(2)
    # 1,2,1 with use_dropout and last_layer_dropout: [0, 0.3, 0] -> Linear0 Tanh1 Dropout2 Linear3
    sizes = {0: (8, 16), 3: (16, 8)}
    states = tuple(files.sequential_state(sizes, activation_slots=(1,), generator=generator) for _ in range(2))
    content = {
        8: states,
        "layer_structure": [1, 2, 1],
        "activation_func": "tanh",
        "use_dropout": True,
        "last_layer_dropout": True,
        "activate_output": False,
    }
    net = hx.load(_write(tmp_path / "lld.pt", files.torch_bytes(content)))
    assert net.architecture.dropout_structure == (0, 0.3, 0)
    _assert_module_matches(net, 8, 0, states[0], (1, 2, 1), "tanh", False, (0, 0.3, 0), False)


@pytest.mark.parametrize("activation", ["linear", "relu", "swish", "prelu", "mish"])
@pytest.mark.parametrize("layer_norm", [False, True])
@pytest.mark.parametrize("structure,dropout", [((1, 2, 1), (0, 0, 0)), ((1, 1.5, 2, 1), (0, 0.1, 0.2, 0))])
@pytest.mark.parametrize("activate_output", [False, True])
def test_a1111_files_round_trip_and_load_in_the_host(
    tmp_path, activation, layer_norm, structure, dropout, activate_output
):
    net = hx.create(
        [24, 16],
        structure,
        activation,
        "XavierNormal",
        layer_norm=layer_norm,
        dropout_structure=dropout,
        activate_output=activate_output,
        seed=4,
        name="roundtrip",
    )
    net.step = 321
    net.info.sd_checkpoint, net.info.sd_checkpoint_name = "abcdef0123", "model-v1"
    net.info.optional_info = "notes"
    pt = hx.save(net, tmp_path / "n.pt")

    a1111_safety_check(pt)  # the host's own safety check accepts our archive
    raw = torch.load(pt, map_location="cpu", weights_only=False)  # what the host does next
    assert [type(k) for k in raw if not isinstance(k, str)] == [int, int]
    assert all(type(raw[w]) is tuple and len(raw[w]) == 2 for w in (24, 16))
    expected_types = {
        "step": int,
        "name": str,
        "layer_structure": list,
        "activation_func": str,
        "is_layer_norm": bool,
        "weight_initialization": str,
        "sd_checkpoint": str,
        "sd_checkpoint_name": str,
        "activate_output": bool,
        "use_dropout": bool,
        "dropout_structure": list,
        "last_layer_dropout": bool,
        "optional_info": str,
    }
    for key, kind in expected_types.items():
        assert type(raw[key]) is kind, key
    for width in (24, 16):
        for index in (0, 1):
            _assert_module_matches(
                net, width, index, raw[width][index], structure, activation, layer_norm, dropout, activate_output
            )

    st = hx.save(hx.load(pt), tmp_path / "n.safetensors")
    back = hx.save(hx.load(st), tmp_path / "back.pt")
    _assert_same_content(load_torch_file(pt), load_torch_file(back))
    again = hx.load(st)
    assert hx.content_hash(again) == hx.content_hash(net)
    assert (again.name, again.step, again.info.optional_info) == ("roundtrip", 321, "notes")


def _assert_same_content(a: dict, b: dict):
    assert list(a) == list(b)
    for key in a:
        if isinstance(key, int):
            for sa, sb in zip(a[key], b[key], strict=True):
                assert list(sa) == list(sb)
                for name in sa:
                    assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name], sb[name])
        else:
            assert a[key] == b[key] and type(a[key]) is type(b[key]), key


def test_safetensors_to_pt_to_safetensors_is_lossless(tmp_path):
    net = hx.create(
        [2048, 640, 1280], (1, 2, 1), "gelu", "KaimingNormal", layer_norm=True, seed=11, model_family="sdxl"
    )
    first = hx.save(net, tmp_path / "a.safetensors")
    second = hx.save(hx.load(hx.save(hx.load(first), tmp_path / "a.pt")), tmp_path / "b.safetensors")
    from safetensors import safe_open

    with safe_open(first, "pt") as fa, safe_open(second, "pt") as fb:
        assert fa.metadata() == fb.metadata()
        assert sorted(fa.keys()) == sorted(fb.keys())
        for key in fa.keys():  # noqa: SIM118 (safe_open is not a dict)
            assert torch.equal(fa.get_tensor(key), fb.get_tensor(key))


def test_safetensors_header_documents_the_network(tmp_path):
    import json

    from safetensors import safe_open

    net = hx.create(seed=1, name="style")
    net.info.sd_checkpoint_name = "v1-5-pruned"
    path = hx.save(net, tmp_path / "style.safetensors")
    with safe_open(path, "pt") as handle:
        meta = handle.metadata()
        keys = set(handle.keys())
    assert meta["hypernetwork.format_version"] == "1"
    assert json.loads(meta["widths"]) == [768, 320, 640, 1280]
    assert json.loads(meta["model_family"]) == "sd1" and json.loads(meta["model_family_inferred"]) is True
    assert json.loads(meta["content_hash"]) == hx.content_hash(net)
    assert json.loads(meta["tool"]) == "sd-webui-hypernetworks" and json.loads(meta["tool_version"]) == hx.__version__
    assert json.loads(meta["sd_checkpoint_name"]) == "v1-5-pruned"
    for key in (
        "step",
        "name",
        "layer_structure",
        "activation_func",
        "is_layer_norm",
        "weight_initialization",
        "sd_checkpoint",
        "activate_output",
        "use_dropout",
        "dropout_structure",
        "last_layer_dropout",
        "optional_info",
    ):
        assert key in meta
    assert "hypernetwork.768.key.linear.0.weight" in keys and "hypernetwork.1280.value.linear.1.bias" in keys


def test_declared_family_survives_and_inferred_one_stays_inferred(tmp_path):
    declared = hx.create([640, 1280], seed=0, model_family="sdxl")
    assert hx.load(hx.save(declared, tmp_path / "d.safetensors")).info.model_family == "sdxl"
    assert hx.load(hx.save(declared, tmp_path / "d.pt")).info.model_family == "sdxl"
    inferred = hx.create([1024, 320], seed=0)
    loaded = hx.load(hx.save(inferred, tmp_path / "i.safetensors"))
    assert loaded.info.model_family is None and loaded.family == "sd2"


def test_unknown_keys_of_a_pt_file_are_kept(tmp_path):
    net = hx.create([8], seed=0)
    content = network_to_dict(net) | {"trainer_notes": "epoch 3", "lr": 1e-5}
    pt = _write(tmp_path / "x.pt", files.torch_bytes(content))
    back = hx.load(hx.save(hx.load(hx.save(hx.load(pt), tmp_path / "x.safetensors")), tmp_path / "y.pt"))
    assert back.info.extra == {"trainer_notes": "epoch 3", "lr": 1e-5}


def test_legacy_raw_pickle_torch_files_load(tmp_path):
    net = hx.create([16, 8], (1, 2, 1), "relu", seed=3)
    path = _write(tmp_path / "legacy.pt", files.torch_bytes(network_to_dict(net), legacy=True))
    with pytest.raises(zipfile.BadZipFile):
        zipfile.ZipFile(path)
    assert hx.content_hash(hx.load(path)) == hx.content_hash(net)


def test_files_in_half_precision_keep_their_dtype(tmp_path):
    net = hx.create([8], seed=0).to(torch.float16)
    loaded = hx.load(hx.save(net, tmp_path / "half.safetensors"))
    assert loaded.layers[8][0].linear[0].weight.dtype == torch.float16


def test_optimizer_sidecar_is_used_only_with_a_matching_hash(tmp_path):
    net = hx.create([8], seed=0)
    path = hx.save(net, tmp_path / "net.pt")
    state = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2)}},
        "param_groups": [{"lr": 1e-5, "params": [0]}],
    }
    write_optimizer_sidecar(path, "AdamW", state)
    assert os.path.exists(sidecar_path(path)) and sidecar_path(path).endswith("net.pt.optim")
    a1111_safety_check(sidecar_path(path))
    sidecar, reason = read_optimizer_sidecar(path)
    assert sidecar is not None and reason == "" and sidecar.optimizer_name == "AdamW"
    assert torch.equal(sidecar.state_dict["state"][0]["exp_avg"], torch.ones(2))
    net.step = 5
    hx.save(net, path, overwrite=True)  # the network changed: the optimizer state no longer fits
    sidecar, reason = read_optimizer_sidecar(path)
    assert sidecar is None and "another version" in reason


def test_a1111_sidecar_layout_is_read(tmp_path):
    net = hx.create([8], seed=0)
    path = hx.save(net, tmp_path / "net.pt")
    content = {
        "optimizer_name": "AdamW",
        "hash": hx.short_hash(hx.file_sha256(path)),
        "optimizer_state_dict": {"state": {}, "param_groups": []},
    }
    _write(tmp_path / "net.pt.optim", files.torch_bytes(content))
    sidecar, _ = read_optimizer_sidecar(path)
    assert sidecar is not None and sidecar.state_dict == {"state": {}, "param_groups": []}


def test_hashes(tmp_path):
    import hashlib

    net = hx.create([8], seed=0)
    path = hx.save(net, tmp_path / "h.pt")
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    assert hx.file_sha256(path) == digest and hx.short_hash(digest) == digest[:10]
    other = hx.create([8], seed=1)
    assert hx.content_hash(other) != hx.content_hash(net)
    renamed = hx.load(path)
    renamed.name, renamed.step = "other", 99
    assert hx.content_hash(renamed) == hx.content_hash(net)


def test_save_refuses_to_overwrite_and_writes_atomically(tmp_path, monkeypatch):
    net = hx.create([8], seed=0)
    path = tmp_path / "keep.pt"
    hx.save(net, path)
    original = path.read_bytes()
    with pytest.raises(hx.FileExistsRefusedError) as caught:
        hx.save(hx.create([8], seed=1), path)
    assert str(path) in str(caught.value)
    assert path.read_bytes() == original

    def fail_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail_replace)
    with pytest.raises(OSError):
        hx.save(hx.create([8], seed=1), path, overwrite=True)
    assert path.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.pt"]  # no partial file left behind


def test_unknown_suffix_is_refused(tmp_path):
    with pytest.raises(hx.HypernetworkError) as caught:
        hx.save(hx.create([8]), tmp_path / "n.ckpt")
    assert ".ckpt" in str(caught.value)


def test_arch_helpers_agree_with_reference():
    net = hx.create([8], (1, 2, 1), "relu", layer_norm=True)
    assert arch_of(net)["is_layer_norm"] is True


def test_written_files_get_the_usual_permissions(tmp_path):
    """Atomic writes go through a private temporary file; the result must not stay private."""
    mask = os.umask(0o022)
    os.umask(mask)
    net = hx.create([8], (1, 2, 1), "relu", seed=0)
    for name in ("net.pt", "net.safetensors"):
        hx.save(net, tmp_path / name)
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o666 & ~mask
    os.chmod(tmp_path / "net.pt", 0o640)
    hx.save(net, tmp_path / "net.pt", overwrite=True)
    assert stat.S_IMODE(os.stat(tmp_path / "net.pt").st_mode) == 0o640  # an overwritten file keeps its mode


def test_files_load_while_a1111_has_replaced_torch_load(tmp_path, monkeypatch):
    """A1111 replaces ``torch.load`` process-wide (``modules/safe.py``): its check reads a file object
    to the end, then hands it to torch. In the real A1111 every .pt of ours was reported as damaged."""
    from tests.support.reference import a1111_safety_check

    original = torch.load

    def a1111_load(filename, *args, **kwargs):
        a1111_safety_check(filename)  # leaves a file object at its end, as zipfile does
        return original(filename, *args, **kwargs)

    network = hx.create([16, 8], (1, 2, 1), "relu", seed=4)
    hx.save(network, tmp_path / "net.pt")
    monkeypatch.setattr(torch, "load", a1111_load)
    loaded = hx.load(tmp_path / "net.pt")
    for a, b in zip(loaded.state_dict().values(), network.state_dict().values(), strict=True):
        assert torch.equal(a, b)
