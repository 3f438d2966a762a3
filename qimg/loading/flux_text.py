"""FLUX.1's text side from a diffusers-layout folder: CLIP-L (text_encoder/, tokenizer/) and T5-v1.1-XXL
(text_encoder_2/, tokenizer_2/), through transformers, from safetensors only and strict about keys."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from qimg.errors import ModelNotFoundError
from qimg.loading import components
from qimg.loading.checkpoint import check_keys, load_module, safetensors_files

# What each folder holds, for the one-line error when it is absent.
ROLES = {
    "text_encoder": "the CLIP-L text encoder",
    "text_encoder_2": "the T5-XXL text encoder",
    "tokenizer": "the CLIP tokenizer",
    "tokenizer_2": "the T5 tokenizer",
}
# Buffers older transformers saved that the current models rebuild (CLIP's position ids).
_KNOWN_UNUSED = ("text_model.embeddings.position_ids",)
_T5_BLOCK = re.compile(r"encoder\.block\.\d+\.")


def require_folder(folder: Path) -> None:
    """A FLUX component folder must exist: say which one is missing and what it holds, in one line."""
    if not folder.is_dir():
        what = ROLES.get(folder.name, "a component")
        raise ModelNotFoundError(f"{folder.parent} has no {folder.name}/ ({what} FLUX.1 needs)",
                                 hint="point --model at a complete FLUX.1 folder, or download the model again")


def load_clip_tokenizer(folder: Path) -> Any:
    """tokenizer/: CLIP's BPE tokenizer (vocab.json + merges.txt as released, or a tokenizer.json)."""
    # transformers 5 builds a 3-token CLIP tokenizer, without a word of warning, from a folder missing its vocab.
    _require_files(folder, (("vocab.json", "merges.txt"), ("tokenizer.json",)))
    return components.load_tokenizer(folder)


def load_t5_tokenizer(folder: Path) -> Any:
    """tokenizer_2/: T5's tokenizer from its tokenizer.json (spiece.model alone would need sentencepiece)."""
    # Without tokenizer.json transformers 5 silently falls back to a 104-token T5 vocabulary.
    _require_files(folder, (("tokenizer.json",),))
    return components.load_tokenizer(folder)


def _require_files(folder: Path, choices: tuple[tuple[str, ...], ...]) -> None:
    require_folder(folder)
    if not any(all((folder / name).is_file() for name in names) for names in choices):
        wanted = " or ".join(" + ".join(names) for names in choices)
        raise ModelNotFoundError(f"{folder} has no {wanted}", hint="download the model again")


def load_clip_text_model(folder: Path, *, device: torch.device | str, dtype: torch.dtype) -> Any:
    """text_encoder/: transformers' CLIPTextModel (FLUX reads only its pooled output)."""
    from transformers import CLIPTextModel

    return _load_pretrained(CLIPTextModel, folder, device, dtype)


def load_t5_encoder(folder: Path, *, device: torch.device | str | None, dtype: torch.dtype,
                    on_block: Callable[[int, nn.Module], None] | None = None) -> Any:
    """text_encoder_2/: transformers' T5EncoderModel, read block by block from its safetensors (memory-mapped), so
    host memory never holds the whole 9.5 GB encoder: on_block(i, block) runs right after block i is in place (FP8
    quantisation, packing into pinned memory, or a move to the GPU, one block at a time). Strict about keys, as
    every qimg loader; in float16 the FFN output linears `wo` stay float32, as transformers keeps them. device
    None leaves the blocks where on_block put them (the rest on the CPU)."""
    from transformers import T5Config, T5EncoderModel

    require_folder(folder)
    components.require_safetensors_model(folder)
    config = T5Config.from_pretrained(folder)
    fp32 = tuple(f".{m}.weight" for m in T5EncoderModel._keep_in_fp32_modules or ()) if dtype == torch.float16 else ()

    def convert(name: str, tensor: Tensor) -> Tensor:
        if not tensor.is_floating_point():
            return tensor
        return tensor.to(torch.float32 if name.endswith(fp32) else dtype)

    def group(name: str) -> str | None:
        m = _T5_BLOCK.match(name)
        return None if m is None else m.group(0)[:-1]

    def placed(prefix: str, model: nn.Module) -> None:
        if on_block is not None:
            on_block(int(prefix.rsplit(".", 1)[1]), model.get_submodule(prefix))

    model = load_module(lambda: T5EncoderModel(config), safetensors_files(folder, stem="model"),
                        convert=convert, group=group, on_group=placed, aliases=("encoder.embed_tokens.weight",),
                        what=f"{folder.name}/ weights")
    model.encoder.set_input_embeddings(model.shared)  # the tie the meta build made points at a meta tensor
    model = model.eval().requires_grad_(False)
    return model if device is None else model.to(device)


def _load_pretrained(cls: Any, folder: Path, device: torch.device | str, dtype: torch.dtype) -> Any:
    """A transformers model from a folder's model.safetensors (or its shards), refusing pickles before transformers
    sees the folder, and any missing or unexpected weight (transformers would only warn)."""
    from transformers.utils import logging as hf_logging

    require_folder(folder)
    components.require_safetensors_model(folder)
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # qimg's CLI owns the terminal
    try:
        # ignore_mismatched_sizes: report a wrongly shaped tensor below, in one line, instead of transformers'
        # RuntimeError after its table.
        model, info = cls.from_pretrained(folder, dtype=dtype, output_loading_info=True, low_cpu_mem_usage=True,
                                          use_safetensors=True, ignore_mismatched_sizes=True)
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    # A key tied to another (T5's encoder.embed_tokens to shared) is filled from that one, not from the file.
    tied = getattr(model, "all_tied_weights_keys", None) or {}

    def used(key: str) -> bool:
        return key not in tied and key not in _KNOWN_UNUSED

    missing = sorted(k for k in info.get("missing_keys", []) if used(k))
    unexpected = sorted(k for k in info.get("unexpected_keys", []) if used(k))
    mismatched = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys", []))
    check_keys(f"{folder.name}/ weights", missing, unexpected, mismatched)
    return model.to(device).eval().requires_grad_(False)
