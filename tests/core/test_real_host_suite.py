"""The real-host suite's own safeguards, which run before any host does (tests/hosts needs one)."""

import json

import pytest

from tests.hosts.real_host import EXTENSION_FOLDER, HostConfig, install_extension, other_copies


def a1111_folder(tmp_path, *extensions, disabled=()):
    host = tmp_path / "webui"
    (host / "modules").mkdir(parents=True)
    (host / "modules" / "launch_utils.py").write_text("")
    for name in extensions:
        (host / "extensions" / name / "hypernetwork_ext").mkdir(parents=True)
        (host / "extensions" / name / "hypernetwork_ext" / "__init__.py").write_text("")
    (host / "extensions" / "sd-webui-other").mkdir(parents=True)
    (host / "config.json").write_text(json.dumps({"disabled_extensions": list(disabled)}))
    return HostConfig(host, "http://127.0.0.1:1", "true", tmp_path / "artifacts")


def test_an_enabled_second_copy_of_the_extension_stops_the_suite_before_it_installs(tmp_path):
    config = a1111_folder(tmp_path, "sd-webui-hypernetworks-dev")
    assert other_copies(config) == ["sd-webui-hypernetworks-dev"]
    with pytest.raises(RuntimeError, match="sd-webui-hypernetworks-dev"):
        install_extension(config)
    assert not config.extension_dir.exists()


def test_a_disabled_copy_and_the_suites_own_clone_are_not_other_copies(tmp_path):
    config = a1111_folder(tmp_path, "old-copy", EXTENSION_FOLDER, disabled=["old-copy"])
    assert other_copies(config) == []


@pytest.mark.parametrize(("own_hypernetworks", "kind"), [(True, "reforge"), (False, "forgeclassic")])
def test_forge_classic_is_told_from_reforge_by_its_missing_hypernetwork_code(tmp_path, own_hypernetworks, kind):
    from tests.hosts.real_host import host_kind

    (tmp_path / "ldm_patched").mkdir()
    (tmp_path / "modules").mkdir()
    if own_hypernetworks:
        (tmp_path / "modules" / "hypernetworks").mkdir()
    assert host_kind(tmp_path) == kind
