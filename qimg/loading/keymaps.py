"""Rename tables as data: diffusers config keys -> params fields, and the tensors a loader may skip."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch only for the annotation: this table module stays import-light
    from torch import Tensor

# transformer/config.json of QwenImageTransformer2DModel -> QwenMMDiTParams
QWEN_MMDIT_CONFIG = {
    "patch_size": "patch_size",
    "in_channels": "in_channels",
    "out_channels": "out_channels",
    "num_layers": "num_layers",
    "attention_head_dim": "head_dim",
    "num_attention_heads": "num_heads",
    "joint_attention_dim": "txt_dim",
    "axes_dims_rope": "axes_dims_rope",
    "zero_cond_t": "zero_cond_t",
}
# Keys that fix the network's shapes: a config without one would build the default-sized net and report the
# whole checkpoint as mismatched, so their absence is the error to report.
QWEN_MMDIT_CONFIG_REQUIRED = ("num_layers", "attention_head_dim", "num_attention_heads", "joint_attention_dim",
                              "in_channels", "out_channels")
# Present in released configs but without effect on the network: guidance_embeds builds nothing in
# diffusers either, and pooled_projection_dim is a leftover of the original release.
QWEN_MMDIT_CONFIG_IGNORED = ("guidance_embeds", "pooled_projection_dim")
# Flags of variants qimg does not run yet (Qwen-Image-Layered); building without them would be wrong.
QWEN_MMDIT_UNSUPPORTED_FLAGS = ("use_additional_t_cond", "use_layer3d_rope")

# vae/config.json of AutoencoderKLQwenImage -> QwenVAEParams
QWEN_VAE_CONFIG = {
    "base_dim": "base_dim",
    "z_dim": "z_dim",
    "dim_mult": "dim_mult",
    "num_res_blocks": "num_res_blocks",
    "attn_scales": "attn_scales",
    "temperal_downsample": "temporal_downsample",  # sic: the released config spells it so
    "input_channels": "in_channels",
    "latents_mean": "latents_mean",
    "latents_std": "latents_std",
}
QWEN_VAE_CONFIG_IGNORED = ("dropout",)
QWEN_VAE_CONFIG_REQUIRED = ("base_dim", "z_dim", "dim_mult", "num_res_blocks")

# The temporal resampling convs of the 3-D VAE: one frame never runs them, so the image-only net has none.
QWEN_VAE_KNOWN_UNUSED = (
    "encoder.down_blocks.*.time_conv.*",
    "decoder.up_blocks.*.upsamplers.0.time_conv.*",
)


def qwen_vae_tensor(name: str, tensor: Tensor) -> Tensor:
    """Adapt a released 3-D VAE tensor to the 2-D image net (qimg/nets/qwen_vae.py).

    Causal conv kernels (out, in, t, kh, kw): a single frame is preceded by zero padding only, so just the
    last time slice touches data. RMS-norm gains (C, 1, 1, 1) lose their time axis.
    """
    if tensor.ndim == 5:
        # contiguous: a strided view would keep the whole 3-D kernel alive and slow the conv
        return tensor[:, :, -1].contiguous()
    if name.endswith(".gamma") and tensor.ndim == 4:
        return tensor[..., 0]
    return tensor
