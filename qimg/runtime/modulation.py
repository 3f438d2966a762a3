"""adaLN modulation looked up instead of recomputed at every step.

Each forward of an MMDiT turns one timestep embedding into every block's shifts, scales and gates: Qwen-Image
reads 120 linears of 3072 x 18432 for it, 13.6 GB of bf16 weights for a handful of output rows, ~4 ms of an
H200's ~90 ms FP8 forward (bench/results/profile_fused_before_h200.json). A denoising run visits a short list of
timesteps known before it starts, so `ModulationTable.use` computes every site's output for all of them at once
(one GEMM per site, each weight read once per run instead of once per step), and each forward then gathers its
rows from the table: ~3 ms less a forward, bf16 or FP8 (bench/results/speed_tables_h200.json).

Applied from outside, like FP8 and compile: `ModulationTable(model, sites)` patches the forward of the model's
time embedding and of each modulation module in place, so module names, state dicts and LoRA targets stay as they
are. Outside `use` the patched forwards compute exactly as before. Inside it, the time embedding finds each row's
timestep among the table's keys on the device (no host sync, so CUDA graphs can capture it) and hands every site
its rows; a timestep missing from the table is counted on the device and reported when `use` ends.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

MAX_BYTES = 2**30  # larger (thousands of steps): not worth the memory, the run computes its modulation instead


@dataclass(frozen=True)
class ModulationSites:
    """Where a family's denoiser computes its modulation, as data for ModulationTable.

    time_embed: the module (by name) that maps the forward's timesteps (N,) to embeddings (N, D); it is called
    as embed(model, timesteps, dtype). per_block: each block's modulation modules (embedding (N, D) -> (N, K)),
    named relative to the blocks of the `blocks` lists. keys(sigmas, dtype, model): the timesteps, as the time
    embedding receives them, of a run visiting `sigmas`.
    """

    time_embed: str
    blocks: tuple[str, ...]
    per_block: tuple[str, ...]
    embed: Callable[[nn.Module, Tensor, torch.dtype], Tensor]
    keys: Callable[[Tensor, torch.dtype, nn.Module], Tensor]


def _site_forward(self: nn.Module, emb: Tensor) -> Tensor:
    rows = self._modulation_rows
    if rows is None:
        return type(self).forward(self, emb)
    return rows[: emb.shape[0]]  # a zero_cond_t model's text stream takes only the real timestep's rows


def _embed_forward(self: nn.Module, t: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    out = type(self).forward(self, t, *args, **kwargs)
    table = self._modulation_table
    if table is not None:
        table._hand_out(t)
    return out


class ModulationTable:
    """Every modulation site's output for the timesteps of one run, filled by `use(sigmas, dtype)`.

    The table's tensors keep their storage from one run to the next while the number of distinct timesteps stays
    the same (CUDA graphs captured over them stay valid); `version` changes whenever they are reallocated."""

    def __init__(self, model: nn.Module, sites: ModulationSites) -> None:
        self.model = model
        self.spec = sites
        self.embedder = model.get_submodule(sites.time_embed)
        self.sites = [block.get_submodule(name) for blocks in sites.blocks for block in model.get_submodule(blocks)
                      for name in sites.per_block]
        self.keys: Tensor | None = None
        self.values: Tensor | None = None  # (keys, sum of the sites' widths)
        self.widths: list[int] = []
        self.misses: Tensor | None = None
        self.version = 0
        self.embedder._modulation_table = None
        self.embedder.forward = types.MethodType(_embed_forward, self.embedder)
        for site in self.sites:
            site._modulation_rows = None
            site.forward = types.MethodType(_site_forward, site)

    def nbytes(self, keys: Tensor, dtype: torch.dtype) -> int:
        """The table's size for these timesteps (the first call runs every site on one row to learn widths)."""
        if not self.widths:
            with torch.no_grad():
                probe = self.spec.embed(self.model, keys[:1], dtype)
                self.widths = [site(probe).shape[-1] for site in self.sites]
        return len(keys) * sum(self.widths) * dtype.itemsize

    @contextlib.contextmanager
    def use(self, sigmas: Tensor, dtype: torch.dtype) -> Iterator[bool]:
        """Within the block, the model's forwards take their modulation from the table for a run over `sigmas`
        (the noise levels its steps start from); yields False, and changes nothing, when the table would be too
        large for the memory it has."""
        keys = torch.unique(self.spec.keys(sigmas, dtype, self.model))
        if not self._fits(keys, dtype):
            yield False
            return
        self._fill(keys, dtype)
        self.embedder._modulation_table = self
        try:
            yield True
        finally:
            self.embedder._modulation_table = None
            for site in self.sites:
                site._modulation_rows = None
        assert self.misses is not None
        missed = int(self.misses.item())
        if missed:  # a caller ran the model at a timestep outside the run it declared: its output is wrong
            self.misses.zero_()
            raise RuntimeError(f"{missed} rows ran at a timestep outside the modulation table's {len(keys)}")

    def _fits(self, keys: Tensor, dtype: torch.dtype) -> bool:
        need = self.nbytes(keys, dtype)
        if need > MAX_BYTES:
            return False
        if keys.device.type == "cuda" and (self.values is None or self.values.shape[0] != len(keys)):
            free, _ = torch.cuda.mem_get_info(keys.device)
            return need * 8 <= free  # what the memory plan set aside for activations stays theirs
        return True

    @torch.no_grad()
    def _fill(self, keys: Tensor, dtype: torch.dtype) -> None:
        emb = self.spec.embed(self.model, keys, dtype)
        values = torch.cat([site(emb) for site in self.sites], dim=1)
        self.misses = None if self.misses is None else self.misses.zero_()
        if self.values is None or self.values.shape != values.shape or self.values.dtype != values.dtype:
            # ordinary tensors, even when this run is under inference_mode: a later run outside it fills them in place
            with torch.inference_mode(False):
                self.keys, self.values = keys.clone(), values.clone()
                self.misses = torch.zeros((), dtype=torch.int64, device=values.device)
            self.version += 1
        else:
            assert self.keys is not None
            self.keys.copy_(keys)
            self.values.copy_(values)

    def _hand_out(self, t: Tensor) -> None:
        """Give every site its rows for timesteps t (N,): row i of a site is its output at t[i]."""
        assert self.keys is not None and self.values is not None and self.misses is not None
        found = t[:, None] == self.keys.to(t.dtype)[None, :]
        self.misses.add_((~found.any(dim=1)).sum())
        rows = self.values.index_select(0, found.to(torch.int32).argmax(dim=1))
        for site, part in zip(self.sites, rows.split(self.widths, dim=1), strict=True):
            site._modulation_rows = part
