"""Training at Stable Diffusion's size: our trainer against A1111 1.10.1's training step, steps per
second and peak memory, with the memory options beside them.

    python benchmarks/training.py                       # the table of docs/speed.md (see --help for its length)
    python benchmarks/training.py --quick               # SD1.5 at 256 px, batch 1, A1111 and ours (~6 min, 2 cores)
    python benchmarks/training.py --rows sd15-512-b1 --variants a1111,ours,checkpointing --rounds 3
    python benchmarks/training.py --device cuda         # on a GPU: float16 weights as A1111 loads them
    python benchmarks/training.py --rows sd15-256-b2 --models M --record r.jsonl   # one row at a time, kept
    python benchmarks/training.py --table r.jsonl      # the table of every kept measurement, with when and how

Models: real ldm code with random weights (zero-initialised layers re-randomised, so every block
acts), built once per run and loaded by every measurement:
- ``sd15``: ldm ``LatentDiffusion`` with SD1.5's UNet, its autoencoder (``AutoencoderKL``, ch 128,
  1-2-4-4) and a text encoder of CLIP ViT-L/14's size (transformers ``CLIPTextModel``, 12 layers,
  768 wide, 77 tokens);
- ``sdxl-full`` (not in the default run): the same with SDXL's own UNet layout (2, 10 and 10
  transformer blocks at the 640 and 1280 levels and the middle; 2.6 B weights, made random quickly
  and kept in bf16 but the normalisations), to measure what our trainer needs at SDXL's depth;
- ``sdxl``: an sgm-shaped ``DiffusionEngine`` (tests/support/training_models.py) around an ldm UNet
  with SDXL's attention layout (no attention at the first level, 64-wide heads, linear
  projections, 2048-wide context, the 2816-wide size/pooled vector) but 2 transformer blocks per
  level instead of 2 and 10, two text encoders 768 and 1280 wide (12 layers each; SDXL's second has
  32), the SD autoencoder. A1111 1.10.1 cannot train SDXL at all ("'tuple' object has no
  attribute 'to'"); its row applies its SD1 step unchanged (checkpointing included) to this model.

Every measurement is a fresh process (``--worker``): it loads the model, prepares the dataset (4
captioned images at the row's size, latents encoded once, "once" sampling), runs one warm-up step
(not timed, not in the peak), then ``--steps`` timed steps. Rounds are interleaved: each round runs
every variant once, in an order that rotates from round to round. The table gives medians over
rounds and the spread (lowest-highest).

Memory, per measurement: *model* is what the process holds once the model is loaded: the weights,
read once into its own memory as a host holds a loaded checkpoint (3.8 GiB for SD1.5 in float32),
and torch's and ldm's code and buffers (about 0.4 GiB); *peak* the most it held during the timed
steps, the model included; *training* = peak - model: activations, gradients (A1111's step keeps the
UNet's), optimizer state, caches, the dataset's latents. Both sides load the model the same way. CPU:
resident memory (``VmRSS``/``VmHWM`` of /proc, the peak reset through
``/proc/self/clear_refs`` after the warm-up), with glibc's malloc told to hand every block of 64 KiB
or more back to the system when freed (``MALLOC_MMAP_THRESHOLD_``), so freed tensors leave the
figure as they leave the device on a GPU. CUDA: ``torch.cuda.memory_allocated`` and
``max_memory_allocated``.

Variants:
- ``a1111``: A1111 1.10.1's ``train_hypernetwork`` loop body as its Train tab runs it: attention
  optimisations undone (the einsum ``attention_CrossAttention_forward``, the networks on the
  context as ``apply_hypernetworks`` does), ``sd_hijack_checkpoint.add()`` (reentrant
  ``torch.utils.checkpoint`` around every ldm ``BasicTransformerBlock``, ``ResBlock`` and
  ``AttentionBlock``), the UNet weights left with ``requires_grad`` as loaded (so their gradients
  are computed and kept), shuffled tags (the text encoder runs every step, moved to the device and
  back), ``devices.autocast()`` + ``GradScaler``, clipping on the still-scaled gradients,
  ``sd_model.forward(x, c)`` for the loss;
- ``ours``: ``hypernetwork_ext.training.train`` with the same options and its defaults, attention
  left on the host's optimisation (PyTorch SDP, as A1111's "sdp"); the options measured beside it:
  ``checkpointing`` (``gradient_checkpointing``), ``bf16-autocast`` (``mixed_precision="bf16"`` over
  the float32 weights), ``bf16-weights`` (the UNet's weights in bfloat16, as a half-precision
  checkpoint runs on a GPU: the trainer then computes under bf16 autocast), ``checkpointing+bf16-weights``,
  ``unload`` (``unload_models_when_training``: text encoder and VAE off the
  device during steps; nothing to move on a CPU, so GPU only) and ``no-cache`` (ours with the
  batch's images encoded by the VAE at every step: what caching the latents once saves).
Every variant trains the same network (relu 1-2-1, A1111's default widths for the model) with the
same learning rate, images and captions.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import hypernetwork_ext as hx  # noqa: E402

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}


# -- what is measured -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Family:
    name: str
    label: str
    widths: tuple[int, ...]  # the network's: context, then self-attention


FAMILIES = {
    "sd15": Family("sd15", "SD1.5", (768, 320, 640, 1280)),
    "sdxl": Family("sdxl", "SDXL-shaped", (2048, 640, 1280)),
    "sdxl-full": Family("sdxl-full", "SDXL", (2048, 640, 1280)),
    "tiny": Family("tiny", "tiny (script check)", (48, 32, 64)),
}


@dataclass(frozen=True)
class Row:
    key: str
    family: str
    pixels: int
    batch: int

    @property
    def label(self) -> str:
        return f"{FAMILIES[self.family].label} {self.pixels}x{self.pixels}, batch {self.batch}"


ROWS = {
    row.key: row
    for row in (
        Row("sd15-256-b1", "sd15", 256, 1),
        Row("sd15-256-b2", "sd15", 256, 2),
        Row("sd15-512-b1", "sd15", 512, 1),
        Row("sd15-512-b2", "sd15", 512, 2),
        Row("sdxl-256-b1", "sdxl", 256, 1),
        # SDXL's own UNet layout (2.6 B weights, kept in bf16): our trainer's memory at SDXL's depth.
        Row("sdxl-full-256-b1", "sdxl-full", 256, 1),
        Row("sdxl-full-512-b1", "sdxl-full", 512, 1),
        Row("sdxl-full-1024-b1", "sdxl-full", 1024, 1),
        Row("tiny-64-b2", "tiny", 64, 2),
    )
}
VARIANTS = (
    "a1111",
    "ours",
    "checkpointing",
    "bf16-autocast",
    "bf16-weights",
    "checkpointing+bf16-weights",
    "unload",
    "no-cache",
)
VARIANT_LABELS = {
    "a1111": "A1111 1.10.1 step",
    "ours": "ours",
    "checkpointing": "ours, gradient checkpointing",
    "bf16-autocast": "ours, bf16 autocast (float32 weights)",
    "bf16-weights": "ours, UNet weights in bf16",
    "checkpointing+bf16-weights": "ours, checkpointing + UNet in bf16",
    "unload": "ours, text encoder and VAE off the device",
    "no-cache": "ours, latents encoded every step (no cache)",
}
GPU_ONLY = ("unload",)
# Only meaningful over float32 weights (a CPU's); on a GPU the weights are already half precision.
FLOAT32_ONLY = ("bf16-autocast", "bf16-weights", "checkpointing+bf16-weights")
# The default run: every size against A1111, the memory options where they matter most.
DEFAULT_PLAN = {
    "sd15-256-b1": ("a1111", "ours", "checkpointing", "bf16-autocast", "bf16-weights", "no-cache"),
    "sd15-256-b2": ("a1111", "ours"),
    "sd15-512-b1": ("a1111", "ours", "checkpointing", "bf16-weights", "checkpointing+bf16-weights", "unload"),
    "sd15-512-b2": ("a1111", "ours"),
    "sdxl-256-b1": ("a1111", "ours", "checkpointing", "unload"),
}
QUICK_PLAN = {"sd15-256-b1": ("a1111", "ours")}


# -- the models ------------------------------------------------------------------------------------
SD15_UNET = dict(
    model_channels=320,
    channel_mult=(1, 2, 4, 4),
    num_res_blocks=2,
    attention_resolutions=(4, 2, 1),
    num_heads=8,
    transformer_depth=1,
    context_dim=768,
)
SDXL_SHAPED_UNET = dict(
    model_channels=320,
    channel_mult=(1, 2, 4),
    num_res_blocks=2,
    attention_resolutions=(2, 4),
    num_head_channels=64,
    transformer_depth=2,
    context_dim=[2048, 2048],  # one per block of a level
    use_linear_in_transformer=True,
)
SD_AUTOENCODER = {
    "double_z": True,
    "z_channels": 4,
    "resolution": 256,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 128,
    "ch_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_resolutions": [],
    "dropout": 0.0,
}
CLIP_L = dict(layers=12, heads=12, tokens=77)
SDXL_SIZE_KEYS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")


def _quiet():
    return contextlib.redirect_stdout(io.StringIO())


def build_model(family: str, seed: int = 0) -> torch.nn.Module:
    """The family's model with random weights, every zero-initialised layer re-randomised."""
    from tests.support.models import randomise
    from tests.support.training_models import import_ldm, tiny_latent_diffusion

    import_ldm()
    if family == "tiny":
        return tiny_latent_diffusion(seed)
    torch.manual_seed(seed)
    if family == "sdxl-full":
        with _no_initialisation(), _default_dtype(torch.bfloat16):
            model = _sdxl_shaped_model(full=True)
        _quick_random(model.model.diffusion_model, seed + 1)
        model.conditioner.float()
        model.first_stage_model.float()
        return model.eval()
    model = _sd15_model() if family == "sd15" else _sdxl_shaped_model()
    unet = model.model.diffusion_model
    randomise(unet, seed + 1)
    return model.eval()


