"""The language model of Qwen2.5-VL (Qwen-Image's text encoder) for text-only prompts: a Qwen2 decoder (Yang et al.
2024) whose last hidden state conditions the image model.

Qwen2.5-VL's multimodal RoPE gives each token three position ids (time, height, width) and rotates three sections
of every head by one each; a token of text has the same id on all three axes, so for a prompt without images it is
the plain RoPE of positions 0..L-1, which is what this net computes. Module names follow transformers 5's
Qwen2_5_VLForConditionalGeneration (`model.language_model.layers.N.self_attn.q_proj`, ...), so the loader, the FP8
predicate and the memory plans treat both the same; prompts with images (edit models) still go through
transformers, which holds the vision tower.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qimg.nets.layers import RMSNorm


@dataclass(frozen=True)
class QwenTextParams:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> QwenTextParams:
        """From text_encoder/config.json in either layout: transformers 5 nests the language model's settings under
        "text_config", 4.x keeps them at the top; rope_theta sits in "rope_parameters" in 5.x. Anything but the
        default RoPE (scaling of any kind) is refused rather than computed wrongly."""
        text = config.get("text_config") or config
        rope = text.get("rope_parameters") or {}
        kind = rope.get("rope_type", "default")
        scaling = text.get("rope_scaling") or {}
        if kind != "default" or scaling.get("type", scaling.get("rope_type", "mrope")) not in ("mrope", "default"):
            raise ValueError(f"unsupported RoPE settings for the Qwen text encoder: {rope or scaling}")
        heads = int(text["num_attention_heads"])
        hidden = int(text["hidden_size"])
        return cls(
            vocab_size=int(text["vocab_size"]), hidden_size=hidden, intermediate_size=int(text["intermediate_size"]),
            num_hidden_layers=int(text["num_hidden_layers"]), num_attention_heads=heads,
            num_key_value_heads=int(text.get("num_key_value_heads") or heads),
            head_dim=int(text.get("head_dim") or hidden // heads), rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", text.get("rope_theta", 1e6))),
        )


def rope_cos_sin(length: int, head_dim: int, theta: float, device: torch.device, dtype: torch.dtype
                 ) -> tuple[Tensor, Tensor]:
    """cos and sin (length, head_dim) for positions 0..length-1, in the rotate-half layout (both halves share a
    frequency), computed in fp32 and rounded to dtype, as transformers does (its inverse frequencies on the CPU,
    where a GPU's pow could round differently)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    inv_freq = inv_freq.to(device)
    freqs = torch.arange(length, device=device).float()[:, None] * inv_freq[None, :]
    angles = torch.cat([freqs, freqs], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate_half(x: Tensor) -> Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


class QwenTextAttention(nn.Module):
    def __init__(self, p: QwenTextParams) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = p.num_attention_heads, p.num_key_value_heads, p.head_dim
        self.q_proj = nn.Linear(p.hidden_size, p.num_attention_heads * p.head_dim)
        self.k_proj = nn.Linear(p.hidden_size, p.num_key_value_heads * p.head_dim)
        self.v_proj = nn.Linear(p.hidden_size, p.num_key_value_heads * p.head_dim)
        self.o_proj = nn.Linear(p.num_attention_heads * p.head_dim, p.hidden_size, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        b, length, _ = x.shape
        q = self.q_proj(x).view(b, length, self.heads, self.head_dim).transpose(1, 2)  # (B, H, L, D)
        k = self.k_proj(x).view(b, length, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, length, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        if self.kv_heads != self.heads:  # grouped-query attention: each key/value head serves a run of query heads
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=length > 1)
        return self.o_proj(out.transpose(1, 2).reshape(b, length, self.heads * self.head_dim))


class QwenTextMLP(nn.Module):
    def __init__(self, p: QwenTextParams) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(p.hidden_size, p.intermediate_size, bias=False)
        self.up_proj = nn.Linear(p.hidden_size, p.intermediate_size, bias=False)
        self.down_proj = nn.Linear(p.intermediate_size, p.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class QwenTextLayer(nn.Module):
    """One pre-norm decoder layer: causal self-attention, then a SwiGLU MLP, each around a residual."""

    def __init__(self, p: QwenTextParams) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(p.hidden_size, p.rms_norm_eps)
        self.self_attn = QwenTextAttention(p)
        self.post_attention_layernorm = RMSNorm(p.hidden_size, p.rms_norm_eps)
        self.mlp = QwenTextMLP(p)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class QwenLanguageModel(nn.Module):
    def __init__(self, p: QwenTextParams) -> None:
        super().__init__()
        self.params = p
        self.embed_tokens = nn.Embedding(p.vocab_size, p.hidden_size)
        self.layers = nn.ModuleList(QwenTextLayer(p) for _ in range(p.num_hidden_layers))
        self.norm = RMSNorm(p.hidden_size, p.rms_norm_eps)

    def forward(self, input_ids: Tensor) -> Tensor:
        """input_ids (B, L) of unpadded prompts -> the last hidden state (B, L, hidden), after the final norm."""
        x = self.embed_tokens(input_ids)
        p = self.params
        cos, sin = rope_cos_sin(input_ids.shape[1], p.head_dim, p.rope_theta, x.device, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x)


class _Inner(nn.Module):
    """transformers' `model` level, which holds the language model (and, there, the vision tower)."""

    def __init__(self, p: QwenTextParams) -> None:
        super().__init__()
        self.language_model = QwenLanguageModel(p)
        self.visual = None


class QwenTextEncoder(nn.Module):
    """Qwen2.5-VL's language model for text-only prompts: encode(input_ids) -> the last hidden state."""

    def __init__(self, p: QwenTextParams) -> None:
        super().__init__()
        self.model = _Inner(p)
        self.lm_head = nn.Identity()  # prompt encoding never reads the logits

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.model.language_model(input_ids)
