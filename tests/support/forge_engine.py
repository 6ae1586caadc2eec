"""A stand-in of the model Forge and reForge load, with their memory manager and LoRA merging.

Names and behaviour from lllyasviel/stable-diffusion-webui-forge (dfdcbab) and
Panchovix/stable-diffusion-webui-reForge (3b56b26), read in their source:

- **Loading.** Forge builds and loads every model inside ``torch.inference_mode()``
  (``backend/loader.py: forge_loader``, ``sd_models.forge_model_reload``), so every weight is an
  inference tensor; reForge loads under ``torch.no_grad()`` (``forge_loader.load_model_for_a1111``).
- **The model** (``ForgeDiffusionEngine``): ``forge_objects`` (``unet``: a UnetPatcher of a
  KModel holding ``diffusion_model`` and, on Forge, a ``predictor`` with ``sigmas``,
  ``alphas_cumprod``, ``prediction_type``; on reForge a ``model_sampling`` whose class mixes in
  ``EPS``/``V_PREDICTION`` and a ``model_config.latent_format``), ``clip``, ``vae``; the
  ``forge_objects_original`` and ``forge_objects_after_applying_lora`` copies; and
  ``get_learned_conditioning`` / ``encode_first_stage`` / ``decode_first_stage`` decorated with
  ``torch.inference_mode()``, each loading its model through the memory manager first.
- **The memory manager** (``backend/memory_management.py``, reForge's
  ``ldm_patched/modules/model_management.py``): ``load_models_gpu(models)`` keeps
  ``current_loaded_models`` (most recent first); a patcher already loaded moves to the front; clones
  of the same model are unloaded without moving; room is made by unloading the least recent ones;
  ``LoadedModel.model_load`` moves the weights onto the device and merges the patcher's LoRA
  (``refresh_loras``), ``model_unload`` moves them off. Here a device holds ``capacity`` models and
  a weight off the device keeps no data (an empty tensor; its values wait in an offload copy), so
  anything that computes with an unloaded model fails. ``model_accelerated`` marks a partial load.
- **LoRA** (``backend/patcher/lora.py: LoraLoader.refresh``, in inference mode): the patches of the
  loaded patcher are merged into new Parameter objects, the originals backed up and put back
  when a patcher with other patches (or none) is loaded.

The UNet and the autoencoder's encoder and decoder are the real ldm classes; the text encoder is a
small transformer (the Forge test environment has no transformers package).
"""

from __future__ import annotations

import contextlib
import io
import zlib

import torch
from torch import nn

from tests.support import forge_standin
from tests.support.models import SDXL_CONTEXT
from tests.support.training_models import autoencoder_config, unet_config

SCALE_FACTOR = 0.18215


# --- the memory manager ----------------------------------------------------------------------------


class LoadedModel:
    def __init__(self, manager: MemoryManager, patcher):
        self.manager = manager
        self.model = patcher
        self.model_accelerated = manager.partial

    def model_load(self) -> None:
        self.model.model_patches_to(self.model.load_device)
        self.model.model_patches_to(self.model.model_dtype())
        self.manager.move_on(self.model.model)
        self.model.refresh_loras()

    def model_unload(self, avoid_model_moving: bool = False) -> None:
        if not avoid_model_moving:
            self.manager.move_off(self.model.model)
            self.model.model_patches_to(self.model.offload_device)


class MemoryManager:
    def __init__(self, capacity: int = 1, *, partial: bool = False):
        self.capacity = capacity
        self.partial = partial
        self.current_loaded_models: list[LoadedModel] = []
        self.offloaded: dict[tuple[int, str], torch.Tensor] = {}
        self.loads: list[object] = []  # every model moved onto the device, in order

    def load_models_gpu(self, models, memory_required=0, **kwargs) -> None:
        for patcher in models:
            found = next((m for m in self.current_loaded_models if m.model is patcher), None)
            if found is not None:
                self.current_loaded_models.remove(found)
                self.current_loaded_models.insert(0, found)
                continue
            for clone in [m for m in self.current_loaded_models if m.model.model is patcher.model]:
                self.current_loaded_models.remove(clone)
                clone.model_unload(avoid_model_moving=True)
            while len(self.current_loaded_models) >= self.capacity:
                self.current_loaded_models.pop().model_unload()
            loaded = LoadedModel(self, patcher)
            loaded.model_load()
            self.current_loaded_models.insert(0, loaded)

    def load_model_gpu(self, model) -> None:
        self.load_models_gpu([model])

    def unload_all_models(self) -> None:
        while self.current_loaded_models:
            self.current_loaded_models.pop().model_unload()

    def is_on(self, module: nn.Module) -> bool:
        return all(t.numel() > 0 for t in module.parameters())

    def move_off(self, module: nn.Module) -> None:
        for owner in module.modules():
            for name, tensor in owner._parameters.items():
                if tensor is not None and tensor.numel() > 0:
                    self.offloaded[(id(owner), name)] = tensor.detach().clone()
                    tensor.data = torch.empty(0, dtype=tensor.dtype)

    def move_on(self, module: nn.Module) -> None:
        if not self.is_on(module):
            self.loads.append(module)
        for owner in module.modules():
            for name, tensor in owner._parameters.items():
                saved = self.offloaded.pop((id(owner), name), None)
                if tensor is not None and saved is not None:
                    tensor.data = saved.clone()  # a new tensor of the caller's mode, as `.to(device)` makes


