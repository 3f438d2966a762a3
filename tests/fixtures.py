"""Helpers that write tiny random models in the official diffusers layout (the test-only oracle builds them)."""

from __future__ import annotations

import math

import torch
from torch import nn


@torch.no_grad()
def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter a random value (diffusers zero-initialises some layers, and zeros hide bugs).

    Norm gains get 1 + noise; other tensors get noise scaled by 1/sqrt(fan_in) so activations stay O(1).
    """
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "gamma" or ("norm" in name and leaf == "weight" and p.ndim == 1):
            value = 1.0 + 0.1 * noise
        elif p.ndim >= 2:
            fan_in = math.prod(p.shape[1:])
            value = noise / math.sqrt(fan_in)
        else:
            value = 0.1 * noise
        p.copy_(value.to(p.dtype))
    return module


# Special tokens of Qwen2 / Qwen2.5-VL, in id order from 151643 (offline_fixtures.md).
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
)  # fmt: skip
QWEN_PRETOKENIZE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def qwen_tiktoken_path():
    """qwen.tiktoken as shipped inside the dashscope wheel (found without importing dashscope)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("dashscope")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the test extra is not installed: pip install -e '.[test]' (needs dashscope)")
    return Path(next(iter(spec.submodule_search_locations))) / "resources" / "qwen.tiktoken"


def build_qwen_tokenizer(out_dir) -> None:
    """The real Qwen2 tokenizer, rebuilt offline from the BPE ranks, saved as a tokenizer/ folder."""
    from tokenizers import AddedToken
    from transformers import Qwen2TokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(vocab_file=str(qwen_tiktoken_path()), pattern=QWEN_PRETOKENIZE).converted()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
    tok = Qwen2TokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.save_pretrained(out_dir)


TINY_MMDIT = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16,
                  num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6))
TINY_VAE = dict(base_dim=16, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, attn_scales=[],
                temperal_downsample=[False, True, True])
QWEN_SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, shift=1.0,
                      shift_terminal=0.02, time_shift_type="exponential", use_dynamic_shifting=True)


def tiny_text_encoder(seed: int = 0):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, rope_theta=1e6),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[1],
                           window_size=112),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
    )
    torch.manual_seed(seed)
    return randomize_(Qwen2_5_VLForConditionalGeneration(config).eval(), seed)


def write_tiny_qwen_image(root, tokenizer_dir, *, seed: int = 0, transformer_shard_size: str | None = None):
    """A tiny random Qwen-Image in the official layout, written by diffusers' own save_pretrained.

    transformer_shard_size (e.g. "200KB") writes the transformer as shards with an index, as the Hub does.
    """
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import AutoTokenizer

    pipe = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER),
        vae=randomize_(AutoencoderKLQwenImage(**TINY_VAE).eval(), seed + 1),
        text_encoder=tiny_text_encoder(seed + 2),
        tokenizer=AutoTokenizer.from_pretrained(tokenizer_dir),
        transformer=randomize_(QwenImageTransformer2DModel(**TINY_MMDIT).eval(), seed + 3),
    )
    pipe.save_pretrained(root)
    if transformer_shard_size:
        import shutil

        shutil.rmtree(f"{root}/transformer")
        pipe.transformer.save_pretrained(f"{root}/transformer", max_shard_size=transformer_shard_size)
    return pipe
