"""What a LoRA costs on the full-size Qwen-Image MMDiT: qimg vs diffusers (PEFT) in one process, random weights.

    python bench/lora.py --part step --out bench/results/lora_step_h200.json
    python bench/lora.py --part e2e --tokenizer DIR --out bench/results/lora_e2e_h200.json

step: one denoising step (forward, batch 1, 1024x1024 = 4096 image tokens, 128 text tokens; Lightning runs CFG
off), compiled, with random rank-16 and rank-64 LoRAs on the 12 attention and MLP linears of all 60 blocks
(musubi's default targets): none / side branch / merged into the weights, in bf16 and with FP8 compute (merged:
quantised from bf16 + delta, as qimg's load-time merge does). diffusers: the same PEFT file through
load_lora_weights, unfused and fused. Also the seconds to read and attach a LoRA file, to switch to another
between two batch lines, to change a scale, and the first step after a switch (the compiled blocks recompile).
e2e: Lightning 8 steps end to end (random 7B text encoder, 20B MMDiT and VAE, bf16, compiled, CFG off, the
lightning-8 schedule) with a rank-64 LoRA, seconds per image; diffusers with the same LoRA fused, for reference.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import fp8_compute_copy, random_diffusers_mmdit, sharing_qimg_mmdit, time_ms  # noqa: E402
from qimg.families.qwen import (
    QWEN_IMAGE,  # noqa: E402
    mmdit_fp8_layers,  # noqa: E402
)
from qimg.nets.qwen_mmdit import qwen_rope  # noqa: E402
from qimg.pipelines.loras import LoRAs  # noqa: E402
from qimg.runtime.attention import use_attention  # noqa: E402
from qimg.runtime.fp8 import apply_fp8  # noqa: E402
from qimg.runtime.merge import merge_deltas  # noqa: E402
from qimg.specs import QwenMMDiTParams  # noqa: E402

TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
           "attn.add_v_proj", "attn.to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj",
           "txt_mlp.net.2")


def write_peft_lora(path: Path, model: torch.nn.Module, layers: int, rank: int, seed: int) -> Path:
    """A random PEFT-format LoRA (what diffusers' save_lora_weights writes) on TARGETS of every block; the delta is
    about 1% of the weight's scale, as trained LoRAs are."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for i in range(layers):
        for t in TARGETS:
            name = f"transformer_blocks.{i}.{t}"
            lin = model.get_submodule(name)
            out_f, in_f = lin.weight.shape
            state[f"transformer.{name}.lora_A.weight"] = (torch.randn(rank, in_f, generator=gen) / math.sqrt(in_f)
                                                          ).to(torch.bfloat16)
            state[f"transformer.{name}.lora_B.weight"] = (torch.randn(out_f, rank, generator=gen) * 2e-4
                                                          ).to(torch.bfloat16)
    config = {"r": rank, "lora_alpha": rank, "target_modules": sorted({t for t in TARGETS})}
    save_file(state, str(path), metadata={"lora_adapter_metadata": json.dumps({f"transformer.{k}": v
                                                                               for k, v in config.items()})})
    return path


def merged_deltas(lora_file, strength: float = 1.0):
    """qimg's merge input for a read LoRA file: module name -> [(delta on a device, strength)]."""
    def factors(m):
        return lambda dev: (m.up.to(dev, torch.float32) @ m.down.to(dev, torch.float32)) * m.scale

    return {name: [(factors(m), strength)] for name, m in lora_file.modules.items()}


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")  # cpu: a smoke run of the script only


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _compiler(args):
    from qimg.runtime import compile as compiling

    return (lambda blocks: 0) if args.no_compile else compiling.compile_blocks


def report(args, rows, extra) -> None:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (smoke run)"
    out = {"benchmark": f"qwen-image LoRA cost ({args.part})", "device": device,
           "torch": torch.__version__, "diffusers": __import__("diffusers").__version__,
           "command": " ".join(["python", *sys.argv]),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "rows": rows, **extra}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")


def part_step(args) -> None:
    dev, dtype = _device(), torch.bfloat16
    params = QwenMMDiTParams(num_layers=args.layers)
    ref = random_diffusers_mmdit(args.layers, dev, dtype)
    ours = sharing_qimg_mmdit(ref, args.layers)
    tmp = Path(tempfile.mkdtemp())
    r16 = write_peft_lora(tmp / "r16.safetensors", ours, args.layers, 16, 1)
    r64 = write_peft_lora(tmp / "r64.safetensors", ours, args.layers, 64, 2)
    r64b = write_peft_lora(tmp / "r64b.safetensors", ours, args.layers, 64, 3)

    gen = torch.Generator(dev).manual_seed(1)
    side, n_txt = args.side // 16, args.text_tokens
    x = torch.randn(1, side * side, 64, device=dev, dtype=dtype, generator=gen)
    txt = torch.randn(1, n_txt, 3584, device=dev, dtype=dtype, generator=gen)
    t = torch.full((1,), 0.5, device=dev, dtype=dtype)
    shapes = [(1, side, side)]
    rope = qwen_rope(shapes, n_txt, params.axes_dims_rope).to(dev)
    rows: dict[str, dict] = {}
    extra: dict[str, dict] = {"seconds": {}, "rel_l2": {}}

    def measure(name: str, fn) -> None:
        _sync()
        started = time.perf_counter()
        fn()
        _sync()
        first = time.perf_counter() - started
        times = time_ms(fn, args.warmup, args.repeats)
        rows[name] = {"median_ms": round(statistics.median(times), 2), "min_ms": round(min(times), 2),
                      "first_call_s": round(first, 2)}
        print(name, json.dumps(rows[name]), flush=True)
        report(args, rows, extra)

    def timed(name: str, fn):
        _sync()
        started = time.perf_counter()
        result = fn()
        _sync()
        extra["seconds"][name] = round(time.perf_counter() - started, 3)
        print(name, extra["seconds"][name], "s", flush=True)
        return result

    def q_fwd(model):
        return lambda: model(x, txt, t, rope)

    def d_fwd():
        return ref(hidden_states=x, encoder_hidden_states=txt, timestep=t, img_shapes=[shapes], return_dict=False)[0]

    def rel(a, b) -> float:
        return round(((a.float() - b.float()).norm() / b.float().norm()).item(), 5)

    compile_blocks = _compiler(args)
    with torch.inference_mode():
        use_attention("cudnn" if dev.type == "cuda" else "sdpa", dev)
        # diffusers first, eager: its PEFT layers wrap the same weight tensors qimg reads.
        measure("diffusers eager: no LoRA", d_fwd)
        timed("diffusers load_lora_adapter r64", lambda: ref.load_lora_adapter(str(r64), adapter_name="r64"))
        d_r64 = d_fwd()
        measure("diffusers eager: r64 unfused (PEFT)", d_fwd)
        ref.fuse_lora(lora_scale=1.0)
        measure("diffusers eager: r64 fused", d_fwd)
        ref.unfuse_lora()
        ref.unload_lora()
        gc.collect()

        # qimg bf16, compiled: none, then LoRAs as the pipeline attaches them (pipelines/loras.py).
        manager = LoRAs(ours, QWEN_IMAGE.denoiser_blocks, QWEN_IMAGE.name, dtype, None)
        compile_blocks(ours.transformer_blocks)
        measure("qimg compiled bf16: no LoRA", q_fwd(ours))
        base = q_fwd(ours)()
        timed("qimg load r16 (read + attach)", lambda: manager.load(r16, 1.0))
        measure("qimg compiled bf16: r16 branch", q_fwd(ours))
        timed("qimg switch r16 -> r64 (apply)", lambda: manager.apply([(r64, 1.0)]))
        timed("qimg first step after switch (recompile)", q_fwd(ours))
        got = q_fwd(ours)()
        extra["rel_l2"]["qimg r64 branch vs diffusers r64 PEFT"] = rel(got, d_r64)
        measure("qimg compiled bf16: r64 branch", q_fwd(ours))
        timed("qimg switch r64 -> r64b (apply)", lambda: manager.apply([(r64b, 1.0)]))
        timed("qimg first step after r64 -> r64b", q_fwd(ours))
        timed("qimg set scale 0.5", lambda: manager.set_strength("r64b", 0.5))
        timed("qimg first step after a scale change", q_fwd(ours))
        manager.apply([])
        extra["rel_l2"]["qimg after unload vs before"] = rel(q_fwd(ours)(), base)
        r64_file = manager.load(r64, 1.0)
        lora_r64 = merged_deltas(r64_file)
        manager.unload("r64")

        # FP8 compute on a fresh model sharing the (unmerged) bf16 weights: none and the r64 branch.
        fp8 = sharing_qimg_mmdit(ref, args.layers)
        apply_fp8(fp8, mmdit_fp8_layers, compute=True)
        compile_blocks(fp8.transformer_blocks)
        measure("qimg compiled fp8: no LoRA", q_fwd(fp8))
        fp8_manager = LoRAs(fp8, QWEN_IMAGE.denoiser_blocks, QWEN_IMAGE.name, dtype, None)
        fp8_manager.load(r64, 1.0)
        measure("qimg compiled fp8: r64 branch", q_fwd(fp8))
        del fp8, fp8_manager
        gc.collect()
        torch.cuda.empty_cache()

        # Merged: into the shared bf16 weights in place (everything above is done with them), then FP8 from them.
        merged = sharing_qimg_mmdit(ref, args.layers)
        timed("qimg merge r64 into bf16 weights (every block)", lambda m=merged: merge_deltas(m, lora_r64))
        extra["rel_l2"]["qimg r64 merged vs r64 branch"] = rel(merged(x, txt, t, rope), got)
        compile_blocks(merged.transformer_blocks)
        measure("qimg compiled bf16: r64 merged", q_fwd(merged))
        fp8m = sharing_qimg_mmdit(ref, args.layers)
        del merged
        apply_fp8(fp8m, mmdit_fp8_layers, compute=True)
        compile_blocks(fp8m.transformer_blocks)
        measure("qimg compiled fp8: r64 merged (quantised from bf16 + delta)", q_fwd(fp8m))

    def over(a: str, b: str) -> float | None:
        return round(rows[a]["median_ms"] / rows[b]["median_ms"], 4) if a in rows and b in rows else None

    extra["overhead_x"] = {
        "bf16 r16 branch": over("qimg compiled bf16: r16 branch", "qimg compiled bf16: no LoRA"),
        "bf16 r64 branch": over("qimg compiled bf16: r64 branch", "qimg compiled bf16: no LoRA"),
        "bf16 r64 merged": over("qimg compiled bf16: r64 merged", "qimg compiled bf16: no LoRA"),
        "fp8 r64 branch": over("qimg compiled fp8: r64 branch", "qimg compiled fp8: no LoRA"),
        "fp8 r64 merged": over("qimg compiled fp8: r64 merged (quantised from bf16 + delta)",
                               "qimg compiled fp8: no LoRA"),
        "diffusers eager r64 unfused": over("diffusers eager: r64 unfused (PEFT)", "diffusers eager: no LoRA"),
    }
    report(args, rows, extra)
    print(json.dumps(extra, indent=1))


def part_e2e(args) -> None:
    import qimg
    from bench.generate import PROMPT, QWEN_SCHEDULE, build_pipelines

    dev = torch.device("cuda")
    lightning = dict(QWEN_SCHEDULE, base_shift=math.log(3), max_shift=math.log(3), shift_terminal=None)
    dpipe, qpipe, transformer, ours_t = build_pipelines(args.tokenizer, lightning)
    ref = qpipe.ref
    folder = ref.path
    lora = write_peft_lora(folder / "Qwen-Image-Lightning-8steps-random.safetensors", ours_t, 60, 64, 7)
    rows: dict[str, dict] = {}

    def run(name: str, call) -> None:
        call()  # warm-up: compilation, cuDNN plans, allocator
        torch.cuda.synchronize()
        times = []
        for _ in range(args.repeats_e2e):
            started = time.perf_counter()
            call()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        rows[name] = {"s_per_image": round(statistics.median(times), 3), "min_s": round(min(times), 3),
                      "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2)}
        print(name, json.dumps(rows[name]), flush=True)
        report(args, rows, {})

    job = qimg.prepare_generate(ref, PROMPT, seed=0, preset="lightning-8")
    assert job.request.steps == 8 and not job.request.cfg_enabled

    def qimg_call():
        qpipe.run(job, keep_text_encoder=True)

    def diffusers_call():
        dpipe(prompt=PROMPT, negative_prompt=" ", true_cfg_scale=1.0, num_inference_steps=8, height=1024, width=1024,
              generator=torch.Generator("cpu").manual_seed(0))

    compile_blocks = _compiler(args)
    with torch.inference_mode():
        use_attention("auto", dev)
        dpipe.load_lora_weights(str(lora), adapter_name="lightning")
        dpipe.fuse_lora(lora_scale=1.0)
        run("diffusers eager: lightning-8, r64 fused", diffusers_call)
        dpipe.unfuse_lora()
        dpipe.unload_lora_weights()
        qpipe.load_lora(lora, 1.0)
        compile_blocks(ours_t.transformer_blocks)
        run("qimg compiled bf16: lightning-8, r64 branch", qimg_call)
        read = qpipe.adapters.attached["Qwen-Image-Lightning-8steps-random"].file
        qpipe.unload_lora("Qwen-Image-Lightning-8steps-random")
        merge_deltas(ours_t, merged_deltas(read))  # what --lora-mode merge does as the model loads
        run("qimg compiled bf16: lightning-8, r64 merged", qimg_call)
        # FP8 compute from the merged bf16 weights; diffusers' copy of the MMDiT goes first to make room.
        dpipe.transformer = None
        del transformer
        gc.collect()
        qpipe.transformer = fp8_compute_copy(ours_t)
        del ours_t
        gc.collect()
        torch.cuda.empty_cache()
        compile_blocks(qpipe.transformer.transformer_blocks)
        run("qimg compiled fp8: lightning-8, r64 merged", qimg_call)
    report(args, rows, {})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("step", "e2e"), required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tokenizer", type=Path)
    ap.add_argument("--layers", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--repeats-e2e", type=int, default=3)
    ap.add_argument("--side", type=int, default=1024, help="image side in pixels (step part)")
    ap.add_argument("--text-tokens", type=int, default=128)
    ap.add_argument("--no-compile", action="store_true", help="eager (a CPU smoke run of the script)")
    args = ap.parse_args()
    part_step(args) if args.part == "step" else part_e2e(args)


if __name__ == "__main__":
    main()
