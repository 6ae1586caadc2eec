"""What the suite puts into a host: hypernetworks of several structures, a small LoRA, a second name for
the loaded checkpoint; all made here from fixed seeds for the loaded checkpoint's widths."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

import hypernetwork_ext as hx
from tests.hosts import sdnext_host
from tests.hosts.real_host import HostConfig, Server
from tests.support.networks import perturbed

SUITE_FOLDER = "hnx-suite"  # under models/hypernetworks and models/Lora


@dataclass(frozen=True)
class NetworkSpec:
    name: str
    layer_structure: tuple
    activation: str
    layer_norm: bool = False
    dropout: tuple | None = None
    activate_output: bool = False
    weight_std: float = 0.05


NETWORKS = (
    NetworkSpec("hnx-relu-ln", (1, 2, 1), "relu", layer_norm=True),
    NetworkSpec("hnx-swish-dropout", (1, 2, 1), "swish", dropout=(0, 0.3, 0), activate_output=True),
    NetworkSpec("hnx-linear", (1, 2, 1), "linear"),
    NetworkSpec("hnx-elu-deep", (1, 1.5, 1.5, 1), "elu", layer_norm=True, weight_std=0.04),
)

# The plain prompt every tag is appended to, chosen once per session: the first of these the host renders
# finitely without a tag (a random checkpoint's text encoder overflows on some prompts: on sd15-seed1 Forge
# Classic, without the extension, draws "a red circle" as an all-NaN image). See conftest.choose_plain.
PLAIN_CANDIDATES = ("a red circle", "a blue square", "a photo of a cat", "a green tree on a hill")

# (case, tags): what "tags render exactly" compares with the host's own hypernetworks, each prompt being
# the session's plain prompt followed by the tags (``tagged``).
RENDER_CASES = (
    ("relu-ln", "<hypernet:hnx-relu-ln:0.8>"),
    ("swish-dropout-activate-output", "<hypernet:hnx-swish-dropout:1>"),
    ("linear", "<hypernet:hnx-linear:1.2>"),
    ("deep-negative", "<hypernet:hnx-elu-deep:-0.7>"),
    ("stacked", "<hypernet:hnx-relu-ln:0.8> <hypernet:hnx-linear:-0.5>"),
)
LORA_NAME = "hnx-suite-lora"
LORA_CASES = (
    ("lora-alone", f"<lora:{LORA_NAME}:1>"),
    ("lora-with-hypernetwork", f"<lora:{LORA_NAME}:1> <hypernet:hnx-relu-ln:0.8>"),
)


def tagged(plain: str, tags: str) -> str:
    """The session's plain prompt with ``tags`` after it (no tags: the plain prompt itself)."""
    return f"{plain} {tags}" if tags else plain


def reference_cases(plain: str) -> list[tuple[str, str]]:
    """(case, prompt) of every image A1111's own hypernetworks (or SD.Next's reference) renders first."""
    return [("no-tag", plain), *((case, tagged(plain, tags)) for case, tags in (*RENDER_CASES, *LORA_CASES))]


