"""The fast paths of the Qwen-Image MMDiT vs diffusers, in one process on the same random full-size weights.

    python bench/speed.py --out bench/results/speed_h100.json [--no-compile] [--no-fp8] [--quick]

Rows (1024x1024: 4096 image tokens; prompt 128 text tokens, negative prompt 8):
- forward, batch 1, no mask: diffusers eager / compiled (its compile_repeated_blocks), qimg eager with each
  attention kernel, qimg compiled;
- one CFG step: diffusers = two forwards (cond, uncond), qimg = one batch-of-two forward (TextPadding: each row
  attends over its own prompt tokens, no mask);
- FP8 compute (qimg only): forward batch 1 and CFG step, eager and compiled;
- resident --fp8 weights (FP8 storage, bf16 compute): CFG step, eager and compiled;
- qimg rows named "fused" run with the fused Triton kernels on (qimg/runtime/kernels.py), the others without;
- qimg rows named "cuda-graphs" call the model through runtime/graphs.CudaGraphs (--cuda-graphs): replays;
- qimg rows named "table" take the blocks' modulation from runtime/modulation.ModulationTable, as a pipeline's
  runs do (filled once for the row's timestep, outside the timing);
- --quick: only the compiled rows with the fused kernels (bf16, FP8 compute, FP8 weights; each with and without
  the table, with and without CUDA graphs) and diffusers compiled;
plus the relative L2 error of each qimg variant's velocity against diffusers' bf16 output.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import random_diffusers_mmdit, sharing_qimg_mmdit, time_ms  # noqa: E402
from qimg.embeddings import PromptEmbeds  # noqa: E402
from qimg.families.qwen import QWEN_IMAGE  # noqa: E402
from qimg.families.qwen import mmdit_fp8_layers as qwen_mmdit_fp8_layers  # noqa: E402
from qimg.nets.qwen_mmdit import qwen_rope  # noqa: E402
from qimg.pipelines.qwen import text_batch  # noqa: E402
from qimg.runtime.attention import use_attention  # noqa: E402
from qimg.runtime.compile import compile_blocks  # noqa: E402
from qimg.runtime.fp8 import apply_fp8  # noqa: E402
from qimg.runtime.graphs import CudaGraphs  # noqa: E402
from qimg.runtime.kernels import use_fused_kernels  # noqa: E402
from qimg.runtime.modulation import ModulationTable  # noqa: E402
from qimg.specs import QwenMMDiTParams  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--layers", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--attention", default="sdpa,cudnn", help="the eager rows' attention kernels")
    ap.add_argument("--no-fp8", action="store_true")
    ap.add_argument("--quick", action="store_true", help="the compiled fused rows only, with and without tables")
    args = ap.parse_args()
    assert QWEN_IMAGE.modulation is not None

    dev, dtype = torch.device("cuda"), torch.bfloat16
    params = QwenMMDiTParams(num_layers=args.layers)
    ref = random_diffusers_mmdit(args.layers, dev, dtype)
    ours = sharing_qimg_mmdit(ref, args.layers)  # shared storage, no copy

    gen = torch.Generator(dev).manual_seed(1)
    x = torch.randn(1, 4096, 64, device=dev, dtype=dtype, generator=gen)
    cond = torch.randn(1, 128, 3584, device=dev, dtype=dtype, generator=gen)
    uncond = torch.randn(1, 8, 3584, device=dev, dtype=dtype, generator=gen)
    t1 = torch.full((1,), 0.5, device=dev, dtype=dtype)
    t2 = t1.expand(2)
    shapes = [(1, 64, 64)]
    rope1 = qwen_rope(shapes, 128, params.axes_dims_rope).to(dev)
    txt2, mask2 = text_batch([PromptEmbeds(cond), PromptEmbeds(uncond)], dtype)
    x2 = x.expand(2, -1, -1)

    rows: dict[str, dict] = {}

    def dump() -> None:
        """Write what is measured so far (a run stopped at a time limit keeps its rows)."""
        report = {
            "benchmark": "qwen-image mmdit fast paths, 1024x1024, 128 + 8 text tokens",
            "device": torch.cuda.get_device_name(dev),
            "torch": torch.__version__,
            "diffusers": __import__("diffusers").__version__,
            "python": platform.python_version(),
            "layers": args.layers,
            "command": " ".join(["python", *sys.argv]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "rows": rows,
            "rel_l2_vs_diffusers_bf16": err,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")

    def measure(name: str, fn, warmup: int | None = None) -> None:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        first = time.perf_counter() - started
        times = time_ms(fn, args.warmup if warmup is None else warmup, args.repeats)
        rows[name] = {"median_ms": round(statistics.median(times), 2), "min_ms": round(min(times), 2),
                      "first_call_s": round(first, 2),
                      "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2)}
        if graphs:  # 0 would mean the capture was refused and every call ran plain
            rows[name]["replays"] = graphs[0].replays
        print(name, json.dumps(rows[name]), flush=True)
        dump()

    def d_fwd(txt, n):
        return ref(hidden_states=x, encoder_hidden_states=txt, timestep=t1, img_shapes=[shapes],
                   return_dict=False)[0]

    def d_step():
        return d_fwd(cond, 128), d_fwd(uncond, 8)

    graphs: list[CudaGraphs] = []  # set: the qimg rows call the model through CUDA-graph replays

    def q_fwd():
        return (graphs[0] if graphs else ours)(x, cond, t1, rope1)

    def q_step():
        return (graphs[0] if graphs else ours)(x2, txt2, t2, rope2, mask2)

    rope2 = qwen_rope(shapes, txt2.shape[1], params.axes_dims_rope).to(dev)
    err: dict[str, float] = {}
    with torch.inference_mode():
        want = d_fwd(cond, 128).float()
        want_u = d_fwd(uncond, 8).float()

        def rel(name: str) -> None:
            got = q_fwd().float()
            err[name] = ((got - want).norm() / want.norm()).item()
            pair = q_step().float()
            err[name + " cfg-pair uncond"] = ((pair[1] - want_u).norm() / want_u.norm()).item()

        def compiled_rows(name: str, pair: str, cuda_graphs: bool = False, table: ModulationTable | None = None,
                          b1: bool = True) -> None:
            """The batch-1 and the CFG-pair rows of a compiled variant, each from a fresh compile: a real run has
            one shape, and a graph compiled after another shape is dynamic in the dimensions that changed.
            cuda_graphs: the calls go through runtime/graphs.CudaGraphs (--cuda-graphs); table: inside a run of
            this modulation table at the rows' timestep."""
            graphs[:] = [CudaGraphs(ours)] if cuda_graphs else []
            name += " table" if table is not None else ""
            with contextlib.ExitStack() as run:
                if table is not None:
                    assert run.enter_context(table.use(t1.float(), dtype))
                if b1:
                    torch._dynamo.reset()
                    got = q_fwd().float()
                    err[name] = ((got - want).norm() / want.norm()).item()
                    measure(f"forward b1: {name}", q_fwd, warmup=2)
                torch._dynamo.reset()
                got = q_step().float()
                err[name + " cfg-pair uncond"] = ((got[1] - want_u).norm() / want_u.norm()).item()
                measure(f"cfg step: {name} {pair}", q_step, warmup=2)
            graphs.clear()

        def graphed_rows(name: str) -> None:
            """Uncompiled rows through CUDA-graph replays: no tracing for a new process to pay."""
            graphs[:] = [CudaGraphs(ours)]
            measure(f"forward b1: {name}", q_fwd)
            measure(f"cfg step: {name} (batch 2, TextPadding)", q_step)
            graphs.clear()

        if args.quick:
            use_attention("cudnn", dev)
            use_fused_kernels(dev)
            # (label, fp8 mode, cuda graphs, table): each variant against the one it differs from by one change
            variants = [("qimg compiled cudnn fused", None, False, False),
                        ("qimg compiled cudnn fused", None, False, True),
                        ("qimg compiled cudnn fused cuda-graphs", None, True, False),
                        ("qimg compiled cudnn fused cuda-graphs", None, True, True),
                        ("qimg fp8 compiled fused", "compute", False, False),
                        ("qimg fp8 compiled fused", "compute", False, True),
                        ("qimg fp8 compiled fused cuda-graphs", "compute", True, False),
                        ("qimg fp8 compiled fused cuda-graphs", "compute", True, True),
                        ("qimg fp8 weights compiled fused", "weights", False, False),
                        ("qimg fp8 weights compiled fused", "weights", False, True),
                        ("qimg fp8 weights compiled fused cuda-graphs", "weights", True, False),
                        ("qimg fp8 weights compiled fused cuda-graphs", "weights", True, True)]
            made: object = ()  # no model yet
            for label, fp8, graphed, tabled in variants:
                if made != fp8:
                    made = fp8
                    ours = sharing_qimg_mmdit(ref, args.layers)  # fresh, sharing the bf16 weights
                    if fp8 is not None:
                        apply_fp8(ours, qwen_mmdit_fp8_layers, compute=fp8 == "compute")
                    table = ModulationTable(ours, QWEN_IMAGE.modulation)
                    compile_blocks(ours.transformer_blocks)
                compiled_rows(label, "(batch 2, TextPadding)", graphed, table if tabled else None,
                              b1=fp8 != "weights")
            torch._dynamo.reset()
            ref.compile_repeated_blocks(fullgraph=True)
            measure("forward b1: diffusers compiled", lambda: d_fwd(cond, 128), warmup=2)
            measure("cfg step: diffusers compiled (2 forwards)", d_step, warmup=2)
        measure("forward b1: diffusers eager", lambda: d_fwd(cond, 128))
        measure("cfg step: diffusers eager (2 forwards)", d_step)
        if not args.quick:
            use_fused_kernels("cpu")  # off: the unfused rows first
            for backend in args.attention.split(","):
                use_attention(backend, dev)
                rel(f"qimg eager {backend}")
                measure(f"forward b1: qimg eager {backend}", q_fwd)
                measure(f"cfg step: qimg eager {backend} (batch 2, TextPadding)", q_step)
            use_fused_kernels(dev)
            rel("qimg eager cudnn fused")
            measure("forward b1: qimg eager cudnn fused", q_fwd)
            measure("cfg step: qimg eager cudnn fused (batch 2, TextPadding)", q_step)
            graphed_rows("qimg eager cudnn fused cuda-graphs")
            if not args.no_compile:
                use_attention("cudnn", dev)
                compile_blocks(ours.transformer_blocks)
                use_fused_kernels("cpu")
                compiled_rows("qimg compiled cudnn", "(batch 2, TextPadding)")
                use_fused_kernels(dev)
                compiled_rows("qimg compiled cudnn fused", "(batch 2, TextPadding)")
                compiled_rows("qimg compiled cudnn fused cuda-graphs", "(batch 2, TextPadding)", cuda_graphs=True)
                torch._dynamo.reset()
                ref.compile_repeated_blocks(fullgraph=True)
                measure("forward b1: diffusers compiled", lambda: d_fwd(cond, 128), warmup=2)
                measure("cfg step: diffusers compiled (2 forwards)", d_step, warmup=2)
            if not args.no_fp8:
                ours = sharing_qimg_mmdit(ref, args.layers)  # fresh, uncompiled, still sharing the bf16 weights
                n = apply_fp8(ours, qwen_mmdit_fp8_layers, compute=True)
                print("fp8 linears", n, flush=True)
                use_attention("cudnn", dev)
                for fused in (False, True):
                    use_fused_kernels(dev if fused else "cpu")
                    tag = " fused" if fused else ""
                    rel(f"qimg fp8 eager{tag}")
                    measure(f"forward b1: qimg fp8 eager{tag}", q_fwd)
                    measure(f"cfg step: qimg fp8 eager{tag} (batch 2, TextPadding)", q_step)
                graphed_rows("qimg fp8 eager fused cuda-graphs")
                if not args.no_compile:
                    compile_blocks(ours.transformer_blocks)
                    for fused in (False, True):
                        use_fused_kernels(dev if fused else "cpu")
                        compiled_rows("qimg fp8 compiled" + (" fused" if fused else ""), "(batch 2, TextPadding)")
                    compiled_rows("qimg fp8 compiled fused cuda-graphs", "(batch 2, TextPadding)", cuda_graphs=True)
                # --fp8 weights, resident: FP8 storage, bf16 compute (each linear dequantises its weight per call)
                del ours
                ours = sharing_qimg_mmdit(ref, args.layers)
                apply_fp8(ours, qwen_mmdit_fp8_layers, compute=False)
                for fused in (False, True):
                    use_fused_kernels(dev if fused else "cpu")
                    tag = " fused" if fused else ""
                    rel(f"qimg fp8 weights eager{tag}")
                    measure(f"cfg step: qimg fp8 weights eager{tag} (batch 2, TextPadding)", q_step)
                if not args.no_compile:
                    compile_blocks(ours.transformer_blocks)
                    torch._dynamo.reset()
                    rel("qimg fp8 weights compiled fused")
                    measure("cfg step: qimg fp8 weights compiled fused (batch 2, TextPadding)", q_step, warmup=2)
                    graphs[:] = [CudaGraphs(ours)]
                    measure("cfg step: qimg fp8 weights compiled fused cuda-graphs (batch 2, TextPadding)", q_step,
                            warmup=2)
                    graphs.clear()

    dump()
    for name, row in rows.items():
        print(f"{name:<52}{row['median_ms']:>10} ms {row['peak_reserved_gib']:>7} GiB")
    for name, e in err.items():
        print(f"rel L2 {name:<45}{e:.4f}")


if __name__ == "__main__":
    main()
