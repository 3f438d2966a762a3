"""On a GPU: offloaded and streamed runs give the same image as resident runs (the CPU tests cannot run CUDA
streams, pinned memory or the caching allocator under a budget).

    python bench/offload_parity.py --tokenizer DIR --out bench/results/offload_parity_h100.json

A tiny random Qwen-Image in the official layout (tests/fixtures.py), bf16 on CUDA. For each FP8 setting (off,
weights, compute) and with --compile: resident (--offload none) against model offload, and against layer
streaming of every transformer block and every text-encoder layer (the streaming set forced through
Offloaded.stream, since the tiny model fits any budget). Records the largest pixel difference (0 = identical)
and the CLI's --verbose plan for a real budget.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import qimg  # noqa: E402
from tests.fixtures import write_tiny_qwen_image  # noqa: E402

PROMPT = "a red fox in snow"
OPTIONS = dict(steps=4, seed=7, width=256, height=256, negative="blurry", cfg=4.0)


def run(model: Path, *, stream_all: bool, **load: object) -> np.ndarray:
    pipe = qimg.load(model, device="cuda", **load)
    if stream_all:
        pipe.transformer_offload.stream(range(len(pipe.transformer.transformer_blocks)))
        pipe.prompts.model  # load the text encoder now, then stream all its layers too  # noqa: B018
        te = pipe.residency.components["text_encoder"]
        te.stream(range(len(te.blocks)))
    image = pipe.generate(PROMPT, **OPTIONS)[0]
    # Twice: the second run starts from the wrapped-around prefetch of the first.
    again = pipe.generate(PROMPT, **OPTIONS)[0]
    a, b = np.asarray(image, dtype=np.int16), np.asarray(again, dtype=np.int16)
    assert (a == b).all(), "a second run on the same pipeline differs"
    return a


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp())
    model = work / "tiny"
    write_tiny_qwen_image(model, args.tokenizer)
    rows = []
    for fp8 in (None, "weights", "compute"):
        for compile in (False, True):
            base = run(model, stream_all=False, offload="none", fp8=fp8, compile=compile)
            for name, kw in (("model", dict(offload="model")), ("layer-all-streamed", dict(offload="layer"))):
                got = run(model, stream_all=name != "model", fp8=fp8, compile=compile, **kw)
                row = {"fp8": fp8, "compile": compile, "mode": name,
                       "max_pixel_diff_vs_resident": int(np.abs(got - base).max())}
                rows.append(row)
                print(json.dumps(row), flush=True)
    cmd = [sys.executable, "-m", "qimg", "generate", PROMPT, "-o", str(work / "cli.png"), "--model", str(model),
           "--steps", "2", "--width", "256", "--height", "256", "--offload", "layer", "--vram-budget", "4",
           "--fp8", "weights", "--verbose"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    report = {
        "bench": "offload_parity",
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "command": "python bench/offload_parity.py --tokenizer .bench_assets/tokenizer --out $OUT/offload_parity.json",
        "date": datetime.date.today().isoformat(),
        "rows": rows,
        "cli_verbose": {"rc": proc.returncode, "stderr": proc.stderr.strip().splitlines()[-16:]},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report["cli_verbose"], indent=1))


if __name__ == "__main__":
    main()