# --- LoRA --------------------------------------------------------------------------------------------


class LoraLoader:
    def __init__(self, model: nn.Module):
        self.model = model
        self.backup: dict[str, nn.Parameter] = {}
        self.loaded_hash = str([])

    @torch.inference_mode()
    def refresh(self, lora_patches: dict) -> None:
        hashes = str(list(lora_patches.keys()))
        if hashes == self.loaded_hash:
            return
        for key, weight in self.backup.items():
            _set(self.model, key, weight)
        self.backup = {}
        for patches in lora_patches.values():
            for key, delta in patches.items():
                weight = _get(self.model, key)
                self.backup.setdefault(key, weight)
                _set(self.model, key, nn.Parameter(weight + delta, requires_grad=False))
        self.loaded_hash = hashes


def _get(model: nn.Module, key: str):
    owner, name = key.rsplit(".", 1)
    return getattr(model.get_submodule(owner), name)


def _set(model: nn.Module, key: str, value) -> None:
    owner, name = key.rsplit(".", 1)
    setattr(model.get_submodule(owner), name, value)


class ModelPatcher(forge_standin.ModelPatcher):
    """The patcher with its LoRA bookkeeping (``add_patches``, ``refresh_loras``)."""

    def __init__(self, model, load_device="cpu", offload_device="cpu", size=0, current_device=None, **kwargs):
        super().__init__(model, load_device, offload_device, size, current_device)
        if not hasattr(model, "lora_loader"):
            model.lora_loader = LoraLoader(model)
        self.lora_loader = model.lora_loader

    def add_patches(self, *, filename, patches, strength=1.0) -> None:
        self.lora_patches[(filename, strength)] = {key: delta * strength for key, delta in patches.items()}

    def refresh_loras(self) -> None:
        self.lora_loader.refresh(self.lora_patches)


class UnetPatcher(ModelPatcher, forge_standin.UnetPatcher):
    pass


# --- the model's parts -------------------------------------------------------------------------------


class Prediction(nn.Module):
    """Forge's ``predictor`` (backend/modules/k_prediction.py: Prediction)."""

    def __init__(self, prediction_type: str = "epsilon"):
        super().__init__()
        self.prediction_type = prediction_type
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.register_buffer("alphas_cumprod", alphas_cumprod.float())
        self.register_buffer("sigmas", (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).float())


class EPS:
    pass


class V_PREDICTION(EPS):  # reForge's class name, which the backend reads
    pass


class ModelSamplingDiscrete(nn.Module):
    """reForge's ``model_sampling`` (ldm_patched/modules/model_sampling.py): sigmas, no prediction_type."""

    def __init__(self):
        super().__init__()
        reference = Prediction()
        self.register_buffer("sigmas", reference.sigmas.clone())


class LatentFormat:
    scale_factor = SCALE_FACTOR

    def process_in(self, latent):
        return latent * self.scale_factor

    def process_out(self, latent):
        return latent / self.scale_factor


class KModel(nn.Module):
    """Forge's KModel / reForge's BaseModel: the UNet and its noise schedule."""

    def __init__(self, diffusion_model: nn.Module, *, reforge: bool, v_prediction: bool = False):
        super().__init__()
        self.diffusion_model = diffusion_model
        if reforge:
            mixin = V_PREDICTION if v_prediction else EPS
            self.model_sampling = type("ModelSampling", (ModelSamplingDiscrete, mixin), {})()
            self.model_config = type("ModelConfig", (), {"latent_format": LatentFormat()})()
            self.manual_cast_dtype = None
        else:
            self.predictor = Prediction("v_prediction" if v_prediction else "epsilon")
            self.storage_dtype = self.computation_dtype = torch.float32

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        sigmas = (self.predictor if hasattr(self, "predictor") else self.model_sampling).sigmas
        return 1.0 / (1.0 + sigmas.float() ** 2)


