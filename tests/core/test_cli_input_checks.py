"""The command line checks what it is given before any work: numbers are range-checked before a model
loads, an unknown option answers with the command's own usage, outputs that exist are refused first
(naming --overwrite), unknown tag names are reported before sampling, and a refused or failed
create-and-train writes nothing."""

import pytest

import hypernetwork_ext as hx
import hypernetwork_ext.standalone.cli as cli
from hypernetwork_ext.standalone.cli import main
from hypernetwork_ext.standalone.tiny import TINY_WIDTHS, procedural_images


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model or a checkpoint fails the test: every refusal here must come before it."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(cli, "_load_source", refuse)
    monkeypatch.setattr("hypernetwork_ext.ops.checkpoints.read_unet", refuse)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hx.save(hx.create(TINY_WIDTHS, seed=1, name="net"), tmp_path / "net.safetensors")
    procedural_images(tmp_path / "data", 2, seed=1, colour="red")
    return tmp_path


def _files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


BAD_NUMBERS = [
    (["generate", "x", "--steps", "-5"], "--steps: must be at least 1, found -5"),
    (["generate", "x", "--steps", "0"], "--steps: must be at least 1"),
    (["generate", "x", "--cfg", "nan"], "--cfg: must be a finite number"),
    (["generate", "x", "--cfg", "inf"], "--cfg: must be a finite number"),
    (["generate", "x", "--width", "65"], "--width: must be a multiple of 8, found 65"),
    (["generate", "x", "--height", "0"], "--height: must be at least 1"),
    (["generate", "x", "--batch", "0"], "--batch: must be at least 1"),
    (["generate", "x", "--grid=-1,nan"], "--grid: must be a finite number"),
    (["export-lora", "net.safetensors", "--model", "m", "-o", "l.safetensors", "--rank", "-3"], "--rank: must be at least 1"),
    (["export-lora", "net.safetensors:nan", "--model", "m", "-o", "l.safetensors"], "the multiplier must be a finite number"),
    (["bake", "m", "net.safetensors:inf", "-o", "baked"], "the multiplier must be a finite number"),
    (["merge", "out.pt", "net.safetensors:nan"], "the multiplier must be a finite number"),
    (["merge", "out.pt", "net.safetensors", "--multiplier", "inf"], "--multiplier: must be a finite number"),
    (["merge", "out.pt", "net.safetensors", "--width", "48=nan"], "expected WIDTH=VALUE"),
    (["merge", "out.pt", "net.safetensors", "--width", "48"], "expected WIDTH=VALUE"),
    (["train", "--create", "n", "--data-root", "data", "--widths", "48,0"], "--widths: must be at least 1"),
    (["train", "--create", "n", "--data-root", "data", "--layer-structure", "1,x,1"], "--layer-structure: expected a number"),
    (["demo", "--steps", "-3"], "--steps: must be at least 1, found -3"),
]  # fmt: skip


@pytest.mark.parametrize("argv,problem", BAD_NUMBERS, ids=[" ".join(a) for a, _ in BAD_NUMBERS])
def test_bad_numbers_are_refused_with_the_commands_usage_before_any_work(argv, problem, workdir, no_model, capsys):
    before = _files(workdir)
    with pytest.raises(SystemExit) as exited:
        main(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2
    assert err.startswith(f"usage: hypernetwork {argv[0]} ") and problem in err
    assert _files(workdir) == before


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--create", "n", "--data-root", "data", "--steps", "-5"],
        ["train", "--create", "n", "--data-root", "data", "--learn-rate", "fast"],
        ["train", "--create", "n", "--data-root", "data", "--activation", "nosuch"],
        ["train", "--create", "n", "--data-root", "data", "--layer-structure", "2,2,1"],
        ["train", "--create", "n", "--data-root", "nowhere"],
        ["train", "--create", "n", "--data-root", "data", "--template-filename", "nosuch.txt"],
        ["train", "--create", "n", "--network", "net.safetensors", "--data-root", "data"],
    ],
)
def test_refused_training_writes_nothing_and_loads_no_model(argv, workdir, no_model, capsys):
    before = _files(workdir)
    code = main([*argv, "--output-dir", "nets", "--save-preset", "p.json"])
    assert code == 2 and capsys.readouterr().err.startswith("error: ")
    assert _files(workdir) == before


