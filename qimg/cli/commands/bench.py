"""qimg bench: time a model with the flags given, on this machine. Parse -> public API -> render."""

from __future__ import annotations

import json
from typing import Annotated

import typer

import qimg
from qimg.cli.options import (
    FP8,
    MODEL_ENV,
    Attention,
    AttentionKernel,
    Compile,
    CudaGraphs,
    Debug,
    Device,
    DType,
    LoRA,
    LoRAMode,
    LoRAModeOption,
    Offload,
    OffloadMode,
    PresetOption,
    Quiet,
    TextEncoderPlace,
    TiledVAE,
    TransformerOption,
    VramBudget,
    loras_from,
    preset_from,
    require_model,
    runtime_options,
)
from qimg.cli.output import Output

EXAMPLES = """\
Examples:

\b
  qimg bench --model qwen-image
  qimg bench --model qwen-image --compile --fp8 compute
  qimg bench --model flux-dev --vram-budget 8 --steps 8 --runs 2
  qimg bench --model qwen-image --preset lightning-8 --json > lightning.json
"""


def bench(
    ctx: typer.Context,  # read by the error mapping in main.py (root --debug)
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", envvar=MODEL_ENV,
                     help="A model name (see: qimg models), a repo id, or a local folder in the diffusers layout."),
    ] = None,
    steps: Annotated[int | None, typer.Option(help="Denoising steps. Default: the preset's, else the model's.")
                     ] = None,
    width: Annotated[int | None, typer.Option(help="Image width. Default: the model's.")] = None,
    height: Annotated[int | None, typer.Option(help="Image height. Default: the model's.")] = None,
    cfg: Annotated[float | None, typer.Option(help="True CFG scale (above 1 runs the negative prompt too).")
                   ] = None,
    runs: Annotated[int, typer.Option(min=1, max=100, help="Timed images after the first one.")] = 3,
    preset: PresetOption = None,
    dtype: Annotated[DType | None, typer.Option(help="Compute dtype. Default: bfloat16 on CUDA, float32 on CPU.")
                     ] = None,
    device: Device = None,
    tiled_vae: TiledVAE = False,
    attention: Attention = AttentionKernel.auto,
    compile: Compile = False,
    cuda_graphs: CudaGraphs = False,
    fp8: FP8 = None,
    offload: Offload = OffloadMode.auto,
    vram_budget: VramBudget = None,
    text_encoder_device: TextEncoderPlace = None,
    lora: LoRA = None,
    lora_mode: LoRAModeOption = LoRAMode.auto,
    transformer: TransformerOption = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as one JSON object on stdout.")] = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Time a model with the flags given: load, first image, then seconds per image and per step, and peak GPU
    memory.

    The first image pays for loading the text encoder, compiling (--compile) and the GPU's kernel plans, so it is
    reported apart; the timed images that follow keep the text encoder, as a batch does. Writes nothing.
    Compare flags (--fp8, --compile, --vram-budget, --preset, --offload) by running it once per setting.
    """
    out = Output(quiet=quiet)
    runtime = runtime_options(device, dtype, tiled_vae, None, None, attention, compile, fp8, offload, vram_budget,
                              text_encoder_device, lora_mode, cuda_graphs=cuda_graphs)
    ref = qimg.resolve_model(require_model(model))
    if transformer is not None:
        ref = qimg.with_transformer(ref, transformer)
    job = qimg.bench_job(ref, steps=steps, width=width, height=height, cfg=cfg, preset=preset_from(preset),
                         loras=qimg.check_loras(loras_from(lora)) or None)
    for note in job.notes:
        out.warn(note)
    with qimg.catch_signals(), out.status(f"benchmarking {job.ref.name}"):
        result = qimg.benchmark(job, runtime, runs=runs,
                                on_image=lambda label, seconds: out.info(f"{label}: {seconds:.2f} s"))
    if json_out:
        typer.echo(json.dumps(result.as_dict(), ensure_ascii=False))
        return
    request = result.request
    step = "" if result.s_per_step is None else f", {result.s_per_step:.3f} s/step"
    peak = "" if result.peak_gib is None else f", peak {result.peak_gib:.2f} GiB"
    typer.echo(f"{result.model} on {result.device} ({result.dtype}), {request['width']}x{request['height']}, "
               f"{request['steps']} steps{', CFG ' + str(request['cfg']) if job.request.cfg_enabled else ''}")
    flags = ", ".join(f"{k} {v}" for k, v in result.options.items() if k not in ("device", "dtype"))
    typer.echo(f"flags: {flags or 'none'}{'; memory plan: ' + result.plan if result.plan else ''}")
    typer.echo(f"load {result.load_s:.2f} s, first image {result.first_image_s:.2f} s; "
               f"{result.s_per_image:.3f} s/image{step}{peak} (median of {len(result.runs)})")
