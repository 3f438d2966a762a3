"""Prompt-file batches on 1, 2, 4 GPUs (issue 16, part a): images per minute for a 16-line prompt file, each
count in a new `qimg generate --prompts FILE --gpus N` (torchrun underneath), on a random full-size folder.

    python bench/memory.py make --tokenizer DIR --model /tmp/qwen                       # once
    python bench/multi_gpu.py --model /tmp/qwen --out bench/results/multi_gpu_h200x4.json [--gpus 1,2,4]
    python bench/multi_gpu.py --tiny --out /tmp/multi_gpu_tiny.json                     # CPU smoke run (gloo)

Per count: the wall clock of the whole command (loading included: each process loads its own copy, in
parallel), and the steady rate: images per minute between the first and the last image written (the --json
events, time-stamped as they arrive), which is what a long batch converges to. Speed-ups are against one GPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SUBJECTS = ["a lighthouse at dusk", "a red fox in snow", "a bowl of ramen", "a city street in rain",
            "a mountain lake", "an old library", "a robot gardener", "a sailing ship", "a desert at noon",
            "a cat on a windowsill", "a neon sign reading 'qimg'", "a forest path in autumn", "a glass teapot",
            "a snowy village", "a jazz trio on stage", "a field of sunflowers"]


def prompt_file(folder: Path, lines: int) -> Path:
    path = folder / "prompts.txt"
    path.write_text("".join(f"{SUBJECTS[i % len(SUBJECTS)]}, photograph {i}\n" for i in range(lines)))
    return path


def run(count: int, argv: list[str], tiny: bool) -> dict:
    if tiny:  # no GPUs: torchrun directly, every rank on the CPU
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={count}", "-m",
               "qimg", *argv] if count > 1 else [sys.executable, "-m", "qimg", *argv]
    else:
        cmd = [sys.executable, "-m", "qimg", *argv, "--gpus", str(count)]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stamps = []
    for line in proc.stdout:  # type: ignore[union-attr]
        if line.startswith("{") and json.loads(line).get("event") == "written":
            stamps.append(time.perf_counter() - started)
    err = proc.stderr.read()  # type: ignore[union-attr]
    code = proc.wait()
    wall = time.perf_counter() - started
    row = {"processes": count, "rc": code, "wall_s": round(wall, 2), "images": len(stamps),
           "images_per_minute_wall": round(60 * len(stamps) / wall, 2)}
    if len(stamps) > 1:
        row["images_per_minute_steady"] = round(60 * (len(stamps) - 1) / (stamps[-1] - stamps[0]), 2)
        row["first_image_s"] = round(stamps[0], 2)
    if code != 0:
        row["stderr_tail"] = err[-1500:]
    print(json.dumps(row), flush=True)
    return row


def _device() -> str:
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="a model folder (default with --tiny: a tiny random one)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--gpus", default="1,2,4", help="process counts to run, comma-separated")
    ap.add_argument("--lines", type=int, default=16)
    ap.add_argument("--flags", default="--compile --fp8 compute", help="qimg generate flags for every count")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run on a tiny random model (gloo)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp())
    model = args.model
    flags = args.flags.split()
    if args.tiny:
        from tests.fixtures import build_qwen_tokenizer, write_tiny_qwen_image

        if model is None:
            build_qwen_tokenizer(work / "tokenizer")
            model = work / "tiny"
            write_tiny_qwen_image(model, work / "tokenizer")
        flags = ["--device", "cpu", "--steps", "2", "--width", "64", "--height", "64"]
    elif model is None:
        ap.error("--model is needed (write one with bench/memory.py make)")
    prompts = prompt_file(work, args.lines)
    rows = []
    for count in (int(c) for c in args.gpus.split(",")):
        out = work / f"out{count}"
        rows.append(run(count, ["generate", "--prompts", str(prompts), "-o", str(out), "--model", str(model),
                                "--seed", "1", "--json", "-q", *flags], args.tiny))
        base = rows[0].get("images_per_minute_steady")
        if base and rows[-1].get("images_per_minute_steady"):
            rows[-1]["speedup_steady"] = round(rows[-1]["images_per_minute_steady"] / base, 2)
        report = {"bench": "multi_gpu batch", "device": _device(), "command": " ".join(["python", *sys.argv]),
                  "flags": flags, "lines": args.lines, "rows": rows,
                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
