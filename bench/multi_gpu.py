"""qimg on 1, 2, 4 GPUs of one machine (issue 16), each part in new processes as users start them, on a random
full-size Qwen-Image folder:

a. prompt-file batches: images per minute for a 16-line prompt file, `qimg generate --prompts FILE --gpus N`
   (torchrun underneath);
b. one 1024x1024 image: `qimg generate PROMPT --gpus N --parallel cfg|cfg+seq` against one GPU, its phases from
   -v's "time:" line and its pixels against the one-GPU image; part s: bench/multi_gpu_step.py under torchrun for
   the CFG step alone, qimg's modes next to diffusers' ContextParallelConfig on the same weights;
c. LoRA training: `torchrun --nproc-per-node N -m qimg train-lora` (data parallel), samples per second.

    python bench/memory.py make --tokenizer DIR --model /tmp/qwen                       # once
    python bench/multi_gpu.py --model /tmp/qwen --out bench/results/multi_gpu_h200x4.json [--parts a,b,s,c]
    python bench/multi_gpu.py --tiny --out /tmp/multi_gpu_tiny.json                     # CPU smoke run (gloo)

Batches: the wall clock of the whole command (loading included: each process loads its own copy, in parallel),
and the steady rate: images per minute from the start of the first image (its --json "written" event, less the
seconds it took) to the last image written, which is what a long batch converges to. Speed-ups are against one
GPU. The JSON is rewritten after every row.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
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


def launcher(count: int, tiny: bool) -> list[str]:
    """The command prefix that starts `count` qimg processes: one plain process, else torchrun (--standalone: one
    machine)."""
    if count == 1:
        return [sys.executable, "-m", "qimg"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={count}", "-m", "qimg"]


def spawn(cmd: list[str], work: Path) -> tuple[list[tuple[float, dict]], str, int, float]:
    """Run cmd; its --json events stamped with the seconds since the start, its stderr, exit code and wall
    clock. stderr goes to a file, so a chatty process never blocks on a full pipe."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "4")}
    with (work / "stderr.txt").open("w+") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        events = []
        for line in proc.stdout:  # type: ignore[union-attr]
            if line.startswith("{"):
                events.append((time.perf_counter() - started, json.loads(line)))
        code = proc.wait()
        wall = time.perf_counter() - started
        err.seek(0)
        return events, err.read(), code, wall


def batch_row(count: int, argv: list[str], tiny: bool, work: Path) -> dict:
    cmd = [*launcher(count, True), *argv] if tiny else [sys.executable, "-m", "qimg", *argv, "--gpus", str(count)]
    events, err, code, wall = spawn(cmd, work)
    written = [(at, e) for at, e in events if e.get("event") == "written"]
    row = {"processes": count, "rc": code, "wall_s": round(wall, 2), "images": len(written),
           "images_per_minute_wall": round(60 * len(written) / wall, 2)}
    if written:
        seconds = [float(e.get("seconds") or 0.0) for _, e in written]
        row["image_s_median"] = round(statistics.median(seconds), 2)
        # what a long batch converges to once every process has loaded: N processes, each an image per median
        row["images_per_minute_per_process_rate"] = round(60 * count / statistics.median(seconds), 2)
        first_start = min(at - float(e.get("seconds") or 0.0) for at, e in written)
        row["images_per_minute_steady"] = round(60 * len(written) / (written[-1][0] - first_start), 2)
        row["first_image_s"] = round(written[0][0], 2)
    if code != 0:
        row["stderr_tail"] = err[-1500:]
    print(json.dumps(row), flush=True)
    return row


