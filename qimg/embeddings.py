"""Prompt embeddings as a file: encode once with the text encoder, then generate without ever loading it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from qimg.errors import InputError

FORMAT = "qimg.prompt-embeds/1"


@dataclass
class PromptEmbeds:
    """Text conditioning for one prompt: embeds (1, L, D), a (1, L) mask (None when no token is padding) and,
    for families that condition on one (FLUX.1: CLIP's), a pooled vector (1, P)."""

    embeds: Tensor
    mask: Tensor | None = None
    pooled: Tensor | None = None

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> PromptEmbeds:
        mask = None if self.mask is None else self.mask.to(device)
        pooled = None if self.pooled is None else self.pooled.to(device, dtype)
        return PromptEmbeds(self.embeds.to(device, dtype), mask, pooled)


@dataclass
class EmbeddingsFile:
    """What `qimg encode-prompt` writes: positive (and optional negative) embeddings plus their provenance."""

    cond: PromptEmbeds
    uncond: PromptEmbeds | None
    meta: dict[str, Any] = field(default_factory=dict)  # family, template, prompt, negative, text_encoder, ...


def _dense(p: PromptEmbeds) -> tuple[Tensor, Tensor]:
    mask = p.mask if p.mask is not None else torch.ones(p.embeds.shape[:2], dtype=torch.long)
    return p.embeds.detach().cpu().contiguous(), mask.detach().cpu().to(torch.long).contiguous()


def save_embeddings(path: str | Path, data: EmbeddingsFile, *, overwrite: bool = False) -> Path:
    """Write the embeddings as safetensors with string metadata, atomically."""
    from safetensors.torch import save

    from qimg.png import check_output_path, write_atomic

    out = check_output_path(path, overwrite=overwrite, suffix=".safetensors")
    tensors = {}
    for prefix, p in (("prompt", data.cond), ("negative", data.uncond)):
        if p is None:
            continue
        tensors[f"{prefix}_embeds"], tensors[f"{prefix}_mask"] = _dense(p)
        if p.pooled is not None:
            tensors[f"{prefix}_pooled"] = p.pooled.detach().cpu().contiguous()
    meta = {"format": FORMAT, **{k: v if isinstance(v, str) else json.dumps(v) for k, v in data.meta.items()}}
    data = save(tensors, metadata=meta)
    return write_atomic(out, lambda f: f.write(data), overwrite=overwrite)


def _meta_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def load_embeddings(path: str | Path) -> EmbeddingsFile:
    """Read a file written by save_embeddings; anything else is a clear InputError."""
    from safetensors import safe_open

    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(f"prompt embeddings file {p} does not exist", hint="create it with: qimg encode-prompt")
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own types for foreign or truncated files
        raise InputError(f"{p} is not a safetensors file ({e})", hint="create it with: qimg encode-prompt") from e
    if meta.get("format") != FORMAT or "prompt_embeds" not in tensors:
        raise InputError(f"{p} was not written by qimg encode-prompt", hint="create it with: qimg encode-prompt")

    def read(prefix: str) -> PromptEmbeds | None:
        if f"{prefix}_embeds" not in tensors:
            return None
        m = tensors.get(f"{prefix}_mask")
        if m is None:
            raise InputError(f"{p} lacks {prefix}_mask", hint="create it again with: qimg encode-prompt")
        return PromptEmbeds(tensors[f"{prefix}_embeds"], None if bool(m.all()) else m, tensors.get(f"{prefix}_pooled"))

    cond = read("prompt")
    assert cond is not None
    meta.pop("format")
    return EmbeddingsFile(cond, read("negative"), {k: _meta_value(v) for k, v in meta.items()})