def test_an_unknown_option_answers_with_the_commands_usage(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["generate", "a cat", "--stepz", "4"])
    err = capsys.readouterr().err
    assert exited.value.code == 2
    assert err.startswith("usage: hypernetwork generate ") and "unrecognized arguments: --stepz 4" in err


def test_an_existing_output_is_refused_before_the_model_loads_naming_overwrite(workdir, no_model, capsys):
    (workdir / "nets").mkdir()
    (workdir / "nets" / "n.safetensors").write_bytes(b"mine")
    (workdir / "out.png").write_bytes(b"mine")
    assert main(["train", "--create", "n", "--data-root", "data", "--output-dir", "nets"]) == 2
    assert "n.safetensors: exists; nothing was written (add --overwrite to replace it)" in capsys.readouterr().err
    assert main(["generate", "x", "-o", "out.png"]) == 2
    assert "out.png: exists; nothing was written (add --overwrite to replace it)" in capsys.readouterr().err
    hx.save(hx.create(TINY_WIDTHS, seed=2, name="other"), workdir / "other.pt")
    assert main(["convert", "net.safetensors", "other.pt"]) == 2
    assert "other.pt: exists; nothing was written (add --overwrite to replace it)" in capsys.readouterr().err
    (workdir / "baked").mkdir()
    assert main(["bake", "m", "net.safetensors", "-o", "baked"]) == 2
    assert "baked: exists; nothing was written (choose another output)" in capsys.readouterr().err
    assert (workdir / "nets" / "n.safetensors").read_bytes() == b"mine" and (
        workdir / "out.png"
    ).read_bytes() == b"mine"


def test_unknown_tag_names_are_reported_before_the_model_loads_naming_the_folders(workdir, monkeypatch, capsys):
    def stop(*args, **kwargs):
        raise cli.HypernetworkError("stopped where the model would load")

    monkeypatch.setattr(cli, "_load_source", stop)
    assert main(["generate", "a red circle <hypernet:demo>", "--grid=-1,0,1"]) == 2
    err = capsys.readouterr().err
    searched = "(searched nothing: models/hypernetworks, hypernetwork-demo/latest/networks do not exist)"
    assert err.index(f"warning: <hypernet:demo>: no hypernetwork named 'demo' {searched}") < err.index("stopped")
    assert main(["generate", "<hypernet:nett>", "--hypernetwork-dir", str(workdir)]) == 2
    assert f"no hypernetwork named 'nett' in {workdir}; did you mean net?" in capsys.readouterr().err


def test_a_create_and_train_that_fails_before_training_takes_back_what_it_wrote(workdir, capsys):
    (workdir / "empty").mkdir()
    argv = ["train", "--create", "n", "--data-root", "empty", "--output-dir", "nets", "--save-preset", "p.json"]
    code = main([*argv, "--steps", "2", "--training-width", "64", "--training-height", "64", "--quiet"])
    assert code == 2 and "no images found in the dataset folder" in capsys.readouterr().err
    assert not (workdir / "nets" / "n.safetensors").exists() and not (workdir / "p.json").exists()


def test_the_step_limit_shortens_every_step_count_and_is_checked(monkeypatch):
    monkeypatch.setenv(cli.STEP_LIMIT, "2")
    assert cli._limited_steps(40) == 2 and cli._limited_steps(1) == 1
    args = cli.build_parser().parse_args(["train", "--create", "n", "--data-root", "d", "--steps", "2000"])
    assert cli._training_config(args, "n").steps == 2
    monkeypatch.setenv(cli.STEP_LIMIT, "-1")
    with pytest.raises(cli.InvalidConfigError, match="HYPERNETWORK_STEP_LIMIT='-1': must be at least 1"):
        cli._limited_steps(40)


def test_app_is_a_command_with_the_apps_own_options(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["app", "--help"])
    assert exited.value.code == 0 and "--hypernetwork-dir" in capsys.readouterr().out
