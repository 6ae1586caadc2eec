"""The real-ComfyUI suite: one real ComfyUI per run, told by HNX_COMFYUI_DIR / _URL / _LAUNCH.

Without them every test here is skipped, saying what to set. With them the session:
1. writes the suite's hypernetworks (several structures, a ``.safetensors`` copy, a 2022-style file
   without ``activate_output``, dropout files) for the widths of the SD1.5 checkpoint in
   ``models/checkpoints`` and, when one is there, of the (reduced) SDXL one (``-sdxl`` names); a
   captioned dataset into ``input/``;
2. writes the suite's reference node (A1111's formula from ``tests/support/reference.py``) and clones
   this repository into ``custom_nodes/``, as users install a node pack;
3. starts ComfyUI, runs the tests through its HTTP API, stops it (its log stays with the artifacts).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

import hypernetwork_ext as hx
from tests.comfyui import graphs
from tests.comfyui.comfy_host import (
    USAGE,
    ComfyConfig,
    ComfyServer,
    Rendered,
    install_pack,
    install_reference_node,
    remove_installed,
)
from tests.hosts.suite_files import NETWORKS, NetworkSpec, attention_widths, make_network

SUITE_FOLDER = "hnx-suite"
DATASET = "hnx-suite-train"
TRAINED = "hnx-suite-trained"  # the training node's results in models/hypernetworks
EXTRA_NETWORKS = (
    # Without layer norm or dropout, where ComfyUI's own loader follows A1111.
    NetworkSpec("hnx-tanh", (1, 2, 1), "tanh"),
    NetworkSpec("hnx-relu-deep", (1, 2, 2, 1), "relu", weight_std=0.04),
    # A1111 reads a missing activate_output as True; ComfyUI's loader as False.
    NetworkSpec("hnx-2022-relu", (1, 2, 1), "relu"),
    # Dropout after the first of three layers: ComfyUI builds a Dropout(0.3) there and never sets eval mode.
    NetworkSpec("hnx-dropout-deep", (1, 2, 2, 1), "relu", dropout=(0, 0.3, 0, 0)),
)
# The models the suite runs on: a random SD1.5 checkpoint (required) and the reduced SDXL one (when
# models/checkpoints has it), told apart by their cross-attention width.
MODELS = {"sd15": 768, "sdxl": 2048}


@dataclass
class Model:
    label: str  # sd15, sdxl
    checkpoint: str  # the name ComfyUI lists it by
    widths: tuple[int, ...]
    networks: dict[str, Path] = field(default_factory=dict)  # suite name -> file
    _renders: dict = field(default_factory=dict)

    @property
    def suffix(self) -> str:
        """Of the suite's file names for this model: SD1.5's are the bare names, so that prompts can
        name them as users do; SDXL's end in -sdxl."""
        return "" if self.label == "sd15" else f"-{self.label}"

    def listed(self, name: str) -> str:
        """A suite file's name as ComfyUI lists it (``hnx-suite/hnx-linear.pt``)."""
        return f"{SUITE_FOLDER}/{self.networks[name].name}"

    def stem(self, name: str) -> str:
        """A suite file's name in a ``<hypernet:...>`` tag (``hnx-linear``, ``hnx-linear-sdxl``)."""
        return self.networks[name].stem

    def path(self, name: str) -> str:
        return str(self.networks[name])

    def workflow(self, **kwargs) -> graphs.Workflow:
        return graphs.Workflow(self.checkpoint, unet_name=f"{SUITE_FOLDER}-{self.checkpoint}", **kwargs)


@dataclass
class Suite:
    config: ComfyConfig
    server: ComfyServer
    models: dict[str, Model]
    commit: str
    loaded: str | None = None  # the checkpoint of the last workflow run

    @property
    def sd1(self) -> Model:
        return self.models["sd15"]

    def run(self, workflow: dict) -> dict:
        self._switch_to(workflow["ckpt"]["inputs"]["ckpt_name"])
        return self.server.run(workflow)

    def render(self, workflow: graphs.Workflow) -> Rendered:
        self._switch_to(workflow.checkpoint)
        return self.server.render(workflow.build())

    def _switch_to(self, checkpoint: str) -> None:
        """Another checkpoint: ComfyUI drops the last one's models and cached outputs first (/free), so
        that this shared machine holds one model at a time."""
        if self.loaded not in (None, checkpoint):
            self.server.free()
        self.loaded = checkpoint

    def save(self, name: str, rendered: Rendered) -> Path:
        path = self.config.artifacts / "images" / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        rendered.image.save(path)
        return path

    def baseline(self, model: Model) -> Rendered:
        """The image without any hypernetwork (rendered once)."""
        if "baseline" not in model._renders:
            model._renders["baseline"] = self.render(model.workflow())
        return model._renders["baseline"]


