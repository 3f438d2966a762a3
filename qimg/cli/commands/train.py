"""qimg train-lora: LoRA training on a folder of captioned images. Parse -> config -> public API -> progress."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

import qimg
from qimg.cli.options import (
    FP8,
    MODEL_ENV,
    Compile,
    Debug,
    Device,
    DType,
    FP8Mode,
    Quiet,
    Verbose,
    VramBudget,
    on_command_line,
    require_model,
)
from qimg.cli.output import Output

EXAMPLES = """\
Examples:

\b
  qimg train-lora --model qwen-image --data photos/ -o runs/fox --steps 1000
  qimg train-lora --model qwen-image --data photos/metadata.jsonl -o runs/fox --rank 32 --alpha 32 --lr 5e-5
  qimg train-lora --model qwen-image --data photos/ -o runs/fox --resume --steps 2000
  qimg train-lora --config fox.toml --steps 500 --fp8 weights
  qimg train-lora --model qwen-image --data photos/ -o runs/fox --vram-budget 24 --compile -v
  qimg train-lora --model qwen-image-edit-2511 --data pairs/ -o runs/relight   # pairs/control/NAME.png
  qimg train-lora --model flux-dev --data photos/ -o runs/fox-flux --format comfy
  torchrun --nproc-per-node 4 -m qimg train-lora --model qwen-image --data photos/ -o runs/fox --grad-accum 4
  torchrun --nproc-per-node 2 -m qimg train-lora --config fox.toml --shard-base   # 1/2 of the model per GPU
  qimg generate "a photo of sks fox" -o fox.png --model qwen-image --lora runs/fox/lora.safetensors
