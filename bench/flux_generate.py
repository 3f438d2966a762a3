"""Whole FLUX.1-dev text-to-image runs, qimg vs diffusers in one process on the same random full-size weights.

    python bench/flux_generate.py --root /tmp/flux-random --out O.json --only d-eager
    for row in q-eager q-compiled q-fp8 q-budget; do
        python bench/flux_generate.py --root /tmp/flux-random --out O.json --reuse --only $row; done

A random FLUX.1-dev folder in the official layout is written first (diffusers' save_pretrained: the 12B
transformer, CLIP-L, T5-XXL at its published shape, the VAE; bf16), with the offline tokenizers the tests build
(tests/fixtures_flux.py; T5 pads to 512 tokens whatever the vocabulary, so the tokenizer does not change the cost).
diffusers' FluxPipeline runs from the modules it saved; qimg loads the folder as a user's `qimg generate` does
(qimg.load). 1024x1024, 28 steps, distilled guidance 3.5, 512 T5 tokens, batch 1: seconds per image (text
encoders, denoising and VAE decode; after a 2-step warm-up run that pays for compilation), seconds per step, peak
GiB reserved, and the load time. The --vram-budget row runs --budget-steps steps and reports its s/step. Each
qimg row runs in a fresh process (--reuse), as a user's `qimg generate` does: in one process the memory a
compiled model leaves behind would be counted against the next row's budget.
--tiny runs the same code on a tiny model on the CPU (a smoke test of this script, no figures).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import qimg  # noqa: E402
from tests.fixtures_flux import (  # noqa: E402
    TINY_CLIP,
    TINY_T5,
    build_clip_tokenizer,
    build_t5_tokenizer,
    clip_vocab,
    t5_vocab_size,
)
from tests.fixtures_flux_model import FLUX_SCHEDULER, TINY_FLUX, TINY_FLUX_VAE  # noqa: E402

PROMPT = ("A vintage travel poster of a lighthouse on a cliff at dusk, bold block letters reading 'QIMG COAST', "
          "warm orange sky, gulls, screen-print texture")
# Published shapes: openai/clip-vit-large-patch14's text tower, google/t5-v1_1-xxl's encoder, FLUX.1-dev's VAE.
CLIP_L = dict(TINY_CLIP, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              projection_dim=768, vocab_size=49408)
T5_XXL = dict(TINY_T5, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, vocab_size=32128)
FLUX_VAE = dict(TINY_FLUX_VAE, block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)
ROWS = ("d-eager", "q-eager", "q-compiled", "q-fp8", "q-budget")
FLUX_DEV = dict(num_layers=19, num_single_layers=38, guidance_embeds=True, axes_dims_rope=(16, 56, 56))


def write_random_flux(root: Path, device: torch.device, dtype: torch.dtype, tiny: bool) -> object:
    """diffusers' FluxPipeline with every weight random, saved to `root` in the official layout; returned."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    shutil.rmtree(root, ignore_errors=True)
    tokenizers = root.parent / f"{root.name}-tokenizers"
    clip = dict(TINY_CLIP, vocab_size=len(clip_vocab()[0])) if tiny else CLIP_L
    t5 = dict(TINY_T5, vocab_size=t5_vocab_size()) if tiny else T5_XXL
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            transformer = FluxTransformer2DModel(**(TINY_FLUX if tiny else FLUX_DEV))
            vae = AutoencoderKL(**(TINY_FLUX_VAE if tiny else FLUX_VAE))
            clip_model = CLIPTextModel(CLIPTextConfig(**clip))
            t5_model = T5EncoderModel(T5Config(**t5))
    finally:
        torch.set_default_dtype(torch.float32)
    with torch.no_grad():
        for m in (transformer, vae):  # diffusers zero-initialises some layers: every weight random instead
            for p in m.parameters():
                p.normal_(0.0, 0.02)
    for m in (transformer, vae, clip_model, t5_model):
        m.eval().requires_grad_(False)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), vae=vae, text_encoder=clip_model,
        tokenizer=CLIPTokenizer.from_pretrained(build_clip_tokenizer(tokenizers / "clip")),
        text_encoder_2=t5_model,
        tokenizer_2=T5TokenizerFast.from_pretrained(build_t5_tokenizer(tokenizers / "t5")),
        transformer=transformer)
    pipe.save_pretrained(root, max_shard_size="5GB")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def plan_summary(plan: object) -> dict:
    """The memory plan's choices, without its byte tables."""
    streamed = getattr(plan, "streamed", {}) or {}
    return {"mode": getattr(plan, "mode", None), "text_encoder_device": getattr(plan, "text_encoder_device", None),
            "vae_tiling": getattr(plan, "vae_tiling", None),
            "streamed_blocks": {k: len(v) if hasattr(v, "__len__") else v for k, v in streamed.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--root", type=Path, default=Path("/tmp/flux-random"))
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--budget", type=float, default=8.0, help="GiB for the --vram-budget row")
    ap.add_argument("--budget-steps", type=int, default=6)
    ap.add_argument("--skip", default="", help="rows to skip: " + ",".join(ROWS))
    ap.add_argument("--only", choices=ROWS, help="run this row alone")
    ap.add_argument("--reuse", action="store_true",
                    help="use the folder --root already holds and add rows to --out's (each row a fresh process)")
    ap.add_argument("--tiny", action="store_true", help="a tiny model on the CPU: checks the script, no figures")
    args = ap.parse_args()
    skip = set(ROWS) - {args.only} if args.only else set(filter(None, args.skip.split(",")))
    cuda = not args.tiny
    dev, dtype = (torch.device("cuda"), torch.bfloat16) if cuda else (torch.device("cpu"), torch.float32)
    size = 1024 if cuda else 64
    if args.tiny:
        args.steps, args.budget_steps = 3, 2

    rows: dict[str, dict] = json.loads(args.out.read_text())["rows"] if args.reuse and args.out.exists() else {}

    def save() -> None:
        report = {"benchmark": f"FLUX.1-dev generate {size}x{size}, {args.steps} steps, guidance 3.5, 512 T5 "
                               "tokens, text encoders + VAE included",
                  "device": torch.cuda.get_device_name(dev) if cuda else "cpu (--tiny)", "torch": torch.__version__,
                  "diffusers": __import__("diffusers").__version__, "command": " ".join(["python", *sys.argv]),
                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "rows": rows}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")

    def run(name: str, call, steps: int, extra: dict | None = None) -> None:
        call(2)  # warm-up: compilation, cuDNN plans, allocator
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        stamps: list[float] = []
        started = time.perf_counter()
        call(steps, stamps)
        if cuda:
            torch.cuda.synchronize()
        total = time.perf_counter() - started
        per_step = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else None
        rows[name] = {"command": " ".join(["python", *sys.argv]),  # each row's own: rows come from several runs
                      "s_per_image": round(total, 3), "steps": steps, "s_per_step": per_step and round(per_step, 4),
                      "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None,
                      **(extra or {})}
        print(name, json.dumps(rows[name]), flush=True)
        save()

    def stamp(stamps: list | None) -> None:
        if stamps is not None:
            if cuda:
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

    held = []  # a list, so the pipeline can be dropped
    if not args.reuse:
        started = time.perf_counter()
        held.append(write_random_flux(args.root, dev, dtype, args.tiny))
        print(f"wrote {args.root} in {time.perf_counter() - started:.1f} s", flush=True)

    def diffusers_call(steps: int, stamps: list | None = None) -> None:
        held[0](prompt=PROMPT, guidance_scale=3.5, num_inference_steps=steps, height=size, width=size,
              max_sequence_length=512, generator=torch.Generator("cpu").manual_seed(0),
              callback_on_step_end=lambda pipe, i, t, kw: (stamp(stamps), kw)[1])

    if "d-eager" not in skip and held:
        with torch.inference_mode():
            run("diffusers eager", diffusers_call, args.steps)
    held.clear()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()

    def qimg_row(name: str, steps: int, **options) -> None:
        t0 = time.perf_counter()
        pipe = qimg.load(args.root, device=dev.type, dtype="bfloat16" if cuda else "float32", **options)
        held.append(pipe)
        load_s = round(time.perf_counter() - t0, 2)

        def call(n: int, stamps: list | None = None) -> None:
            held[0].generate(PROMPT, seed=0, steps=n, guidance=3.5, width=size, height=size,
                          progress=lambda i, total: stamp(stamps))

        run(name, call, steps, {"options": {k: v for k, v in options.items()}, "qimg_load_s": load_s,
                                "plan": plan_summary(pipe.plan)})
        del pipe
        held.clear()
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()

    if "q-eager" not in skip:
        qimg_row("qimg eager", args.steps)
    if "q-compiled" not in skip:
        qimg_row("qimg compiled", args.steps, compile=True)
    if "q-fp8" not in skip and cuda:
        qimg_row("qimg compiled fp8 compute", args.steps, compile=True, fp8="compute")
    if "q-budget" not in skip:
        qimg_row(f"qimg --vram-budget {args.budget:g}", args.budget_steps, vram_budget=args.budget if cuda else None)
    save()


if __name__ == "__main__":
    main()
