"""One LoRA training step on the full-size FLUX.1-dev transformer: qimg vs diffusers + PEFT, same process, same
weights.

    python bench/flux_train.py --out bench/results/flux_train_h200.json

1024x1024 (4096 image tokens), 512 T5 tokens, batch 1, guidance 1.0, rank 16 on train-lora's default FLUX targets
(every double- and single-block linear but the modulation: 12 per double block, 5 per single block), bf16 base,
fp32 adapters, AdamW; forward + backward + optimizer step. Rows: qimg eager and compiled (compile_blocks), without
and with per-block gradient checkpointing, and compiled with FP8 weight storage; diffusers + PEFT eager (autocast),
without and with its gradient checkpointing. qimg's step is train-lora's own (training/flux_step.flux_flow_loss on
attach_lora + trainable_lora adapters); diffusers' is its transformer with PEFT's add_adapter and the same loss.
Seconds per step (median) and peak GiB allocated; compiled rows give their gradients' relative error against
eager's. --tiny runs the same code on a tiny model on the CPU (a smoke test of this script, no figures).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import random_diffusers_flux  # noqa: E402
from qimg.embeddings import PromptEmbeds  # noqa: E402
from qimg.families.flux import flux_fp8_layers  # noqa: E402
from qimg.nets.flux import FluxTransformer  # noqa: E402
from qimg.runtime.attention import use_attention  # noqa: E402
from qimg.runtime.checkpoint import checkpoint_blocks  # noqa: E402
from qimg.runtime.compile import compile_blocks  # noqa: E402
from qimg.runtime.fp8 import apply_fp8  # noqa: E402
from qimg.runtime.lora import attach_lora, trainable_lora  # noqa: E402
from qimg.specs import FluxParams  # noqa: E402
from qimg.training.config import FLUX_TARGETS  # noqa: E402
from qimg.training.flux_step import flux_flow_loss, flux_shift  # noqa: E402
from qimg.training.step import init_adapters  # noqa: E402

FLUX_DEV = dict(num_layers=19, num_single_layers=38, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
TINY = dict(num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
            pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
VARIANTS = ("eager, no ckpt", "eager, ckpt", "compile, no ckpt", "compile, ckpt", "compile, fp8 weights, no ckpt")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--variants", default="/".join(VARIANTS), help="qimg rows, '/'-separated")
    ap.add_argument("--skip", default="", help="diffusers: no diffusers rows")
    ap.add_argument("--attention", default="cudnn", help="qimg's attention backend (runtime/attention.py)")
    ap.add_argument("--diffusers-no-cudnn", action="store_true",
                    help="diffusers rows without cuDNN SDPA (its backward fails there on FLUX's strided gradients)")
    ap.add_argument("--tiny", action="store_true", help="a tiny model on the CPU: checks the script, no figures")
    args = ap.parse_args()
    cuda = not args.tiny
    dev, dtype = (torch.device("cuda"), torch.bfloat16) if cuda else (torch.device("cpu"), torch.float32)
    config, grid, n_txt = (FLUX_DEV, 64, 512) if cuda else (TINY, 8, 16)
    if args.tiny:
        args.warmup, args.repeats = 1, 2
    ref = random_diffusers_flux(config, dev, dtype)
    params = FluxParams(**config)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, grid * grid, 64, generator=gen)
    text = PromptEmbeds(torch.randn(1, n_txt, params.joint_attention_dim, generator=gen).to(dev, dtype), None,
                        torch.randn(1, params.pooled_projection_dim, generator=gen).to(dev, dtype))
    size = (16 * grid, 16 * grid)
    rows: dict[str, dict] = {}

    def report() -> None:
        out = {"benchmark": "FLUX.1-dev LoRA training step, 1024x1024, 512 text tokens, bs 1, rank 16, attn-mlp, "
                            "bf16, guidance 1.0",
               "device": torch.cuda.get_device_name() if cuda else "cpu (--tiny)", "torch": torch.__version__,
               "diffusers": __import__("diffusers").__version__, "command": " ".join(["python", *sys.argv]),
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "rows": rows}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")

    def measure(name: str, step) -> None:
        before = torch.cuda.memory_allocated() if cuda else 0
        for _ in range(args.warmup):
            step()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        peak = torch.cuda.max_memory_allocated() if cuda else 0
        rows[name] = {"s_per_step": round(statistics.median(times), 4), "min_s": round(min(times), 4),
                      "peak_allocated_gib": round(peak / 2**30, 2), "allocated_before_gib": round(before / 2**30, 2)}
        print(name, json.dumps(rows[name]), flush=True)
        report()

    rows["attention"] = {"qimg": use_attention(args.attention if cuda else "auto", dev)}

    def qimg_model(fp8: bool) -> FluxTransformer:
        with torch.device("meta"):
            ours = FluxTransformer(params)
        ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
        ours = ours.eval().requires_grad_(False)
        if fp8:
            apply_fp8(ours, flux_fp8_layers, compute=False)
        return ours

    def adapters(ours: FluxTransformer) -> list[torch.nn.Parameter]:
        linears = {n for n, m in ours.named_modules() if isinstance(m, torch.nn.Linear) or hasattr(m, "in_features")}
        names = [name for blocks in ("transformer_blocks", "single_transformer_blocks")
                 for i in range(len(ours.get_submodule(blocks))) for t in FLUX_TARGETS["attn-mlp"]
                 if (name := f"{blocks}.{i}.{t}") in linears]
        init = init_adapters(ours, names, args.rank, seed=0)
        attach_lora(ours, "train", {n: (d, u, 1.0) for n, (d, u) in init.items()}, dtype=torch.float32)
        out = list(trainable_lora(ours, "train").values())
        for p in out:
            p.data = p.data.to(dev)
        return out

    def grads(ours: FluxTransformer, trained: list[torch.nn.Parameter]) -> torch.Tensor:
        loss = flux_flow_loss(ours, x0, [text], size, torch.Generator().manual_seed(12345), dtype, dev)
        loss.backward()
        out = torch.cat([torch.zeros(p.numel(), device=dev) if p.grad is None else p.grad.flatten() for p in trained])
        for p in trained:
            p.grad = None
        return out

    for variant in filter(None, args.variants.split("/")):
        try:
            ours = qimg_model("fp8" in variant)
            trained = adapters(ours)
            blocks = [*ours.transformer_blocks, *ours.single_transformer_blocks]
            if "no ckpt" not in variant:
                checkpoint_blocks(blocks)
            err = None
            if "compile" in variant:
                eager = grads(ours, trained)
                compile_blocks(blocks)
                got = grads(ours, trained)
                err = round(float((got - eager).norm() / eager.norm()), 5)
            opt = torch.optim.AdamW(trained, lr=1e-4)
            counter = iter(range(10**6))

            def q_step(ours=ours, trained=trained, opt=opt, counter=counter) -> None:
                loss = flux_flow_loss(ours, x0, [text], size, torch.Generator().manual_seed(next(counter)), dtype,
                                      dev)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trained, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)

            name = f"qimg {variant}"
            measure(name, q_step)
            rows[name]["adapter_values"] = sum(p.numel() for p in trained)
            if err is not None:
                rows[name]["grad_rel_err_vs_eager"] = err
                report()
        except Exception as e:  # one failing row must not lose the others' figures
            rows[f"qimg {variant}"] = {"error": f"{type(e).__name__}: {e}"[:500]}
            print(variant, rows[f"qimg {variant}"], flush=True)
            report()
            if "illegal memory access" in str(e):  # the CUDA context is gone: nothing after this can run
                raise
        ours = trained = opt = q_step = None
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()

    if "diffusers" not in args.skip:
        from peft import LoraConfig

        targets = [t for t in FLUX_TARGETS["attn-mlp"] if t != "proj_out"] + [
            f"single_transformer_blocks.{i}.proj_out" for i in range(params.num_single_layers)]
        ref.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights=True, target_modules=targets))
        trainable = [p for p in ref.parameters() if p.requires_grad]
        for p in trainable:
            p.data = p.data.float()
        d_opt = torch.optim.AdamW(trainable, lr=1e-4)
        d_gen = torch.Generator().manual_seed(1)
        rows_ids = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
        img_ids = torch.stack([torch.zeros_like(rows_ids[0]), *rows_ids], -1).reshape(-1, 3).float().to(dev)
        txt_ids = torch.zeros(n_txt, 3, device=dev)

        def d_step() -> None:
            noise = torch.randn(x0.shape, generator=d_gen)
            t = flux_shift(torch.sigmoid(torch.randn(1, generator=d_gen)), x0.shape[1])
            xt = ((1 - t) * x0 + t * noise).to(dev, dtype)
            with torch.autocast(dev.type, dtype=dtype, enabled=cuda):
                pred = ref(hidden_states=xt, encoder_hidden_states=text.embeds, pooled_projections=text.pooled,
                           timestep=t.to(dev, dtype), img_ids=img_ids, txt_ids=txt_ids,
                           guidance=torch.ones(1, device=dev), return_dict=False)[0]
            loss = F.mse_loss(pred.float(), (noise - x0).to(dev))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            d_opt.step()
            d_opt.zero_grad(set_to_none=True)

        ref.train()
        how = ""
        if args.diffusers_no_cudnn:
            torch.backends.cuda.enable_cudnn_sdp(False)
            how = ", SDPA without cuDNN"
        measure(f"diffusers + PEFT eager (autocast{how}), no ckpt", d_step)
        ref.enable_gradient_checkpointing()
        measure(f"diffusers + PEFT eager (autocast{how}), ckpt", d_step)
    report()


if __name__ == "__main__":
    main()
