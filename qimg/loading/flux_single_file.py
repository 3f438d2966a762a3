"""FLUX.1 transformer files in Black Forest Labs' own key layout (the "BFL" layout of single_file.py): the
flux1-dev / flux1-kontext-dev releases, FP8 casts, ComfyUI's `model.diffusion_model.` copies and checkpoints.

BFL fuses what qimg's net (diffusers' names) keeps apart: a double block's q, k, v in one `img_attn.qkv` (and
`txt_attn.qkv`), a single block's q, k, v and MLP input in one `linear1`; and its final adaLN stores (shift, scale)
where the net has (scale, shift). Each network tensor is therefore a list of row ranges of one stored tensor,
read straight from the file (a safetensors slice reads only those rows). FP8 values stay as stored: a part keeps
its fused tensor's per-tensor scale, or its own rows of a per-row scale.

Facts from diffusers' convert_flux_transformer_checkpoint_to_diffusers (diffusers_facts.md 6.1); the module names
come from keymaps.FLUX_BFL_MODULES, shared with the BFL-named LoRAs.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from qimg.errors import CheckpointError
from qimg.loading.keymaps import FLUX_BFL_MODULES, FLUX_BFL_SWAPPED

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn

    from qimg.loading.single_file import TransformerFile

# BFL tensors that are not linears' (the QK RMSNorm gains) -> the network's names.
BFL_NORMS: tuple[tuple[str, str], ...] = (
    ("double_blocks.{i}.img_attn.norm.query_norm.scale", "transformer_blocks.{i}.attn.norm_q.weight"),
    ("double_blocks.{i}.img_attn.norm.key_norm.scale", "transformer_blocks.{i}.attn.norm_k.weight"),
    ("double_blocks.{i}.txt_attn.norm.query_norm.scale", "transformer_blocks.{i}.attn.norm_added_q.weight"),
    ("double_blocks.{i}.txt_attn.norm.key_norm.scale", "transformer_blocks.{i}.attn.norm_added_k.weight"),
    ("single_blocks.{i}.norm.query_norm.scale", "single_transformer_blocks.{i}.attn.norm_q.weight"),
    ("single_blocks.{i}.norm.key_norm.scale", "single_transformer_blocks.{i}.attn.norm_k.weight"),
)
# How a fused BFL linear's output rows divide among the linears FLUX_BFL_MODULES lists for it, in that order: q, k
# and v are the model width each, and a single block's MLP input 4x it (qimg's SingleBlock fixes FLUX.1's mlp_ratio
# 4). So the split follows from the stored shape alone; a wrong width is then the strict load's shape mismatch.
BFL_SPLITS: dict[str, tuple[int, ...]] = {
    "double_blocks.{i}.img_attn.qkv": (1, 1, 1),
    "double_blocks.{i}.txt_attn.qkv": (1, 1, 1),
    "single_blocks.{i}.linear1": (1, 1, 1, 4),
}
_GUIDANCE = "time_text_embed.guidance_embedder."
_BFL_BLOCK = re.compile(r"(double_blocks|single_blocks)\.(0|[1-9][0-9]*)\.")  # "01" is no index BFL writes
_NET_BLOCK = re.compile(r"(transformer_blocks|single_transformer_blocks)\.(0|[1-9][0-9]*)\.")
_HINT = "the file is damaged or not a FLUX.1 transformer; use the BFL or diffusers release of the model"

Rows = tuple[tuple[int, int], ...]  # row ranges of a stored tensor, concatenated in order


def _tables() -> tuple[dict[str, tuple[str, tuple[str, ...]]], dict[str, str]]:
    """BFL tensor (block index as {i}) -> (its BFL module, the network tensors it holds, in row order); and the
    inverse, network tensor -> BFL tensor, for naming what a file lacks as the file would name it."""
    forward: dict[str, tuple[str, tuple[str, ...]]] = {}
    for module, targets in FLUX_BFL_MODULES:
        for suffix in (".weight", ".bias"):
            forward[module + suffix] = (module, tuple(t + suffix for t in targets))
    for bfl, name in BFL_NORMS:
        forward[bfl] = (bfl, (name,))
    inverse = {name: bfl for bfl, (_, names) in forward.items() for name in names}
    return forward, inverse


_FORWARD, _INVERSE = _tables()


def _pattern(name: str, block: re.Pattern[str]) -> tuple[str, str]:
    """"double_blocks.7.img_mlp.0.weight" -> ("double_blocks.{i}.img_mlp.0.weight", "7"); outside blocks, index ""."""
    m = block.match(name)
    return (name, "") if m is None else (f"{m.group(1)}.{{i}}.{name[m.end():]}", m.group(2))


def split_bfl(shown: str, tensors: dict[str, tuple[str, tuple[int, ...]]], stored: dict[str, str],
              scales: dict[str, str]) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict[str, str], dict[str, str],
                                               dict[str, Rows], list[str]]:
    """A BFL file's tensors (by BFL name, prefix removed) as the network's: (tensors, stored, scales) by network
    name, each part's row ranges (only for tensors read as part of a stored one), and the keys of tensors the layout
    does not have (unexpected in the strict load)."""
    out_tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    out_stored: dict[str, str] = {}
    out_scales: dict[str, str] = {}
    parts: dict[str, Rows] = {}
    unknown: list[str] = []
    for bfl, (dtype, shape) in tensors.items():
        pattern, index = _pattern(bfl, _BFL_BLOCK)
        if pattern not in _FORWARD:
            unknown.append(stored[bfl])
            continue
        module, targets = _FORWARD[pattern]
        names = [t.format(i=index) for t in targets]
        for name, rows in zip(names, _row_ranges(shown, stored[bfl], module, shape, names), strict=True):
            out_tensors[name] = (dtype, shape if rows is None else (sum(b - a for a, b in rows), *shape[1:]))
            out_stored[name] = stored[bfl]
            if rows is not None:
                parts[name] = rows
            if bfl in scales:  # one scale for the fused tensor: each part's values stand for stored * that scale
                out_scales[name] = scales[bfl]
    return out_tensors, out_stored, out_scales, parts, unknown


def _row_ranges(shown: str, key: str, module: str, shape: tuple[int, ...], names: list[str]) -> list[Rows | None]:
    """The rows of a stored tensor each of `names` takes (None: the whole tensor, as stored)."""
    ratios = BFL_SPLITS.get(module)
    swapped = module in FLUX_BFL_SWAPPED
    if ratios is None and not swapped:
        return [None] * len(names)
    ratios = ratios or (1,)
    n = shape[0] if shape else 0
    unit, rest = divmod(n, sum(ratios) * (2 if swapped else 1))
    if not shape or rest or unit == 0:
        split = "in two halves" if swapped else ":".join(map(str, ratios))
        raise CheckpointError(f"{shown}: {key} has shape {list(shape)}, whose rows do not split {split} into "
                              f"{', '.join(names)}", hint=_HINT)
    if swapped:  # BFL's (shift, scale) halves -> the net's (scale, shift)
        return [((n // 2, n), (0, n // 2))]
    bounds = [0]
    for r in ratios:
        bounds.append(bounds[-1] + r * unit)
    return [((a, b),) for a, b in zip(bounds, bounds[1:], strict=False)]


def bfl_key(prefix: str, name: str) -> str:
    """The key a BFL file stores a network tensor under (its fused tensor for a part); the name itself if none."""
    pattern, index = _pattern(name, _NET_BLOCK)
    bfl = _INVERSE.get(pattern)
    return name if bfl is None else prefix + bfl.format(i=index)


def take_rows(tensor: Any, rows: Rows) -> Tensor:
    """The row ranges of a tensor, or of a safetensors slice (which then reads only those rows), concatenated."""
    import torch

    if len(rows) == 1:
        return tensor[rows[0][0]: rows[0][1]]
    return torch.cat([tensor[a:b] for a, b in rows])


def _shape_of(shapes: dict[str, tuple[int, ...]]) -> tuple[int, int, int | None, bool]:
    """(double blocks, single blocks, width, guidance embedding) of a FLUX.1 transformer's tensors."""
    blocks = {"transformer_blocks": 0, "single_transformer_blocks": 0}
    for name in shapes:
        m = _NET_BLOCK.match(name)
        if m is not None:
            blocks[m.group(1)] = max(blocks[m.group(1)], int(m.group(2)) + 1)
    width = shapes.get("x_embedder.weight", (None,))[0]
    guidance = any(n.startswith(_GUIDANCE) for n in shapes)
    return blocks["transformer_blocks"], blocks["single_transformer_blocks"], width, guidance


