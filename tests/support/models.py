"""Small real UNets built from configs with fixed seeds: A1111's ldm classes and diffusers'.

Every parameter that starts at zero (ldm's zero_module output layers, biases) is re-randomised:
with zero output layers the attention blocks add nothing and any comparison would pass trivially.
"""

from __future__ import annotations

import torch

LDM_CONTEXT = 48
LDM_WIDTHS = (32, 64)  # self-attention widths
SDXL_CONTEXT = 80
SDXL_WIDTHS = (32, 64)


def randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if torch.count_nonzero(parameter) == 0:
                parameter.normal_(0.0, 0.05, generator=generator)
    return model.eval()


def ldm_unet(seed: int = 0, *, context_dim: int = LDM_CONTEXT, use_linear: bool = False) -> torch.nn.Module:
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed(seed)
    model = UNetModel(
        image_size=8,
        in_channels=4,
        model_channels=LDM_WIDTHS[0],
        out_channels=4,
        num_res_blocks=1,
        attention_resolutions=[1, 2],
        channel_mult=[1, 2],
        num_head_channels=8,
        use_spatial_transformer=True,
        use_linear_in_transformer=use_linear,
        transformer_depth=1,
        context_dim=context_dim,
        legacy=False,
        use_checkpoint=False,
    )
    return randomise(model, seed + 1)


def ldm_inputs(seed: int = 0, batch: int = 2, context_dim: int = LDM_CONTEXT, tokens: int = 7):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=generator)
    t = torch.tensor([10, 500][:batch] + [999] * max(0, batch - 2))
    context = torch.randn(batch, tokens, context_dim, generator=generator)
    return {"x": x, "timesteps": t, "context": context}


def run_ldm(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(inputs["x"], inputs["timesteps"], context=inputs["context"])


def diffusers_sd1_unet(seed: int = 0) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    model = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=LDM_WIDTHS,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=LDM_CONTEXT,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    return randomise(model, seed + 1)


def diffusers_sdxl_unet(seed: int = 0) -> torch.nn.Module:
    """SDXL's layout in miniature: no attention at the first level, linear projections, several
    transformer layers per block, and the text_time additional embedding."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    model = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, *SDXL_WIDTHS),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        cross_attention_dim=SDXL_CONTEXT,
        attention_head_dim=8,
        norm_num_groups=8,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=SDXL_CONTEXT + 6 * 8,
    )
    return randomise(model, seed + 1)


def diffusers_inputs(
    seed: int = 0, batch: int = 2, context_dim: int = LDM_CONTEXT, tokens: int = 7, sdxl: bool = False
):
    generator = torch.Generator().manual_seed(seed)
    inputs = {
        "sample": torch.randn(batch, 4, 8, 8, generator=generator),
        "timestep": torch.tensor(321),
        "encoder_hidden_states": torch.randn(batch, tokens, context_dim, generator=generator),
    }
    if sdxl:
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, context_dim, generator=generator),
            "time_ids": torch.randn(batch, 6, generator=generator),
        }
    return inputs


def run_diffusers(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).sample
