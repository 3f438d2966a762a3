"""The Qwen-Image MMDiT's linear layers one at a time: bf16 against the FP8 forms torch._scaled_mm offers.

    python bench/gemm_shapes.py --out bench/results/gemm_shapes_h200.json

Device time per call (calls replayed as one CUDA graph: no host latency in it). For each block linear's shape
(1024x1024: 4096 image tokens, 128 text tokens; batch of two for a CFG pair) it times each form, in TFLOP/s:
- bf16: F.linear with bias (what the bf16 path runs);
- fp8 rowwise: per-token activation scales x per-channel weight scales (what --fp8 compute runs), with and without
  use_fast_accum (Hopper's FP8 accumulation without periodic promotion);
- fp8 tensorwise: one scale each (cuBLASLt), with and without fast accumulation;
and the same for the three attention projections fused into one matmul (q, k, v stacked: N = 3 * 3072), to see
whether fusing them pays. Also the relative L2 error of each FP8 form against the bf16 product.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import time_graph_ms  # noqa: E402
from qimg.runtime.fp8 import quantize_rowwise  # noqa: E402

E4M3_MAX = 448.0


def tensorwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = (x.abs().amax().float() / E4M3_MAX).clamp(min=1e-12)
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


def matmul_forms(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    """x (M, K) @ w (N, K).T + b in bf16 and in each FP8 form (operands quantised beforehand, as in the model)."""
    qw, sw = quantize_rowwise(w)
    qx, sx = quantize_rowwise(x)
    tw, tsw = tensorwise(w)
    tx, tsx = tensorwise(x)
    sw = sw.reshape(1, -1)

    def scaled(a: torch.Tensor, bt: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor, fast: bool) -> Callable:
        return lambda: torch._scaled_mm(a, bt.t(), scale_a=sa, scale_b=sb, bias=b, out_dtype=torch.bfloat16,
                                        use_fast_accum=fast)

    return {"bf16": lambda: F.linear(x, w, b),
            "fp8 rowwise": scaled(qx, qw, sx, sw, False), "fp8 rowwise fast": scaled(qx, qw, sx, sw, True),
            "fp8 tensorwise": scaled(tx, tw, tsx, tsw, False), "fp8 tensorwise fast": scaled(tx, tw, tsx, tsw, True)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--calls", type=int, default=20, help="calls per CUDA graph replay")
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    d = 3072
    shapes = {  # name: (M, N, K)
        "qkv one (img b1)": (4096, d, d), "qkv fused (img b1)": (4096, 3 * d, d),
        "mlp up (img b1)": (4096, 4 * d, d), "mlp down (img b1)": (4096, d, 4 * d),
        "qkv one (img b2)": (8192, d, d), "qkv fused (img b2)": (8192, 3 * d, d),
        "mlp up (img b2)": (8192, 4 * d, d), "mlp down (img b2)": (8192, d, 4 * d),
        "qkv one (txt 128)": (128, d, d), "qkv fused (txt 128)": (128, 3 * d, d),
        "mlp up (txt 128)": (128, 4 * d, d), "mlp down (txt 128)": (128, d, 4 * d),
    }
    rows: dict[str, dict] = {}
    with torch.inference_mode():
        for name, (m, n, k) in shapes.items():
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
            b = torch.randn(n, device=dev, dtype=torch.bfloat16) * 0.02
            want = F.linear(x, w, b).float()
            forms = matmul_forms(x, w, b)
            row: dict[str, dict] = {}
            for form, fn in forms.items():
                try:
                    got = fn().float()
                    t = statistics.median(time_graph_ms(fn, calls=args.calls))
                except RuntimeError as e:
                    row[form] = {"error": str(e).splitlines()[0][:200]}
                    continue
                row[form] = {"us": round(t * 1000, 1), "tflop_s": round(2 * m * n * k / (t / 1e3) / 1e12),
                             "rel_l2": round(((got - want).norm() / want.norm()).item(), 5)}
            rows[name] = row
            print(name, json.dumps(row), flush=True)
    out = {"benchmark": "Qwen-Image MMDiT linear shapes, bf16 vs torch._scaled_mm forms",
           "device": torch.cuda.get_device_name(dev), "torch": torch.__version__,
           "cuda": torch.version.cuda, "command": " ".join(["python", *sys.argv]),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
