"""One CFG step of the full-size Qwen-Image MMDiT (1024x1024) shared by the ranks of a torchrun job, qimg's
--parallel modes next to diffusers' own context parallelism (its ContextParallelConfig, Ulysses) on the very same
weight tensors, in the same processes (issue 16, part b, per step).

    torchrun --nproc-per-node N bench/multi_gpu_step.py --out DIR/step_N.json [--no-compile] [--no-fp8]

Every rank builds the same random weights (one seed), so no file is read. Per world size N:
- 1: qimg's CFG step as one process runs it (the two branches batched), diffusers' (two forwards);
- 2: qimg --parallel cfg and seq, diffusers Ulysses over 2;
- 4 (and other even counts >= 4): qimg --parallel cfg+seq and seq, diffusers Ulysses over N.
Each qimg row also records the velocity's rel-L2 against the same rank's one-process velocity (the NCCL path of
the exchanges, checked on GPUs), eager and compiled, and with FP8 compute (against the one-process FP8 velocity).
Rank 0 writes the JSON after every row.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import fp8_compute_copy, random_diffusers_mmdit, sharing_qimg_mmdit, time_ms  # noqa: E402
from qimg.embeddings import PromptEmbeds  # noqa: E402
from qimg.pipelines.qwen import qwen_velocity  # noqa: E402
from qimg.runtime.attention import use_attention  # noqa: E402
from qimg.runtime.compile import compile_blocks  # noqa: E402
from qimg.runtime.distributed import init_world, leave_world, world_from_env  # noqa: E402
from qimg.runtime.kernels import use_fused_kernels  # noqa: E402
from qimg.runtime.sequence_parallel import make_parallel_plan  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--layers", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--no-fp8", action="store_true")
    ap.add_argument("--pixels", type=int, default=1024, help="image side (1024: 4096 image tokens)")
    args = ap.parse_args()

    world = world_from_env()
    size = 1 if world is None else world.size
    rank = 0 if world is None else world.rank
    if world is not None:
        init_world(world)
    cuda = torch.cuda.is_available()  # the CPU runs a smoke test of the script (gloo, fp32, no compile or FP8)
    dev = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    if not cuda:
        args.no_compile = args.no_fp8 = True
    side = args.pixels // 16
    shapes = [(1, side, side)]
    ref = random_diffusers_mmdit(args.layers, dev, dtype)  # one seed: the same weights on every rank
    ours = sharing_qimg_mmdit(ref, args.layers)
    use_attention("cudnn" if cuda else "sdpa", dev)
    use_fused_kernels(dev)

    gen = torch.Generator(dev).manual_seed(1)
    x = torch.randn(1, side * side, 64, device=dev, dtype=dtype, generator=gen)
    cond = PromptEmbeds(torch.randn(1, 128, 3584, device=dev, dtype=dtype, generator=gen))
    uncond = PromptEmbeds(torch.randn(1, 8, 3584, device=dev, dtype=dtype, generator=gen))
    sigma = torch.tensor(0.5, device=dev)
    rows: dict[str, dict] = {}
    report = {"benchmark": "qwen-image CFG step (60 blocks, 1024x1024, 128 + 8 text tokens) over torchrun ranks",
              "device": f"{size} x {torch.cuda.get_device_name(dev) if cuda else 'cpu'}", "processes": size,
              "torch": torch.__version__, "diffusers": __import__("diffusers").__version__,
              "command": " ".join([f"torchrun --nproc-per-node {size}", *sys.argv]),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "rows": rows}

    def dump() -> None:
        if rank == 0:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2) + "\n")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def measure(name: str, fn, want: torch.Tensor | None = None, warmup: int | None = None) -> None:
        if world is not None:
            dist.barrier()
        sync()
        started = time.perf_counter()
        got = fn()
        sync()
        first = time.perf_counter() - started
        times = time_ms(fn, args.warmup if warmup is None else warmup, args.repeats)
        # a step ends when the slowest rank ends: the median of every rank's median
        local = torch.tensor([statistics.median(times)], device=dev)
        if world is not None:
            dist.all_reduce(local, op=dist.ReduceOp.MAX)
        row = {"median_ms": round(float(local), 2), "min_ms": round(min(times), 2), "first_call_s": round(first, 2),
               "peak_allocated_gib": round(torch.cuda.max_memory_allocated(dev) / 2**30, 2) if cuda else None}
        if want is not None:
            row["rel_l2_vs_one_process"] = round(((got.float() - want).norm() / want.norm()).item(), 5)
        rows[name] = row
        if rank == 0:
            print(name, json.dumps(row), flush=True)
        dump()

    def velocity_fn(model, parallel=None):
        field = qwen_velocity(model, dtype, cond, uncond, 4.0, shapes, parallel=parallel)
        return lambda: field(x, sigma)

    def diffusers_step():
        def fwd(p: PromptEmbeds):
            return ref(hidden_states=x, encoder_hidden_states=p.embeds, timestep=sigma.to(dtype).reshape(1),
                       img_shapes=[shapes], return_dict=False)[0]
        return fwd(cond), fwd(uncond)

    modes = [] if size == 1 else (["cfg", "seq"] if size == 2 else (["cfg+seq", "seq"] if size % 2 == 0 else ["seq"]))
    plans = {mode: make_parallel_plan(mode) for mode in modes}  # every rank, same order: groups are collective
    with torch.inference_mode():
        alone = velocity_fn(ours)
        want = alone().float()
        if size == 1:
            measure("qimg eager, one process", alone, want)
            measure("diffusers eager, one process (2 forwards)", diffusers_step)
        for mode in modes:
            measure(f"qimg eager, --parallel {mode}", velocity_fn(ours, plans[mode]), want)
        if not args.no_compile:
            compile_blocks(ours.transformer_blocks)
            if size == 1:
                measure("qimg compiled, one process", alone, want)
            for mode in modes:
                measure(f"qimg compiled, --parallel {mode}", velocity_fn(ours, plans[mode]), want)
        if size > 1 and cuda:  # diffusers' context parallelism needs an accelerator
            from diffusers import ContextParallelConfig

            name = f"diffusers eager, ContextParallelConfig(ulysses_degree={size}) (2 forwards)"
            try:
                ref.set_attention_backend("_native_cudnn")
                ref.enable_parallelism(config=ContextParallelConfig(ulysses_degree=size))
                measure(name, diffusers_step)
            except Exception as e:  # every rank fails alike; the qimg rows after it still run
                rows[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
        if not args.no_fp8:
            del ours
            fp8 = fp8_compute_copy(sharing_qimg_mmdit(ref, args.layers))
            if not args.no_compile:
                compile_blocks(fp8.transformer_blocks)
            tag = "compiled" if not args.no_compile else "eager"
            alone8 = velocity_fn(fp8)
            want8 = alone8().float()
            report["fp8_rel_l2_vs_bf16_one_process"] = round(((want8 - want).norm() / want.norm()).item(), 5)
            if size == 1:
                measure(f"qimg fp8 compute {tag}, one process", alone8, want8)
            for mode in modes:
                measure(f"qimg fp8 compute {tag}, --parallel {mode}", velocity_fn(fp8, plans[mode]), want8)
    dump()
    if world is not None:
        leave_world()


if __name__ == "__main__":
    main()