def _describe(shape: tuple[int, int, int | None, bool]) -> str:
    double, single, width, guidance = shape
    return (f"{double} double + {single} single blocks, width {width}, "
            f"{'with' if guidance else 'without'} guidance embedding")


def check_size(found: TransformerFile, expected: dict[str, tuple[int, ...]]) -> None:
    """A FLUX.1 transformer of another size or kind than the folder's config (FLUX.1-schnell's file, without
    guidance_in, for a dev folder; a full-size file for a small config) as one line saying both."""
    got = _shape_of({n: s for n, (_, s) in found.tensors.items()})
    want = _shape_of(expected)
    if got[2] is None:  # no x_embedder (img_in): the strict load names it missing
        got = (*got[:2], want[2], got[3])
    if got != want:
        raise CheckpointError(f"{found.what} is a FLUX.1 transformer of {_describe(got)}; transformer/config.json "
                              f"describes {_describe(want)}",
                              hint="use the file of this model variant (FLUX.1-schnell has no guidance embedding, "
                                   "dev and Kontext do), or a model folder whose config fits the file")


def _misshapen(found: TransformerFile, expected: dict[str, tuple[int, ...]]) -> list[str]:
    """Stored tensors of the wrong shape, once each as the file stores them ("qkv [48, 31] != [96, 32]"): a fused
    tensor's shape is its parts' rows stacked."""
    covers: dict[str, list[str]] = {}
    for name, key in found.stored.items():
        if name in expected:
            covers.setdefault(key, []).append(name)
    out = []
    for key, names in covers.items():
        if all(found.tensors[n][1] == expected[n] for n in names):
            continue
        got, want = found.tensors[names[0]][1], expected[names[0]]
        if len(names) > 1:  # parts of one fused tensor: rows add up, the other dimensions are shared
            got = (sum(found.tensors[n][1][0] for n in names), *got[1:])
            want = (sum(expected[n][0] for n in names), *want[1:])
        out.append(f"{key} {list(got)} != {list(want)}")
    return out


