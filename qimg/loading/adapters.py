"""The adapters a LoRA file holds, as read (loading/lora.py): their types, shape rules and math. Pure torch.

- LoRA (Hu et al. 2021): delta W = scale * up @ down, scale = alpha / rank.
- LoHa (FedPara, Hyeon-Woo et al. 2022; LyCORIS): delta W = scale * (w1_a @ w1_b) * (w2_a @ w2_b), elementwise. That
  product is exactly one low-rank pair of rank r1*r2 (a row-wise Khatri-Rao product of the factors), so a LoHa is held
  as a LoRAModule and applies as one.
- LoKr (LyCORIS, Yeh et al. 2023): delta W = scale * kron(W1, W2), W1 (a, b) and W2 (c, d) on a linear (a*c, b*d);
  each W is stored whole (lokr_w1) or as a low-rank pair (lokr_w1_a @ lokr_w1_b). Its rank can be full, so it keeps
  its own form and applies through the Kronecker identity (runtime/lora.py).

LyCORIS scales as its own modules and ComfyUI (comfy/weight_adapter/loha.py, lokr.py) do: LoHa alpha / r1 (w1_b's
rows); LoKr alpha / rank of its factored W, and 1 when both Ws are whole; an alpha of 0, or none, means alpha = rank.
Only `.alpha` keys carry a LyCORIS alpha: diffusers' LoraConfig header describes LoRAs, not these.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

Shapes = Mapping[str, tuple[int, ...]]  # role (keymaps.LORA_SUFFIXES) -> shape, from the file's header


@dataclass(frozen=True, eq=False)  # eq=False: tensors do not compare to one bool
class LoRAModule:
    """One low-rank adapter on one linear (Hu et al. 2021): delta W = strength * scale * up @ down."""

    down: Tensor  # A (rank, in_features), as stored
    up: Tensor  # B (out_features, rank), as stored
    # As stored, or rank where the file has none. An rsLoRA config (scale alpha / sqrt(rank)) is stored here as
    # lora_alpha * sqrt(rank), so that `scale` is what its trainer applied.
    alpha: float
    kind: ClassVar[str] = "LoRA"

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def file_rank(self) -> int | None:
        """The rank the file states (inspect shows it; for a LoHa not the rank of its pair)."""
        return self.rank

    @property
    def file_alpha(self) -> float | None:
        return self.alpha

    @property
    def parameters(self) -> int:
        """How many numbers the file stores for it."""
        return self.down.numel() + self.up.numel()

    def dense_delta(self) -> Tensor:
        """delta W (out, in) in fp32, with the scale and without the strength: what a merge adds to the weight."""
        return (self.up.float() @ self.down.float()) * self.scale


@dataclass(frozen=True, eq=False)
class LoHaModule(LoRAModule):
    """A LoHa held as the low-rank pair it equals (loha_pair): down and up are fp32 products of its four factors, of
    rank r1*r2, and alpha = loha_alpha * r2, so that scale = loha_alpha / r1 as LyCORIS applies it."""

    ranks: tuple[int, int] = (1, 1)  # (r1, r2): the ranks of its two stored pairs
    loha_alpha: float = 1.0  # as stored, or r1 where the file has none
    kind: ClassVar[str] = "LoHa"

    @property
    def file_rank(self) -> int | None:
        return self.ranks[0]

    @property
    def file_alpha(self) -> float | None:
        return self.loha_alpha

    @property
    def parameters(self) -> int:
        return sum(self.ranks) * (self.up.shape[0] + self.down.shape[1])


@dataclass(frozen=True, eq=False)
class LoKrModule:
    """A LoKr: delta W = strength * scale * kron(w1, w2), kept as its two small matrices (never delta W itself)."""

    w1: Tensor  # W1 (a, b): lokr_w1 as stored, or lokr_w1_a @ lokr_w1_b in fp32
    w2: Tensor  # W2 (c, d), likewise; the linear is (a*c, b*d)
    scale: float  # alpha / rank of the factored W; 1 when both are stored whole
    rank: int | None = None  # what alpha is divided by; None when both Ws are stored whole
    alpha: float | None = None  # as stored (rank where none); None when both Ws are whole, as it then plays no part
    parameters: int = 0  # how many numbers the file stores for it
    kind: ClassVar[str] = "LoKr"

    @property
    def file_rank(self) -> int | None:
        return self.rank

    @property
    def file_alpha(self) -> float | None:
        return self.alpha

    def dense_delta(self) -> Tensor:
        """delta W (out, in) in fp32, with the scale and without the strength: what a merge adds to the weight."""
        return torch.kron(self.w1.float(), self.w2.float()) * self.scale


Adapter = LoRAModule | LoKrModule  # a LoHaModule is a LoRAModule


def _matrix(shape: tuple[int, ...]) -> bool:
    return len(shape) == 2 and min(shape) >= 1


def lora_misfit(shapes: Shapes, linear: tuple[int, int]) -> str | None:
    """What down and up must be for a linear (out, in), or None where they fit."""
    out, inp = linear
    d, u = shapes["down"], shapes["up"]
    if _matrix(d) and len(u) == 2 and d[1] == inp and u == (out, d[0]):
        return None
    return f"down must be (rank, {inp}) and up ({out}, rank)"


def loha_misfit(shapes: Shapes, linear: tuple[int, int]) -> str | None:
    """What the hada_* factors must be for a linear (out, in), or None where they fit."""
    out, inp = linear
    w1a, w1b, w2a, w2b = (shapes[r] for r in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
    if all(map(_matrix, (w1a, w1b, w2a, w2b))):
        r1, r2 = w1b[0], w2b[0]
        if (w1a, w1b, w2a, w2b) == ((out, r1), (r1, inp), (out, r2), (r2, inp)):
            return None
    return f"hada_w1_a must be ({out}, r1), hada_w1_b (r1, {inp}), hada_w2_a ({out}, r2) and hada_w2_b (r2, {inp})"


def _lokr_shape(shapes: Shapes, n: int) -> tuple[int, int] | None:
    """The shape of W{n}, stored whole or as a pair sharing one rank; None where that is no matrix."""
    whole = shapes.get(f"lokr_w{n}")
    if whole is not None:
        return (whole[0], whole[1]) if _matrix(whole) else None
    a, b = shapes[f"lokr_w{n}_a"], shapes[f"lokr_w{n}_b"]
    return (a[0], b[1]) if _matrix(a) and _matrix(b) and a[1] == b[0] else None


def lokr_misfit(shapes: Shapes, linear: tuple[int, int]) -> str | None:
    """What W1 and W2 must be for a linear (out, in), or None where kron(W1, W2) has its shape."""
    out, inp = linear
    w1, w2 = _lokr_shape(shapes, 1), _lokr_shape(shapes, 2)
    if w1 is not None and w2 is not None and (w1[0] * w2[0], w1[1] * w2[1]) == (out, inp):
        return None
    here = f" (here W1 {w1} and W2 {w2})" if w1 is not None and w2 is not None else ""
    return (f"W1 (a, b) and W2 (c, d) must have a*c = {out} and b*d = {inp}{here}, each pair lokr_wN_a (rows, rank) "
            "and lokr_wN_b (rank, cols) sharing one rank")


MISFIT: dict[str, Callable[[Shapes, tuple[int, int]], str | None]] = {
    "LoRA": lora_misfit, "LoHa": loha_misfit, "LoKr": lokr_misfit}


def lokr_rank(shapes: Shapes) -> int | None:
    """The rank a LoKr's alpha is divided by: its factored W's; None when both Ws are stored whole (scale 1).
    LyCORIS factors both Ws only with one rank; were they to differ, its own loader's rule (W1's) holds."""
    for n in (1, 2):
        if f"lokr_w{n}_b" in shapes:
            return int(shapes[f"lokr_w{n}_b"][0])
    return None


def _fp32(t: Tensor) -> Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def lokr_w(tensors: Mapping[str, Tensor], n: int) -> Tensor:
    """W{n} (rows, cols): as stored where whole, else the product of its pair in fp32 (at least)."""
    whole = tensors.get(f"lokr_w{n}")
    if whole is not None:
        return whole
    return _fp32(tensors[f"lokr_w{n}_a"]) @ _fp32(tensors[f"lokr_w{n}_b"])


def loha_pair(w1a: Tensor, w1b: Tensor, w2a: Tensor, w2b: Tensor) -> tuple[Tensor, Tensor]:
    """(down (r1*r2, in), up (out, r1*r2)) with up @ down = (w1a @ w1b) * (w2a @ w2b):
    up[:, j*r2 + k] = w1a[:, j] * w2a[:, k] and down[j*r2 + k] = w1b[j] * w2b[k]. In fp32 (at least), where the
    products of fp16/bf16 factors are exact, so the pair holds the LoHa as stored."""
    w1a, w1b, w2a, w2b = map(_fp32, (w1a, w1b, w2a, w2b))
    up = (w1a[:, :, None] * w2a[:, None, :]).flatten(1)  # (out, r1, r2) -> (out, r1*r2)
    down = (w1b[:, None, :] * w2b[None, :, :]).flatten(0, 1)  # (r1, r2, in) -> (r1*r2, in)
    return down, up
