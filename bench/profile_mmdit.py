"""Where the Qwen-Image MMDiT's time goes on the GPU: kernels grouped into matmul / attention / fused
elementwise / other, per variant, with achieved TFLOP/s against the FLOP count of anchors.md.

    python bench/profile_mmdit.py --out bench/results/profile_h100.json

Variants (1024x1024, 4096 image tokens, prompt 128 tokens, negative 8): compiled bf16 batch 1; compiled bf16
CFG pair as one batch of two with TextPadding (no attention mask); compiled FP8-compute batch 1 and CFG pair.
--table: inside a run of the modulation table (runtime/modulation.py), as a pipeline's denoise is.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import time_ms  # noqa: E402
from qimg.embeddings import PromptEmbeds  # noqa: E402
from qimg.families.qwen import QWEN_IMAGE  # noqa: E402
from qimg.families.qwen import mmdit_fp8_layers as qwen_mmdit_fp8_layers  # noqa: E402
from qimg.nets.qwen_mmdit import QwenMMDiT, qwen_rope  # noqa: E402
from qimg.pipelines.qwen import text_batch  # noqa: E402
from qimg.runtime.attention import use_attention  # noqa: E402
from qimg.runtime.compile import compile_blocks  # noqa: E402
from qimg.runtime.fp8 import apply_fp8  # noqa: E402
from qimg.runtime.kernels import use_fused_kernels  # noqa: E402
from qimg.runtime.modulation import ModulationTable  # noqa: E402
from qimg.specs import QwenMMDiTParams  # noqa: E402

D, LAYERS = 3072, 60


def flops(tokens: int, txt: int) -> tuple[float, float]:
    """(linear, attention) FLOPs of one forward: 2*12*D^2 per token per layer; 4*L^2*D per layer."""
    return 2 * 12 * D * D * LAYERS * tokens, 4 * tokens * tokens * D * LAYERS


def category(name: str) -> str:
    n = name.lower()
    if any(s in n for s in ("flash", "fmha", "attention", "attn", "cudnn_generated", "sdpa")):
        return "attention"
    if any(s in n for s in ("gemm", "nvjet", "sm90_xmma", "cutlass", "matmul", "scaled_mm", "f8f8")):
        return "matmul"
    if "triton" in n:
        return "fused elementwise (triton)"
    return "other"


def profile(fn, steps: int = 3) -> tuple[dict[str, float], list[tuple[str, float]]]:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    per_kernel: dict[str, float] = defaultdict(float)
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0)
        if t and e.key and not e.key.startswith("aten::") and not e.key.startswith("Memcpy"):
            per_kernel[e.key] += t / 1000.0 / steps  # ms per call
    groups: dict[str, float] = defaultdict(float)
    for k, t in per_kernel.items():
        groups[category(k)] += t
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:30]
    return dict(groups), top


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--fused", action="store_true", help="with qimg's fused kernels on (qimg/runtime/kernels.py)")
    ap.add_argument("--table", action="store_true", help="with the modulation table (runtime/modulation.py)")
    args = ap.parse_args()
    dev, dtype = torch.device("cuda"), torch.bfloat16
    params = QwenMMDiTParams()
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    with torch.device(dev):
        model = QwenMMDiT(params)
    torch.set_default_dtype(torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    model.eval().requires_grad_(False)
    use_attention("cudnn", dev)
    use_fused_kernels(dev if args.fused else "cpu")
    tag = (" fused" if args.fused else "") + (" table" if args.table else "")
    assert QWEN_IMAGE.modulation is not None
    table = ModulationTable(model, QWEN_IMAGE.modulation) if args.table else None
    compile_blocks(model.transformer_blocks)

    gen = torch.Generator(dev).manual_seed(1)
    x = torch.randn(1, 4096, 64, device=dev, dtype=dtype, generator=gen)
    cond = torch.randn(1, 128, 3584, device=dev, dtype=dtype, generator=gen)
    uncond = torch.randn(1, 8, 3584, device=dev, dtype=dtype, generator=gen)
    t1 = torch.full((1,), 0.5, device=dev, dtype=dtype)
    rope1 = qwen_rope([(1, 64, 64)], 128, params.axes_dims_rope).to(dev)
    txt2, pad2 = text_batch([PromptEmbeds(cond), PromptEmbeds(uncond)], dtype)

    report: dict[str, dict] = {}

    def run(name: str, fn, tokens: list[tuple[int, int]]) -> None:
        with torch.inference_mode(), contextlib.ExitStack() as stack:
            if table is not None:
                stack.enter_context(table.use(t1.float(), dtype))
            times = time_ms(fn, 3, 10)
            groups, top = profile(fn)
        lin = sum(flops(n, txt)[0] for n, txt in tokens)
        att = sum(flops(n, txt)[1] for n, txt in tokens)
        ms = statistics.median(times)
        row = {
            "median_ms": round(ms, 2),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
            "kernel_ms": {k: round(v, 2) for k, v in sorted(groups.items())},
            "linear_tflops": round(lin / 1e12, 1),
            "attention_tflops": round(att / 1e12, 1),
            "top_kernels_ms": [(k[:90], round(v, 3)) for k, v in top],
        }
        if "matmul" in groups:
            row["matmul_tflop_per_s"] = round(lin / (groups["matmul"] / 1e3) / 1e12)
        if "attention" in groups:
            row["attention_tflop_per_s"] = round(att / (groups["attention"] / 1e3) / 1e12)
        report[name] = row
        print(name, json.dumps(row, indent=1), flush=True)

    run("bf16 compiled b1" + tag, lambda: model(x, cond, t1, rope1), [(4224, 128)])
    rope2 = qwen_rope([(1, 64, 64)], txt2.shape[1], params.axes_dims_rope).to(dev)
    x2, t2 = x.expand(2, -1, -1), t1.expand(2)
    pair_tokens = [(4224, 128), (4104, 8)]
    run("bf16 compiled cfg pair (TextPadding)" + tag, lambda: model(x2, txt2, t2, rope2, pad2), pair_tokens)
    apply_fp8(model, qwen_mmdit_fp8_layers, compute=True)
    compile_blocks(model.transformer_blocks)
    run("fp8 compiled b1" + tag, lambda: model(x, cond, t1, rope1), [(4224, 128)])
    run("fp8 compiled cfg pair (TextPadding)" + tag, lambda: model(x2, txt2, t2, rope2, pad2), pair_tokens)

    out = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__,
           "command": " ".join(["python", *sys.argv]),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "variants": report}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
