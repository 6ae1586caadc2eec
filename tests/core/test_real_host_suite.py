"""The real-host suite's own safeguards, which run before any host does (tests/hosts needs one)."""

import json
import re

import numpy as np
import pytest

from hypernetwork_ext.training.jobs import JobStatus
from tests.hosts.jobs import JobEnded, Progress, ended, from_status, from_tab, from_tab_text, reached, wait_for
from tests.hosts.real_host import EXTENSION_FOLDER, HostConfig, flat_image_reason, install_extension, other_copies
from tests.hosts.training_data import choose_captions


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


# -- waiting for training jobs: a job that ends otherwise fails the wait at once ------------------------
class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def reader(states):
    """Readings of a job, one per poll: (state, step) pairs, the last one repeated."""
    readings = iter(states)
    last = []

    def read():
        item = next(readings, None)
        if item is not None:
            last[:] = [Progress(item[0], item[1], 20, item[2] if len(item) > 2 else "")]
        return last[0] if last else None

    return read


def test_a_job_that_ends_otherwise_fails_the_wait_at_once_with_its_state_and_message():
    """Issue 21: the Train-tab test waited an hour for "finished step 20" after the run had stopped on
    NaN at step 3."""
    clock = FakeClock()
    read = reader([("running", 1), ("running", 2), ("non-finite", 3, "the loss is NaN at step 3")])
    with pytest.raises(JobEnded, match=r"finished step 20.*ended non-finite at step 3: the loss is NaN at step 3"):
        wait_for(read, ended("finished", 20), "finished step 20", timeout=3600, poll=1, clock=clock, sleep=clock.sleep)
    assert clock.now == 2  # three readings, no more


@pytest.mark.parametrize(
    ("until", "states", "message"),
    [
        (ended("finished", 20), [("running", 5), ("finished", 12)], "ended finished at step 12"),
        (reached(2), [("queued", 0), ("failed", 0, "no images in the folder")], "ended failed at step 0"),
        (ended("interrupted"), [("running", 4), ("diverged", 4)], "ended diverged at step 4"),
    ],
)
def test_every_other_end_fails_the_wait(until, states, message):
    clock = FakeClock()
    with pytest.raises(JobEnded, match=message):
        wait_for(reader(states), until, "it", poll=1, clock=clock, sleep=clock.sleep)


def test_the_wait_returns_the_reading_it_waited_for():
    clock = FakeClock()
    got = wait_for(
        reader([("queued", 0), ("running", 1), ("running", 3)]), reached(2), "step 2", clock=clock, sleep=clock.sleep
    )
    assert (got.state, got.step) == ("running", 3)
    done = wait_for(
        reader([("running", 19), ("finished", 20)]), ended("finished", 20), "end", clock=clock, sleep=clock.sleep
    )
    assert done.state == "finished"


def test_a_wait_that_times_out_says_where_the_job_stood():
    clock = FakeClock()
    with pytest.raises(AssertionError, match=r"after 10 s; the job is running at step 4"):
        wait_for(
            reader([("running", 4)]),
            ended("finished", 20),
            "the end",
            timeout=10,
            poll=1,
            clock=clock,
            sleep=clock.sleep,
        )


def test_readings_of_an_earlier_job_are_ignored():
    """The Train tab still shows the previous run (ended) until its next poll shows the new one."""
    clock = FakeClock()
    readings = iter(
        [Progress("interrupted", 7, 1000, "old"), Progress("running", 1, 20, ""), Progress("running", 2, 20, "")]
    )
    got = wait_for(
        lambda: next(readings), reached(2), "step 2", ignore=lambda p: p.max_steps != 20, clock=clock, sleep=clock.sleep
    )
    assert got.step == 2


def tab_text(job: JobStatus) -> str:
    """What the browser shows of the Train tab's progress column (its innerText), from the tab's own HTML."""
    from hypernetwork_ext.ui.training import TrainingTab

    class Latest:
        def latest(self):
            return job

    markup = TrainingTab(jobs=Latest()).refresh()[0]
    return re.sub(r"<[^>]+>", "", markup.replace("<br>", "\n"))


@pytest.mark.parametrize("state", ["running", "finished", "non-finite", "interrupted", "failed"])
def test_the_train_tabs_own_progress_text_is_read_back(state):
    job = JobStatus(id="x", state=state, step=3, max_steps=20, message="the loss is NaN at step 3", last_loss=0.5)
    progress = from_tab_text(tab_text(job))
    assert (progress.state, progress.step, progress.max_steps) == (state, 3, 20)
    assert "the loss is NaN at step 3" in progress.text
    assert from_tab_text("No training yet.") is None