class Clip:
    """``forge_objects.clip``: the text encoder and its patcher."""

    def __init__(self, encoder: nn.Module, *, sdxl: bool):
        self.cond_stage_model = encoder
        self.patcher = ModelPatcher(encoder)
        self.sdxl = sdxl

    def encode(self, prompts) -> torch.Tensor | dict:
        hidden = self.cond_stage_model(list(prompts))
        if not self.sdxl:
            return hidden
        width, height = getattr(prompts, "width", 1024), getattr(prompts, "height", 1024)
        size = torch.tensor([[height, width, 0, 0, height, width]], dtype=hidden.dtype).repeat(hidden.shape[0], 1)
        vector = torch.cat([hidden[:, -1], torch.sin(size / 64.0)], dim=1)
        return {"crossattn": hidden, "vector": vector}


class Vae:
    """``forge_objects.vae``: the autoencoder (which, on Forge, scales latents in ``process_in``)."""

    def __init__(self, autoencoder: nn.Module, *, reforge: bool):
        if not reforge:
            autoencoder.process_in = LatentFormat().process_in
            autoencoder.process_out = LatentFormat().process_out
        self.first_stage_model = autoencoder
        self.patcher = ModelPatcher(autoencoder)
        self.device = torch.device("cpu")
        self.vae_dtype = torch.float32


# --- the loaded model --------------------------------------------------------------------------------


class ForgeEngine:
    """``shared.sd_model`` on Forge (a ForgeDiffusionEngine) or reForge (its A1111 model plus forge_objects)."""

    def __init__(self, memory: MemoryManager, unet: UnetPatcher, clip: Clip, vae: Vae, *, family: str):
        self.memory = memory
        self.forge_objects = forge_standin.ForgeObjects(unet, clip, vae, None)
        self.forge_objects_original = self.forge_objects.shallow_copy()
        self.forge_objects_after_applying_lora = self.forge_objects.shallow_copy()
        for flag in ("is_sd1", "is_sd2", "is_sdxl", "is_sd3"):
            setattr(self, flag, flag == f"is_{family}")
        self.parameterization = "v" if _is_v(unet.model) else "eps"
        self.latent_format = LatentFormat()
        self.weight_shapes = {name: p.shape for name, p in unet.model.named_parameters()}  # (LoRA files know them)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.forge_objects.unet.model.alphas_cumprod

    @torch.inference_mode()
    def get_learned_conditioning(self, prompts):
        self.memory.load_model_gpu(self.forge_objects.clip.patcher)
        return self.forge_objects.clip.encode(prompts)

    @torch.inference_mode()
    def encode_first_stage(self, x):
        vae = self.forge_objects.vae
        self.memory.load_model_gpu(vae.patcher)
        return self.latent_format.process_in(vae.first_stage_model.encode(x).sample())

    @torch.inference_mode()
    def decode_first_stage(self, x):
        vae = self.forge_objects.vae
        self.memory.load_model_gpu(vae.patcher)
        return vae.first_stage_model.decode(self.latent_format.process_out(x))

    def apply_model(self, x, t, cond):
        """One denoiser call as Forge's sampling makes it: the sampling patcher loaded, its
        transformer options with the batch layout (the stand-in sampler's rows are [cond, uncond])."""
        patcher = self.forge_objects.unet
        self.memory.load_models_gpu([patcher])
        options = dict(patcher.model_options["transformer_options"])
        options["cond_or_uncond"] = [0, 1] if x.shape[0] % 2 == 0 else [0]
        context, vector = (cond["crossattn"], cond["vector"]) if isinstance(cond, dict) else (cond, None)
        extra = {"y": vector} if vector is not None else {}
        return patcher.model.diffusion_model(x, t, context=context, transformer_options=options, **extra)


def _is_v(model: KModel) -> bool:
    if hasattr(model, "predictor"):
        return model.predictor.prediction_type == "v_prediction"
    return isinstance(model.model_sampling, V_PREDICTION)