def make_network(spec: NetworkSpec, widths: tuple[int, ...], seed: int) -> hx.Hypernetwork:
    net = hx.create(
        widths,
        spec.layer_structure,
        spec.activation,
        "XavierNormal",
        layer_norm=spec.layer_norm,
        dropout_structure=spec.dropout,
        activate_output=spec.activate_output,
        seed=seed,
        name=spec.name,
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in net.modules():
            if isinstance(layer, torch.nn.Linear):
                layer.weight.normal_(0.0, spec.weight_std, generator=generator)
    return perturbed(net, seed)


def write_networks(config: HostConfig, widths: tuple[int, ...]) -> dict[str, Path]:
    """The suite's networks as A1111 ``.pt`` files (the built-in reads only those)."""
    folder = config.hypernetwork_dir / SUITE_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for seed, spec in enumerate(NETWORKS, start=1):
        path = folder / f"{spec.name}.pt"
        hx.save(make_network(spec, widths, seed), path, overwrite=True)
        paths[spec.name] = path
    return paths


# -- the loaded checkpoint ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Checkpoint:
    name: str
    path: Path
    sha256: str
    context_width: int
    self_widths: tuple[int, ...]

    @property
    def widths(self) -> tuple[int, ...]:
        return (self.context_width, *self.self_widths)

    @property
    def is_sdxl(self) -> bool:
        return self.context_width == 2048


def launch_checkpoint(config: HostConfig) -> Checkpoint:
    """The checkpoint the launch command loads (``--ckpt``), or the only one in models/Stable-diffusion."""
    arguments = shlex.split(config.launch)
    if "--ckpt" in arguments and arguments.index("--ckpt") + 1 < len(arguments):
        path = Path(arguments[arguments.index("--ckpt") + 1])
        path = path if path.is_absolute() else config.folder / path
    elif config.kind == "sdnext" and sdnext_host.configured_checkpoint(config) is not None:
        path = sdnext_host.configured_checkpoint(config)
    else:
        found = sorted((config.folder / "models" / "Stable-diffusion").glob("*.safetensors"))
        found = [p for p in found if not p.name.startswith("hnx-suite")]
        if len(found) != 1:
            raise RuntimeError("give the checkpoint to load with --ckpt in HNX_HOST_LAUNCH")
        path = found[0]
    context, selfs = attention_widths(path)
    return Checkpoint(path.stem, path, file_sha256(path, config), context, selfs)


def loaded_title(server: Server, checkpoint: Checkpoint) -> str:
    """The host's title of the checkpoint (as /sdapi/v1/options names it)."""
    return title_for(server, checkpoint.path)


def title_for(server: Server, path: Path) -> str:
    """The host's title of a checkpoint file or diffusers folder (SD.Next lists relative filenames)."""
    for model in server.checkpoints():
        listed = Path(model["filename"])
        if (server.config.folder / listed).resolve() == path.resolve():
            return model["title"]
    raise RuntimeError(f"{path} is not in the host's /sdapi/v1/sd-models")


def unet_file(path: Path) -> tuple[Path, str]:
    """The file holding the UNet's weights, and the prefix of its keys: a single file or a diffusers folder."""
    if path.is_dir():
        return path / "unet" / "diffusion_pytorch_model.safetensors", ""
    return path, "model.diffusion_model."


def attention_widths(path: Path) -> tuple[int, tuple[int, ...]]:
    """(context width, self-attention widths) from the checkpoint's to_k weights."""
    from safetensors import safe_open

    file, prefix = unet_file(path)
    context, selfs = None, set()
    with safe_open(str(file), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
            if not key.startswith(prefix) or not key.endswith("to_k.weight"):
                continue
            width = handle.get_slice(key).get_shape()[1]
            if ".attn2." in key:
                context = width
            else:
                selfs.add(width)
    if context is None:
        raise RuntimeError(f"{path}: no cross-attention to_k weights found")
    return context, tuple(sorted(selfs))


def file_sha256(path: Path, config: HostConfig) -> str:
    """Hashed once per file version (a diffusers folder: its files in order); the cache lives with
    the suite's artifacts."""
    cache_file = config.artifacts.parent / "checkpoint-hashes.json"
    cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    key = f"{path.resolve()}:" + ";".join(f"{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    if key not in cache:
        digest = hashlib.sha256()
        for file in files:
            digest.update(str(file.relative_to(path)).encode() if path.is_dir() else b"")
            with open(file, "rb") as handle:
                for block in iter(lambda handle=handle: handle.read(1 << 24), b""):
                    digest.update(block)
        cache[key] = digest.hexdigest()
        cache_file.write_text(json.dumps(cache, indent=1))
    return cache[key]


def second_name_for(checkpoint: Checkpoint) -> Path:
    """A hard link of the loaded checkpoint under another name (a diffusers folder: a folder of hard
    links): switching to it is a full checkpoint load in the host, without a second copy on disk."""
    link = checkpoint.path.with_name(f"hnx-suite-switch{checkpoint.path.suffix}")
    if link.exists():
        return link
    if checkpoint.path.is_dir():
        shutil.copytree(checkpoint.path, link, copy_function=os.link)
    else:
        os.link(checkpoint.path, link)
    return link


def remove_checkpoint(path: Path) -> None:
    """A checkpoint file or diffusers folder the suite made."""
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


# -- a small LoRA for the loaded checkpoint's attention projections ---------------------------------------
def write_lora(config: HostConfig, checkpoint: Checkpoint, seed: int = 5, rank: int = 4) -> Path:
    """A kohya-format LoRA on to_q/to_k/to_v of every attention layer (the layers hypernetworks act
    on), as A1111's built-in Lora extension reads it."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from hypernetwork_ext.ops.checkpoints import UnetWeights, diffusers_module_path

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    file, prefix = unet_file(checkpoint.path)
    with safe_open(str(file), framework="pt") as handle:
        keys = [key for key in handle.keys() if key.startswith(prefix)]  # noqa: SIM118 (safe_open has no __iter__)
        shapes = {key[len(prefix) :]: handle.get_slice(key).get_shape() for key in keys}
    layout = "diffusers" if checkpoint.path.is_dir() else "single-file"
    names_only = UnetWeights(str(checkpoint.path), layout, dict.fromkeys(shapes))
    for key, (out_features, in_features) in ((k, v) for k, v in shapes.items() if k.endswith(LORA_TARGETS)):
        attention, projection = key[: -len(".weight")].rsplit(".", 1)
        name = "lora_unet_" + f"{diffusers_module_path(names_only, attention)}.{projection}".replace(".", "_")
        # A LoRA of a usual strength. A far stronger one saturates the attention softmax, and then
        # A1111's own merged and functional Lora modes differ by 16/255 (float rounding, amplified).
        tensors[f"{name}.lora_down.weight"] = torch.randn(rank, in_features, generator=generator) * LORA_STD
        tensors[f"{name}.lora_up.weight"] = torch.randn(out_features, rank, generator=generator) * LORA_STD
        tensors[f"{name}.alpha"] = torch.tensor(float(rank))
    folder = config.folder / "models" / "Lora" / SUITE_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{LORA_NAME}.safetensors"
    save_file(tensors, str(path), {"ss_network_module": "networks.lora"})
    return path


LORA_TARGETS = (".to_q.weight", ".to_k.weight", ".to_v.weight")
LORA_STD = 0.05