def image_row(name: str, count: int, mode: str | None, args: argparse.Namespace, model: Path, work: Path,
              flags: list[str]) -> dict:
    from bench.first_image import PROMPT, parse_time_line

    out = work / (re.sub(r"\W+", "_", name) + ".png")
    argv = ["generate", PROMPT, "-o", str(out), "--model", str(model), "--seed", "1", "-v", "--overwrite", *flags]
    if mode is not None:
        argv += ["--parallel", mode]
    if args.tiny:
        cmd = [*launcher(count, True), *argv]
    else:
        cmd = [sys.executable, "-m", "qimg", *argv] + (["--gpus", str(count)] if count > 1 else [])
    _, err, code, wall = spawn(cmd, work)
    row = {"name": name, "processes": count, "parallel": mode, "rc": code, "wall_s": round(wall, 2),
           "phases_s": parse_time_line(err), "argv": " ".join(["qimg", *argv])}
    if code != 0:
        row["stderr_tail"] = err[-1500:]
    row["png"] = str(out)
    print(json.dumps(row), flush=True)
    return row


def compare_pngs(a: str, b: str) -> dict:
    """How far image b is from image a: the largest and the mean absolute difference in 8-bit levels."""
    import numpy as np
    from PIL import Image

    x = np.asarray(Image.open(a).convert("RGB"), dtype=np.int16)
    y = np.asarray(Image.open(b).convert("RGB"), dtype=np.int16)
    diff = np.abs(x - y)
    return {"max_abs_levels": int(diff.max()), "mean_abs_levels": round(float(diff.mean()), 4),
            "equal": bool((diff == 0).all())}


def step_rows(count: int, args: argparse.Namespace, work: Path) -> dict:
    """bench/multi_gpu_step.py on `count` processes; its JSON."""
    out = work / f"step{count}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={count}",
           str(ROOT / "bench" / "multi_gpu_step.py"), "--out", str(out)]
    if args.tiny:
        cmd += ["--layers", "1", "--pixels", "256", "--warmup", "0", "--repeats", "1"]
    _, err, code, _ = spawn(cmd, work)
    report = json.loads(out.read_text()) if out.is_file() else {}
    if code != 0:
        report["rc"], report["stderr_tail"] = code, err[-1500:]
    print(json.dumps(report.get("rows", report)), flush=True)
    return report


def train_data(folder: Path, count: int, side: int) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        yy, xx = np.mgrid[0:side, 0:side] / side
        picture = np.stack([xx, yy, (xx + yy) / 2], -1) * 200 + rng.random((side, side, 3)) * 55
        Image.fromarray(picture.astype(np.uint8)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a photo of sks thing number {i}", encoding="utf-8")
    return folder


def train_row(count: int, args: argparse.Namespace, model: Path, data: Path, work: Path) -> dict:
    run_dir = work / f"run{count}"
    flags = (["--device", "cpu", "--dtype", "float32", "--resolution", "256", "--rank", "4"] if args.tiny
             else ["--resolution", "1024"])
    argv = ["train-lora", "--model", str(model), "--data", str(data), "-o", str(run_dir), "--steps",
            str(args.train_steps), "--grad-accum", str(args.grad_accum), "--save-every", str(args.train_steps),
            "--seed", "1", "--json", *flags, *args.train_flags.split()]
    events, err, code, wall = spawn([*launcher(count, args.tiny), *argv], work)
    steps = [e for _, e in events if e.get("event") == "step"]
    plan = [line for _, e in events if e.get("event") == "plan" for line in e.get("lines", [])]
    timed = steps[2:] if len(steps) > 3 else steps  # the first steps warm up (allocator, kernels, compile)
    row = {"processes": count, "rc": code, "wall_s": round(wall, 2), "steps": len(steps),
           "global_batch": args.grad_accum, "argv": " ".join(["qimg", *argv]), "plan": plan}
    if timed:
        seconds = statistics.median(e["seconds"] for e in timed)
        row["s_per_step"] = round(seconds, 3)
        row["samples_per_s"] = round(args.grad_accum / seconds, 3)
        row["gpu_gib"] = max((e.get("gpu_gib") or 0) for e in timed) or None
        row["losses"] = [round(e["loss"], 5) for e in steps]
    if code != 0:
        row["stderr_tail"] = err[-1500:]
    print(json.dumps(row), flush=True)
    return row


def _device() -> str:
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}"


