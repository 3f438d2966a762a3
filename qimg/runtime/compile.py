"""Regional torch.compile: compile the repeated transformer block once and reuse it for every layer.

Compiling one block instead of the whole model keeps compile time to one block's worth (~tens of seconds on
first use) and lets inductor fuse the elementwise work around the matmuls (norm + modulate, QK-norm + RoPE,
gate + residual). Inductor's on-disk caches make later processes start faster; qimg points them at its own
cache folder so they survive /tmp cleaning.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn


def compile_cache_dir() -> Path:
    """Where compiled kernels are cached across runs: $QIMG_HOME/compile, else ~/.cache/qimg/compile."""
    home = os.environ.get("QIMG_HOME")
    base = Path(home) if home else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qimg"
    return base / "compile"


def prepare_compiler() -> Path:
    """Point inductor's and Triton's caches at qimg's folder and quiet a warning that says nothing to a user;
    returns the folder. Called only when compiling was asked for: no import-time environment changes."""
    cache = compile_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache / "inductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(cache / "triton"))
    # The RoPE table enters the blocks as complex64 and the compiled form reads only its .real and .imag views;
    # inductor still warns once that it "does not support code generation for complex operators". The fused
    # kernels are measured (bench/results/speed_*.json), so the warning says nothing to a user: keep it quiet.
    warnings.filterwarnings("ignore", message="Torchinductor does not support code generation for complex",
                            category=UserWarning)
    return cache


def compile_blocks(blocks: Iterable[nn.Module], *, dynamic: bool | None = None) -> int:
    """torch.compile each repeated block in place (blocks of one class share one compiled graph); returns the
    count. Several block kinds (FLUX.1's double and single stream) are passed together.

    dynamic=None lets the compiler mark a dimension dynamic once it sees it change (a new prompt length), so a
    second prompt length costs one recompile, not one per length.
    """
    prepare_compiler()
    count = 0
    for block in blocks:
        block.compile(fullgraph=True, dynamic=dynamic)
        count += 1
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    return count


def compile_inside(blocks: Iterable[nn.Module]) -> int:
    """torch.compile each block's own forward, inside its gradient checkpoint and any wrapper added later (block
    streaming's, which binds weights and must stay eager), instead of the whole module call as compile_blocks
    does; returns the count. A block compiled by compile_blocks is un-compiled first."""
    from qimg.runtime.checkpoint import wrap_inside

    compile_blocks([])  # the cache folders and the dynamo cache size, as for compile_blocks
    count = 0
    for block in blocks:
        block._compiled_call_impl = None  # type: ignore[assignment]
        wrap_inside(block, lambda forward: torch.compile(forward, fullgraph=True))
        count += 1
    return count
