"""One LoRA training step on the full-size Qwen-Image MMDiT: qimg vs diffusers + PEFT, same process, same weights.

    python bench/train.py --skip compile --out bench/results/train_h200.json
    python bench/train.py --skip eager,diffusers --budgets bf16:24:compile,bf16:16:compile --warmup 3 \
        --out bench/results/train_compile_h200.json

1024x1024 (4096 image tokens), 128 text tokens, batch 1, rank 16 on the 12 attention and MLP linears of all 60
blocks, bf16 base, fp32 adapters, AdamW; forward + backward + optimizer step. Rows:
- qimg eager / compiled (compile_blocks), without and with per-block gradient checkpointing, bf16 or FP8 weight
  storage (--fp8 weights); compiled rows also give their gradients' relative error against eager's;
- diffusers + PEFT, eager, without and with its gradient checkpointing;
- --vram-budget rows (weights:GiB[:compile]): the frozen weights packed into pinned host memory, placed as
  train-lora's training plan says for that budget (plan_training: checkpointed blocks, blocks streamed through
  forward and backward), the process capped to the budget; compiled ones as train-lora --compile compiles
  (compile_inside, within the checkpoint and the streaming). Compiled budget rows must run in a process of their
  own (compile_inside goes inside the streaming wrapper, so before the first streamed placement).
qimg's step is qimg.training.trainer.flow_loss on attach_lora + trainable_lora adapters; diffusers' is its
transformer with PEFT's add_adapter and the same loss. Seconds per step (median) and peak GiB allocated.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import random_diffusers_mmdit, sharing_qimg_mmdit  # noqa: E402
from qimg.embeddings import PromptEmbeds  # noqa: E402
from qimg.families.qwen import mmdit_fp8_layers  # noqa: E402
from qimg.pipelines.memory import block_train_needs  # noqa: E402
from qimg.runtime.attention import use_attention  # noqa: E402
from qimg.runtime.checkpoint import checkpoint_blocks  # noqa: E402
from qimg.runtime.compile import compile_blocks, compile_inside  # noqa: E402
from qimg.runtime.fp8 import apply_fp8  # noqa: E402
from qimg.runtime.lora import attach_lora, trainable_lora  # noqa: E402
from qimg.runtime.offload import Offloaded  # noqa: E402
from qimg.runtime.planner import HEADROOM, Footprint, GiB, plan_training  # noqa: E402
from qimg.training.config import TARGETS  # noqa: E402
from qimg.training.step import flow_loss, init_adapters, qwen_shift  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--layers", type=int, default=60)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip", default="", help="rows to skip: qimg,diffusers,compile,eager (qimg's eager rows)")
    ap.add_argument("--variants", default="", help="only these qimg rows, '/'-separated (e.g. 'compile, ckpt')")
    ap.add_argument("--budgets", default="bf16:24,fp8:24,bf16:16,fp8:16",
                    help="VRAM-budget rows, weights:GiB[:compile], comma-separated ('' for none)")
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
    def train_step(ours: torch.nn.Module, params: list[torch.nn.Parameter]) -> Callable[[], None]:
        for p in params:
            p.data = p.data.to(dev)  # adapters of blocks packed in host memory are made there
        opt = torch.optim.AdamW(params, lr=1e-4)
        counter = iter(range(10**6))

        def q_step() -> None:
            loss = flow_loss(ours, x0, [text], (1024, 1024), torch.Generator().manual_seed(next(counter)), dtype,
                             dev)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        return q_step

    def grads(ours: torch.nn.Module, params: list[torch.nn.Parameter]) -> torch.Tensor:
        """The adapters' gradients for one fixed draw, flattened (no optimizer step)."""
        loss = flow_loss(ours, x0, [text], (1024, 1024), torch.Generator().manual_seed(12345), dtype, dev)
        loss.backward()
        # The last block's text-stream linears get no gradient (its text output is discarded): zeros.
        out = torch.cat([torch.zeros(p.numel(), device=dev) if p.grad is None else p.grad.flatten() for p in params])
        for p in params:
            p.grad = None
        return out

    def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
        return round(float((got - want).norm() / want.norm()), 5)

    def adapters(ours: torch.nn.Module) -> list[torch.nn.Parameter]:
        init = init_adapters(ours, names, args.rank, seed=0)
        attach_lora(ours, "train", {n: (d, u, 1.0) for n, (d, u) in init.items()}, dtype=torch.float32)
        return list(trainable_lora(ours, "train").values())

    def qimg_row(variant: str) -> None:
        ours = sharing_qimg_mmdit(ref, args.layers)
        if "fp8" in variant:
            apply_fp8(ours, mmdit_fp8_layers, compute=False)
        params = adapters(ours)
        if "no ckpt" not in variant:
            checkpoint_blocks(ours.transformer_blocks)
        step = train_step(ours, params)
        err = None
        if "compile" in variant:  # the compiled step trains the same adapters: its gradients against eager's
            eager = grads(ours, params)
            compile_blocks(ours.transformer_blocks)
            err = rel_err(grads(ours, params), eager)
        kind = "compiled" if "compile" in variant else "eager"
        name = f"qimg {kind} bf16, rank 16 attn-mlp, {variant.replace('compile, ', '')}"
        measure(name, step)
        if err is not None:
            rows[name]["grad_rel_err_vs_eager"] = err
            report()

    for variant in ("no ckpt", "ckpt", "fp8 weights, no ckpt", "fp8 weights, ckpt", "compile, no ckpt",
                    "compile, ckpt", "compile, fp8 weights, no ckpt", "compile, fp8 weights, ckpt"):
        kind = "compile" if "compile" in variant else "eager"
        if "qimg" not in skip and kind not in skip and (not args.variants or variant in args.variants.split("/")):
            try:
                qimg_row(variant)
            except Exception as e:  # one failing row must not lose the others' figures
                rows[variant] = {"error": f"{type(e).__name__}: {e}"[:500]}
                print(variant, rows[variant], flush=True)
            gc.collect()
            torch.cuda.empty_cache()
    budgets = [b.split(":") for b in filter(None, args.budgets.split(","))]
    # For the budget rows (run after diffusers'): the frozen weights packed into pinned host memory as qimg.load
    # does under an offload plan, then, with qimg alone on the GPU, placed as train-lora's training plan says for
    # each budget (the process capped to it). The CLI plans for 512 text tokens; so does this.
    packed = {}
    for variant in sorted({v for v, *_ in budgets}, reverse=True):
        ours = sharing_qimg_mmdit(ref, args.layers)
        if variant == "fp8":
            apply_fp8(ours, mmdit_fp8_layers, compute=False)
        off = Offloaded(ours, dev, list(ours.transformer_blocks))
        packed[variant] = (ours, off, adapters(ours))
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
        del trainable, d_opt
    if not budgets:
        report()
        return
    ref = None  # the closures above hold it in a cell: drop the weights there too
    gc.collect()
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    values = sum(p.numel() for p in packed[budgets[0][0]][2])
    tokens = 4096 + 512
    compiled: set[str] = set()
    for variant, gib, *how in budgets:
        ours, off, params = packed[variant]
        kind = "compiled" if how == ["compile"] else "eager"
        name = f"qimg {kind} {'fp8 weights' if variant == 'fp8' else 'bf16'}, rank 16 attn-mlp, --vram-budget {gib}"
        try:
            act = tokens * 3072 * 2 * 16 + 64 * 2**20 + (3072 * 4 * 3072 * 6 if variant == "fp8" else 0)
            fp = Footprint(off.rest.nbytes, tuple(c.nbytes for c in off.block_copies), act)
            needs = block_train_needs(fp, 3072, 2, tokens, 1, values)
            plan = plan_training(needs, budget=int(float(gib) * GiB))
            print("\n".join(plan.describe(needs)), flush=True)
            checkpoint_blocks(ours.transformer_blocks[i] for i in plan.checkpointed)
            step = train_step(ours, params)
            eager = None
            if kind == "compiled" and variant not in compiled:
                # Compiled inside the checkpoint and the streaming wrapper, which must wrap it, so before the first
                # placement streams (run compiled budget rows in a process of their own); the eager reference
                # gradients come first, uncapped, all resident.
                off.to_device()
                eager = grads(ours, params)
                off.off_device()
                gc.collect()
                torch.cuda.empty_cache()  # the cap below counts what the allocator keeps reserved
                compile_inside(ours.transformer_blocks)
                compiled.add(variant)
            torch.cuda.set_per_process_memory_fraction(min(1.0, float(gib) * GiB / total))
            off.stream(plan.streamed, backward=True)
            off.to_device()
            err = None if eager is None else rel_err(grads(ours, params), eager)
            measure(name, step)
            if err is not None:
                rows[name]["grad_rel_err_vs_eager"] = err
            rows[name].update(streamed_blocks=len(plan.streamed), checkpointed_blocks=len(plan.checkpointed),
                              planned_peak_gib=round((plan.peak + HEADROOM) / GiB, 2),
                              peak_reserved_gib=round(torch.cuda.max_memory_reserved() / GiB, 2))
        except Exception as e:
            rows[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
            print(name, rows[name], flush=True)
        off.off_device()
        for p in params:  # this variant's adapters and optimizer state leave the GPU to the next row
            p.data, p.grad = p.data.cpu(), None
        step = None
        torch.cuda.set_per_process_memory_fraction(1.0)
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    report()


if __name__ == "__main__":
    main()
