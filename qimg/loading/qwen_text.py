"""Qwen-Image's text encoder (Qwen2.5-VL through transformers) read layer by layer from its safetensors, so host
memory never holds the whole 15 GB model: each decoder layer (and, for edit models, each vision block) is handed
to the caller as it arrives, to be quantised, packed into pinned memory or moved to the GPU before the next one is
read. The parts prompt encoding never reads (the LM head; the vision tower for text-to-image) are not read at all.

Text-only prompts (text to image) need the language model alone: it is qimg's own net (nets/qwen_text.py), so
loading it imports nothing from transformers (seconds of a cron job's start). Edit models get transformers'
Qwen2.5-VL with its vision tower.

The released files name the language model `model.layers.N` and the vision tower `visual.*`; transformers 5
nests them as `model.language_model.layers.N` and `model.visual.*`. Each stored key is matched to the network
built for its config (either layout), and loading is strict: a key that names nothing, a missing or misshapen
tensor is one error. The rotary tables are non-persistent buffers that a network built on the meta device lacks;
they come from a one-head, one-layer copy of the network built on the CPU from the same config.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qimg.errors import ConfigError
from qimg.loading.checkpoint import GroupFill, load_module, meta_device, open_checkpoint, read_json, safetensors_files
from qimg.nets.qwen_text import QwenTextEncoder, QwenTextParams

LayerHook = Callable[[str, int, nn.Module], None]  # (kind "layers" or "blocks", index, module)
# (index, decoder layer as built on the meta device, fill(module, device)): a layer left unread, with its reader.
LaterHook = Callable[[int, nn.Module, GroupFill], None]
_GROUP = re.compile(r"^(model\.(?:language_model\.)?layers\.\d+|(?:model\.)?visual\.blocks\.\d+)\.")


def load_qwen_text_encoder(folder: Path, *, dtype: torch.dtype, vision: bool = True, head: bool = True,
                           on_layer: LayerHook | None = None, later: LaterHook | None = None,
                           read_to: torch.device | str = "cpu") -> Any:
    """text_encoder/ read into `read_to` (or moved wherever on_layer put each layer), in eval mode without
    gradients: with vision, transformers' Qwen2_5_VLForConditionalGeneration (head False: the LM head is not read,
    `lm_head = Identity`; a file without one loads too, older exports omit it); without, qimg's QwenTextEncoder,
    the language model alone (no vision tower, no LM head, neither read; transformers is not imported). later:
    the decoder layers are not read; each goes to later(index, layer, fill) with the function that reads it when
    wanted (load_module's on_later)."""
    files = safetensors_files(folder, stem="model")
    stored = list(open_checkpoint(files))
    if not vision:
        return _load_language_model(folder, files, stored, dtype, on_layer, later, read_to)
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    config = AutoConfig.from_pretrained(folder)

    def build() -> nn.Module:
        return Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype)

    with meta_device():
        network = build()  # built once: its names choose the renames, then load_module fills it
    names = set(network.state_dict())
    rename = {key: _network_name(key, names) for key in stored}
    skipped: set[str] = set()
    tied = any(getattr(c, "tie_word_embeddings", False) for c in (config, getattr(config, "text_config", None)))
    if not head or tied or "lm_head.weight" not in rename.values():
        skipped.add("lm_head.weight")

    model = load_module(lambda: network, files, device=read_to, dtype=dtype, rename=rename, aliases=sorted(skipped),
                        what=f"{folder.name}/ weights", **_by_layer(on_layer, later))
    _fill_rotary_tables(model, config, dtype)
    if not head:
        model.lm_head = nn.Identity()  # ~1 GiB of logits weights the prompt encoding never reads
    elif tied or "lm_head.weight" in skipped:
        # Tied as the config says, or (a file without one) bound to the embeddings rather than left on the meta
        # device: prompt encoding never reads it, but the module must be movable.
        model.lm_head.weight = model.get_input_embeddings().weight
    return model.eval().requires_grad_(False)


