"""The CLI end to end on a GPU machine's own stack, on a tiny random model written in the official layout.

    python bench/cli_smoke.py --tokenizer DIR --out bench/results/cli_smoke_h100.json

Runs `python -m qimg` as a user would (generate plain, --compile, --fp8 compute, --attention, --tiled-vae, img2img,
a two-line batch, info) and records each command's exit code, wall time and whether images that should agree do.
Needs diffusers only to write the tiny model (tests/fixtures.py); qimg itself never imports it.
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

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.fixtures import write_tiny_qwen_image  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp())
    model = work / "tiny"
    write_tiny_qwen_image(model, args.tokenizer)
    rows = []

    def qimg(*argv: str) -> dict:
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "qimg", *argv], cwd=ROOT, capture_output=True, text=True)
        row = {"argv": " ".join(argv).replace(str(work), "$W"), "rc": proc.returncode,
               "seconds": round(time.perf_counter() - started, 2), "stderr_tail": proc.stderr.strip()[-300:]}
        rows.append(row)
        print(json.dumps(row), flush=True)
        return row

    def pixels(name: str) -> np.ndarray:
        with Image.open(work / name) as im:
            return np.asarray(im.convert("RGB"), dtype=np.int16)

    common = ["--model", str(model), "--steps", "4", "--seed", "7", "--width", "256", "--height", "256"]
    qimg("generate", "a red fox in snow", "-o", str(work / "plain.png"), *common)
    qimg("generate", "a red fox in snow", "-o", str(work / "again.png"), *common)
    qimg("generate", "a red fox in snow", "-o", str(work / "sdpa.png"), "--attention", "sdpa", *common)
    qimg("generate", "a red fox in snow", "-o", str(work / "compiled.png"), "--compile", *common)
    qimg("generate", "a red fox in snow", "-o", str(work / "fp8.png"), "--fp8", "compute", *common)
    qimg("generate", "a red fox in snow", "-o", str(work / "tiled.png"), "--tiled-vae", "--tile-size", "128", *common)
    qimg("generate", "a red fox at night", "-o", str(work / "i2i.png"), "--init-image", str(work / "plain.png"),
         *common)
    (work / "prompts.txt").write_text("a red fox\n# skipped\na blue bird\n")
    qimg("generate", "--prompts", str(work / "prompts.txt"), "-o", str(work / "batch"), *common)
    qimg("generate", "--prompts", str(work / "prompts.txt"), "-o", str(work / "batch"), *common)  # all skipped
    qimg("info", str(work / "plain.png"), "--json")

    checks = {}
    if all(r["rc"] == 0 for r in rows):
        base = pixels("plain.png")
        checks = {
            "same_seed_same_image": bool((pixels("again.png") == base).all()),
            **{f"max_abs_diff_{name}": int(np.abs(pixels(f"{name}.png") - base).max())
               for name in ("sdpa", "compiled", "fp8", "tiled")},
        }
    report = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__, "command": " ".join(["python", *sys.argv]),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "runs": rows, "checks": checks}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(checks, indent=1))


if __name__ == "__main__":
    main()
