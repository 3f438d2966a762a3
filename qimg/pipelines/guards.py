"""What a run checks around the work: the device and dtype the options mean on this machine (refused in one line
before any weight is read), NaN or infinite results (saying where they came from), and how long each phase of a
run took."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor, nn

from qimg.errors import InputError, NumericsError
from qimg.runtime.attention import resolve as resolve_attention
from qimg.runtime.devices import pick_device, pick_dtype
from qimg.runtime.fp8 import fp8_supported
from qimg.runtime.options import RuntimeOptions


def resolve_device(options: RuntimeOptions) -> tuple[torch.device, torch.dtype]:
    """The device and dtype the options mean on this machine, refusing (one line each, before any weight is
    read) what it cannot run."""
    dev = pick_device(options.device)
    dt = pick_dtype(options.dtype, dev)
    if options.fp8 == "compute" and not fp8_supported(dev):
        raise InputError(
            f"--fp8 compute needs an FP8 GPU (Ada or Hopper, compute capability 8.9+); {dev} has none",
            hint="use --fp8 weights (FP8 storage, bf16 compute) or leave FP8 off",
        )
    try:
        resolve_attention(options.attention, dev)
    except (ValueError, ImportError) as e:
        raise InputError(str(e), hint="--attention sdpa works everywhere") from e
    gpu_only = ([f"--offload {options.offload}"] if options.offload in ("model", "layer") else []) + (
        [f"--vram-budget {options.vram_budget:g}"] if options.vram_budget is not None else [])
    if dev.type != "cuda" and gpu_only:
        raise InputError(f"{' and '.join(gpu_only)} manage{'s' if len(gpu_only) == 1 else ''} GPU memory; the "
                         f"device is {dev}", hint="leave it off on the CPU, or pass --device cuda")
    if dev.type != "cuda" and options.cuda_graphs:
        raise InputError(f"--cuda-graphs needs a CUDA device; the device is {dev}",
                         hint="leave it off on the CPU, or pass --device cuda")
    if dev.type != "cuda" and options.text_encoder_device == "cuda":
        raise InputError("--text-encoder-device cuda needs a CUDA device", hint="pass --device cuda")
    return dev, dt


def check_finite(x: Tensor, where: str, dtype: torch.dtype, model: nn.Module | None = None) -> Tensor:
    """Refuse NaN or infinite values, saying where they came from: the prompt embeddings, the model's own
    weights (searched only once something is wrong), or float16 overflowing."""
    if bool(torch.isfinite(x).all()):
        return x
    if model is not None:
        bad = next((n for n, t in model.state_dict().items() if t.is_floating_point()
                    and not bool(torch.isfinite(t.float()).all())), None)
        if bad is not None:
            raise NumericsError(f"the model's weights hold NaN or infinite values ({bad})",
                                hint="the checkpoint is damaged; re-download the model")
    if dtype == torch.float16:
        raise NumericsError(f"{where} produced NaN or infinite values in float16",
                            hint="float16 overflows on this model; use --dtype bfloat16 (CUDA) or float32")
    raise NumericsError(f"{where} produced NaN or infinite values", hint="rerun with --debug and report it")


class Phases:
    """Seconds per phase of one run (placing, text, denoise, decode), for image metadata and `qimg bench`. On a
    GPU each mark waits for the queued work, so a phase is charged its own kernels, not the next one's."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def mark(self, name: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.seconds[name] = round(self.seconds.get(name, 0.0) + now - self._last, 4)
        self._last = now


def parallel_plan(options: RuntimeOptions) -> Any:
    """This process's part in one image shared by the processes of a torchrun job (--parallel), or None; the
    process group is joined here, before any weight is read."""
    if options.parallel is None:
        return None
    from qimg.runtime.distributed import init_world, world_from_env
    from qimg.runtime.sequence_parallel import make_parallel_plan

    world = world_from_env()
    if world is None:
        raise InputError(f"--parallel {options.parallel} shares one image between several processes, and this one "
                         "runs alone", hint="run it under torchrun, or add --gpus N")
    init_world(world)
    try:
        return make_parallel_plan(options.parallel)
    except ValueError as e:
        raise InputError(str(e), hint="--parallel cfg: 2 processes; seq: any count; cfg+seq: 4, 6, 8, ...") from None