def test_a_start_the_tab_refused_ends_the_wait_at_once():
    clock = FakeClock()
    refused = from_tab("No training yet.", "Not started:\n  learn_rate: not a number", 20)
    with pytest.raises(JobEnded, match=r"ended not started at step 0: Not started: learn_rate: not a number"):
        wait_for(lambda: refused, reached(1), "running step 1", clock=clock, sleep=clock.sleep)
    assert clock.now == 0
    assert from_tab("running step 3/20 (15.0%)", "Training started (job 1).", 20).state == "running"


def test_a_route_status_is_read_with_its_error():
    status = JobStatus(id="x", state="failed", step=0, max_steps=20, message="m", error="no images").to_dict(
        history=False
    )
    assert from_status(status) == Progress("failed", 0, 20, "no images")


# -- training captions the host renders finitely ---------------------------------------------------------
def test_captions_the_host_renders_non_finitely_are_dropped_and_named():
    asked = []

    def reason_for(caption):
        asked.append(caption)
        return "flat" if "triangle" in caption else None

    captions = ["a red circle", "a red triangle", "a red triangle", "a red square", "a red diamond", "a red dot"]
    kept, dropped = choose_captions(captions, reason_for, 3)
    assert kept == [0, 3, 4]
    assert [(d.caption, d.reason) for d in dropped] == [("a red triangle", "flat")]
    assert asked == ["a red circle", "a red triangle", "a red square", "a red diamond"]  # once each, no more


def test_too_few_finite_captions_stop_with_what_was_dropped():
    with pytest.raises(RuntimeError, match=r"only 1 of 2 .*'a red triangle': flat"):
        choose_captions(["a red circle", "a red triangle"], lambda c: "flat" if "triangle" in c else None, 2)


# -- the plain prompt the host renders finitely -----------------------------------------------------------
class PlainServer:
    """Renders each prompt as asked: flat black (a NaN image), HTTP 500 naming NaNs (A1111), or finite."""

    def __init__(self, tmp_path, flat=(), refused=()):
        from pathlib import Path

        self.flat, self.refused, self.asked = set(flat), set(refused), []
        self.log_path = Path(tmp_path) / "extension.log"

    def txt2img(self, prompt):
        from PIL import Image

        from tests.hosts.real_host import HttpError, Rendered

        self.asked.append(prompt)
        if prompt in self.refused:
            raise HttpError("POST", "/sdapi/v1/txt2img", 500, "NansException: A tensor with all NaNs was produced")
        image = Image.new("RGB", (8, 8))
        if prompt not in self.flat:
            image.putpixel((1, 2), (200, 10, 10))
        return Rendered(image, "", 0.0, {"prompt": prompt})


def test_the_plain_prompt_is_the_first_candidate_rendered_finitely_each_asked_once(tmp_path):
    from tests.hosts import suite_files as files
    from tests.hosts.conftest import choose_plain

    first, second, third = files.PLAIN_CANDIDATES[:3]
    server = PlainServer(tmp_path, flat={first}, refused={second})
    known = {first: "the host drew every pixel (0, 0, 0) (what a NaN image decodes to)"}
    with pytest.warns(
        UserWarning, match=rf"plain prompt '{third}'.*'{first}' \(the host drew.*'{second}' \(the host refused"
    ):
        assert choose_plain(tmp_path, server, known) == third
    assert server.asked == [second, third]  # the first was rendered while the checkpoint loaded
    tried = json.loads((tmp_path / "plain-prompt.json").read_text())["tried"]
    assert list(tried) == [first, second, third] and tried[third].startswith("finite")


def test_no_candidate_rendered_finitely_names_each_and_what_it_rendered():
    from tests.hosts.training_data import choose_plain_prompt

    reasons = {"a": "the host drew every pixel (0, 0, 0) (what a NaN image decodes to)", "b": "refused: NaNs"}
    with pytest.raises(
        RuntimeError, match=r"none of the suite's 2 .*'a': the host drew every pixel \(0, 0, 0\).*'b': refused"
    ):
        choose_plain_prompt(["a", "b"], reasons.get)


def test_every_prompt_of_the_session_starts_with_its_plain_prompt():
    from tests.hosts import host_modes
    from tests.hosts import suite_files as files

    plain = "a blue square"
    prompts = [prompt for _, prompt in files.reference_cases(plain)]
    prompts += [prompt for mode in host_modes.MODES for _, prompt in host_modes.cases(mode, plain)]
    assert files.reference_cases(plain)[0] == ("no-tag", plain)
    assert all(prompt == plain or prompt.startswith(f"{plain} <") for prompt in prompts), prompts
    assert not any(
        candidate in prompt for prompt in prompts for candidate in files.PLAIN_CANDIDATES if candidate != plain
    )


