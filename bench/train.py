"""One LoRA training step on the full-size Qwen-Image MMDiT: qimg vs diffusers + PEFT, same process, same weights.

    python bench/train.py --out bench/results/train_h200.json

1024x1024 (4096 image tokens), 128 text tokens, batch 1, rank 16 on the 12 attention and MLP linears of all 60
blocks, bf16 base, fp32 adapters, AdamW; forward + backward + optimizer step, eager; each side without and with
per-block gradient checkpointing, and qimg with FP8 weight storage (--fp8 weights) and checkpointing. qimg's step
is qimg.training.trainer.flow_loss on attach_lora + trainable_lora adapters; diffusers' is its transformer with
PEFT's add_adapter and the same loss. Seconds per step and peak GiB: the first measurements of train-lora.
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

from bench.common import random_diffusers_mmdit, sharing_qimg_mmdit  # noqa: E402
from qimg.embeddings import PromptEmbeds  # noqa: E402
from qimg.families.qwen import mmdit_fp8_layers  # noqa: E402
from qimg.runtime.attention import use_attention  # noqa: E402
from qimg.runtime.checkpoint import checkpoint_blocks  # noqa: E402
from qimg.runtime.fp8 import apply_fp8  # noqa: E402
from qimg.runtime.lora import attach_lora, trainable_lora  # noqa: E402
from qimg.training.trainer import TARGETS, flow_loss, init_adapters, qwen_shift  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--layers", type=int, default=60)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip", default="", help="rows to skip: qimg,diffusers")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    dev, dtype = torch.device("cuda"), torch.bfloat16
    ref = random_diffusers_mmdit(args.layers, dev, dtype)
    names = [f"transformer_blocks.{i}.{t}" for i in range(args.layers) for t in TARGETS["attn-mlp"]]
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 4096, 64, generator=gen)
    text = PromptEmbeds(torch.randn(1, 128, 3584, generator=gen).to(dev, dtype))
    rows: dict[str, dict] = {}

    def measure(name: str, step) -> None:
        # What is allocated before the first step: the weights of both models (shared bf16, plus qimg's FP8 copies
        # in the fp8 row), so peak - this is what the step itself needs (activations, adapters, optimizer state).
        before = torch.cuda.memory_allocated()
        for _ in range(args.warmup):
            step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        rows[name] = {"s_per_step": round(statistics.median(times), 4), "min_s": round(min(times), 4),
                      "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                      "allocated_before_gib": round(before / 2**30, 2),
                      "step_peak_over_weights_gib": round((torch.cuda.max_memory_allocated() - before) / 2**30, 2)}
        print(name, json.dumps(rows[name]), flush=True)
        report()

    def report() -> None:
        out = {"benchmark": "qwen-image LoRA training step, 1024x1024, bs 1, rank 16, attn-mlp, bf16",
               "device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "diffusers": __import__("diffusers").__version__, "command": " ".join(["python", *sys.argv]),
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "rows": rows}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")

    use_attention("cudnn", dev)
    def qimg_row(variant: str) -> None:
        ours = sharing_qimg_mmdit(ref, args.layers)
        if variant.startswith("fp8"):
            apply_fp8(ours, mmdit_fp8_layers, compute=False)
        init = init_adapters(ours, names, args.rank, seed=0)
        attach_lora(ours, "train", {n: (d, u, 1.0) for n, (d, u) in init.items()}, dtype=torch.float32)
        params = list(trainable_lora(ours, "train").values())
        if variant != "no ckpt":
            checkpoint_blocks(ours.transformer_blocks)
        opt = torch.optim.AdamW(params, lr=1e-4)
        counter = iter(range(10**6))

        def q_step() -> None:
            loss = flow_loss(ours, x0, [text], (1024, 1024), torch.Generator().manual_seed(next(counter)), dtype,
                             dev)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        measure(f"qimg eager bf16, rank 16 attn-mlp, {variant}", q_step)

    for variant in ("no ckpt", "ckpt", "fp8 weights, ckpt"):
        if "qimg" not in skip:
            qimg_row(variant)
            gc.collect()
            torch.cuda.empty_cache()
    if "diffusers" not in skip:
        from peft import LoraConfig

        ref.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights=True,
                                   target_modules=list(TARGETS["attn-mlp"])))
        trainable = [p for p in ref.parameters() if p.requires_grad]
        for p in trainable:
            p.data = p.data.float()
        d_opt = torch.optim.AdamW(trainable, lr=1e-4)
        d_gen = torch.Generator().manual_seed(1)

        def d_step() -> None:
            noise = torch.randn(x0.shape, generator=d_gen)
            t = qwen_shift(torch.sigmoid(torch.randn(1, generator=d_gen)), x0.shape[1])
            xt = ((1 - t) * x0 + t * noise).to(dev, dtype)
            with torch.autocast("cuda", dtype=dtype):
                pred = ref(hidden_states=xt, encoder_hidden_states=text.embeds, timestep=t.to(dev, dtype),
                           img_shapes=[[(1, 64, 64)]], return_dict=False)[0]
            loss = F.mse_loss(pred.float(), (noise - x0).to(dev))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            d_opt.step()
            d_opt.zero_grad(set_to_none=True)

        ref.train()
        measure("diffusers + PEFT eager bf16 (autocast), rank 16 attn-mlp, no ckpt", d_step)
        ref.enable_gradient_checkpointing()
        measure("diffusers + PEFT eager bf16 (autocast), rank 16 attn-mlp, ckpt", d_step)
    report()


if __name__ == "__main__":
    main()
