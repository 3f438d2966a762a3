"""Tiny random FLUX.1-dev and FLUX.1-Kontext-dev pipelines in the official layout, written by diffusers'
save_pretrained, with the offline tokenizers of tests/fixtures_flux.py: the oracles of the FLUX parity tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.fixtures import randomize_
from tests.fixtures_flux import (
    TINY_CLIP,
    TINY_T5,
    build_clip_tokenizer,
    build_t5_tokenizer,
    tiny_clip_text_model,
    tiny_t5_encoder,
)

TINY_FLUX = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=TINY_T5["d_model"],
                 pooled_projection_dim=TINY_CLIP["hidden_size"], guidance_embeds=True, axes_dims_rope=(4, 6, 6))
TINY_FLUX_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 16, 16, 16),
                     layers_per_block=1, norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 4,
                     up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.3611, shift_factor=0.1159,
                     use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True)
# FLUX.1-dev's scheduler/scheduler_config.json.
FLUX_SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
                      num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)


def write_tiny_flux(root: str | Path, *, kontext: bool = False, seed: int = 0) -> Any:
    """A tiny random FLUX.1-dev (or, kontext=True, FLUX.1-Kontext-dev) pipeline saved in `root`; returns the
    diffusers pipeline (the oracle)."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxKontextPipeline,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTokenizer, T5TokenizerFast

    root = Path(root)
    tokenizers = root.parent / f"{root.name}-tokenizers"
    pipeline = FluxKontextPipeline if kontext else FluxPipeline
    pipe = pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
        vae=randomize_(AutoencoderKL(**TINY_FLUX_VAE).eval(), seed + 1),
        text_encoder=tiny_clip_text_model(seed + 2),
        tokenizer=CLIPTokenizer.from_pretrained(build_clip_tokenizer(tokenizers / "clip")),
        text_encoder_2=tiny_t5_encoder(seed + 3),
        tokenizer_2=T5TokenizerFast.from_pretrained(build_t5_tokenizer(tokenizers / "t5")),
        transformer=randomize_(FluxTransformer2DModel(**TINY_FLUX).eval(), seed + 4),
    )
    pipe.save_pretrained(root)
    return pipe