def test_stored_references_give_the_plain_prompt_a_former_run_chose(tmp_path):
    from PIL import Image

    from tests.hosts import suite_files as files
    from tests.hosts.conftest import ReferenceStore, _settings, stored_plain
    from tests.hosts.real_host import Rendered

    store = ReferenceStore(tmp_path, {"n": "h"})
    assert stored_plain(store, "forgeclassic") is None
    chosen = files.PLAIN_CANDIDATES[1]
    cases = files.reference_cases(chosen)
    for case, prompt in cases[:-1]:
        store.put(case, prompt, _settings(), Rendered(Image.new("RGB", (4, 4)), "", 0.0, {}))
    assert stored_plain(store, "forgeclassic") is None  # one image short: the reference run renders it
    store.put(*cases[-1], _settings(), Rendered(Image.new("RGB", (4, 4)), "", 0.0, {}))
    assert stored_plain(store, "forgeclassic") == chosen
    assert stored_plain(store, "a1111") is None  # A1111 also needs its host modes' references


def test_the_context_bound_holds_what_the_cache_can_keep_for_one_network():
    import collections

    import torch

    from hypernetwork_ext.fastpath import CONTEXTS_KEPT, ContextCache
    from tests.hosts.test_memory import context_bytes_bound

    cache = ContextCache(collections.Counter())
    contexts = [torch.full((1, 77, 768), float(i)) for i in range(CONTEXTS_KEPT + 3)]
    for context in contexts:
        entry = cache.entry_for(context)
        for kind in ("k", "v"):
            entry.put(("hnx-linear", kind), context * 2)
    held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in cache.tensors()}
    assert sum(held.values()) == context_bytes_bound(768)  # full, and not one byte more


def test_a_flat_image_is_what_a_nan_image_decodes_to():
    flat = np.zeros((8, 8, 3), dtype=np.int16)
    assert "every pixel (0, 0, 0)" in flat_image_reason(flat)
    varied = flat.copy()
    varied[3, 4, 1] = 1
    assert flat_image_reason(varied) is None


# -- the shared references folder ------------------------------------------------------------------------
def test_two_runs_sharing_a_references_folder_keep_each_others_images(tmp_path):
    from PIL import Image

    from tests.hosts.conftest import ReferenceStore
    from tests.hosts.real_host import Rendered

    def rendered(value):
        return Rendered(Image.new("RGB", (4, 4), (value, 0, 0)), "", 0.0, {})

    first, second = ReferenceStore(tmp_path, {"n": "h"}), ReferenceStore(tmp_path, {"n": "h"})
    first.put("a", "p", {}, rendered(10))
    second.put("b", "q", {}, rendered(20))
    again = ReferenceStore(tmp_path, {"n": "h"})
    assert again.get("a", "p", {})[0, 0, 0] == 10 and again.get("b", "q", {})[0, 0, 0] == 20
    assert again.get("a", "p", {"other": 1}) is None and not list(tmp_path.glob("*.partial"))


def test_a_txt2img_answered_without_an_image_says_so(tmp_path, monkeypatch):
    """SD.Next answers 200 with no image when its model failed to load ("Aborted: model not loaded"):
    the suite says that, where it once failed every test with an IndexError."""
    from tests.hosts.real_host import Server

    server = Server(a1111_folder(tmp_path), "no-image")
    monkeypatch.setattr(server, "post", lambda path, body=None, **kwargs: {"images": [], "info": "{}"})
    with pytest.raises(RuntimeError, match="answered no image for 'a red circle'"):
        server.txt2img("a red circle")


def test_the_suites_learning_check_reads_the_loss_at_fixed_noise_not_the_step_losses():
    from tests.hosts.test_training import STEPS, learned, step_loss_medians

    # The full random SDXL in Forge Classic: the step losses' medians rose (1.034 -> 1.060) while training.
    rising_steps = [(step, 1.0 + 0.003 * step) for step in range(1, STEPS + 1)]
    status = JobStatus(id="j", losses=rising_steps, fixed_losses=[(0, 1.2171), (STEPS, 1.2049)]).to_dict()
    assert learned(status) and step_loss_medians(status["losses"])[1] > step_loss_medians(status["losses"])[0]
    for fixed in ([(0, 1.2171), (STEPS, 1.2171)], [(0, 1.2)], [], [(0, 1.3), (10, 1.2)], [(5, 1.3), (STEPS, 1.2)]):
        assert not learned(JobStatus(id="j", fixed_losses=fixed).to_dict()), fixed


def test_the_suites_extra_training_options_come_from_a_json_object(monkeypatch):
    from tests.hosts.test_training import extra_options

    monkeypatch.delenv("HNX_HOST_TRAINING_OPTIONS", raising=False)
    assert extra_options() == {}
    monkeypatch.setenv("HNX_HOST_TRAINING_OPTIONS", '{"gradient_checkpointing": true}')
    assert extra_options() == {"gradient_checkpointing": True}
    monkeypatch.setenv("HNX_HOST_TRAINING_OPTIONS", "[1]")
    with pytest.raises(ValueError, match="JSON object"):
        extra_options()
