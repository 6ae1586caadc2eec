"""The demo's thread count follows the cores actually free (a busy machine gets fewer threads than
it has cores), unless a flag or an environment variable says otherwise; the console says which."""

from __future__ import annotations

import pytest

from hypernetwork_ext.errors import InvalidConfigError
from hypernetwork_ext.standalone.threads import THREADS_ENV, choose_threads, usable_cores


@pytest.mark.parametrize(
    "cores,load,threads",
    [(2, 0.2, 2), (2, 0.6, 1), (2, 1.6, 1), (2, 14.8, 1), (16, 3.0, 13), (16, 0.0, 16), (1, 0.0, 1)],
)
def test_the_cores_usable_less_the_load_average(cores, load, threads):
    choice = choose_threads(environ={}, cores=cores, load=load)
    assert choice.threads == threads
    assert f"{cores} core" in choice.describe() and f"load average {load:.1f}" in choice.describe()


def test_a_flag_then_the_variables_override_it():
    busy = {"cores": 2, "load": 9.0}
    assert choose_threads(4, environ={THREADS_ENV: "3"}, **busy).threads == 4
    assert choose_threads(environ={THREADS_ENV: "3", "OMP_NUM_THREADS": "1"}, **busy).threads == 3
    chosen = choose_threads(environ={"OMP_NUM_THREADS": "2"}, **busy)
    assert chosen.threads == 2 and chosen.describe().startswith("threads: 2 (OMP_NUM_THREADS=2;")
    with pytest.raises(InvalidConfigError, match="HYPERNETWORK_THREADS='many': expected a whole number"):
        choose_threads(environ={THREADS_ENV: "many"}, **busy)


def test_a_cgroup_quota_caps_the_cores(tmp_path):
    quota = tmp_path / "cpu.max"
    quota.write_text("100000 100000\n")
    assert usable_cores(str(quota)) == 1
    quota.write_text("max 100000\n")
    assert usable_cores(str(quota)) == usable_cores(str(tmp_path / "absent"))


@pytest.mark.parametrize(
    "argv,stream",
    [
        (["demo", "--output", "demo"], "out"),  # the demo's log is its standard output
        (["generate", "a red circle", "-o", "x.png"], "err"),
        (["train", "--create", "n", "--data-root", "data", "--output-dir", "nets"], "err"),
    ],
)
def test_the_commands_that_load_a_model_say_what_they_chose_and_use_it(argv, stream, tmp_path, monkeypatch, capsys):
    """generate (a grid on 2 busy cores: 71 s for 80 steps) and train gain from it as the demo does."""
    import torch

    from hypernetwork_ext.standalone import cli, threads

    def stop(*args, **kwargs):
        raise cli.HypernetworkError("stopped where the model would load")

    applied = []
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    monkeypatch.setattr(cli, "_load_source", stop)
    monkeypatch.setattr(threads, "apply_threads", lambda choice: applied.append(choice.threads))
    before = torch.get_num_threads()
    assert cli.main([*argv, "--threads", "3"]) == 2
    assert applied == [3] and torch.get_num_threads() == before  # a process calling main() gets its own back
    shown = getattr(capsys.readouterr(), stream)
    assert shown.startswith("threads: 3 (--threads; --threads N or HYPERNETWORK_THREADS=N to choose)")
