"""Write a diffusers SD1-layout model as an original single-file (ldm) checkpoint, for tests.

Single-file checkpoints are what most users have; the tests need one without downloading, so the
embedded tiny model is written in that layout here. The mapping is the inverse of the one
diffusers applies when it loads a single file; a round trip through diffusers' own loader checks
it (tests/core/test_pipelines.py).
"""

from __future__ import annotations

import re

import torch

_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{_RESNET[head]}.{tail}"


def unet_to_ldm(state: dict[str, torch.Tensor], layers: int, up_has_attention: list[bool]) -> dict[str, torch.Tensor]:
    per_level = layers + 1
    out = {}
    fixed = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
    }
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        if module in fixed:
            out[f"{fixed[module]}.{param}"] = value
            continue
        if m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            out[f"input_blocks.{1 + int(m[1]) * per_level + int(m[2])}.0.{_resnet(m[3])}"] = value
        elif m := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", key):
            out[f"input_blocks.{1 + int(m[1]) * per_level + int(m[2])}.1.{m[3]}"] = value
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
            out[f"input_blocks.{(int(m[1]) + 1) * per_level}.0.op.{m[2]}"] = value
        elif m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key):
            out[f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"] = value
        elif m := re.match(r"mid_block\.attentions\.0\.(.*)", key):
            out[f"middle_block.1.{m[1]}"] = value
        elif m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            out[f"output_blocks.{int(m[1]) * per_level + int(m[2])}.0.{_resnet(m[3])}"] = value
        elif m := re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", key):
            out[f"output_blocks.{int(m[1]) * per_level + int(m[2])}.1.{m[3]}"] = value
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
            index = 2 if up_has_attention[int(m[1])] else 1
            out[f"output_blocks.{int(m[1]) * per_level + layers}.{index}.conv.{m[2]}"] = value
        else:
            raise KeyError(f"no ldm name for UNet key {key}")
    return out


def _vae_resnet(rest: str) -> str:
    return rest.replace("conv_shortcut", "nin_shortcut")


def vae_to_ldm(state: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        new = key
        if m := re.match(
            r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.*)", key
        ):
            new = f"{m[1]}.mid.attn_1.{_VAE_ATTENTION[m[2]]}.{m[3]}"
            if value.dim() == 2:
                value = value[:, :, None, None]
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", key):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{_vae_resnet(m[3])}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            new = f"encoder.down.{m[1]}.block.{m[2]}.{_vae_resnet(m[3])}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
            new = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            new = f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.{_vae_resnet(m[3])}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
            new = f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
        else:
            new = key.replace("conv_norm_out", "norm_out")
        out[new] = value
    return out


def components_to_ldm(unet, vae, text_encoder) -> dict[str, torch.Tensor]:
    config = unet.config
    layers = config.layers_per_block
    up_has_attention = ["CrossAttn" in kind for kind in config.up_block_types]
    state = {
        f"model.diffusion_model.{k}": v for k, v in unet_to_ldm(unet.state_dict(), layers, up_has_attention).items()
    }
    levels = len(vae.config.block_out_channels)
    state.update({f"first_stage_model.{k}": v for k, v in vae_to_ldm(vae.state_dict(), levels).items()})
    for key, value in text_encoder.state_dict().items():
        # transformers 5 drops the "text_model." level from CLIPTextModel's own keys; ldm files have it
        key = key if key.startswith("text_model.") else f"text_model.{key}"
        state[f"cond_stage_model.transformer.{key}"] = value
    return {key: value.contiguous() for key, value in state.items()}
