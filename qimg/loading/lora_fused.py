"""FLUX LoRAs on BFL names: a fused module (a double block's qkv, a single block's linear1, the final adaLN) read as
one module as wide as the diffusers linears it covers, and its adapter split onto those linears exactly."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from qimg.errors import CheckpointError
from qimg.loading.adapters import Adapter, LoKrModule
from qimg.loading.keymaps import FLUX_BFL_MODULES, FLUX_BFL_SWAPPED


def bfl_modules(linears: Mapping[str, tuple[int, int]]) -> dict[str, tuple[str, ...]]:
    """FLUX's BFL module names -> the model's linears each covers (FLUX_BFL_MODULES), for every block the model has."""
    return fused_modules(FLUX_BFL_MODULES, linears)


def fused_modules(table: Sequence[tuple[str, tuple[str, ...]]], linears: Mapping[str, tuple[int, int]]
                  ) -> dict[str, tuple[str, ...]]:
    """A fused-module table's names ("{i}" for the block index) -> the model's linears each covers, for every block
    the model has. A name is a module only where all its linears exist and take the same input (so one down
    matrix can serve them)."""
    out: dict[str, tuple[str, ...]] = {}
    for pattern, targets in table:
        for i in range(10_000) if "{i}" in pattern else (0,):
            names = tuple(t.format(i=i) for t in targets)
            if not all(n in linears for n in names):
                break
            if len({linears[n][1] for n in names}) == 1:
                out[pattern.format(i=i)] = names
    return out


def split_fused(shown: str, module: str, adapter: Adapter, targets: list[tuple[str, int]]) -> dict[str, Adapter]:
    """A fused BFL module's adapter as one adapter per linear it covers, exactly: the output rows of delta W split in
    `targets` order (each (linear, rows)). A LoRA's up rows split and each part keeps the whole down (delta W_q =
    up_q @ down); where the up is block-diagonal over equal rank slices, each part takes only its slice of the down,
    with alpha / n so that alpha / rank stays. A LoKr's W1 rows split where each part is whole rows of W1."""
    swap = module in FLUX_BFL_SWAPPED
    n = len(targets)
    bounds = [0]
    for _, rows in targets:
        bounds.append(bounds[-1] + rows)
    if isinstance(adapter, LoKrModule):
        step = int(adapter.w2.shape[0])
        if any(b % step for b in bounds) or (swap and bounds[-1] % (2 * step)):
            raise CheckpointError(f"{shown}: the LoKr for {module} (W2 {tuple(adapter.w2.shape)}) cannot be split "
                                  f"onto {', '.join(t for t, _ in targets)}",
                                  hint="qimg splits a fused LoKr only along whole rows of its W1")
        w1 = _swap_halves(adapter.w1) if swap else adapter.w1
        return {t: dataclasses.replace(adapter, w1=w1[bounds[j] // step: bounds[j + 1] // step])
                for j, (t, _) in enumerate(targets)}
    up = _swap_halves(adapter.up) if swap else adapter.up
    if n == 1:
        return {targets[0][0]: adapter if not swap else dataclasses.replace(adapter, up=up)}
    rank = adapter.rank
    part = rank // n
    diagonal = rank % n == 0 and all(
        not bool(torch.any(up[bounds[j]: bounds[j + 1], k * part: (k + 1) * part] != 0))
        for j in range(n) for k in range(n) if j != k)
    if diagonal:
        return {t: dataclasses.replace(adapter, down=adapter.down[j * part: (j + 1) * part],
                                       up=up[bounds[j]: bounds[j + 1], j * part: (j + 1) * part],
                                       alpha=adapter.alpha / n)
                for j, (t, _) in enumerate(targets)}
    return {t: dataclasses.replace(adapter, up=up[bounds[j]: bounds[j + 1]]) for j, (t, _) in enumerate(targets)}


def _swap_halves(t: Tensor) -> Tensor:
    """(shift, scale) rows -> (scale, shift) rows."""
    half = t.shape[0] // 2
    return torch.cat([t[half:], t[:half]])
