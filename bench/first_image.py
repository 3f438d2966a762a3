"""Time to first image, as a cron job pays it: `qimg generate` in a new process, from process start to the PNG on
disk, split into start-up (interpreter + imports + argument parsing), load, text encoding, denoising, decoding and
writing; next to diffusers doing the same in its own new process.

    python bench/memory.py make --tokenizer DIR --model /tmp/qwen      # a random full-size folder, written once
    python bench/first_image.py --model /tmp/qwen --out bench/results/first_image_h200.json [--rows a,b] [--cold]
    python bench/first_image.py --model TINY --size 64x48 --extra=--device=cpu --rows "qimg 8 steps,..." --out O

TINY, the tests' tiny random Qwen-Image: python -c "from pathlib import Path; from tests.fixtures import *;
build_qwen_tokenizer(Path('/tmp/tok')); write_tiny_qwen_image(Path('/tmp/tiny'), Path('/tmp/tok'))"

Each row is one new process. `--compile` rows run the blocks from AOTInductor packages (runtime/packaged.py) where
torch's package loader works on the device (on the H200 machine it does not: they are regional torch.compile
there, bench/results/aoti_loader_h200.txt); "traced" rows set QIMG_COMPILE_PACKAGES=0 for regional
torch.compile anyway. qimg rows run the CLI with -v and
read its "time:" line (per-phase seconds and the seconds since the process started); the wall clock is the
parent's, from spawning the process to its exit. A row named "... again" repeats its row, so its process finds
the compile cache an earlier one left ($QIMG_HOME/compile). --cold drops the page cache before each row (needs
root: /proc/sys/vm/drop_caches); the JSON records whether that worked.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "A coffee shop entrance with a chalkboard sign reading 'Qwen Coffee $2 per cup', ultra HD"
# name -> extra qimg generate flags ("NAME=VALUE" entries set the row's environment instead); "diffusers-*" rows run
# DIFFUSERS_SCRIPT
TRACED = "QIMG_COMPILE_PACKAGES=0"
ROWS: dict[str, list[str]] = {
    "qimg bf16 2 steps": ["--steps", "2"],
    "qimg fp8 compute compiled 50 steps cfg": ["--steps", "50", "--fp8", "compute", "--compile"],
    "qimg fp8 compute compiled 50 steps cfg again": ["--steps", "50", "--fp8", "compute", "--compile"],
    "qimg fp8 compute compiled lightning-8": ["--preset", "lightning-8", "--fp8", "compute", "--compile"],
    "qimg fp8 compute lightning-8": ["--preset", "lightning-8", "--fp8", "compute"],
    "qimg fp8 compute cuda-graphs lightning-8": ["--preset", "lightning-8", "--fp8", "compute", "--cuda-graphs"],
    "qimg fp8 compute compiled cuda-graphs lightning-8": ["--preset", "lightning-8", "--fp8", "compute", "--compile",
                                                          "--cuda-graphs"],
    "qimg fp8 compute compiled cuda-graphs 50 steps cfg": ["--steps", "50", "--fp8", "compute", "--compile",
                                                           "--cuda-graphs"],
    "qimg fp8 compute traced lightning-8": ["--preset", "lightning-8", "--fp8", "compute", "--compile", TRACED],
    "qimg fp8 compute traced 50 steps cfg": ["--steps", "50", "--fp8", "compute", "--compile", TRACED],
    "qimg 8 steps": ["--steps", "8"],
    "qimg compiled 8 steps": ["--steps", "8", "--compile"],
    "qimg traced 8 steps": ["--steps", "8", "--compile", TRACED],
    "qimg bf16 compiled 50 steps cfg": ["--steps", "50", "--compile"],
    "diffusers bf16 2 steps": ["2"],
    "diffusers bf16 50 steps cfg": ["50"],
}
DIFFUSERS_SCRIPT = """
import sys, time
t0 = time.perf_counter()
import torch
from diffusers import QwenImagePipeline
t1 = time.perf_counter()
pipe = QwenImagePipeline.from_pretrained(sys.argv[1], torch_dtype=torch.bfloat16).to("cuda")
t2 = time.perf_counter()
image = pipe(prompt=sys.argv[3], negative_prompt=" ", true_cfg_scale=4.0, width=1024, height=1024,
             num_inference_steps=int(sys.argv[4]), generator=torch.Generator("cuda").manual_seed(1)).images[0]
t3 = time.perf_counter()
image.save(sys.argv[2])
print(f"time: import {t1 - t0:.2f} s, load {t2 - t1:.2f} s, pipeline {t3 - t2:.2f} s, "
      f"write {time.perf_counter() - t3:.2f} s", file=sys.stderr)