def load_parts(found: TransformerFile, build: Callable[[], nn.Module], *, device: torch.device | str,
               convert: Callable[[str, Tensor], Tensor], hint: str,
               group: Callable[[str], str | None] | None = None,
               on_group: Callable[[str, nn.Module], None] | None = None,
               later: Callable[[str], bool] | None = None,
               on_later: Callable[[str, nn.Module, Callable[[nn.Module, Any], None]], None] | None = None
               ) -> nn.Module:
    """The network `build` makes, filled strictly from a file whose tensors are row ranges of stored ones (as
    checkpoint.load_module does for files named as the network is): names and shapes checked from the header first,
    errors naming the file's keys; `convert` casts each part; group / on_group load block by block; later /
    on_later leave groups unread, with the function that reads them (as load_module does)."""
    from qimg.loading.checkpoint import check_keys, meta_device, own_memory

    with meta_device():
        module = build()
    expected = {name: tuple(t.shape) for name, t in module.state_dict().items()}
    check_size(found, expected)
    missing = sorted({bfl_key(found.prefix, n) for n in expected if n not in found.stored})
    unexpected = sorted({*found.foreign, *(key for n, key in found.stored.items() if n not in expected)})
    check_keys(found.what, missing, unexpected, _misshapen(found, expected), hint)
    parts = found.parts or {}

    def read(names: list[str], to: Any = device) -> dict[str, Any]:
        state = {}
        for name in names:
            key = found.stored[name]
            handle = found._handle(key)
            rows = parts.get(name)
            tensor = handle.get_tensor(key) if rows is None else take_rows(handle.get_slice(key), rows)
            state[name] = own_memory(convert(name, tensor).to(to))
        return state

    def reader_of(prefix: str, names: list[str]) -> Callable[[nn.Module, Any], None]:
        def fill(block: nn.Module, to: Any) -> None:
            lead = f"{prefix}."
            state = {n.removeprefix(lead): t for n, t in read(names, to).items()}
            block.load_state_dict(state, strict=True, assign=True)

        return fill

    groups: dict[str | None, list[str]] = {}
    for name in expected:
        groups.setdefault(group(name) if group else None, []).append(name)
    for prefix in [p for p in groups if p is not None and later is not None and later(p)]:
        names = groups.pop(prefix)
        if on_later is not None:
            on_later(prefix, module, reader_of(prefix, names))
    for prefix, names in groups.items():
        if prefix is not None:
            module.load_state_dict(read(names), strict=False, assign=True)
            if on_group is not None:
                on_group(prefix, module)
    module.load_state_dict(read(groups.get(None, [])), strict=False, assign=True)
    return module
