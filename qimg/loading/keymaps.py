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
# A new dialect is a new row; "*" accepts any suffix style of LORA_SUFFIXES, or any family.
# (dialect, key prefix, module spelling, suffix styles, families)
LORA_DIALECTS: tuple[tuple[str, str, str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("diffusers", "transformer.", "dotted", ("*",), ("*",)),  # save_lora_weights of a diffusers pipeline
    ("diffusers", "base_model.model.", "dotted", ("*",), ("*",)),  # a PEFT model's own save
    ("comfy", "diffusion_model.", "dotted", ("*",), ("*",)),  # ComfyUI, ai-toolkit, musubi --target other
    ("kohya", "lora_unet_", "underscored", ("*",), ("*",)),  # musubi, sd-scripts, OneTrainer KOHYA_LORA
    ("kohya", "lora_transformer_", "underscored", ("*",), ("*",)),  # OneTrainer's older naming
    # FLUX.1 on its BFL names (FLUX_BFL_MODULES): sd-scripts/musubi, ComfyUI/OneTrainer COMFY_LORA, fal Kontext, bare
    ("kohya", "lora_unet_", "bfl_underscored", ("*",), ("flux",)),
    ("comfy", "diffusion_model.", "bfl", ("*",), ("flux",)),
    ("fal", "base_model.model.", "bfl", ("*",), ("flux",)),
    # XLabs' x-flux trainer: its attention processors' names (FLUX_XLABS_MODULES), bare or as ComfyUI keeps them
    ("xlabs", "", "xlabs", ("xlabs",), ("flux",)),
    ("xlabs", "diffusion_model.", "xlabs", ("xlabs",), ("flux",)),
    ("bfl", "", "bfl", ("peft", "kohya"), ("flux",)),
    ("lycoris", "lycoris_", "underscored", ("lycoris", "kohya"), ("*",)),  # the LyCORIS library (SimpleTuner)
    ("diffsynth", "", "dotted", ("peft_default",), ("*",)),  # DiffSynth-Studio: PEFT keys with the adapter name
    ("lightning", "", "dotted", ("kohya",), ("*",)),  # ModelTC Qwen-Image-Lightning (lightx2v)
    ("diffusers", "", "dotted", ("peft", "legacy"), ("*",)),  # diffusers save_lora_adapter: no prefix
    ("lycoris", "", "dotted", ("lycoris",), ("*",)),  # bare module names: ComfyUI's Qwen-Image key map takes them
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
    # LyCORIS (KohakuBlueleaf/LyCORIS lycoris/modules/loha.py, lokr.py; ComfyUI comfy/weight_adapter/): the role is
    # the tensor's own name. LoHa: delta W = (w1_a @ w1_b) * (w2_a @ w2_b); LoKr: kron(W1, W2), each W whole or a pair.
    (".hada_w1_a", "hada_w1_a", "lycoris"),
    (".hada_w1_b", "hada_w1_b", "lycoris"),
    (".hada_w2_a", "hada_w2_a", "lycoris"),
    (".hada_w2_b", "hada_w2_b", "lycoris"),
    (".lokr_w1", "lokr_w1", "lycoris"),
    (".lokr_w1_a", "lokr_w1_a", "lycoris"),
    (".lokr_w1_b", "lokr_w1_b", "lycoris"),
    (".lokr_w2", "lokr_w2", "lycoris"),
    (".lokr_w2_a", "lokr_w2_a", "lycoris"),
    (".lokr_w2_b", "lokr_w2_b", "lycoris"),
    (".alpha", "alpha", "*"),  # kohya's 0-d alpha; any dialect may carry one, and it is always applied
)
# Suffixes only the rows naming their style read, never a "*" row: a bare ".down.weight" is a LoRA matrix only on
# XLabs' processor names (x-flux LoRALinearLayer's down/up). Kept out of LORA_SUFFIXES, which also tells a LoRA
# from a transformer file (single_file.py), where so loose a suffix would say too much.
LORA_OWN_SUFFIXES: tuple[tuple[str, str, str], ...] = (
    (".down.weight", "down", "xlabs"),
    (".up.weight", "up", "xlabs"),
)
# The adapter kinds, by the roles that make one whole: each kind is a tuple of factors, each factor the role sets that
# may give it (LoKr stores W1 and W2 either whole or as a low-rank pair, never both). An alpha may come with any kind.
# A module whose roles make no whole kind is reported unmatched, like half a LoRA pair.
LORA_KINDS: dict[str, tuple[tuple[tuple[str, ...], ...], ...]] = {
    "LoRA": ((("down", "up"),),),
    "LoHa": ((("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),),),
    "LoKr": ((("lokr_w1",), ("lokr_w1_a", "lokr_w1_b")), (("lokr_w2",), ("lokr_w2_a", "lokr_w2_b"))),
}
# Names only one family's networks have, as key tokens ("." and "_" both separate tokens): a file naming them was
# made for that family. FLUX's diffusers names share transformer_blocks.i.attn.to_q with Qwen-Image, so only these
# tell the two apart; the SAI model-spec header (modelspec.architecture) is read as well.
LORA_FAMILY_MARKERS: dict[str, tuple[str, ...]] = {
    "flux": ("double_blocks", "single_blocks", "single_transformer_blocks", "img_attn", "txt_attn", "ff_context",
             "norm1_context"),
}
# Names only Qwen-Image's denoiser has, read by the LoRA loader only (a FLUX model refuses a Qwen-Image LoRA by them).
# Qwen-Image's attention names (attn.to_q, attn.add_q_proj) are FLUX's diffusers names too, so a LoRA on those alone
# cannot be told apart by its keys.
LORA_ONLY_FAMILY_MARKERS: dict[str, tuple[str, ...]] = {
    "qwen-image": ("img_mlp.net", "txt_mlp.net", "img_mod.1", "txt_mod.1", "txt_norm"),
}
# modelspec.architecture prefixes
LORA_FAMILY_ARCHITECTURES: dict[str, tuple[str, ...]] = {"flux": ("flux",), "qwen-image": ("qwen-image", "qwen_image")}
LORA_FAMILY_NAMES: dict[str, str] = {"flux": "FLUX", "qwen-image": "Qwen-Image"}
# Adapters qimg cannot apply exactly: refused by name, since read as a LoRA they would apply the wrong change.
# (kind, key tokens, hint)
LORA_UNSUPPORTED: tuple[tuple[str, tuple[str, ...], str], ...] = (
    # LyCORIS writes Tucker cores only for conv kernels larger than 1x1 (use_tucker); these denoisers have none
    ("LyCORIS Tucker (conv)", ("hada_t1", "hada_t2", "lokr_t1", "lokr_t2"),
     "Tucker cores are for conv kernels and this denoiser's LoRA targets are linears; train without use_tucker"),
    ("DoRA", ("dora_scale", "lora_magnitude_vector"), "use a plain LoRA of the same adapter"),
)
# Key prefixes of text-encoder adapters: qimg applies LoRAs to the denoiser only, so these are reported unmatched.
LORA_TEXT_ENCODER_PREFIXES: tuple[str, ...] = ("lora_te", "text_encoder")  # lora_te1_, text_encoder_2., ...

# FLUX.1's BFL module names (the official checkpoint, ComfyUI, sd-scripts, fal) -> the diffusers linears of qimg's FLUX
# net ("{i}": a block index). A fused BFL linear names several: its output rows split among them in this order, each
# as many rows as its own linear has (diffusers lora_conversion_utils._convert_kohya_flux_lora_to_diffusers).
FLUX_BFL_MODULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("double_blocks.{i}.img_attn.qkv", ("transformer_blocks.{i}.attn.to_q", "transformer_blocks.{i}.attn.to_k",
                                        "transformer_blocks.{i}.attn.to_v")),
    ("double_blocks.{i}.img_attn.proj", ("transformer_blocks.{i}.attn.to_out.0",)),
    ("double_blocks.{i}.img_mlp.0", ("transformer_blocks.{i}.ff.net.0.proj",)),
    ("double_blocks.{i}.img_mlp.2", ("transformer_blocks.{i}.ff.net.2",)),
    ("double_blocks.{i}.img_mod.lin", ("transformer_blocks.{i}.norm1.linear",)),
    ("double_blocks.{i}.txt_attn.qkv", ("transformer_blocks.{i}.attn.add_q_proj",
                                        "transformer_blocks.{i}.attn.add_k_proj",
                                        "transformer_blocks.{i}.attn.add_v_proj")),
    ("double_blocks.{i}.txt_attn.proj", ("transformer_blocks.{i}.attn.to_add_out",)),
    ("double_blocks.{i}.txt_mlp.0", ("transformer_blocks.{i}.ff_context.net.0.proj",)),
    ("double_blocks.{i}.txt_mlp.2", ("transformer_blocks.{i}.ff_context.net.2",)),
    ("double_blocks.{i}.txt_mod.lin", ("transformer_blocks.{i}.norm1_context.linear",)),
    ("single_blocks.{i}.linear1", ("single_transformer_blocks.{i}.attn.to_q",
                                   "single_transformer_blocks.{i}.attn.to_k",
                                   "single_transformer_blocks.{i}.attn.to_v",
                                   "single_transformer_blocks.{i}.proj_mlp")),
    ("single_blocks.{i}.linear2", ("single_transformer_blocks.{i}.proj_out",)),
    ("single_blocks.{i}.modulation.lin", ("single_transformer_blocks.{i}.norm.linear",)),
    ("img_in", ("x_embedder",)),
    ("txt_in", ("context_embedder",)),
    ("time_in.in_layer", ("time_text_embed.timestep_embedder.linear_1",)),
    ("time_in.out_layer", ("time_text_embed.timestep_embedder.linear_2",)),
    ("vector_in.in_layer", ("time_text_embed.text_embedder.linear_1",)),
    ("vector_in.out_layer", ("time_text_embed.text_embedder.linear_2",)),
    ("guidance_in.in_layer", ("time_text_embed.guidance_embedder.linear_1",)),
    ("guidance_in.out_layer", ("time_text_embed.guidance_embedder.linear_2",)),
    ("final_layer.linear", ("proj_out",)),
    ("final_layer.adaLN_modulation.1", ("norm_out.linear",)),
)
# BFL modules whose output halves are (shift, scale) where the diffusers linear has (scale, shift): the up rows swap.
FLUX_BFL_SWAPPED: tuple[str, ...] = ("final_layer.adaLN_modulation.1",)
# XLabs' processor LoRAs (x-flux DoubleStreamBlockLoraProcessor / SingleStreamBlockLoraProcessor) -> the diffusers
# linears they add to, split like FLUX_BFL_MODULES (diffusers lora_conversion_utils._convert_xlabs_flux_lora_to_
# diffusers). lora1 is the image stream, lora2 the text stream. A single block's qkv_lora adds to linear1's q, k, v
# rows only (never proj_mlp); its proj_lora reads linear2's whole input (attention output and MLP activation).
FLUX_XLABS_MODULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("double_blocks.{i}.processor.qkv_lora1", ("transformer_blocks.{i}.attn.to_q", "transformer_blocks.{i}.attn.to_k",
                                               "transformer_blocks.{i}.attn.to_v")),
    ("double_blocks.{i}.processor.proj_lora1", ("transformer_blocks.{i}.attn.to_out.0",)),
    ("double_blocks.{i}.processor.qkv_lora2", ("transformer_blocks.{i}.attn.add_q_proj",
                                               "transformer_blocks.{i}.attn.add_k_proj",
                                               "transformer_blocks.{i}.attn.add_v_proj")),
    ("double_blocks.{i}.processor.proj_lora2", ("transformer_blocks.{i}.attn.to_add_out",)),
    ("single_blocks.{i}.processor.qkv_lora", ("single_transformer_blocks.{i}.attn.to_q",
                                              "single_transformer_blocks.{i}.attn.to_k",
                                              "single_transformer_blocks.{i}.attn.to_v")),
    ("single_blocks.{i}.processor.proj_lora", ("single_transformer_blocks.{i}.proj_out",)),
)
# BFL's FLUX.1 Control LoRAs (FLUX.1-Canny-dev-lora, -Depth-dev-lora) replace every QK-norm scale outright (plain
# tensors next to the LoRA pairs: diffusers tells them by "query_norm.scale", lora_pipeline.lora_state_dict) and
# widen img_in / x_embedder to twice the latent channels: the control image's latents are concatenated to the
# noise (FluxControlPipeline). Without that pipeline they cannot run, so they are refused by these key endings or
# by an img_in down that is twice as wide as the model's.
FLUX_CONTROL_MARKERS: tuple[str, ...] = ("norm.query_norm.scale", "norm.key_norm.scale")
FLUX_CONTROL_EMBEDDERS: tuple[str, ...] = ("img_in", "x_embedder")  # BFL and diffusers names of the patch embedder
