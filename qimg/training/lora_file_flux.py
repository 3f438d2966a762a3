"""FLUX LoRA files on BFL's module names, as ComfyUI (and OneTrainer COMFY_LORA) and sd-scripts write them: a double
block's q, k, v are ONE img_attn.qkv (txt_attn.qkv for the text stream) and a single block's q, k, v and MLP input ONE
linear1 (keymaps.FLUX_BFL_MODULES). A fused module is written as one adapter whose delta W is exactly the parts':

  down = the parts' downs stacked (n*rank, in), up = block-diagonal of the parts' ups (sum of outs, n*rank),
  alpha = n*alpha, so that alpha / rank (the scale) is the parts' own.

Row block j of up @ down is then up_j @ down_j, nothing else: qimg's reader (loading/lora_fused.py split_fused),
diffusers' kohya FLUX converter (its "sparse" case) and ComfyUI all give each linear its own delta back.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from qimg.loading.keymaps import FLUX_BFL_MODULES, FLUX_BFL_SWAPPED

__all__ = ["BFLPart", "bfl_part", "fuse_bfl", "kohya_dropped"]

# diffusers' kohya FLUX converter (lora_conversion_utils._convert_kohya_flux_lora_to_diffusers, 0.42) names the
# embedders' and the final layer's adapters without the "transformer." prefix, so load_lora_weights drops them
# without an error; only the blocks' adapters reach the model.
_KOHYA_DIFFUSERS_READS = ("double_blocks.", "single_blocks.")


@dataclass(frozen=True)
class BFLPart:
    """Where a diffusers FLUX linear sits in BFL's checkpoint: the module and its rows' place among the parts."""

    module: str  # "double_blocks.3.img_attn.qkv"
    index: int  # position among `parts` (its row block of the fused output)
    parts: tuple[str, ...]  # every diffusers linear of `module`, in row order


def _pattern(target: str) -> re.Pattern[str]:
    return re.compile(re.escape(target).replace(re.escape("{i}"), r"(?P<i>\d+)"))


# (regex of one part's name, BFL module pattern, its index, every part's pattern)
_PARTS = tuple((_pattern(target), module, j, targets)
               for module, targets in FLUX_BFL_MODULES for j, target in enumerate(targets))


def bfl_part(linear: str) -> BFLPart | None:
    """The BFL module a diffusers FLUX linear ("transformer_blocks.3.attn.to_k") belongs to, or None for a name FLUX
    does not have."""
    for regex, module, j, targets in _PARTS:
        hit = regex.fullmatch(linear)
        if hit is not None:
            i = hit.groupdict().get("i")
            return BFLPart(module.format(i=i), j, tuple(t.format(i=i) for t in targets))
    return None


def kohya_dropped(module: str) -> bool:
    """Whether diffusers' load_lora_weights drops this BFL module's kohya adapter (see _KOHYA_DIFFUSERS_READS)."""
    return not module.startswith(_KOHYA_DIFFUSERS_READS)


def fuse_bfl(pairs: Mapping[str, tuple[Tensor, Tensor]], rank: int,
             linears: Mapping[str, tuple[int, int]] | None) -> dict[str, tuple[Tensor, Tensor, int]]:
    """BFL module -> (down, up, n parts) for (down (rank, in), up (out, rank)) pairs on diffusers FLUX linears.

    A module of one part is renamed only (the final adaLN's up with its halves swapped: BFL stores (shift, scale)
    where diffusers has (scale, shift)). linears (name -> (out, in)) gives the height of a fused module's parts that
    were not trained; without it a partly trained fused module is refused. Bad names raise ValueError.
    """
    groups: dict[str, tuple[BFLPart, dict[int, tuple[Tensor, Tensor]]]] = {}
    for linear, pair in pairs.items():
        part = bfl_part(linear)
        if part is None:
            raise ValueError(f"{linear!r} is not a FLUX linear with a BFL name (keymaps.FLUX_BFL_MODULES)")
        groups.setdefault(part.module, (part, {}))[1][part.index] = pair

    fused: dict[str, tuple[Tensor, Tensor, int]] = {}
    for module, (part, given) in groups.items():
        n = len(part.parts)
        if n == 1:
            down, up = given[0]
            fused[module] = (down, _swap_halves(up) if module in FLUX_BFL_SWAPPED else up, 1)
            continue
        first_down, _ = next(iter(given.values()))
        widths = {int(down.shape[1]) for down, _ in given.values()}
        if len(widths) > 1:
            raise ValueError(f"{', '.join(part.parts)} share one input in {module}, but their downs are "
                             f"{sorted(widths)} wide")
        heights = []
        for j, name in enumerate(part.parts):
            if j in given:
                heights.append(int(given[j][1].shape[0]))
            elif linears is not None and name in linears:
                heights.append(int(linears[name][0]))
            else:
                raise ValueError(f"{name} is not trained, so its rows of {module} are zeros of unknown height; "
                                 "pass linears= (the denoiser's linears, name -> (out, in))")
        # A part not trained gets zero blocks in both matrices: its rows of delta W are exactly zero, and every other
        # part's rows are exactly its own up @ down (the zero blocks add nothing anywhere, in any dtype).
        down = torch.zeros(n * rank, widths.pop(), dtype=first_down.dtype)
        up = torch.zeros(sum(heights), n * rank, dtype=first_down.dtype)
        row = 0
        for j, height in enumerate(heights):
            if j in given:
                down[j * rank: (j + 1) * rank] = given[j][0]
                up[row: row + height, j * rank: (j + 1) * rank] = given[j][1]
            row += height
        fused[module] = (down, up, n)
    return fused


def _swap_halves(t: Tensor) -> Tensor:
    """(scale, shift) rows -> (shift, scale) rows (its own inverse)."""
    half = t.shape[0] // 2
    return torch.cat([t[half:], t[:half]]).contiguous()