def _speedups(rows: list[dict], key: str, base: dict | None) -> None:
    for row in rows:
        if base and base.get(key) and row.get(key):
            row[f"speedup_{key}"] = round(row[key] / base[key], 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="a model folder (default with --tiny: a tiny random one)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--parts", default="a,b,s,c",
                    help="which parts to run: a (batches), b (one image), s (one CFG step), c (training)")
    ap.add_argument("--gpus", default="1,2,4", help="process counts to run, comma-separated")
    ap.add_argument("--lines", type=int, default=16)
    ap.add_argument("--flags", default="--steps 10", help="part a: qimg generate flags for every count")
    ap.add_argument("--image-flags", default="--steps 50", help="part b: qimg generate flags for every row")
    ap.add_argument("--train-steps", type=int, default=6)
    ap.add_argument("--grad-accum", type=int, default=4, help="part c: the global batch (micro-batches of 1)")
    ap.add_argument("--train-flags", default="", help="part c: more qimg train-lora flags")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run on a tiny random model (gloo)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp())
    model = args.model
    flags, image_flags = args.flags.split(), args.image_flags.split()
    if args.tiny:
        from tests.fixtures import build_qwen_tokenizer, write_tiny_qwen_image

        if model is None:
            build_qwen_tokenizer(work / "tokenizer")
            model = work / "tiny"
            write_tiny_qwen_image(model, work / "tokenizer")
        flags = image_flags = ["--device", "cpu", "--steps", "2", "--width", "64", "--height", "64"]
    elif model is None:
        ap.error("--model is needed (write one with bench/memory.py make)")
    counts = [int(c) for c in args.gpus.split(",")]
    parts = set(args.parts.split(","))
    report: dict = {"bench": "multi_gpu", "device": _device(), "command": " ".join(["python", *sys.argv]),
                    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}

    def dump() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")

    if "a" in parts:
        prompts = prompt_file(work, args.lines)
        rows = report.setdefault("a_batch", {"flags": flags, "lines": args.lines, "rows": []})["rows"]
        for count in counts:
            rows.append(batch_row(count, ["generate", "--prompts", str(prompts), "-o", str(work / f"out{count}"),
                                          "--model", str(model), "--seed", "1", "--json", "-q", *flags],
                                  args.tiny, work))
            _speedups(rows, "images_per_minute_steady", rows[0])
            dump()
    if "b" in parts:
        section = report.setdefault("b_image", {})
        section["flags"] = image_flags
        rows = section.setdefault("rows", [])
        for count in counts:
            mode = None if count == 1 else ("cfg" if count == 2 else "cfg+seq")
            rows.append(image_row(f"{count} process(es) {mode or ''}".strip(), count, mode, args, model, work,
                                  image_flags))
            if rows[0].get("rc") == 0 and rows[-1].get("rc") == 0 and len(rows) > 1:
                rows[-1]["pixels_vs_one_process"] = compare_pngs(rows[0]["png"], rows[-1]["png"])
            base = rows[0].get("phases_s", {}).get("denoise")
            if base and rows[-1].get("phases_s", {}).get("denoise"):
                rows[-1]["speedup_denoise"] = round(base / rows[-1]["phases_s"]["denoise"], 2)
            dump()
    if "s" in parts:
        steps = report.setdefault("b_image", {}).setdefault("steps", {})
        for count in counts:
            steps[str(count)] = step_rows(count, args, work)
            dump()
    if "c" in parts:
        data = train_data(work / "data", max(args.grad_accum, 4), 256 if args.tiny else 1024)
        rows = report.setdefault("c_train", {"rows": []})["rows"]
        for count in counts:
            rows.append(train_row(count, args, model, data, work))
            _speedups(rows, "samples_per_s", rows[0])
            dump()
    dump()


if __name__ == "__main__":
    main()
