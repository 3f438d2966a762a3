"""LoRA deltas merged into linear weights: the other way to apply a LoRA (runtime/lora.py is the side branch).

W' = round(W + sum_a strength_a * delta_a), summed in fp32 on the weight's device and rounded once to the weight's
dtype. Merging costs nothing per step, but it changes the weights: qimg merges only while a model loads, block by
block and before FP8 quantisation, so FP8 weights are quantised from bf16 + delta and never have a delta added in
e4m3 (which would round most of it away: Qwen-Image-Lightning#32). Undoing a merge needs the weights from disk.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

# A delta as a function of the device it is wanted on: low-rank factors are multiplied there (a GPU does a
# rank-64 product of a 3072 x 12288 linear in microseconds; a host CPU takes tens of milliseconds per linear).
Delta = Callable[[torch.device], Tensor]


def merge_deltas(model: nn.Module, deltas: Mapping[str, Sequence[tuple[Delta, float]]], prefix: str = "") -> list[str]:
    """Add each named linear's deltas (fp32 (out, in) tensors from `Delta`, times their strength) into its weight.
    Names are full module names; `model` is the module at `prefix` (a block while it loads, or the whole model).
    Returns the names merged. A name that is not a plain nn.Linear here is a ValueError: FP8 and wrapped
    linears must be merged before they are made."""
    done = []
    lead = f"{prefix}." if prefix else ""
    for name, module in model.named_modules():
        full = lead + name if name else prefix
        wanted = deltas.get(full)
        if not wanted:
            continue
        if type(module) is not nn.Linear:
            raise ValueError(f"cannot merge a LoRA into {full}, a {type(module).__name__}: merge into nn.Linear "
                             "weights before FP8 or LoRA wrappers are applied")
        weight = module.weight
        with torch.no_grad():
            total = weight.detach().float()
            for delta, strength in wanted:
                if strength != 0.0:
                    total = total.add_(delta(weight.device).to(torch.float32), alpha=float(strength))
            weight.copy_(total.to(weight.dtype))
        done.append(full)
    return done
