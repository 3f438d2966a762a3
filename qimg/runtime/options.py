"""Runtime options as one frozen, validated object, built once (by the CLI or a library caller) and read by
loading, the memory planner and the pipelines. Torch-free, so the CLI can build and check it before torch
imports; checks that need the machine (is there an FP8 GPU?) run at load, in the pipelines.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

from qimg.errors import UsageError

SCALE = 8  # pixels per latent along each axis: the tile grid unit (the Qwen-Image and FLUX.1 VAEs both use 8)
ATTENTION_BACKENDS = ("auto", "sdpa", "cudnn", "flash", "sage")
FP8_MODES = ("compute", "weights")
OFFLOAD_MODES = ("auto", "none", "model", "layer")
# How LoRAs given at load apply: merged into the weights as they load (no per-step cost, fixed for the process),
# as a side branch (switchable, ~15% per step at rank 64 on an H200: bench/results/lora_step_h200.json), or auto:
# merged where the weights load from bf16 (FP8 is then quantised from bf16 + delta), a branch on FP8-stored files.
LORA_MODES = ("auto", "merge", "branch")
PARALLEL_MODES = ("cfg", "seq", "cfg+seq")  # one image on several torchrun processes: runtime/sequence_parallel.py
TEXT_ENCODER_DEVICES = ("cpu", "cuda")
DTYPE_NAMES = ("bfloat16", "float16", "float32")
MIN_VRAM_BUDGET = 0.5  # GiB: below this not even one streamed block and its activations fit
_DEVICE = re.compile(r"cpu|cuda(:\d+)?")


@dataclass(frozen=True)
class Tiling:
    """Tile size and overlap in pixels (multiples of 8, so that tiles fall on whole latents)."""

    tile: int = 512
    overlap: int = 64

    def __post_init__(self) -> None:
        # ValueError: Tiling is a plain value also built by benches and tests; qimg.roundtrip.make_tiling and the
        # CLI turn these into one-line errors. The messages are written for people either way.
        if isinstance(self.tile, bool) or not isinstance(self.tile, int) or self.tile < SCALE:
            raise ValueError(f"tile size {self.tile!r} px is too small: use at least {SCALE} px (e.g. 512)")
        if self.tile % SCALE:
            raise ValueError(f"tile size {self.tile} px is not a multiple of {SCALE} (the VAE's latent grid); "
                             f"try {self.tile // SCALE * SCALE or SCALE}")
        if isinstance(self.overlap, bool) or not isinstance(self.overlap, int) or self.overlap < 0:
            raise ValueError(f"tile overlap {self.overlap!r} px must be 0 or more")
        if self.overlap % SCALE:
            raise ValueError(f"tile overlap {self.overlap} px is not a multiple of {SCALE} (the VAE's latent grid)")
        if self.overlap >= self.tile:
            raise ValueError(f"tile overlap {self.overlap} px must be smaller than the tile size {self.tile} px")


@dataclass(frozen=True)
class RuntimeOptions:
    """How a model runs, as opposed to what it draws (that is the request): placement, precision, kernels and
    memory features. Every bound is checked here, once (a bad value is a usage error, exit 2); checks that
    depend on the machine run at load."""

    device: str | None = None  # cpu, cuda, cuda:N; None: cuda if present, else cpu
    dtype: str | None = None  # bfloat16, float16, float32; None: bf16 on CUDA, fp32 on CPU
    attention: str = "auto"  # the kernel behind the engine's attention call site (process-wide)
    compile: bool = False  # torch.compile the repeated blocks
    cuda_graphs: bool = False  # replay the denoiser's forward from CUDA graphs (resident on one GPU)
    fp8: str | None = None  # compute: FP8 tensor-core linears; weights: FP8 storage, compute in dtype
    offload: str = "auto"  # none, model, layer, or auto: the first that fits
    vram_budget: float | None = None  # GiB this process may use; None: the memory free at load
    text_encoder_device: str | None = None  # cpu or cuda; None: the device, within the plan
    vae_tiling: Tiling | None = None  # encode/decode by blended tiles
    lora_mode: str = "auto"  # LORA_MODES: how the LoRAs given to qimg.load apply
    parallel: str | None = None  # PARALLEL_MODES: one image over the processes of a torchrun job

    def __post_init__(self) -> None:
        if self.device is not None and not _DEVICE.fullmatch(str(self.device)):
            raise UsageError(f"device {self.device!r} is not one of cpu, cuda, cuda:N", hint="e.g. --device cuda:1")
        _one_of("dtype", self.dtype, DTYPE_NAMES, optional=True)
        _one_of("attention backend", self.attention, ATTENTION_BACKENDS)
        _one_of("FP8 mode", self.fp8, FP8_MODES, optional=True)
        _one_of("offload mode", self.offload, OFFLOAD_MODES)
        _one_of("LoRA mode", self.lora_mode, LORA_MODES)
        _one_of("parallel mode", self.parallel, PARALLEL_MODES, optional=True)
        _one_of("text encoder device", self.text_encoder_device, TEXT_ENCODER_DEVICES, optional=True)
        if self.vram_budget is not None and not (
            isinstance(self.vram_budget, (int, float)) and math.isfinite(self.vram_budget)
            and self.vram_budget >= MIN_VRAM_BUDGET
        ):
            raise UsageError(f"--vram-budget {self.vram_budget} is not a number of GiB >= {MIN_VRAM_BUDGET}",
                             hint="e.g. --vram-budget 12")
        if self.vae_tiling is not None and not isinstance(self.vae_tiling, Tiling):
            raise UsageError(f"vae_tiling must be a Tiling, not {type(self.vae_tiling).__name__}",
                             hint="e.g. vae_tiling=qimg.Tiling(512, 64)")

    @property
    def budget_bytes(self) -> int | None:
        """The VRAM budget in bytes (None: no budget)."""
        return None if self.vram_budget is None else int(self.vram_budget * 1024**3)

    def replace(self, **changes: object) -> RuntimeOptions:
        """A copy with some options changed (validated again)."""
        return dataclasses.replace(self, **changes)


def _one_of(what: str, value: str | None, allowed: tuple[str, ...], *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if value not in allowed:
        raise UsageError(f"unknown {what} {value!r}", hint=f"use one of {', '.join(allowed)}")