def _load_language_model(folder: Path, files: list[Path], stored: list[str], dtype: torch.dtype,
                         on_layer: LayerHook | None, later: LaterHook | None,
                         read_to: torch.device | str) -> QwenTextEncoder:
    """The language model alone, as qimg's own net (nets/qwen_text.py): no transformers import, no rotary
    buffers to rebuild. The vision tower's and the LM head's tensors are left unread."""
    try:
        params = QwenTextParams.from_config(read_json(folder / "config.json"))
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{folder / 'config.json'} does not describe a Qwen2.5-VL language model ({e})",
                          hint="re-download the model") from e
    with meta_device():
        network = QwenTextEncoder(params)
    names = set(network.state_dict())
    rename = {key: _network_name(key, names) for key in stored}
    model = load_module(lambda: network, files, device=read_to, dtype=dtype, rename=rename,
                        what=f"{folder.name}/ weights", known_unused=("visual.*", "model.visual.*", "lm_head.weight"),
                        **_by_layer(on_layer, later))
    return model.eval().requires_grad_(False)


def _by_layer(on_layer: LayerHook | None, later: LaterHook | None) -> dict[str, Any]:
    """load_module's arguments that hand each decoder layer (and vision block) to on_layer as it arrives, or to
    later with its reader when the decoder layers are left unread."""

    def group(name: str) -> str | None:
        m = _GROUP.match(name)
        return None if m is None else m.group(1)

    def arrived(prefix: str, model: nn.Module) -> None:
        if on_layer is not None:
            kind, _, i = prefix.rpartition(".")
            on_layer(kind.rpartition(".")[2], int(i), model.get_submodule(prefix))

    def deferred(prefix: str, model: nn.Module, fill: GroupFill) -> None:
        if later is not None:
            later(int(prefix.rpartition(".")[2]), model.get_submodule(prefix), fill)

    lazy = {} if later is None else {"later": lambda prefix: ".layers." in f".{prefix}", "on_later": deferred}
    return {"group": group, "on_group": arrived, **lazy}


def _network_name(key: str, names: set[str]) -> str:
    """The network's name for a stored key, in either transformers layout; the key itself when nothing fits (the
    strict load then reports it as unexpected)."""
    if key in names:
        return key
    for old, new in (("model.", "model.language_model."), ("visual.", "model.visual.")):
        if key.startswith(old) and new + key[len(old):] in names:
            return new + key[len(old):]
    return key


def _fill_rotary_tables(model: nn.Module, config: Any, dtype: torch.dtype) -> None:
    """The non-persistent buffers (rotary inverse frequencies) of a network built on the meta device, from a copy
    built for real on the CPU from the same config cut to one head of one layer (and one vision block): the
    tables depend on the head width and the rope settings, never on the depth, the width or the vocabulary. The
    copy is kept that small because building it initialises its weights (a full-width layer: ~10 s of a
    loading thread on an H200 host)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    missing = {n: b for n, b in model.named_buffers() if b.is_meta}
    if not missing:
        return
    small = config.to_dict()
    text = small.get("text_config", small)
    head = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    text.update(num_hidden_layers=1, vocab_size=16, hidden_size=head, num_attention_heads=1, num_key_value_heads=1,
                intermediate_size=1)
    text.pop("layer_types", None)  # derived from the layer count when absent
    for part in (small, text):  # token ids beyond the shrunk vocabulary would make transformers warn
        part.update({k: None for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in part})
    vision = small["vision_config"]
    vision.update(depth=1, fullatt_block_indexes=[0], hidden_size=vision["hidden_size"] // vision["num_heads"],
                  num_heads=1, intermediate_size=1, out_hidden_size=head)
    copy = Qwen2_5_VLForConditionalGeneration._from_config(type(config).from_dict(small), dtype=dtype)
    buffers = dict(copy.named_buffers())
    for name, meta in missing.items():
        owner, _, attr = name.rpartition(".")
        if name not in buffers or buffers[name].shape != meta.shape:
            raise RuntimeError(f"qimg cannot rebuild the buffer {name} of this transformers version's Qwen2.5-VL")
        model.get_submodule(owner).register_buffer(attr, buffers[name].clone(), persistent=False)
