"""A prompt-file batch with each PNG written while the next image generates (qimg.run_batch) against the same work
done one after the other in one thread (generate, write the PNG, append the manifest line: what run_batch did
before), with a stand-in pipeline: the generation is a sleep, as the main thread waits on a GPU without the GIL,
and each image is a 1024x1024 RGB gradient with noise, like a decoded sample.

    python bench/batch_write.py --out bench/results/batch_write_cpu.json [--images 8] [--generate 0.25,1.0]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import qimg  # noqa: E402
from qimg.batch import plan_batch, run_batch  # noqa: E402
from qimg.png import save_png  # noqa: E402
from qimg.prompt_files import parse_prompts  # noqa: E402
from qimg.safety import append_manifest  # noqa: E402
from qimg.specs import SPECS  # noqa: E402


def _pixels() -> np.ndarray:
    y, x = np.mgrid[0:1024, 0:1024]
    base = np.stack([x * 255 // 1023, y * 255 // 1023, (x + y) * 255 // 2046], -1)
    noise = np.random.default_rng(0).normal(0, 12, base.shape)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


class StandIn:
    def __init__(self, seconds: float, pixels: np.ndarray) -> None:
        self.seconds, self.pixels = seconds, pixels

    def generate(self, *, request: Any, progress: Any = None) -> list[Any]:
        time.sleep(self.seconds)
        image = Image.fromarray(self.pixels)
        image.info["qimg"] = {**request.as_dict(), "model": "stand-in", "qimg_version": qimg.__version__}
        return [image]


def _plan(folder: Path, images: int) -> Any:
    ref = SimpleNamespace(spec=SPECS["qwen-image"], name="stand-in")  # planning reads only these
    return plan_batch(ref, parse_prompts("".join(f"prompt {i}\n" for i in range(images)), "txt"), folder,
                      defaults={"steps": 2, "width": 1024, "height": 1024})


def one_thread(plan: Any, pipe: StandIn) -> None:
    for item in plan.todo:
        image = pipe.generate(request=item.request)[0]
        params = dict(image.info["qimg"])
        save_png(image, item.path, params)
        append_manifest(plan.manifest, {"path": item.name, **params})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--generate", default="0.25,1.0", help="seconds of stand-in generation per image")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    pixels = _pixels()
    work = Path(tempfile.mkdtemp())
    rows = []
    for seconds in (float(s) for s in args.generate.split(",")):
        pipe = StandIn(seconds, pixels)
        for name, run in (("one thread", one_thread), ("run_batch", run_batch)):
            walls = []
            for _ in range(args.repeats):
                folder = work / "out"
                shutil.rmtree(folder, ignore_errors=True)
                folder.mkdir()
                plan = _plan(folder, args.images)
                started = time.perf_counter()
                run(plan, pipe)
                walls.append(round(time.perf_counter() - started, 3))
            rows.append({"name": name, "generate_s": seconds, "images": args.images, "wall_s": walls})
            print(json.dumps(rows[-1]), flush=True)
    started = time.perf_counter()
    Image.fromarray(pixels).save(work / "one.png")
    report = {"bench": "batch_write", "device": f"cpu ({os.cpu_count()} cores, {platform.processor() or 'cpu'})",
              "command": " ".join(["python", *sys.argv]),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "png_save_s": round(time.perf_counter() - started, 3), "rows": rows}
    shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
