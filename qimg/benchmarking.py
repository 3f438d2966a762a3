"""`qimg bench`: seconds per step and per image and peak GPU memory for one model and the runtime flags given, on
the user's own machine, so flags can be chosen from numbers.

One load (timed), one first image (it pays for the text encoder's load, compilation and kernel plans: reported
apart), then `runs` timed images of the same request with the text encoder kept, as a batch keeps it. On a GPU
each step is stamped after the queued work finishes, so seconds per step are the device's, not the launch
queue's. Nothing is written to disk.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qimg.jobs import Job, prepare_edit, prepare_generate
from qimg.loading.hub import ModelRef, resolve_model
from qimg.runtime.options import RuntimeOptions

BENCH_PROMPT = "a lighthouse on a cliff at dusk, warm light in the windows, waves below, detailed photograph"


@dataclass
class BenchRun:
    """One timed image: wall seconds, the median seconds per denoising step, the pipeline's phases."""

    seconds: float
    s_per_step: float | None
    timings: dict[str, float]


@dataclass
class BenchResult:
    """What `qimg bench` measured (asdict gives its JSON)."""

    model: str
    device: str
    dtype: str
    options: dict[str, Any]
    request: dict[str, Any]
    load_s: float
    first_image_s: float
    runs: list[BenchRun] = field(default_factory=list)
    peak_gib: float | None = None  # peak GPU memory reserved over the timed runs (None on the CPU)
    plan: str = ""

    @property
    def s_per_image(self) -> float:
        return statistics.median(r.seconds for r in self.runs)

    @property
    def s_per_step(self) -> float | None:
        steps = [r.s_per_step for r in self.runs if r.s_per_step is not None]
        return statistics.median(steps) if steps else None

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "s_per_image": round(self.s_per_image, 4),
                "s_per_step": None if self.s_per_step is None else round(self.s_per_step, 4)}


def bench_job(model: str | Path | ModelRef, *, steps: int | None = None, width: int | None = None,
              height: int | None = None, **request: Any) -> Job:
    """The job a benchmark runs: a fixed prompt and seed; an edit model gets a generated input picture of the
    output size (or 1024x1024), so no file is needed."""
    ref = model if isinstance(model, ModelRef) else resolve_model(model)
    options = dict(seed=0, steps=steps, width=width, height=height, **request)
    options = {k: v for k, v in options.items() if v is not None}
    if ref.spec.task != "edit":
        return prepare_generate(ref, BENCH_PROMPT, **options)
    return prepare_edit(ref, "make it night", [_picture(width or 1024, height or 1024)], **options)


def benchmark(job: Job, options: RuntimeOptions, *, runs: int = 3,
              on_image: Callable[[str, float], None] | None = None) -> BenchResult:
    """Load job.ref as `options` say and time images of `job`; on_image(label, seconds) after each image."""
    import torch

    import qimg.families as families

    started = time.perf_counter()
    pipe = families.load(job.ref, options, job.shape, job.loras or ())
    load_s = time.perf_counter() - started
    cuda = pipe.torch_device.type == "cuda"

    def image(stamps: list[float]) -> tuple[float, dict[str, float]]:
        def on_step(i: int, n: int) -> None:
            if cuda:
                torch.cuda.synchronize(pipe.torch_device)
            stamps.append(time.perf_counter())

        stamps.append(time.perf_counter())
        images = pipe.run(job, on_step, keep_text_encoder=True)
        return time.perf_counter() - stamps[0], dict(images[0].info.get("qimg", {}).get("timings") or {})

    first, _ = image([])
    if on_image is not None:
        on_image("first image", first)
    if cuda:
        torch.cuda.reset_peak_memory_stats(pipe.torch_device)
    result = BenchResult(model=job.ref.name, device=pipe.device, dtype=pipe.dtype,
                         options={k: v for k, v in asdict(options).items() if v not in (None, False, "auto")},
                         request={k: getattr(job.request, k) for k in ("width", "height", "steps", "cfg")},
                         load_s=round(load_s, 3), first_image_s=round(first, 3), plan=_plan_line(pipe))
    for k in range(runs):
        stamps: list[float] = []
        seconds, timings = image(stamps)
        # stamps: the image's start, then one after each step (the first step's also holds the text phase), so
        # the gaps after the first step are the steps alone
        gaps = [b - a for a, b in zip(stamps[1:], stamps[2:], strict=False)]
        result.runs.append(BenchRun(round(seconds, 4), round(statistics.median(gaps), 4) if gaps else None, timings))
        if on_image is not None:
            on_image(f"image {k + 1}", seconds)
    if cuda:
        result.peak_gib = round(torch.cuda.max_memory_reserved(pipe.torch_device) / 2**30, 2)
    return result


def _plan_line(pipe: Any) -> str:
    plan = getattr(pipe, "plan", None)
    if plan is None:
        return ""
    streamed = {k: len(v) for k, v in (plan.streamed or {}).items() if v}
    return f"offload {plan.mode}" + "".join(f", {n} {k} blocks streamed" for k, n in streamed.items())


def _picture(width: int, height: int) -> Any:
    import numpy as np
    from PIL import Image

    yy, xx = np.mgrid[0:height, 0:width]
    rgb = np.stack([xx / max(width - 1, 1), yy / max(height - 1, 1), 0.5 + 0.5 * np.sin(xx / 31 + yy / 17)], -1)
    return Image.fromarray((rgb * 255).astype(np.uint8))


__all__: Sequence[str] = ["BENCH_PROMPT", "BenchResult", "BenchRun", "bench_job", "benchmark"]
