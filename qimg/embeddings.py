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
    """Text conditioning for one prompt: embeds (1, L, D) and a (1, L) mask, None when no token is padding."""

    embeds: Tensor
    mask: Tensor | None = None

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> PromptEmbeds:
        mask = None if self.mask is None else self.mask.to(device)
        return PromptEmbeds(self.embeds.to(device, dtype), mask)


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
    tensors["prompt_embeds"], tensors["prompt_mask"] = _dense(data.cond)
    if data.uncond is not None:
        tensors["negative_embeds"], tensors["negative_mask"] = _dense(data.uncond)
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

    def pair(embeds: str, mask: str) -> PromptEmbeds | None:
        if embeds not in tensors:
            return None
        m = tensors[mask]
        return PromptEmbeds(tensors[embeds], None if bool(m.all()) else m)

    cond = pair("prompt_embeds", "prompt_mask")
    assert cond is not None
    meta.pop("format")
    return EmbeddingsFile(cond, pair("negative_embeds", "negative_mask"), {k: _meta_value(v) for k, v in meta.items()})