def _quick_random(unet: torch.nn.Module, seed: int) -> None:
    """Random weights for 2.6 B parameters in seconds, in bf16 (the normalisations in float32):
    N(0, 1/fan_in) for every convolution and linear layer, biases small, normalisations neutral."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in unet.modules():
            if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                module.float()
                module.weight.fill_(1.0)
                module.bias.zero_()
            elif isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                fan_in = module.weight[0].numel()
                module.weight.normal_(0.0, fan_in**-0.5, generator=generator)
                if module.bias is not None:
                    module.bias.normal_(0.0, 0.01, generator=generator)
            else:
                for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
                    if tensor.is_floating_point():
                        tensor.normal_(0.0, 0.02, generator=generator)


def _sd15_model() -> torch.nn.Module:
    from tests.support.training_models import import_ldm

    ddpm = import_ldm()
    unet = {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": _unet_params(SD15_UNET, 64)}
    with _quiet():
        return ddpm.LatentDiffusion(
            first_stage_config=_autoencoder_config(),
            cond_stage_config={
                "target": "tests.support.training_models.TinyTextEncoder",
                "params": {"width": 768, **CLIP_L},
            },
            unet_config=unet,
            conditioning_key="crossattn",
            cond_stage_key="txt",
            timesteps=1000,
            linear_start=0.00085,
            linear_end=0.012,
            scale_factor=0.18215,
            use_ema=False,
            image_size=64,
            channels=4,
        )


def _unet_params(layout: dict, image_size: int) -> dict:
    return dict(
        image_size=image_size,
        in_channels=4,
        out_channels=4,
        use_spatial_transformer=True,
        use_checkpoint=False,
        legacy=False,
        **layout,
    )


def _autoencoder_config() -> dict:
    return {
        "target": "ldm.models.autoencoder.AutoencoderKL",
        "params": {"embed_dim": 4, "lossconfig": {"target": "torch.nn.Identity"}, "ddconfig": SD_AUTOENCODER},
    }


def _sdxl_shaped_model(full: bool = False) -> torch.nn.Module:
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    from ldm.util import instantiate_from_config

    from tests.support.training_models import (
        DiffusionEngine,
        DiscreteDenoiser,
        EpsScaling,
        GeneralConditioner,
        SizeEmbedder,
        TextEmbedder,
    )

    layout = dict(SDXL_SHAPED_UNET, transformer_depth=10, context_dim=[2048] * 10) if full else SDXL_SHAPED_UNET
    unet = UNetModel(**_unet_params(layout, 32))
    if full:  # ldm builds one depth for every level: SDXL's 640 level has 2 blocks
        for module in unet.modules():
            if type(module).__name__ == "SpatialTransformer" and module.in_channels == 640:
                module.transformer_blocks = torch.nn.ModuleList(list(module.transformer_blocks)[:2])
    one_context_for_every_block(unet)
    time_embed_dim = unet.model_channels * 4
    adm_in_channels = 1280 + 256 * 2 * len(SDXL_SIZE_KEYS)  # SDXL's 2816
    unet.num_classes = "sequential"
    unet.label_emb = torch.nn.Sequential(
        torch.nn.Sequential(
            torch.nn.Linear(adm_in_channels, time_embed_dim),
            torch.nn.SiLU(),
            torch.nn.Linear(time_embed_dim, time_embed_dim),
        )
    )
    conditioner = GeneralConditioner(
        [
            TextEmbedder(768, pooled=False, **CLIP_L),
            TextEmbedder(1280, heads=20, layers=12, tokens=77),
            *(SizeEmbedder(key, outdim=256) for key in SDXL_SIZE_KEYS),
        ]
    )
    with _quiet():
        first_stage = instantiate_from_config(_autoencoder_config()).eval()
    return DiffusionEngine(unet, DiscreteDenoiser(EpsScaling()), conditioner, first_stage, 0.13025)


def one_context_for_every_block(unet: torch.nn.Module) -> None:
    """sgm's ``SpatialTransformer`` gives its one context to every block of a level; ldm's indexes a
    list by block and fails (IndexError) with one context and 2 or more blocks, as SDXL's layout has."""
    for module in unet.modules():
        if type(module).__name__ == "SpatialTransformer":
            forward = type(module).forward

            def every_block(self, x, context=None, _forward=forward):
                if not isinstance(context, list):
                    context = [context] * len(self.transformer_blocks)
                return _forward(self, x, context)

            module.forward = types.MethodType(every_block, module)