"""


def train_lora(
    ctx: typer.Context,  # read by the error mapping in main.py (root --debug)
    data: Annotated[
        Path | None,
        typer.Option("--data", help="A folder of images with same-name .txt captions, or a metadata.jsonl / "
                     ".csv (image, prompt) file or the folder holding one."),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", metavar="RUN_DIR",
                     help="The run's folder: lora.safetensors, lora-stepN.safetensors, log.csv, cache/, state/."),
    ] = None,
    config_file: Annotated[
        Path | None,
        typer.Option("--config", metavar="FILE.toml", help="Settings in a TOML file, keyed as the options are "
                     "(batch_size or batch-size; data, output, model too); options given here win."),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", envvar=MODEL_ENV, help="The model to train on (a name, repo id or folder): "
                     "text-to-image, or an edit model (then each image needs its control images)."),
    ] = None,
    steps: Annotated[int, typer.Option(help="Optimizer steps in all (a resumed run may raise it).")] = 2000,
    rank: Annotated[int, typer.Option(help="LoRA rank.")] = 16,
    alpha: Annotated[float, typer.Option(help="LoRA alpha (stored in the file; scale = alpha / rank).")] = 16.0,
    lr: Annotated[float, typer.Option("--lr", help="AdamW learning rate, constant after a 10-step warmup.")] = 1e-4,
    seed: Annotated[int, typer.Option(help="Seeds the adapter's start, the noise, the timesteps and the data "
                                      "order.")] = 0,
    resolution: Annotated[int, typer.Option(help="Images train at their own aspect in buckets of at most "
                                            "RESOLUTION^2 pixels (never upscaled).")] = 1024,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per step (from one bucket).")] = 1,
    grad_accum: Annotated[int, typer.Option("--grad-accum", help="Batches whose gradients add up per step.")] = 1,
    targets: Annotated[str, typer.Option(help="Which linears of each block train: attn, attn-mlp (the "
                                         "attention and MLP linears: 12 per Qwen-Image or FLUX double block, 5 per "
                                         "FLUX single block) or all (adds modulation).")] = "attn-mlp",
    save_every: Annotated[int, typer.Option("--save-every", help="Save the LoRA and the resumable state every N "
                                            "steps.")] = 250,
    keep: Annotated[int, typer.Option(help="Keep the last N lora-stepN.safetensors files.")] = 4,
    fmt: Annotated[str, typer.Option("--format", help="The LoRA file's keys: diffusers (header alpha; diffusers, "
                                     "ComfyUI and qimg load it), comfy or kohya (.alpha tensors; for FLUX, BFL's "
                                     "fused names).")] = "diffusers",
    sample_every: Annotated[int, typer.Option("--sample-every", help="Every N steps, one image per line of "
                                              "--sample-prompts into RUN_DIR/samples/ (0: never).")] = 0,
    sample_prompts: Annotated[Path | None, typer.Option("--sample-prompts", metavar="FILE", help="Prompts to sample "
                              "(.txt, .jsonl, .csv as generate --prompts reads them; a line's seed, else --seed + "
                              "its index).")] = None,
    checkpointing: Annotated[bool | None, typer.Option("--checkpointing/--no-checkpointing", help="Recompute "
                                                       "every block's activations in backward (much less memory "
                                                       "for about one more forward per step), or none. Default: "
                                                       "as few blocks as the memory plan needs.")] = None,
    shard_base: Annotated[bool | None, typer.Option("--shard-base/--no-shard-base", help="Under torchrun: shard "
                                                    "the frozen model over the processes with FSDP2 (each GPU holds "
                                                    "1/N of it; --grad-accum a multiple of N), or keep a copy on "
                                                    "each. Default: shard when the model fits a GPU only by "
                                                    "streaming blocks.")] = None,
    fp8: FP8 = None,
    vram_budget: VramBudget = None,
    compile_: Compile = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run saved in RUN_DIR exactly where it "
                                         "stopped.")] = False,
    device: Device = None,
    dtype: Annotated[DType | None, typer.Option(help="Compute dtype of the frozen model. Default: bfloat16 on "
                                                "CUDA, float32 on CPU.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object per event (step, saved) on "
                                           "stdout.")] = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
    debug: Debug = False,
) -> None:
    """Train a LoRA for a Qwen-Image model on your images (edit models: on control -> target pairs).

    The data is checked whole before the model loads (a missing caption or control, an unreadable or too small
    image: one line, exit 1). Latents and prompt embeddings are computed once into RUN_DIR/cache (a changed image
    or caption recomputes only that one), then the text encoder is freed. The memory plan (-v prints it) keeps
    the model on the GPU when it fits, else checkpoints blocks, then streams blocks from host memory, within
    --vram-budget. Every --save-every steps and at the end, the LoRA is written (checked to load back with every
    key matched) with the state to resume from; Ctrl-C or SIGTERM saves too and exits 130, and --resume then
    continues exactly as an uninterrupted run would.
    """
    # Under torchrun (data-parallel training) rank 0 reports for the job; the others print only errors.
    process = os.environ.get("RANK", "0") if "WORLD_SIZE" in os.environ else "0"  # `rank` is the LoRA's
    out = Output(quiet=quiet or (process.isdigit() and int(process) > 0))
    given = dict(model=model, data=data, output=output, steps=steps, rank=rank, alpha=alpha, lr=lr, seed=seed,
                 resolution=resolution, batch_size=batch_size, grad_accum=grad_accum, targets=targets,
                 save_every=save_every, keep=keep, format=fmt, checkpointing=checkpointing, sample_every=sample_every,
                 shard_base=shard_base,
                 sample_prompts=None if sample_prompts is None else str(sample_prompts.expanduser().resolve()),
                 device=device, dtype=dtype.value if dtype else None, fp8=fp8.value if fp8 else None,
                 vram_budget=vram_budget, compile=compile_)
    file_keys: set[str] = set()
    if config_file is not None:  # the file's values, except where an option was typed
        for key, value in qimg.read_config_file(config_file).items():
            if not on_command_line(ctx, {"format": "fmt"}.get(key, key)):
                if key in ("data", "output", "sample_prompts") and isinstance(value, str):
                    # Relative to the file, so that a cron job finds them from any working folder.
                    value = str((config_file.expanduser().parent / Path(value).expanduser()).resolve())
                given[key] = value
                file_keys.add(key)
    if given["output"] is None or (given["data"] is None and not resume):
        raise qimg.UsageError("give --data and -o RUN_DIR (or data and output in --config)",
                              hint="e.g. qimg train-lora --model qwen-image --data photos/ -o runs/fox")
    # What the user chose (typed or in --config): on --resume the rest of the fixed settings come from the run.
    typed = [name for name in given if on_command_line(ctx, {"format": "fmt"}.get(name, name))
             or name in file_keys]
    if given["fp8"] == FP8Mode.compute.value:
        raise qimg.UsageError("--fp8 compute cannot train: its FP8 matmuls carry no gradient",
                              hint="use --fp8 weights (FP8 storage, bf16 compute with gradients)")
    names = ("steps", "rank", "alpha", "lr", "seed", "resolution", "batch_size", "grad_accum", "targets",
             "save_every", "keep", "format", "checkpointing", "sample_every", "sample_prompts", "shard_base")
    model_name = given["model"] if resume and given["model"] is None else require_model(given["model"])
    config = qimg.TrainConfig(model=model_name or "", data="" if given["data"] is None else
                              str(Path(given["data"]).expanduser().resolve()), **{name: given[name] for name in names})
    runtime = qimg.RuntimeOptions(device=given["device"], dtype=given["dtype"], fp8=given["fp8"],
                                  vram_budget=given["vram_budget"], compile=bool(given["compile"]))
    output = Path(given["output"])
    if config.format == "diffusers" and config.alpha != config.rank:
        # ComfyUI reads alpha from `.alpha` tensors only, never from the diffusers header: it would apply the file
        # at scale 1 instead of alpha / rank.
        out.note(f"ComfyUI applies a diffusers-format LoRA at alpha = rank, not alpha {config.alpha:g}; "
                 "use --format comfy for ComfyUI")
    with qimg.catch_signals(), out.steps("training", eta=True) as progress:

        def on_event(event: dict[str, Any]) -> None:
            if event["event"] == "plan":
                if verbose:
                    for line in event["lines"]:
                        out.info(line)
                return
            if event["event"] == "step":
                progress(event["step"], event["steps"])
                memory = f", GPU {event['gpu_gib']:.1f} GiB" if "gpu_gib" in event else ""
                progress.info(f"loss {event['loss']:.4f}{memory}")
            elif event["event"] in ("saved", "sample"):
                done = "saved" if event["event"] == "saved" else "sampled"
                out.info(f"{done} {event['path']} (step {event['step']})")
            elif event["event"] == "cached" and event["done"] == event["total"]:
                out.info(f"cached latents and prompt embeddings of {event['total']} image(s)")
            if json_out and event["event"] != "cached":
                typer.echo(json.dumps(event, ensure_ascii=False))

        path = qimg.train_lora(config, output, runtime, resume=resume, typed=typed, on_event=on_event)
    out.info(f"wrote {path}")
