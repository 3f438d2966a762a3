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
    except (ValueError, RecursionError):  # RecursionError: "[[[[..." nested past the recursion limit
        return raw


# Metadata qimg reads back, by type. Text is stored as is, so a prompt "42" or "[1]" stays text (save_embeddings
# writes a missing negative as "null").
_TEXT_META = ("family", "template", "model", "text_encoder", "text_encoder_2", "prompt", "negative", "dtype",
              "qimg_version")
_TYPED_META = {"images": list, "max_sequence_length": int, "dropped_tokens": dict}
_EMBED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


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
        why = repr(str(e))[1:-1]  # one line: the reason may quote a tensor name holding a newline
        raise InputError(f"{p} is not a safetensors file ({why})", hint="create it with: qimg encode-prompt") from e
    if meta.get("format") != FORMAT or "prompt_embeds" not in tensors:
        raise InputError(f"{p} was not written by qimg encode-prompt", hint="create it with: qimg encode-prompt")
    again = "create it again with: qimg encode-prompt"

    def read(prefix: str) -> PromptEmbeds | None:
        if f"{prefix}_embeds" not in tensors:
            return None
        e, m, pooled = (tensors.get(f"{prefix}_{part}") for part in ("embeds", "mask", "pooled"))
        if m is None:
            raise InputError(f"{p} lacks {prefix}_mask", hint=again)
        # What the pipelines take: (1, L, D) float embeddings, a (1, L) 0/1 mask, a (1, P) float pooled vector.
        if e.dim() != 3 or e.shape[0] != 1 or 0 in e.shape or e.dtype not in _EMBED_DTYPES:
            raise InputError(f"{p} has {prefix}_embeds of shape {tuple(e.shape)} and dtype {e.dtype}, not "
                             "(1, tokens, width) floats", hint=again)
        if m.shape != e.shape[:2] or m.is_floating_point() or m.is_complex() or not bool(((m == 0) | (m == 1)).all()):
            raise InputError(f"{p} has a {prefix}_mask of shape {tuple(m.shape)} and dtype {m.dtype}, not "
                             f"{tuple(e.shape[:2])} zeros and ones", hint=again)
        if pooled is not None and (pooled.dim() != 2 or pooled.shape[0] != 1 or 0 in pooled.shape
                                   or pooled.dtype not in _EMBED_DTYPES):
            raise InputError(f"{p} has {prefix}_pooled of shape {tuple(pooled.shape)} and dtype {pooled.dtype}, "
                             "not (1, width) floats", hint=again)
        return PromptEmbeds(e, None if bool(m.all()) else m.to(torch.long), pooled)

    cond, uncond = read("prompt"), read("negative")
    assert cond is not None
    for part in ("embeds", "pooled"):
        a, b = getattr(cond, part), None if uncond is None else getattr(uncond, part)
        if a is not None and b is not None and a.shape[-1] != b.shape[-1]:
            raise InputError(f"{p} has prompt_{part} of width {a.shape[-1]} but negative_{part} of width "
                             f"{b.shape[-1]}", hint=again)
    meta.pop("format")
    values = {k: v if k in _TEXT_META else _meta_value(v) for k, v in meta.items()}
    if values.get("negative") == "null":
        values["negative"] = None
    for key, kind in _TYPED_META.items():
        if key in values and not (isinstance(values[key], kind) and not isinstance(values[key], bool)):
            raise InputError(f"{p} has a damaged {key} entry in its metadata ({meta[key][:40]!r})", hint=again)
    return EmbeddingsFile(cond, uncond, values)