def save_model(family: str, folder: Path) -> Path:
    from safetensors.torch import save_file

    path = folder / f"{family}.safetensors"
    model = build_model(family)
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(path))
    return path


def load_model(
    family: str, path: Path, device: torch.device, dtype: torch.dtype, unet_dtype: torch.dtype | None = None
) -> torch.nn.Module:
    """The saved model: built with torch's weight initialisers switched off, then given the saved
    tensors (read into the process's own memory, once: what a host holds once it has loaded a
    checkpoint); in ``dtype`` (half precision as A1111's ``model.half()``), its UNet in ``unet_dtype``."""
    from tests.support.training_models import import_ldm, tiny_latent_diffusion

    import_ldm()
    builders = {"sd15": _sd15_model, "sdxl": _sdxl_shaped_model, "sdxl-full": lambda: _sdxl_shaped_model(True)}
    # Built in the saved weights' main type, never filled: every tensor is then replaced by the loaded one.
    with _no_initialisation(), _default_dtype(torch.bfloat16 if family == "sdxl-full" else torch.float32):
        model = builders[family]() if family in builders else None
    if model is None:
        model = tiny_latent_diffusion(0)
    model.load_state_dict(read_weights(path), strict=True, assign=True)
    release_freed_memory()  # what building the model touched and loading replaced
    model = model.eval().to(device)
    text = model.cond_stage_model if hasattr(model, "cond_stage_model") else model.conditioner
    if dtype != torch.float32:  # A1111's model.half(): UNet, VAE (unless --no-half-vae) and text encoder
        for part in (model.model, model.first_stage_model, text):
            part.to(dtype)
    if unet_dtype is not None:
        _to_half_but_norms(model.model, unet_dtype)
    if hasattr(model, "logvar"):  # a plain attribute LatentDiffusion.forward indexes with the device's timesteps
        model.logvar = model.logvar.to(device)
    return model


SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file read tensor by tensor into memory of the process's own, the file never
    mapped. With safetensors' ``load_file`` (it maps the file; 0.8.0) and every tensor copied out,
    3.9 GiB of the SD1.5 file's mapped pages stayed resident (``RssFile``) beside the copies: the
    loaded model counted 8.0 GiB for its 3.8 GiB of weights."""
    state = {}
    with open(path, "rb") as handle:
        header_size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(header_size))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            tensor = torch.empty(info["shape"], dtype=SAFETENSORS_DTYPES[info["dtype"]])
            begin, end = info["data_offsets"]
            data = tensor.reshape(-1).view(torch.uint8).numpy()
            handle.seek(8 + header_size + begin)
            if end - begin != data.nbytes or handle.readinto(memoryview(data)) != data.nbytes:
                raise ValueError(f"{path}: {name}'s data is not the {data.nbytes} bytes its header promises")
            state[name] = tensor
    return state


def release_freed_memory() -> None:
    """glibc's ``malloc_trim``: freed blocks go back to the system (and out of the resident figure),
    as the CUDA caching allocator's are out of ``memory_allocated``; nothing elsewhere."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _to_half_but_norms(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Every weight in ``dtype`` but the normalisations' (a CPU's group_norm refuses half weights
    with the float32 input ldm's GroupNorm32 gives it; a GPU's takes them): a few KB apart."""
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    for child in module.modules():
        if isinstance(child, norms):
            continue
        for tensor in [*child.parameters(recurse=False), *child.buffers(recurse=False)]:
            if tensor.is_floating_point():
                tensor.data = tensor.data.to(dtype)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


@contextlib.contextmanager
def _no_initialisation():
    """torch.nn.init's functions leave tensors as they are (the weights are loaded afterwards):
    SD1.5's UNet takes half a minute to initialise on two cores."""
    names = [name for name in dir(torch.nn.init) if name.endswith("_") and not name.startswith("_")]
    saved = {name: getattr(torch.nn.init, name) for name in names}
    for name in names:
        setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(torch.nn.init, name, function)