class WordEncoder(nn.Module):
    """A small text encoder (the Forge test environment has no transformers): words hashed to
    tokens, embedded with positions, one transformer layer; ``(batch, 16, width)``."""

    def __init__(self, width: int, tokens: int = 16):
        super().__init__()
        self.tokens = tokens
        self.embedding = nn.Embedding(1024, width)
        self.position = nn.Parameter(torch.randn(tokens, width) * 0.1)
        self.layer = nn.TransformerEncoderLayer(width, 4, width * 2, dropout=0.0, batch_first=True)

    def forward(self, texts) -> torch.Tensor:
        ids = torch.zeros(len(texts), self.tokens, dtype=torch.long)
        for row, text in enumerate(texts):
            words = [zlib.crc32(word.encode()) % 1023 + 1 for word in text.replace(",", " ").split()]
            ids[row, : min(len(words), self.tokens)] = torch.tensor(words[: self.tokens], dtype=torch.long)
        return self.layer(self.embedding(ids) + self.position)


class Autoencoder(nn.Module):
    """An AutoencoderKL from ldm's own encoder and decoder (as ``ldm.models.autoencoder`` builds it,
    which needs pytorch_lightning)."""

    def __init__(self):
        super().__init__()
        from ldm.modules.diffusionmodules.model import Decoder, Encoder

        config = dict(autoencoder_config()["params"]["ddconfig"])
        self.encoder = Encoder(**config)
        self.decoder = Decoder(**config)
        self.quant_conv = nn.Conv2d(8, 8, 1)
        self.post_quant_conv = nn.Conv2d(4, 4, 1)

    def encode(self, x):
        from ldm.modules.distributions.distributions import DiagonalGaussianDistribution

        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))


def build(
    seed: int = 0,
    *,
    reforge: bool = False,
    classic: bool = False,
    family: str = "sd1",
    memory: MemoryManager | None = None,
) -> ForgeEngine:
    """Forge's (inference tensors, blocks adding in place) or reForge's loaded model, small.
    ``classic``: Forge Classic's, reForge's model whose blocks add in place as Forge's do
    (``ldm_patched/ldm/modules/attention.py``: ``x += n``)."""
    reforge = reforge or classic
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    from tests.support.models import LDM_CONTEXT, randomise

    memory = memory or MemoryManager()
    mode = torch.no_grad() if reforge else torch.inference_mode()
    sdxl = family == "sdxl"
    context = SDXL_CONTEXT if sdxl else LDM_CONTEXT
    with mode, contextlib.redirect_stdout(io.StringIO()):
        torch.manual_seed(seed)
        params = dict(unet_config(context_dim=context)["params"])
        params["use_linear_in_transformer"] = sdxl
        unet = UNetModel(**params)
        if sdxl:  # sgm's "sequential" label embedding of the pooled text and size vector
            width = unet.model_channels * 4
            unet.num_classes = "sequential"
            unet.label_emb = nn.Sequential(
                nn.Sequential(nn.Linear(context + 6, width), nn.SiLU(), nn.Linear(width, width))
            )
        randomise(unet, seed + 1)
        forge_standin.forge_unet(unet, in_place=classic or not reforge)
        encoder = WordEncoder(context).eval()
        autoencoder = Autoencoder().eval()
    patcher = UnetPatcher(KModel(unet, reforge=reforge))
    return ForgeEngine(memory, patcher, Clip(encoder, sdxl=sdxl), Vae(autoencoder, reforge=reforge), family=family)


def add_lora(engine: ForgeEngine, seed: int = 3, strength: float = 1.0) -> UnetPatcher:
    """What Forge's Lora extension does for a prompt with a LoRA: a clone of the original UNet
    patcher with patches, as the new ``forge_objects_after_applying_lora``."""
    original = engine.forge_objects_original.unet
    lora = original.clone()
    generator = torch.Generator().manual_seed(seed)
    keys = [name for name in engine.weight_shapes if name.endswith("attn2.to_k.weight")]
    with torch.inference_mode():
        deltas = {key: 0.2 * torch.randn(engine.weight_shapes[key], generator=generator) for key in keys}
    lora.add_patches(filename=f"lora-{seed}.safetensors", patches=deltas, strength=strength)
    engine.forge_objects.unet = lora
    engine.forge_objects_after_applying_lora = engine.forge_objects.shallow_copy()
    return lora


def remove_lora(engine: ForgeEngine) -> None:
    """A prompt without LoRA after one with it: the original patchers again."""
    engine.forge_objects.unet = engine.forge_objects_original.unet
    engine.forge_objects_after_applying_lora = engine.forge_objects.shallow_copy()
