"""Each fused kernel of qimg/runtime/triton_kernels.py against the PyTorch forms it replaces (eager and
torch.compile'd), at Qwen-Image's full-size shapes, in one process: device time per call (20 calls replayed as one
CUDA graph, so the host's launch latency is not in it), bytes moved per second, and the largest difference.

    python bench/fusions.py --out bench/results/fusions_h200.json

Shapes: 4096 image tokens + 128 text tokens, width 3072, 24 heads of 128, MLP hidden 12288; the dequantisation
rows use the MLP's up projection weight (12288 x 3072) and one CFG pair of activations (8192 tokens).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import time_graph_ms  # noqa: E402
from qimg.nets.layers import RMSNorm, _norm_rope_torch, layer_norm, modulate, rope_angles, rope_table  # noqa: E402
from qimg.runtime import triton_kernels  # noqa: E402  (registers the qimg:: ops)
from qimg.runtime.fp8 import _dequantize, quantize_rowwise  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    dev, bf = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    rows: dict[str, dict[str, Any]] = {}

    def row(name: str, fn: Callable[[], Any], nbytes: int, ref: Any = None) -> None:
        ms = statistics.median(time_graph_ms(fn))
        entry: dict[str, Any] = {"ms": round(ms, 4), "GB_per_s": round(nbytes / ms / 1e6)}
        if ref is not None:
            got = fn()
            got = got[0] if isinstance(got, tuple) else got
            entry["max_abs_diff_vs_eager"] = float((got.float() - ref.float()).abs().max())
        rows[name] = entry
        print(f"{name:<58}{ms:9.4f} ms {entry['GB_per_s']:>6} GB/s", flush=True)
        dump()

    def fused_rows(name: str, fn: Callable[[], Any], nbytes: int, ref: Any, quantises: bool) -> None:
        """The fused kernel in each rounding mode of triton_kernels: hand-rounded casts or the GPU's, and for the
        quantising kernels the division by the scale or a multiply by 1 / scale."""
        modes = [(False, True, "hand-rounded"), (None, True, "gpu casts")]
        if name.startswith("norm_modulate"):  # it rounds by hand whatever hw_casts says (its launcher says why)
            modes = modes[:1]
        if quantises:
            modes.append((modes[-1][0], False, modes[-1][2] + ", times 1/scale"))
        defaults = triton_kernels.hw_casts, triton_kernels.exact_division
        for hw, div, tag in modes:
            triton_kernels.hw_casts, triton_kernels.exact_division = hw, div
            row(f"{name}: fused ({tag})", fn, nbytes, ref)
        triton_kernels.hw_casts, triton_kernels.exact_division = defaults

    def dump() -> None:  # after every row: a run stopped at a time limit keeps what it measured
        report = {"bench": "fusions", "device": torch.cuda.get_device_name(dev), "torch": torch.__version__,
                  "command": " ".join(["python", *sys.argv]),
                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "rows": rows,
                  "notes": "GB_per_s: bytes each call must move (read + write) over its time; for linear rows it "
                           "is GFLOP/s"}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")

    with torch.inference_mode():
        # q/k RMSNorm + join + RoPE
        lt, li, h, d = 128, 4096, 24, 128
        t = torch.randn(1, lt, h * d, device=dev, dtype=bf).unflatten(-1, (h, d))
        i = torch.randn(1, li, h * d, device=dev, dtype=bf).unflatten(-1, (h, d))
        nt, ni = RMSNorm(d).to(dev, bf), RMSNorm(d).to(dev, bf)
        nt.weight.normal_(1, 0.1)
        ni.weight.normal_(1, 0.1)
        pos = torch.randn(lt + li, 3, device=dev) * 30
        rope = rope_table(rope_angles(pos, (16, 56, 56)))
        io = 2 * (lt + li) * h * d * 2  # read once, write once
        eager = _norm_rope_torch(t, nt, i, ni, rope)
        row("norm_rope: eager", lambda: _norm_rope_torch(t, nt, i, ni, rope), io)
        row("norm_rope: compiled", torch.compile(lambda: _norm_rope_torch(t, nt, i, ni, rope)), io, eager)
        fused_rows("norm_rope", lambda: torch.ops.qimg.qk_norm_rope(t, nt.weight, i, ni.weight, rope, 1e-6), io,
                   eager, False)

        # GELU + per-token FP8 quantisation of the MLP hidden activation
        hid = torch.randn(4096, 12288, device=dev, dtype=bf)
        io = hid.numel() * 3 + 4096 * 4

        def gq() -> Any:
            return quantize_rowwise(F.gelu(hid, approximate="tanh"))

        ref_q = gq()[0]
        row("gelu+quant: eager", gq, io)
        row("gelu+quant: compiled", torch.compile(gq), io, ref_q)
        fused_rows("gelu+quant", lambda: torch.ops.qimg.gelu_quant(hid), io, ref_q, True)

        # LayerNorm + modulation (+ quantisation)
        x = torch.randn(1, 4096, 3072, device=dev, dtype=bf)
        shift, scale = (torch.randn(1, 1, 3072, device=dev, dtype=bf) * 0.3 for _ in range(2))

        def nm() -> Any:
            return modulate(layer_norm(x), shift, scale)

        ref_nm = nm()
        io = x.numel() * 4
        row("norm_modulate: eager", nm, io)
        row("norm_modulate: compiled", torch.compile(nm), io, ref_nm)
        fused_rows("norm_modulate", lambda: torch.ops.qimg.norm_modulate(x, shift, scale, False, 1e-6, None), io,
                   ref_nm, False)

        def nmq() -> Any:
            return quantize_rowwise(nm().reshape(-1, 3072))

        ref_nmq = nmq()[0]
        io = x.numel() * 3
        row("norm_modulate+quant: compiled", torch.compile(nmq), io, ref_nmq)
        fused_rows("norm_modulate+quant", lambda: torch.ops.qimg.norm_modulate(x, shift, scale, True, 1e-6, None),
                   io, ref_nmq, True)

        # --fp8 weights: dequantisation of the up projection, and the linear it feeds (a CFG pair, 8192 tokens)
        w = torch.randn(12288, 3072, device=dev, dtype=bf) * 0.02
        wq, ws = quantize_rowwise(w)
        ws = ws.reshape(1, -1)
        a = torch.randn(8192, 3072, device=dev, dtype=bf)
        ref_w = _dequantize(wq, ws, bf)
        io = wq.numel() * 3
        row("dequantize: eager", lambda: _dequantize(wq, ws, bf), io)
        row("dequantize: compiled", torch.compile(lambda: _dequantize(wq, ws, bf)), io, ref_w)
        fused_rows("dequantize", lambda: torch.ops.qimg.dequantize_rows(wq, ws, bf), io, ref_w, False)
        flops = 2 * 8192 * 3072 * 12288
        row("linear, bf16 weight", lambda: F.linear(a, w), flops)
        row("linear, fp8 weight: eager dequantize", lambda: F.linear(a, _dequantize(wq, ws, bf)), flops)
        row("linear, fp8 weight: fused dequantize", lambda: F.linear(a, torch.ops.qimg.dequantize_rows(wq, ws, bf)),
            flops)

        # GELU in the cuBLASLt epilogue of the up projection (bf16 path)
        b = torch.randn(12288, device=dev, dtype=bf) * 0.02
        xs = torch.randn(4096, 3072, device=dev, dtype=bf)
        flops = 2 * 4096 * 3072 * 12288
        row("linear+gelu: eager", lambda: F.gelu(F.linear(xs, w, b), approximate="tanh"), flops)
        row("linear+gelu: compiled", torch.compile(lambda: F.gelu(F.linear(xs, w, b), approximate="tanh")), flops)
        row("linear+gelu: cublasLt epilogue", lambda: torch._addmm_activation(b, xs, w.t(), use_gelu=True), flops)
        # which GELU the epilogue computes: fp32 operands, so tanh's and erf's forms (up to ~5e-4 apart) are told
        # apart far above the rounding
        x32, w32, b32 = xs[:256].float() * 40, w[:512].float(), b[:512].float()
        lin = F.linear(x32.double(), w32.double(), b32.double())
        epi = torch._addmm_activation(b32, x32, w32.t(), use_gelu=True).double()
        rows["gelu epilogue formula"] = {
            "max_abs_vs_tanh_gelu": float((epi - F.gelu(lin, approximate="tanh")).abs().max()),
            "max_abs_vs_erf_gelu": float((epi - F.gelu(lin)).abs().max()),
            "tanh_vs_erf_max_abs": float((F.gelu(lin, approximate="tanh") - F.gelu(lin)).abs().max()),
        }
        print(rows["gelu epilogue formula"])
    dump()


if __name__ == "__main__":
    main()
