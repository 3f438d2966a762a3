"""The FLUX.1-dev transformer forward on full-size random weights: qimg (eager, compiled) and diffusers (eager) in
the same process, on the same weight tensors.

    python bench/flux.py --out bench/results/flux_forward_h200.json

1024x1024 (4096 image tokens), 512 text tokens, batch 1, bf16, guidance 3.5; milliseconds per forward (median of
--repeats after --warmup, CUDA events) and the peak GiB allocated; the outputs' relative difference to diffusers'.
Rows: diffusers eager, qimg eager, qimg compiled, qimg compiled with FP8 compute (a copy of the same weights with
the block linears in e4m3, flux_fp8_layers). --tiny runs the same code on a two-block model on the CPU (a smoke
test of this script, no figures).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import random_diffusers_flux, time_ms  # noqa: E402
from bench.profile_mmdit import profile  # noqa: E402
from qimg.families.flux import flux_fp8_layers  # noqa: E402
from qimg.nets.flux import FluxTransformer, flux_ids, flux_rope  # noqa: E402
from qimg.runtime.attention import use_attention  # noqa: E402
from qimg.runtime.compile import compile_blocks  # noqa: E402
from qimg.runtime.fp8 import apply_fp8  # noqa: E402
from qimg.specs import FluxParams  # noqa: E402


def flops(tokens: int, p: FluxParams) -> tuple[float, float]:
    """(linear, attention) FLOPs of one forward over `tokens` (text + image) tokens: per token, a double block's
    two streams together have 12 D^2 weights (q, k, v, out and the 4x MLP), a single block 12 D^2 too (linear1:
    3D + 4D outputs, linear2: 5D inputs); attention 4 L^2 D per block. Modulation and embedders are per sample."""
    d, blocks = p.dim, p.num_layers + p.num_single_layers
    return 2 * 12 * d * d * blocks * tokens, 4 * tokens * tokens * d * blocks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--skip", default="", help="rows to skip: diffusers,compile,fp8")
    ap.add_argument("--profile", action="store_true", help="also group each qimg row's kernel time (torch.profiler)")
    ap.add_argument("--tiny", action="store_true", help="a two-block model on the CPU: checks the script, no figures")
    args = ap.parse_args()
    if args.tiny:
        dev, dtype, grid, n_txt = torch.device("cpu"), torch.float32, 8, 16
        config = dict(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                      joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
        args.warmup, args.repeats = 1, 2
    else:
        dev, dtype, grid, n_txt = torch.device("cuda"), torch.bfloat16, 64, 512
        config = dict(num_layers=19, num_single_layers=38, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    ref = random_diffusers_flux(config, dev, dtype)
    params = FluxParams(**config)
    with torch.device("meta"):
        ours = FluxTransformer(params)
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    ours = ours.eval().requires_grad_(False)
    use_attention("cudnn" if dev.type == "cuda" else "auto", dev)

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, grid * grid, 64, generator=gen).to(dev, dtype)
    txt = torch.randn(1, n_txt, params.joint_attention_dim, generator=gen).to(dev, dtype)
    pooled = torch.randn(1, params.pooled_projection_dim, generator=gen).to(dev, dtype)
    t = torch.tensor([0.7], device=dev, dtype=dtype)
    g = torch.tensor([3.5], device=dev)
    rope = flux_rope(flux_ids(n_txt, [(0, grid, grid)]), params.axes_dims_rope, params.rope_theta).to(dev)
    txt_ids = torch.zeros(n_txt, 3, device=dev)
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).to(dev, torch.float32)

    def q() -> torch.Tensor:
        return current[0](x, txt, t, g, pooled, rope)

    current = [ours]

    def d() -> torch.Tensor:
        return ref(hidden_states=x, encoder_hidden_states=txt, pooled_projections=pooled, timestep=t, img_ids=img_ids,
                   txt_ids=txt_ids, guidance=g, return_dict=False)[0]

    rows_out: dict[str, dict] = {}
    skip = set(filter(None, args.skip.split(",")))

    def report() -> None:  # after every row: a run cut short keeps what it measured
        out = {"benchmark": "FLUX.1-dev transformer forward, 1024x1024, 512 text tokens, batch 1, bf16",
               "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (--tiny)",
               "torch": torch.__version__,
               "diffusers": __import__("diffusers").__version__, "command": " ".join(["python", *sys.argv]),
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "rows": rows_out}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")

    def measure(name: str, fn) -> torch.Tensor:
        cuda = dev.type == "cuda"
        with torch.inference_mode():
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            times = time_ms(fn, args.warmup, args.repeats)
            out = fn()
        rows_out[name] = {"ms_median": round(statistics.median(times), 2), "ms_min": round(min(times), 2),
                          "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None}
        if args.profile and cuda and name.startswith("qimg"):
            with torch.inference_mode():
                groups, top = profile(fn)
            lin, att = flops(grid * grid + n_txt, params)
            rows_out[name].update(
                kernel_ms={k: round(v, 2) for k, v in sorted(groups.items())},
                linear_tflop=round(lin / 1e12, 1), attention_tflop=round(att / 1e12, 1),
                matmul_tflop_per_s=round(lin / (groups.get("matmul", float("nan")) / 1e3) / 1e12),
                attention_tflop_per_s=round(att / (groups.get("attention", float("nan")) / 1e3) / 1e12),
                top_kernels_ms=[(k[:90], round(v, 3)) for k, v in top])
        print(name, json.dumps(rows_out[name]), flush=True)
        report()
        return out

    want = None if "diffusers" in skip else measure("diffusers eager bf16", d)
    got = measure("qimg eager bf16", q)
    if want is not None:
        rows_out["qimg eager bf16"]["rel_diff_vs_diffusers"] = round(float((got - want).float().norm()
                                                                          / want.float().norm()), 5)
    if "compile" not in skip:
        compile_blocks([*ours.transformer_blocks, *ours.single_transformer_blocks])
        got = measure("qimg compiled bf16", q)
        if want is not None:
            rows_out["qimg compiled bf16"]["rel_diff_vs_diffusers"] = round(float((got - want).float().norm()
                                                                                  / want.float().norm()), 5)
    if "fp8" not in skip and (dev.type == "cuda" or args.tiny):
        with torch.device("meta"):
            fp8 = FluxTransformer(params)
        fp8.load_state_dict(ours.state_dict(), strict=True, assign=True)
        fp8 = fp8.eval().requires_grad_(False)
        count = apply_fp8(fp8, flux_fp8_layers, compute=dev.type == "cuda")
        if "compile" not in skip:
            compile_blocks([*fp8.transformer_blocks, *fp8.single_transformer_blocks])
        current[0] = fp8
        name = "qimg compiled fp8 compute" if "compile" not in skip else "qimg eager fp8 compute"
        got = measure(name, q)
        rows_out[name]["fp8_linears"] = count
        if want is not None:
            rows_out[name]["rel_diff_vs_diffusers"] = round(float((got - want).float().norm() / want.float().norm()),
                                                            5)
    report()


if __name__ == "__main__":
    main()