"""
_PART = re.compile(r"([a-z ]+?) (\d+(?:\.\d+)?) s")


def drop_caches() -> bool:
    """Empty the page cache so the next load reads from disk; False where the system does not allow it."""
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def parse_time_line(stderr: str) -> dict[str, float]:
    """The phases of a "time: load 3.10 s, text 0.52 s (...), ...; 12.3 s since the process started" line."""
    line = next((ln for ln in stderr.splitlines() if ln.startswith("time: ")), "")
    body, _, since = line[len("time: "):].partition(";")
    parts = {name.strip(): float(value) for name, value in _PART.findall(re.sub(r"\([^)]*\)", "", body))}
    if since.strip():
        parts["since_process_start"] = float(since.split()[0])
    return parts


def run_row(name: str, flags: list[str], model: Path, work: Path, cold: bool, home: Path,
            size: tuple[int, int] = (1024, 1024), extra: tuple[str, ...] = ()) -> dict:
    out = work / (re.sub(r"\W+", "_", name) + ".png")
    settings = dict(f.split("=", 1) for f in flags if "=" in f and not f.startswith("-"))
    flags = [f for f in flags if not ("=" in f and not f.startswith("-"))]
    if name.startswith("diffusers"):
        argv = [sys.executable, "-c", DIFFUSERS_SCRIPT, str(model), str(out), PROMPT, *flags]
    else:
        argv = [sys.executable, "-m", "qimg", "generate", PROMPT, "-o", str(out), "--model", str(model),
                "--seed", "1", "--width", str(size[0]), "--height", str(size[1]), "-v", "--overwrite", *flags,
                *extra]
    dropped = drop_caches() if cold else None
    env = dict(os.environ, QIMG_HOME=str(home), **settings)
    # pip compiles a package's bytecode when it installs it; a host that forbids writing bytecode (the GPU machine
    # here sets PYTHONDONTWRITEBYTECODE=1 over a torch without any) would time compiling torch's sources in every row
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    started = time.perf_counter()
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    phases = parse_time_line(proc.stderr)
    row = {"name": name, "rc": proc.returncode, "wall_s": round(wall, 2), "phases_s": phases,
           "page_cache": "dropped" if dropped else ("warm" if not cold else "could not drop (warm)"),
           "argv": " ".join(a if a != DIFFUSERS_SCRIPT else "<DIFFUSERS_SCRIPT>" for a in argv[1:]),
           "env": settings}
    if "since_process_start" in phases:
        inside = sum(v for k, v in phases.items() if k != "since_process_start")
        row["start_up_s"] = round(phases["since_process_start"] - inside, 2)  # interpreter, imports, parsing
        row["exit_s"] = round(wall - phases["since_process_start"], 2)
    if proc.returncode != 0:
        row["stderr_tail"] = proc.stderr[-1500:]
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rows", default="", help="comma-separated row names (default: all)")
    ap.add_argument("--cold", action="store_true", help="drop the page cache before each row")
    ap.add_argument("--home", type=Path, help="QIMG_HOME for every row (default: a new empty one)")
    ap.add_argument("--size", default="1024x1024", help="WIDTHxHEIGHT of every qimg row")
    ap.add_argument("--extra", default="", help="more qimg generate flags for every qimg row, comma-separated")
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                    help="set in every row's environment (PYTHONPATH=DIR: another copy of qimg, for an A/B)")
    args = ap.parse_args()
    names = [n.strip() for n in args.rows.split(",") if n.strip()] or list(ROWS)
    unknown = [n for n in names if n.removesuffix(" again") not in ROWS]
    if unknown:
        ap.error(f"unknown rows {unknown}; known: {list(ROWS)}")
    work = Path(tempfile.mkdtemp())
    home = args.home or work / "qimg_home"  # by default a compile cache that starts empty, as on a new machine
    import torch

    rows: list[dict] = []
    for n in names:  # the file is rewritten after each row: a run stopped at a time limit keeps what it measured
        width, height = (int(v) for v in args.size.split("x"))
        rows.append(run_row(n, ROWS[n.removesuffix(" again")] + args.env, args.model, work, args.cold, home,
                            (width, height), tuple(f for f in args.extra.split(",") if f)))
        report = {"bench": "first_image", "device": torch.cuda.get_device_name() if torch.cuda.is_available()
                  else f"cpu ({os.cpu_count()} cores)", "torch": torch.__version__,
                  "command": " ".join(["python", *sys.argv]),
                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "bytecode": "written and reused (PYTHONDONTWRITEBYTECODE removed from each row's environment)",
                  "rows": rows}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