# -- attention as each side runs it -----------------------------------------------------------------
def a1111_attention(network):
    """A1111's ``attention_CrossAttention_forward`` (what ``undo_optimizations`` installs): the
    networks on the context (``apply_hypernetworks``), einsum attention."""

    def forward(self, x, context=None, mask=None, **kwargs):
        heads = self.heads
        q = self.to_q(x)
        context = x if context is None else context
        pair = network.layers.get(context.shape[2])
        if pair is not None:
            dtype = context.dtype
            context_k, context_v = pair[0](context.float()).to(dtype), pair[1](context.float()).to(dtype)
        else:
            context_k = context_v = context
        k, v = self.to_k(context_k), self.to_v(context_v)
        q, k, v = (
            t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2).reshape(-1, t.shape[1], t.shape[2] // heads)
            for t in (q, k, v)
        )
        sim = torch.einsum("b i d, b j d -> b i j", q, k) * self.scale
        out = torch.einsum("b i j, b j d -> b i d", sim.softmax(dim=-1), v)
        out = (
            out.reshape(-1, heads, out.shape[1], out.shape[2])
            .transpose(1, 2)
            .reshape(out.shape[0] // heads, out.shape[1], -1)
        )
        return self.to_out(out)

    return forward


def sdp_attention(self, x, context=None, mask=None, **kwargs):
    """A1111's "sdp" optimisation (to_k/to_v called as modules, so our hooks act)."""
    heads = self.heads
    q = self.to_q(x)
    context = x if context is None else context
    k, v = self.to_k(context), self.to_v(context)
    q, k, v = (t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    return self.to_out(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


def patch_attention(model, forward) -> None:
    for module in model.model.diffusion_model.modules():
        if type(module).__name__ == "CrossAttention":
            module.forward = types.MethodType(forward, module)


@contextlib.contextmanager
def a1111_checkpointing():
    """``sd_hijack_checkpoint.add()``: reentrant checkpoints around the ldm blocks, by class."""
    from ldm.modules.attention import BasicTransformerBlock
    from ldm.modules.diffusionmodules.openaimodel import AttentionBlock, ResBlock
    from torch.utils.checkpoint import checkpoint

    def transformer(self, x, context=None):
        return checkpoint(self._forward, x, context, use_reentrant=True)

    def attention(self, x):
        return checkpoint(self._forward, x, use_reentrant=True)

    def resblock(self, x, emb):
        return checkpoint(self._forward, x, emb, use_reentrant=True)

    classes = ((BasicTransformerBlock, transformer), (ResBlock, resblock), (AttentionBlock, attention))
    stored = [(cls, cls.forward) for cls, _ in classes]
    for cls, forward in classes:
        cls.forward = forward
    try:
        yield
    finally:
        for cls, forward in stored:
            cls.forward = forward


# -- memory -----------------------------------------------------------------------------------------
class Memory:
    """The process's memory now and its peak since the last reset, in bytes."""

    def __init__(self, device: torch.device):
        self.device = device

    def now(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return _proc_status("VmRSS")

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        return _proc_status("VmHWM")


def _proc_status(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- one measurement -------------------------------------------------------------------------------
@dataclass
class Measurement:
    row: str
    variant: str
    steps_per_second: float
    model_bytes: int
    peak_bytes: int
    losses: list[float]

    @property
    def training_bytes(self) -> int:
        return self.peak_bytes - self.model_bytes


def network_for(row: Row, device: torch.device) -> hx.Hypernetwork:
    widths = FAMILIES[row.family].widths
    return hx.create(widths, (1, 2, 1), "relu", seed=1, name="bench").to(device)


def dataset(folder: Path, row: Row) -> Path:
    from hypernetwork_ext.standalone.tiny import procedural_images

    data = folder / f"data-{row.pixels}"
    if not data.is_dir():
        procedural_images(data, 4, seed=0, colour="red", size=row.pixels)
    return data


class Clock:
    """Times steps between marks; the peak counts from the first mark (after the warm-up).
    ``cpu``: the process's CPU time (every thread), which other jobs on the machine barely move."""

    def __init__(self, memory: Memory, kind: str = "wall"):
        self.memory = memory
        self.now = time.process_time if kind == "cpu" else time.perf_counter
        self.marks: list[float] = []

    def mark(self) -> None:
        synchronise(self.memory.device)
        if not self.marks:
            self.memory.reset_peak()
        self.marks.append(self.now())

    def steps_per_second(self) -> float:
        return (len(self.marks) - 1) / (self.marks[-1] - self.marks[0])


def measure(
    row: Row, variant: str, model_path: Path, folder: Path, steps: int, device, dtype, clock: str = "wall"
) -> Measurement:
    memory = Memory(device)
    model = load_model(row.family, model_path, device, dtype, torch.bfloat16 if "bf16-weights" in variant else None)
    synchronise(device)
    model_bytes = memory.now()
    data = dataset(folder, row)
    clock = Clock(memory, clock)
    if variant == "a1111":
        losses = run_a1111(model, row, data, steps, device, clock)
    else:
        losses = run_ours(model, row, data, steps, device, clock, variant, folder)
    return Measurement(row.key, variant, clock.steps_per_second(), model_bytes, memory.peak(), losses)


def run_a1111(model, row: Row, data: Path, steps: int, device, clock: Clock) -> list[float]:
    """A1111 1.10.1's loop body (see the module docstring); the dataset is prepared first, as there."""
    from hypernetwork_ext.training.data import load_pixels, scan_images

    network = network_for(row, device).train()
    patch_attention(model, a1111_attention(network))
    images = scan_images(str(data))
    latents, words = [], []
    first_stage_dtype = next(model.first_stage_model.parameters()).dtype
    with torch.no_grad():
        for path, text, _size in images:
            pixels, _ = load_pixels(path, (row.pixels, row.pixels), keep_aspect=False, with_alpha=False)
            encoded = model.encode_first_stage(pixels[None].to(device, first_stage_dtype))
            latent = model.get_first_stage_encoding(encoded) if hasattr(model, "get_first_stage_encoding") else encoded
            latents.append(latent[0].cpu())  # A1111 keeps them on the CPU
            words.append(text)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-5)
    cuda = device.type == "cuda"
    scaler = (  # A1111's torch.cuda.amp.GradScaler(), by its current name where there is one
        torch.amp.GradScaler("cuda", enabled=cuda)
        if hasattr(torch.amp, "GradScaler")
        else torch.cuda.amp.GradScaler(enabled=cuda)
    )
    generator = torch.Generator().manual_seed(0)
    losses = []
    text_model = model.cond_stage_model if hasattr(model, "cond_stage_model") else model.conditioner

    def step():
        order = torch.randperm(len(latents), generator=generator)[: row.batch].tolist()
        autocast = torch.autocast("cuda") if cuda else contextlib.nullcontext()  # devices.autocast()
        with autocast:
            x = torch.stack([latents[i] for i in order]).to(device)
            texts = [_shuffled_tags(words[i], generator) for i in order]
            text_model.to(device)  # shuffled tags: the text encoder every step, moved there and back
            c = _a1111_conditioning(model, texts, row)
            text_model.to("cpu")
            loss = _a1111_loss(model, x, c)
            losses.append(loss.item())
        scaler.scale(loss).backward()
        torch.nn.utils.clip_grad_norm_(list(network.parameters()), 1.0)  # still scaled: the host's bug
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)  # the network's only: the UNet's gradients stay
        clock.mark()

    model.model.diffusion_model.requires_grad_(True)  # as loaded in A1111
    with a1111_checkpointing():
        for _ in range(steps + 1):
            step()
    return losses


def _shuffled_tags(words: str, generator: torch.Generator) -> str:
    tags = words.split(",")
    return ",".join(tags[j] for j in torch.randperm(len(tags), generator=generator).tolist())


def _a1111_conditioning(model, texts: list[str], row: Row):
    if hasattr(model, "cond_stage_model"):
        return model.cond_stage_model(texts)
    from hypernetwork_ext.training.backends.ldm import SgmBackend

    return SgmBackend(model)._encode(texts, (row.pixels, row.pixels), negative=False)


def _a1111_loss(model, x, c):
    if hasattr(model, "p_losses"):  # LatentDiffusion.forward, as A1111 calls it
        return model(x, c)[0]
    # The same loss for the sgm model (A1111 has no training path for it): uniform timestep, eps.
    from hypernetwork_ext.training.backends.ldm import legacy_ddpm_alphas_cumprod

    alphas = legacy_ddpm_alphas_cumprod().to(x.device)
    t = torch.randint(0, 1000, (x.shape[0],), device=x.device)
    noise = torch.randn_like(x)
    ab = alphas[t].view(-1, 1, 1, 1)
    noisy = ab.sqrt() * x + (1 - ab).sqrt() * noise
    prediction = model.model(noisy.to(next(model.model.parameters()).dtype), t, c)
    return F.mse_loss(prediction.float(), noise.float())


def run_ours(model, row: Row, data: Path, steps: int, device, clock: Clock, variant: str, folder: Path) -> list[float]:
    from hypernetwork_ext.training import LdmBackend, SgmBackend, TrainingCallbacks, TrainingConfig, train

    patch_attention(model, sdp_attention)
    network = network_for(row, device)
    options = {
        "gradient_checkpointing": "checkpointing" in variant,
        "mixed_precision": "bf16" if variant == "bf16-autocast" else "auto",
    }
    if variant == "unload":
        options["unload_models_when_training"] = True
    config = TrainingConfig(
        hypernetwork_name="bench",
        learn_rate="1e-5",
        batch_size=row.batch,
        data_root=str(data),
        log_directory="",
        training_width=row.pixels,
        training_height=row.pixels,
        steps=steps + 1,
        create_image_every=0,
        save_hypernetwork_every=0,
        template_filename="filewords.txt",
        shuffle_tags=True,
        clip_grad_mode="norm",
        clip_grad_value="1.0",
        seed=0,
        save_training_settings_to_txt=False,
        **options,
    )
    backend = (SgmBackend if row.family == "sdxl" else LdmBackend)(model)
    if variant == "no-cache":
        backend = EncodingEveryStep(backend, row, data)
    losses = []

    def on_progress(progress):
        losses.append(progress.loss)
        clock.mark()

    train(
        network,
        backend,
        config,
        TrainingCallbacks(on_progress=on_progress),
        source_path=str(folder / f"bench-{os.getpid()}.pt"),
        progress_bar=False,
    )
    return losses


class EncodingEveryStep:
    """Our backend, with the VAE encoding a batch of the dataset's images before every prediction:
    what the trainer would pay without its latent cache."""

    def __init__(self, backend, row: Row, data: Path):
        from hypernetwork_ext.training.data import load_pixels, scan_images

        self._backend = backend
        paths = [path for path, _words, _size in scan_images(str(data))][: row.batch]
        self._pixels = torch.stack(
            [load_pixels(p, (row.pixels, row.pixels), keep_aspect=False, with_alpha=False)[0] for p in paths]
        )

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def predict(self, noisy, timesteps, cond):
        self._backend.encode_images(self._pixels)
        return self._backend.predict(noisy, timesteps, cond)


# -- the run ----------------------------------------------------------------------------------------
def worker(args) -> None:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    result = measure(
        ROWS[args.row], args.worker, Path(args.model), Path(args.folder), args.steps, device, _dtype(args), args.clock
    )
    print("RESULT " + json.dumps(result.__dict__), flush=True)


def _dtype(args) -> torch.dtype:
    return getattr(torch, args.dtype or ("float16" if args.device.startswith("cuda") else "float32"))


def run_worker(args, row: Row, variant: str, model_path: Path, folder: Path) -> Measurement:
    command = [
        sys.executable, __file__, "--worker", variant, "--row", row.key, "--model", str(model_path),
        "--folder", str(folder), "--steps", str(args.steps), "--device", args.device,
        "--threads", str(args.threads), "--clock", args.clock, *(["--dtype", args.dtype] if args.dtype else []),
    ]  # fmt: skip
    env = {**os.environ, **MALLOC_ENV}
    if args.clock == "cpu":  # idle OpenMP threads sleep instead of spinning: CPU time is work done
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"{row.key} {variant} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return Measurement(**json.loads(lines[-1][len("RESULT ") :]))


def plan_from(args) -> dict[str, tuple[str, ...]]:
    if args.quick:
        plan = dict(QUICK_PLAN)
    elif args.rows or args.variants:
        rows = args.rows.split(",") if args.rows else list(DEFAULT_PLAN)
        variants = tuple(args.variants.split(",")) if args.variants else ("a1111", "ours")
        plan = {row: variants for row in rows}
    else:
        plan = dict(DEFAULT_PLAN)
    unknown = [r for r in plan if r not in ROWS] + [v for vs in plan.values() for v in vs if v not in VARIANTS]
    if unknown:
        raise SystemExit(
            f"unknown rows or variants: {', '.join(unknown)} (rows: {', '.join(ROWS)}; variants: {', '.join(VARIANTS)})"
        )
    dropped = GPU_ONLY if not args.device.startswith("cuda") else FLOAT32_ONLY if _dtype(args) != torch.float32 else ()
    return {row: tuple(v for v in variants if v not in dropped) for row, variants in plan.items()}


def run(args) -> list[dict]:
    plan = plan_from(args)
    results: list[Measurement] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hnx-bench-training-") as temp:
        folder = Path(temp)
        models: dict[str, Path] = {}
        for key, variants in plan.items():
            row = ROWS[key]
            if row.family not in models:
                models[row.family] = _model_file(args, row.family, folder)
            for round_index in range(args.rounds):
                shift = round_index % len(variants)
                for variant in variants[shift:] + variants[:shift]:
                    if args.in_process:
                        with _threads(args.threads):
                            device = torch.device(args.device)
                            result = measure(
                                row, variant, models[row.family], folder, args.steps, device, _dtype(args), args.clock
                            )
                    else:
                        result = run_worker(args, row, variant, models[row.family], folder)
                    results.append(result)
                    if args.record:
                        with open(args.record, "a") as handle:
                            handle.write(json.dumps(record_of(args, result, round_index)) + "\n")
                    print(
                        f"  {row.key} round {round_index + 1} {variant}: {result.steps_per_second:.4f} steps/s, "
                        f"peak {result.peak_bytes / 2**30:.2f} GiB (training {result.training_bytes / 2**30:.2f} GiB)",
                        file=sys.stderr,
                        flush=True,
                    )
    table = summarise(plan, results)
    print(header(args, time.perf_counter() - started))
    print(format_table(table))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": table, "measurements": [r.__dict__ for r in results]}, indent=1))
    return table


def _model_file(args, family: str, folder: Path) -> Path:
    """The family's saved model: built into ``--models`` once and reused by later runs, else into
    this run's temporary folder."""
    if args.models:
        path = Path(args.models) / f"{family}.safetensors"
        if path.is_file():
            return path
        folder = Path(args.models)
        folder.mkdir(parents=True, exist_ok=True)
    with _threads(args.threads):
        return save_model(family, folder)


# -- measurements kept, and the table from them -------------------------------------------------------
CONDITIONS = ("device", "clock", "threads", "steps", "dtype", "torch")


def record_of(args, result: Measurement, round_index: int) -> dict:
    """One measurement with when and under what it ran: a line of ``--record``'s file."""
    device = torch.device(args.device)
    return {
        **result.__dict__,
        "round": round_index + 1,
        "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "load1": round(os.getloadavg()[0], 2),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "clock": args.clock,
        "threads": args.threads,
        "steps": args.steps,
        "dtype": str(_dtype(args)),
        "torch": torch.__version__,
    }


def read_records(paths: list[str]) -> list[dict]:
    records = []
    for path in paths:
        for number, line in enumerate(Path(path).read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                Measurement(**{name: record[name] for name in Measurement.__dataclass_fields__})
            except (ValueError, KeyError, TypeError) as error:
                raise SystemExit(f"{path}:{number}: not a measurement of this benchmark ({error})") from None
            if record["row"] not in ROWS or record["variant"] not in VARIANTS:
                raise SystemExit(f"{path}:{number}: unknown row or variant {record['row']} {record['variant']}")
            records.append(record)
    return records


def table_from_records(paths: list[str]) -> tuple[str, list[dict]]:
    """The table of the measurements saved by earlier runs (``--record``), each row with when its
    measurements ran, the load then and their conditions: rows run at different times compare
    within themselves (each has its own A1111 baseline), not with each other's seconds."""
    records = read_records(paths)
    if not records:
        raise SystemExit(f"no measurements in {', '.join(paths)}")
    plan = {
        key: tuple(v for v in VARIANTS if any(r["row"] == key and r["variant"] == v for r in records))
        for key in ROWS
        if any(r["row"] == key for r in records)
    }
    results = [Measurement(**{name: r[name] for name in Measurement.__dataclass_fields__}) for r in records]
    lines = []
    for key in plan:
        mine = [r for r in records if r["row"] == key]
        times = sorted(r["time"] for r in mine)
        loads = [r["load1"] for r in mine]
        conditions = "; ".join(f"{name} {' / '.join(sorted({str(r[name]) for r in mine}))}" for name in CONDITIONS)
        rounds = max(r["round"] for r in mine)
        lines.append(
            f"{ROWS[key].label}: {len(mine)} measurements in {rounds} rounds, {times[0]} to {times[-1]}, "
            f"load average (1 min) {min(loads):.1f}-{max(loads):.1f}; {conditions}"
        )
    table = summarise(plan, results)
    return "\n".join(lines) + "\n\n" + format_table(table), table


@contextlib.contextmanager
def _threads(count: int):
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def summarise(plan: dict, results: list[Measurement]) -> list[dict]:
    table = []
    for key, variants in plan.items():
        base = [r for r in results if r.row == key and r.variant == "a1111"]
        base_speed = statistics.median(r.steps_per_second for r in base) if base else math.nan
        base_peak = statistics.median(r.peak_bytes for r in base) if base else math.nan
        base_training = statistics.median(r.training_bytes for r in base) if base else math.nan
        for variant in variants:
            mine = [r for r in results if r.row == key and r.variant == variant]
            speeds = [r.steps_per_second for r in mine]
            peaks = [r.peak_bytes for r in mine]
            training = [r.training_bytes for r in mine]
            table.append(
                {
                    "row": key,
                    "label": ROWS[key].label,
                    "variant": variant,
                    "rounds": len(mine),
                    "seconds_per_step": 1 / statistics.median(speeds),
                    "steps_per_second": statistics.median(speeds),
                    "speed_spread": (min(speeds), max(speeds)),
                    "speed_ratio": statistics.median(speeds) / base_speed,
                    "model_gib": statistics.median(r.model_bytes for r in mine) / 2**30,
                    "peak_gib": statistics.median(peaks) / 2**30,
                    "peak_spread_gib": (min(peaks) / 2**30, max(peaks) / 2**30),
                    "peak_ratio": statistics.median(peaks) / base_peak,
                    "training_gib": statistics.median(training) / 2**30,
                    "training_ratio": statistics.median(training) / base_training,
                    "losses_finite": all(math.isfinite(v) for r in mine for v in r.losses),
                }
            )
    return table


def header(args, seconds: float) -> str:
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} threads"
    load = os.getloadavg()
    return (
        f"device: {name}; {args.clock} clock; torch {torch.__version__}; weights {_dtype(args)}; "
        f"{args.rounds} rounds of 1 warm-up + "
        f"{args.steps} timed steps per variant; load average at the end {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} "
        f"(1/5/15 min); {seconds / 60:.1f} min"
    )


def _ratio(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}"  # "-": no A1111 measurement in the row


def format_table(table: list[dict]) -> str:
    lines = [
        "| configuration | variant | s/step | steps/s (spread) | x A1111 | peak GiB (spread) | peak / A1111 "
        "| training GiB | training / A1111 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for item in table:
        low, high = item["speed_spread"]
        peak_low, peak_high = item["peak_spread_gib"]
        lines.append(
            f"| {item['label']} | {VARIANT_LABELS[item['variant']]} | {item['seconds_per_step']:.2f} "
            f"| {item['steps_per_second']:.4f} ({low:.4f}-{high:.4f}) | {_ratio(item['speed_ratio'])} "
            f"| {item['peak_gib']:.2f} ({peak_low:.2f}-{peak_high:.2f}) | {_ratio(item['peak_ratio'])} "
            f"| {item['training_gib']:.2f} | {_ratio(item['training_ratio'])} |"
        )
    return "\n".join(lines)


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="", help=f"comma-separated, of: {', '.join(ROWS)}")
    parser.add_argument("--variants", default="", help=f"comma-separated, of: {', '.join(VARIANTS)}")
    parser.add_argument("--quick", action="store_true", help="SD1.5 at 256 px, batch 1: A1111 and ours")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per measurement, after one warm-up")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="", help="weights: float16 on CUDA (as A1111 loads them), float32 on CPU")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="cpu: CPU time of the process, for a machine other jobs keep busy (use with --threads 1)",
    )
    parser.add_argument("--json", default="", help="also write the table and every measurement here")
    parser.add_argument("--in-process", action="store_true", help="no subprocess per measurement (memory then mixes)")
    parser.add_argument("--models", default="", help="keep the built models in this folder and reuse them")
    parser.add_argument("--record", default="", help="append every measurement to this file (JSON lines) as it ends")
    parser.add_argument(
        "--table", default="", help="measure nothing: print the table of these --record files (comma-separated)"
    )
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
    parser.add_argument("--row", default="", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="", help=argparse.SUPPRESS)
    parser.add_argument("--folder", default="", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    if args.worker:
        return worker(args)
    if args.table:
        printed, table = table_from_records(args.table.split(","))
        print(printed)
        return table
    return run(args)


if __name__ == "__main__":
    main()
