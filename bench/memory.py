"""Memory rows of issue 6: the whole Qwen-Image pipeline under VRAM budgets, qimg against diffusers' offload modes,
on the same random full-size weights read from disk in the official layout.

    python bench/memory.py make --tokenizer DIR --model /tmp/qwen          # write the random model folder once
    python bench/memory.py all --model /tmp/qwen --out bench/results/memory.json [--rows a,b]

Each row runs in its own process (so host peak RSS and the CUDA allocator start clean): load, then one image at
1024x1024, 50 steps (fewer for the slow diffusers modes: the per-step time is what is compared), true CFG 4.
qimg rows use the public API with the CLI's settings (text encoder freed after encoding); the budget is
qimg's --vram-budget, which caps the process with torch.cuda.set_per_process_memory_fraction. Per row:
peak = max_memory_reserved, s_per_step = mean over the denoising steps after the first, host peak RSS (VmHWM,
which counts memory-mapped checkpoint pages), host peak anonymous + pinned memory (sampled; pages pinned with
cudaHostRegister are anonymous ones), the peak of qimg's own host copies, and the largest pixel difference
against the resident FP8 row.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = ("A coffee shop entrance features a chalkboard sign reading 'Qwen Coffee $2 per cup', with a neon light "
          "beside it displaying 'qimg'. Next to it hangs a poster showing a beautiful Chinese woman. Ultra HD, 4K.")
GiB = 1024**3
# name -> (engine, budget GiB or None, qimg.load options / diffusers offload mode, steps)
ROWS = {
    "qimg-fp8-resident": ("qimg", None, {"fp8": "weights", "offload": "none"}, 50),
    "qimg-fp8-24gib": ("qimg", 24, {"fp8": "weights"}, 50),
    "qimg-fp8-12gib": ("qimg", 12, {"fp8": "weights"}, 50),
    "qimg-fp8-8gib": ("qimg", 8, {"fp8": "weights"}, 50),
    "qimg-bf16-8gib": ("qimg", 8, {}, 20),
    "diffusers-model-offload": ("diffusers", None, "model", 10),
    "diffusers-group-offload": ("diffusers", None, "group", 6),
}


def make(args: argparse.Namespace) -> None:
    """A random full-size Qwen-Image folder: transformer in 5 GB bf16 shards, the 7B text encoder, the VAE."""
    from bench.common import write_random_qwen_image

    root = args.model
    if (root / "model_index.json").is_file():
        print(f"{root} exists")
        return
    write_random_qwen_image(root, args.tokenizer)
    print(f"wrote {root}: {sum(f.stat().st_size for f in root.rglob('*') if f.is_file()) / 1e9:.1f} GB")


class HostPeak:
    """Peak of this process's anonymous + shared (pinned) resident memory, sampled every 20 ms."""

    def __init__(self) -> None:
        self.peak = 0
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _read(self) -> dict[str, int]:
        out = {}
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssShmem", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
        return out

    def _run(self) -> None:
        while self.running:
            s = self._read()
            self.peak = max(self.peak, s.get("RssAnon", 0) + s.get("RssShmem", 0))
            time.sleep(0.02)

    def stop(self) -> dict[str, float]:
        self.running = False
        self.thread.join()
        return {"host_peak_gib": round(self._read()["VmHWM"] / GiB, 2), "host_peak_anon_gib": round(self.peak / GiB, 2)}


def host_buffers() -> int:
    """The most bytes qimg's own host copies (runtime/offload.py HOST) held at once: the part of the host peak
    that the memory plan decides."""
    from qimg.runtime.host_copies import HOST

    return HOST.peak


