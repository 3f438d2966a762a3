"""Qwen-Image MMDiT forward: qimg vs diffusers in one process, on the same random full-size weights (bf16, CUDA).

Both models share one set of weight tensors (qimg's is built on the meta device and assigned diffusers'
parameters), so the 41 GB of bf16 weights fit once on an 80 GB card and the comparison is weight-for-weight.

    python bench/transformer.py --out bench/results/transformer_h100.json

Reports the median ms per forward (CUDA events, after warm-up) and the peak torch.cuda.max_memory_reserved per
configuration: 1024x1024 (4096 image tokens) with 128 text tokens, batch 1 without a text mask and batch 2 with
one (a CFG pair whose negative prompt is shorter, padded to 128).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import random_diffusers_mmdit, sharing_qimg_mmdit, time_ms  # noqa: E402
from qimg.nets.qwen_mmdit import qwen_rope  # noqa: E402
from qimg.specs import QwenMMDiTParams  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--layers", type=int, default=60, help="fewer layers for a quick smoke run")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()

    dev, dtype = torch.device("cuda"), torch.bfloat16
    params = QwenMMDiTParams(num_layers=args.layers)
    ref = random_diffusers_mmdit(args.layers, dev, dtype)
    ours = sharing_qimg_mmdit(ref, args.layers)  # shared storage, no copy
    n_params = sum(p.numel() for p in ours.parameters())

    results = []
    for batch, use_mask in ((1, False), (2, True)):
        gen = torch.Generator(dev).manual_seed(batch)
        x = torch.randn(batch, 4096, 64, device=dev, dtype=dtype, generator=gen)
        txt = torch.randn(batch, 128, 3584, device=dev, dtype=dtype, generator=gen)
        t = torch.full((batch,), 0.5, device=dev, dtype=dtype)
        mask = None
        if use_mask:
            mask = torch.ones(batch, 128, dtype=torch.bool, device=dev)
            mask[1:, 100:] = False
        rope = qwen_rope([(1, 64, 64)], 128, params.axes_dims_rope).to(dev)
        shapes = [[(1, 64, 64)]] * batch

        # Inputs bound as defaults: each closure must time this configuration's tensors.
        def run_ref(x=x, txt=txt, t=t, mask=mask, shapes=shapes):
            return ref(hidden_states=x, encoder_hidden_states=txt, encoder_hidden_states_mask=mask, timestep=t,
                       img_shapes=shapes, return_dict=False)[0]

        def run_ours(x=x, txt=txt, t=t, mask=mask, rope=rope):
            return ours(x, txt, t, rope, mask)

        row = {"batch": batch, "image_tokens": 4096, "text_tokens": 128, "text_mask": use_mask}
        with torch.inference_mode():
            a, b = run_ref().float(), run_ours().float()
            row["rel_l2_vs_diffusers"] = ((a - b).norm() / a.norm()).item()
            for name, fn in (("diffusers", run_ref), ("qimg", run_ours)):
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                times = time_ms(fn, args.warmup, args.repeats)
                row[name] = {"median_ms": round(statistics.median(times), 2), "min_ms": round(min(times), 2),
                             "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2)}
        row["speedup"] = round(row["diffusers"]["median_ms"] / row["qimg"]["median_ms"], 3)
        results.append(row)
        print(json.dumps(row), flush=True)

    report = {
        "benchmark": "qwen-image mmdit forward, 1024x1024",
        "device": torch.cuda.get_device_name(dev),
        "torch": torch.__version__,
        "diffusers": __import__("diffusers").__version__,
        "python": platform.python_version(),
        "dtype": "bfloat16",
        "params": n_params,
        "layers": args.layers,
        "command": " ".join(["python", *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "warmup": args.warmup,
        "repeats": args.repeats,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'config':<22}{'diffusers ms':>14}{'qimg ms':>10}{'speedup':>9}{'peak GiB d/q':>16}")
    for r in results:
        cfg = f"b{r['batch']} mask={r['text_mask']}"
        print(f"{cfg:<22}{r['diffusers']['median_ms']:>14}{r['qimg']['median_ms']:>10}{r['speedup']:>9}"
              f"{r['diffusers']['peak_reserved_gib']:>8}/{r['qimg']['peak_reserved_gib']}")


if __name__ == "__main__":
    main()
