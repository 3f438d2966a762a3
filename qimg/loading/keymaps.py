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


# LoRA files (loading/lora.py). A key is <prefix><module><suffix>. The prefix says who wrote it and how the module
# is spelled: "dotted" is the denoiser's own module name, "underscored" is kohya's (dots turned into "_"), mapped
# back only through the model's own names, never guessed. The suffix says which matrix the tensor is. Rows are tried
# in order and the first whose prefix, suffix style and module all fit the model wins, so bare rows ("") come last.
# A new dialect (FLUX's XLabs or BFL names, say) is a new row; "*" accepts any suffix style, or any family.
# (dialect, key prefix, module spelling, suffix styles, families)
LORA_DIALECTS: tuple[tuple[str, str, str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("diffusers", "transformer.", "dotted", ("*",), ("*",)),  # save_lora_weights of a diffusers pipeline
    ("diffusers", "base_model.model.", "dotted", ("*",), ("*",)),  # a PEFT model's own save
    ("comfy", "diffusion_model.", "dotted", ("*",), ("*",)),  # ComfyUI, ai-toolkit, musubi --target other
    ("kohya", "lora_unet_", "underscored", ("*",), ("*",)),  # musubi, sd-scripts, OneTrainer KOHYA_LORA
    ("kohya", "lora_transformer_", "underscored", ("*",), ("*",)),  # OneTrainer's older naming
    ("diffsynth", "", "dotted", ("peft_default",), ("*",)),  # DiffSynth-Studio: PEFT keys with the adapter name
    ("lightning", "", "dotted", ("kohya",), ("*",)),  # ModelTC Qwen-Image-Lightning (lightx2v)
    ("diffusers", "", "dotted", ("peft", "legacy"), ("*",)),  # diffusers save_lora_adapter: no prefix
)
# (key suffix, what it holds, style); the variants ComfyUI accepts (comfy/weight_adapter/lora.py)
LORA_SUFFIXES: tuple[tuple[str, str, str], ...] = (
    (".lora_A.default.weight", "down", "peft_default"),
    (".lora_B.default.weight", "up", "peft_default"),
    (".lora_A.weight", "down", "peft"),
    (".lora_B.weight", "up", "peft"),
    (".lora_A", "down", "peft"),
    (".lora_B", "up", "peft"),
    (".lora_down.weight", "down", "kohya"),
    (".lora_up.weight", "up", "kohya"),
    (".lora.down.weight", "down", "legacy"),
    (".lora.up.weight", "up", "legacy"),
    ("_lora.down.weight", "down", "legacy"),
    ("_lora.up.weight", "up", "legacy"),
    (".lora_linear_layer.down.weight", "down", "legacy"),
    (".lora_linear_layer.up.weight", "up", "legacy"),
    (".alpha", "alpha", "*"),  # kohya's 0-d alpha; any dialect may carry one, and it is always applied
)
# Names only one family's networks have, as key tokens ("." and "_" both separate tokens): a file naming them was
# made for that family. FLUX's diffusers names share transformer_blocks.i.attn.to_q with Qwen-Image, so only these
# tell the two apart; the SAI model-spec header (modelspec.architecture) is read as well.
LORA_FAMILY_MARKERS: dict[str, tuple[str, ...]] = {
    "flux": ("double_blocks", "single_blocks", "single_transformer_blocks", "img_attn", "txt_attn", "ff_context",
             "norm1_context"),
}
LORA_FAMILY_ARCHITECTURES: dict[str, tuple[str, ...]] = {"flux": ("flux",)}  # modelspec.architecture prefixes
LORA_FAMILY_NAMES: dict[str, str] = {"flux": "FLUX", "qwen-image": "Qwen-Image"}
# Adapters that are not a low-rank pair (down, up): read as one they would apply the wrong change, so they are
# refused by name until the reader builds their dense delta. (kind, key tokens, hint)
LORA_UNSUPPORTED: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("LyCORIS (LoKr/LoHa)", ("lycoris", "lokr_w1", "lokr_w2", "lokr_t2", "hada_w1_a", "hada_w1_b", "hada_w2_a",
                             "hada_w2_b", "hada_t1", "hada_t2"),
     "use a plain LoRA of the same adapter, or convert it to one"),
    ("DoRA", ("dora_scale", "lora_magnitude_vector"), "use a plain LoRA of the same adapter"),
)
# Key prefixes of text-encoder adapters: qimg applies LoRAs to the denoiser only, so these are reported unmatched.
LORA_TEXT_ENCODER_PREFIXES: tuple[str, ...] = ("lora_te", "text_encoder")  # lora_te1_, text_encoder_2., ...