def row(args: argparse.Namespace) -> None:
    """One row in this process; prints its JSON on the last line and saves the image as args.image."""
    engine, budget, options, steps = ROWS[args.name]
    steps = args.steps or steps
    host = HostPeak()
    stamps: list[float] = []
    started = time.perf_counter()
    if engine == "qimg":
        import qimg

        pipe = qimg.load(args.model, device="cuda", vram_budget=budget, **options)
        pipe.keep_text_encoder = False
        loaded = time.perf_counter()
        plan = pipe.plan.describe(pipe.needs)

        def progress(i: int, n: int) -> None:
            torch.cuda.synchronize()
            stamps.append(time.perf_counter())

        image = pipe.generate(PROMPT, steps=steps, cfg=4.0, seed=0, width=1024, height=1024, progress=progress)[0]
    else:
        from diffusers import QwenImagePipeline

        pipe = QwenImagePipeline.from_pretrained(args.model, torch_dtype=torch.bfloat16)
        pipe.set_progress_bar_config(disable=True)
        if options == "model":
            pipe.enable_model_cpu_offload()
        else:
            from diffusers.hooks import apply_group_offloading

            for name in ("transformer", "text_encoder"):
                apply_group_offloading(getattr(pipe, name), onload_device=torch.device("cuda"),
                                       offload_type="block_level", num_blocks_per_group=1, use_stream=True)
            pipe.vae.to("cuda")
        loaded = time.perf_counter()
        plan = [f"diffusers {options} offload"]

        def on_step(p, i, t, kwargs):
            torch.cuda.synchronize()
            stamps.append(time.perf_counter())
            return kwargs

        gen = torch.Generator("cpu").manual_seed(0)
        image = pipe(PROMPT, negative_prompt=" ", true_cfg_scale=4.0, num_inference_steps=steps, width=1024,
                     height=1024, generator=gen, callback_on_step_end=on_step).images[0]
    done = time.perf_counter()
    image.save(args.image)
    gaps = np.diff(stamps)
    flags = {"qimg": lambda: " ".join(f"--{k.replace('_', '-')} {v}" for k, v in options.items())
             + (f" --vram-budget {budget}" if budget else ""), "diffusers": lambda: f"enable_{options}_offload"}
    result = {
        "name": args.name,
        "engine": engine,
        "budget_gib": budget,
        "peak_gib": round(torch.cuda.max_memory_reserved() / GiB, 2),
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / GiB, 2),
        "s_per_step": round(float(gaps.mean()), 4) if len(gaps) else None,
        "steps": steps,
        "load_s": round(loaded - started, 1),
        "generate_s": round(done - loaded, 1),
        **host.stop(),
        **({"host_buffers_peak_gib": round(host_buffers() / GiB, 2)} if engine == "qimg" else {}),
        "flags": flags[engine](),
        "plan": plan,
    }
    print(json.dumps(result))


def run_all(args: argparse.Namespace) -> None:
    names = args.rows.split(",") if args.rows else list(ROWS)
    report = json.loads(args.out.read_text()) if args.out.is_file() else {"rows": []}
    report.update(
        bench="memory",
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        command="python bench/memory.py make --tokenizer .bench_assets/tokenizer --model /tmp/qwen && "
                "python bench/memory.py all --model /tmp/qwen --out $OUT/memory.json",
        date=datetime.date.today().isoformat(),
        total_vram_gib=round(torch.cuda.get_device_properties(0).total_memory / GiB, 1),
    )
    images = Path("/tmp/qimg_memory_images")  # $OUT brings back few files: keep only the JSON there
    images.mkdir(exist_ok=True)
    for name in names:
        image = images / f"memory_{name}.png"
        cmd = [sys.executable, __file__, "row", "--model", str(args.model), "--name", name, "--image", str(image)]
        if args.steps:
            cmd += ["--steps", str(args.steps)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if proc.returncode != 0:
            result = {"name": name, "error": proc.stderr.strip().splitlines()[-3:]}
        else:
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            ref = images / "memory_qimg-fp8-resident.png"
            if ref.is_file() and result["engine"] == "qimg":
                from PIL import Image

                a = np.asarray(Image.open(image), dtype=np.int16)
                b = np.asarray(Image.open(ref), dtype=np.int16)
                result["max_pixel_diff_vs_resident_fp8"] = int(np.abs(a - b).max())
        result.update(device=report["device"], date=report["date"], command=report["command"])
        print(json.dumps(result), flush=True)
        report["rows"] = [r for r in report["rows"] if r.get("name") != name] + [result]
        args.out.write_text(json.dumps(report, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("--tokenizer", type=Path, required=True)
    m.add_argument("--model", type=Path, required=True)
    r = sub.add_parser("row")
    r.add_argument("--model", type=Path, required=True)
    r.add_argument("--name", choices=list(ROWS), required=True)
    r.add_argument("--image", type=Path, required=True)
    r.add_argument("--steps", type=int)
    a = sub.add_parser("all")
    a.add_argument("--model", type=Path, required=True)
    a.add_argument("--out", type=Path, required=True)
    a.add_argument("--rows", default="")
    a.add_argument("--steps", type=int, help="override every row's step count (a quick pass)")
    args = ap.parse_args()
    {"make": make, "row": row, "all": run_all}[args.cmd](args)


if __name__ == "__main__":
    main()
