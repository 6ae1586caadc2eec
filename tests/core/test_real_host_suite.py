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


def test_the_in_host_reference_script_applies_a1111s_formula(tmp_path, monkeypatch):
    """The suite's reference for hosts that do not draw A1111's images (tests/hosts/reference_extension):
    its to_k/to_v pre-hooks on a real ldm UNet give what the extension gives for the same stacked tags."""
    import shutil
    import sys
    import types

    import torch

    import hypernetwork_ext as hx
    from tests.hosts.real_host import REFERENCE_FOLDER, ROOT
    from tests.support import models as M
    from tests.support.networks import webui_network
    from tests.support.scripts import script_module

    folder = tmp_path / "models" / "hypernetworks" / "hnx-suite"
    folder.mkdir(parents=True)
    hx.save(webui_network(seed=1), folder / "one.pt")
    hx.save(webui_network(seed=2, activation="tanh"), folder / "two.pt")
    extension = tmp_path / REFERENCE_FOLDER
    shutil.copytree(ROOT / "tests" / "hosts" / "reference_extension", extension)
    shutil.copy(ROOT / "tests" / "support" / "reference.py", extension / "reference_formula.py")

    class Script:
        pass

    host = {"paths_internal": types.SimpleNamespace(models_path=str(tmp_path / "models"))}
    host["scripts"] = types.SimpleNamespace(Script=Script, AlwaysVisible=object())
    monkeypatch.setitem(sys.modules, "modules", types.SimpleNamespace(**host))
    unet, inputs = M.ldm_unet(0), M.ldm_inputs(0)
    p = types.SimpleNamespace(sd_model=types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=unet)))
    p.extra_generation_params = {}
    with script_module(extension / "scripts" / "hnx_suite_reference.py", "hnx_suite_reference.py") as module:
        script = module.SuiteReference()
        plain = M.run_ldm(unet, inputs)
        script.process(p, "one:0.8, two:-0.5")
        with torch.no_grad():
            got = M.run_ldm(unet, inputs)
        script.postprocess(p, None)
    entries = [(hx.load(folder / "one.pt"), 0.8), (hx.load(folder / "two.pt"), -0.5)]
    with hx.apply(unet, entries), torch.no_grad():
        want = M.run_ldm(unet, inputs)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, plain) and torch.equal(M.run_ldm(unet, inputs), plain)  # hooks removed


SDNEXT_PRELOAD_ERROR = """\
12:17:04-847385 ERROR    Extension preload:
                         extensions/sd-webui-hypernetworks/preload.py:
                         ImportError
/work/hosts/sdnext/modules/script_loading.py:51 in preload_extensions

  50             if hasattr(module, 'preload'):
❱ 51                 module.preload(parser)
  52         except Exception as e:

/work/hosts/sdnext/extensions/sd-webui-hypernetworks/preload.py:20 in preload

  19         return  # the host's own option
❱ 20     from modules.paths_internal import models_path, normalized_filepath
  21
ImportError: cannot import name 'models_path' from 'modules.paths_internal'
12:17:04-926052 DEBUG    Extension preload: {'extensions-builtin': 0.0,
"""
SDNEXT_OTHER_ERROR = """\
12:17:42-334064 ERROR    Module load:
/work/hosts/sdnext/modules/script_loading.py:27 in load_module

❱ 27                     module_spec.loader.exec_module(module)
/work/hosts/sdnext/extensions/other-extension/scripts/other.py:25 in <module>
AttributeError: module 'modules.paths_internal' has no attribute 'models_path'
"""


def test_sdnexts_rich_tracebacks_through_the_extension_are_found():
    """SD.Next logs tracebacks with rich (frames as ``file.py:20 in preload``, no "Traceback" line):
    the suite's no-traceback check passed over the extension's preload error in the real SD.Next."""
    from tests.hosts.real_host import extension_tracebacks

    (found,) = extension_tracebacks(SDNEXT_PRELOAD_ERROR + SDNEXT_OTHER_ERROR)
    assert "sd-webui-hypernetworks/preload.py:20 in preload" in found and "models_path" in found
    assert extension_tracebacks(SDNEXT_OTHER_ERROR) == []
