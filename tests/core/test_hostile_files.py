"""Every kind of hostile or broken file (tests/support/hostile.py): ``hx.load`` and ``inspect`` refuse
it with the project's error naming the file, within seconds and 100 MB, running nothing and
changing nothing; real networks stay far inside the limits."""

from __future__ import annotations

import io
import json
import os
import pickletools
import stat
import zipfile

import pytest

import hypernetwork_ext as hx
from hypernetwork_ext.families import FAMILIES
from hypernetwork_ext.formats import to_bytes
from hypernetwork_ext.formats.limits import HYPERNETWORK_LIMITS
from hypernetwork_ext.formats.pickle_scan import scan_pickle
from hypernetwork_ext.network import Architecture, Hypernetwork
from hypernetwork_ext.standalone.cli import main
from tests.support.bounds import bounded  # noqa: F401 (fixture)
from tests.support.hostile import CASES

SECONDS = 5.0  # the tester's 1 MiB zip bomb took 25 s; every case here takes under 1.5 s
DEADLINE = 20.0  # a FIFO blocked open() forever: fail instead of hanging
MEMORY = 100 * 2**20  # the same bomb allocated 2 GB


@pytest.fixture(scope="module", autouse=True)
def _warm(tmp_path_factory):
    """Lazy imports (safetensors, numpy) and first-call caches must not count as a case's memory."""
    folder = tmp_path_factory.mktemp("warm")
    for suffix in ("pt", "safetensors"):
        hx.load(hx.save(hx.create([16], seed=0), folder / f"ok.{suffix}"))
    main(["inspect", "--json", str(folder / "ok.pt")])


def fingerprint(path: str) -> tuple:
    info = os.lstat(path)
    facts = (info.st_mode, info.st_ino, info.st_size, info.st_mtime_ns)
    if stat.S_ISREG(info.st_mode) and info.st_size < 64 * 2**20:
        return (*facts, hx.file_sha256(path))
    return facts


def build(case, tmp_path) -> tuple[str, str]:
    folder = tmp_path / "files"
    folder.mkdir()
    marker = str(tmp_path / "code-ran")
    return case.build(folder, marker), marker


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_load_refuses_it_by_name_quickly_in_bounded_memory_running_and_changing_nothing(tmp_path, case, bounded):  # noqa: F811
    path, marker = build(case, tmp_path)
    before = fingerprint(path)
    with bounded(DEADLINE) as measured, pytest.raises(case.error) as caught:
        hx.load(path)
    assert path in str(caught.value)
    assert measured.seconds < SECONDS
    assert measured.peak_growth_bytes < MEMORY, f"{measured.peak_growth_bytes / 2**20:.0f} MiB"
    assert not os.path.exists(marker)
    assert fingerprint(path) == before


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_inspect_refuses_it_by_name_and_lists_why_in_json(tmp_path, case, bounded, capsys):  # noqa: F811
    path, marker = build(case, tmp_path)
    with bounded(DEADLINE):
        code = main(["inspect", "--json", path])
    out = capsys.readouterr()
    assert code == 2 and path in out.err
    (record,) = json.loads(out.out)
    assert record["path"] == path and path in record["error"]
    assert not os.path.exists(marker)


def test_nan_weights_are_counted_in_inspect(tmp_path, capsys):
    path, _marker = build(next(case for case in CASES if case.id == "nan-weights"), tmp_path)
    assert main(["inspect", path]) == 2
    assert "3 of 2,144 weights are NaN or infinite" in capsys.readouterr().err
    main(["inspect", "--json", path])
    (record,) = json.loads(capsys.readouterr().out)
    assert record["non_finite_weights"] == 3 and record["parameters"] == 2144


def test_a_symlink_to_a_regular_file_loads(tmp_path):
    network = hx.create([16], seed=0)
    target = hx.save(network, tmp_path / "real.pt")
    (tmp_path / "link.pt").symlink_to(target)
    assert hx.content_hash(hx.load(tmp_path / "link.pt")) == hx.content_hash(network)


# (family, layer structure, layer norm, dropout): the defaults and the largest structures people train
REAL_NETWORKS = [
    (family, structure, layer_norm)
    for family in FAMILIES
    for structure, layer_norm in (
        ((1, 2, 1), False),
        ((1, 2, 2, 1), True),
        ((1, 4, 4, 1), True),
        ((1, 1.5, 1.5, 1.5, 1), True),
    )
]


@pytest.mark.parametrize("family,structure,layer_norm", REAL_NETWORKS)
def test_real_networks_stay_far_inside_every_limit(family, structure, layer_norm):
    """Sizes from a twin on the meta device (no memory); opcodes and header from a 1-wide twin with
    the same widths count and structure (a pickle's opcodes do not depend on the tensor sizes)."""
    widths = FAMILIES[family].widths
    dropout = (0,) + (0.1,) * (len(structure) - 2) + (0,)
    arch = Architecture(
        layer_structure=structure, is_layer_norm=layer_norm, dropout_structure=dropout, use_dropout=True
    )
    full = Hypernetwork(arch, widths, device="meta")
    limits = HYPERNETWORK_LIMITS
    assert full.parameter_count() * 4 * 1.6 < limits.max_file_bytes  # fp32, with 60% to spare
    tensors = sum(len(k) + len(v) for k, v in full.module_state_dicts().values())
    assert tensors * 10 < limits.max_tensors
    twin = hx.create(
        tuple(range(2, 2 + len(widths))), structure, "relu", layer_norm=layer_norm, dropout_structure=dropout
    )
    archive = zipfile.ZipFile(io.BytesIO(to_bytes(twin, "pt")))
    scan = scan_pickle(io.BytesIO(archive.read("archive/data.pkl")), "twin")
    assert scan.storages == tensors
    opcodes = sum(1 for _ in pickletools.genops(io.BytesIO(archive.read("archive/data.pkl"))))
    assert opcodes * 10 < limits.max_pickle_opcodes
    header = to_bytes(twin, "safetensors")
    assert int.from_bytes(header[:8], "little") * 10 < limits.max_header_bytes
