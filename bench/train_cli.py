"""`qimg train-lora` end to end on the GPU, as a user runs it, under a VRAM budget.

    python bench/train_cli.py --tokenizer .bench_assets/tokenizer --layers 12 --budget 6 --compile \
        --out bench/results/train_cli_h200.json

A random Qwen-Image folder in the official layout is written first: the full-width MMDiT with --layers blocks
(the released model has 60), a full-width text encoder cut to 2 layers (the caching step is not what is
measured), the full VAE. Then 3 captioned 1024x1024 images, and two processes of the CLI: a run of 6 steps with a
sample image every 3 (so sampling happens between streamed training steps), stopped by nothing, then the same
run resumed to 8 steps. Recorded: the plan -v prints, seconds per step and the GPU peak per step from the --json
events (steps after the first two: the first compiles), what the run folder holds, and the exit codes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import write_random_qwen_image  # noqa: E402


def make_data(folder: Path) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        yy, xx = np.mgrid[0:1024, 0:1024] / 1024
        picture = np.stack([xx, yy, (xx + yy) / 2], -1) * 200 + rng.random((1024, 1024, 3)) * 55
        Image.fromarray(picture.astype(np.uint8)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a photo of sks thing number {i}", encoding="utf-8")


def train(args: argparse.Namespace, model: Path, data: Path, run: Path, steps: int, resume: bool) -> dict:
    prompts = run.parent / "samples.jsonl"
    prompts.write_text(json.dumps({"prompt": "a photo of sks thing", "steps": 8}) + "\n", encoding="utf-8")
    cmd = [sys.executable, "-m", "qimg", "train-lora", "--model", str(model), "--data", str(data), "-o", str(run),
           "--steps", str(steps), "--save-every", "3", "--resolution", "1024", "--json", "-v",
           "--sample-every", "3", "--sample-prompts", str(prompts), "--vram-budget", str(args.budget)]
    cmd += ["--compile"] if args.compile else []
    cmd += ["--fp8", "weights"] if args.fp8 else []
    cmd += ["--resume"] if resume else []
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    steps_ = [e for e in events if e["event"] == "step"]
    timed = steps_[2:] if len(steps_) > 2 else steps_
    return {
        "command": " ".join(["qimg", *cmd[3:]]),
        "exit_code": done.returncode,
        "stderr": done.stderr.splitlines()[-40:],  # -v's plan, the saves, the samples (no bar: not a terminal)
        "steps": [e["step"] for e in steps_],
        "s_per_step_median": round(statistics.median(e["seconds"] for e in timed), 4) if timed else None,
        "gpu_peak_gib_max": max((e.get("gpu_gib", 0) for e in steps_), default=None),
        "losses": [round(e["loss"], 4) for e in steps_],
        "samples": sorted(p.name for p in (run / "samples").glob("*.png")) if (run / "samples").is_dir() else [],
        "files": sorted(p.name for p in run.glob("lora*.safetensors")),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--budget", type=float, default=6)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--fp8", action="store_true")
    ap.add_argument("--work", type=Path, default=Path("/tmp/qimg-train-cli"))
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    model, data, run = args.work / "model", args.work / "data", args.work / "run"
    write_random_qwen_image(model, args.tokenizer, layers=args.layers, text_layers=2, shard="2GB")
    make_data(data)
    shutil.rmtree(run, ignore_errors=True)
    first = train(args, model, data, run, 6, resume=False)
    print(json.dumps(first, indent=1), flush=True)
    resumed = train(args, model, data, run, 8, resume=True)
    print(json.dumps(resumed, indent=1), flush=True)
    out = {"benchmark": f"qimg train-lora end to end, {args.layers}-block full-width Qwen-Image, 1024x1024",
           "device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "command": " ".join(["python", *sys.argv]),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "runs": {"first": first, "resumed": resumed}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
