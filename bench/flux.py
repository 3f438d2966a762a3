"""The FLUX.1-dev transformer forward on full-size random weights: qimg (eager, compiled) and diffusers (eager) in
the same process, on the same weight tensors.

    python bench/flux.py --out bench/results/flux_forward_h200.json

Not run on a GPU yet (written when the session's device time was spent): no figures from it exist.

1024x1024 (4096 image tokens), 512 text tokens, batch 1, bf16, guidance 3.5; milliseconds per forward (median of
--repeats after --warmup, CUDA events) and the peak GiB allocated; the outputs' relative difference to diffusers'.
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

from bench.common import time_ms  # noqa: E402
from qimg.nets.flux import FluxTransformer, flux_ids, flux_rope  # noqa: E402
from qimg.runtime.attention import use_attention  # noqa: E402
from qimg.runtime.compile import compile_blocks  # noqa: E402
from qimg.specs import FluxParams  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--skip", default="", help="rows to skip: diffusers,compile")
    args = ap.parse_args()
    from diffusers import FluxTransformer2DModel

    dev, dtype = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    try:
        with torch.device(dev):
            ref = FluxTransformer2DModel(num_layers=19, num_single_layers=38, guidance_embeds=True,
                                         axes_dims_rope=(16, 56, 56))
    finally:
        torch.set_default_dtype(torch.float32)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.02)
    ref = ref.eval().requires_grad_(False)
    with torch.device("meta"):
        ours = FluxTransformer(FluxParams())
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    ours = ours.eval().requires_grad_(False)
    use_attention("cudnn", dev)

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4096, 64, generator=gen).to(dev, dtype)
    txt = torch.randn(1, 512, 4096, generator=gen).to(dev, dtype)
    pooled = torch.randn(1, 768, generator=gen).to(dev, dtype)
    t = torch.tensor([0.7], device=dev, dtype=dtype)
    g = torch.tensor([3.5], device=dev)
    rope = flux_rope(flux_ids(512, [(0, 64, 64)]), (16, 56, 56), 10000.0).to(dev)
    txt_ids = torch.zeros(512, 3, device=dev)
    rows, cols = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).to(dev, torch.float32)

    def q() -> torch.Tensor:
        return ours(x, txt, t, g, pooled, rope)

    def d() -> torch.Tensor:
        return ref(hidden_states=x, encoder_hidden_states=txt, pooled_projections=pooled, timestep=t, img_ids=img_ids,
                   txt_ids=txt_ids, guidance=g, return_dict=False)[0]

    rows_out: dict[str, dict] = {}
    skip = set(filter(None, args.skip.split(",")))

    def report() -> None:  # after every row: a run cut short keeps what it measured
        out = {"benchmark": "FLUX.1-dev transformer forward, 1024x1024, 512 text tokens, batch 1, bf16",
               "device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "diffusers": __import__("diffusers").__version__, "command": " ".join(["python", *sys.argv]),
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "rows": rows_out}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")

    def measure(name: str, fn) -> torch.Tensor:
        with torch.inference_mode():
            torch.cuda.reset_peak_memory_stats()
            times = time_ms(fn, args.warmup, args.repeats)
            out = fn()
        rows_out[name] = {"ms_median": round(statistics.median(times), 2), "ms_min": round(min(times), 2),
                          "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
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
    report()


if __name__ == "__main__":
    main()