def find_checkpoints(config: ComfyConfig) -> dict[int, tuple[str, tuple[int, ...]]]:
    """{context width: (file name, widths)} of the checkpoints in models/checkpoints."""
    found = {}
    for path in sorted(config.checkpoint_dir.glob("*.safetensors")):
        try:
            context, selfs = attention_widths(path)
        except Exception:  # not a UNet checkpoint
            continue
        found.setdefault(context, (path.name, (context, *selfs)))
    return found


def write_networks(config: ComfyConfig, model: Model, specs, *, seed_base: int) -> None:
    folder = config.hypernetwork_dir / SUITE_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    for seed, spec in enumerate(specs, start=seed_base):
        path = folder / f"{spec.name}{model.suffix}.pt"
        hx.save(make_network(spec, model.widths, seed), path, overwrite=True)
        model.networks[spec.name] = path


def derive_files(config: ComfyConfig, model: Model) -> None:
    folder = config.hypernetwork_dir / SUITE_FOLDER
    # The same network as .safetensors.
    copy = folder / f"hnx-relu-ln-st{model.suffix}.safetensors"
    hx.save(hx.load(model.networks["hnx-relu-ln"]), copy, overwrite=True)
    model.networks["hnx-relu-ln-st"] = copy
    # A 2022 file: no activate_output key at all.
    state = torch.load(model.networks["hnx-2022-relu"], weights_only=True)
    state.pop("activate_output", None)
    torch.save(state, model.networks["hnx-2022-relu"])
    # The dropout network's weights in a file that declares no dropout: A1111 renders both alike.
    state = torch.load(model.networks["hnx-dropout-deep"], weights_only=True)
    state.update(use_dropout=False, last_layer_dropout=False, dropout_structure=[0.0] * len(state["layer_structure"]))
    no_dropout = folder / f"hnx-dropout-deep-nodrop{model.suffix}.pt"
    torch.save(state, no_dropout)
    model.networks["hnx-dropout-deep-nodrop"] = no_dropout


def link_unet(config: ComfyConfig, model: Model) -> Path:
    """The checkpoint also in models/diffusion_models, where UNETLoader (with its weight_dtype) finds it."""
    link = config.folder / "models" / "diffusion_models" / f"{SUITE_FOLDER}-{model.checkpoint}"
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        link.symlink_to(config.checkpoint_dir / model.checkpoint)
    return link


def write_dataset(config: ComfyConfig) -> None:
    from hypernetwork_ext.standalone.tiny import procedural_images

    procedural_images(str(config.input_dir / DATASET), 4, seed=1, colour="blue")


@pytest.fixture(scope="session")
def config() -> ComfyConfig:
    found = ComfyConfig.from_env()
    if found is None:
        pytest.skip(USAGE)
    return found


@pytest.fixture(scope="session")
def comfy(config: ComfyConfig):
    checkpoints = find_checkpoints(config)
    if MODELS["sd15"] not in checkpoints:
        raise RuntimeError(f"no SD1.5 checkpoint in {config.checkpoint_dir}")
    models = {label: Model(label, *checkpoints[width]) for label, width in MODELS.items() if width in checkpoints}
    # Nothing of an earlier run: its files, the networks its training node saved.
    shutil.rmtree(config.hypernetwork_dir / SUITE_FOLDER, ignore_errors=True)
    for trained in config.hypernetwork_dir.glob(f"{TRAINED}*"):
        trained.unlink()
    for index, model in enumerate(models.values()):
        write_networks(config, model, (*NETWORKS, *EXTRA_NETWORKS), seed_base=1 + 20 * index)
        derive_files(config, model)
    links = [link_unet(config, model) for model in models.values()]
    write_dataset(config)
    install_reference_node(config)
    commit = install_pack(config)
    server = ComfyServer(config).start()
    try:
        yield Suite(config, server, models, commit.strip())
    finally:
        server.stop()
        remove_installed(config)
        for link in links:
            link.unlink(missing_ok=True)


@pytest.fixture(scope="session", params=list(MODELS))
def model(request, comfy) -> Model:
    """Each test that takes ``model`` runs on SD1.5 and on the reduced SDXL checkpoint (skipped, saying
    so, when models/checkpoints has none)."""
    found = comfy.models.get(request.param)
    if found is None:
        pytest.skip(f"no {request.param} checkpoint in {comfy.config.checkpoint_dir}")
    return found
