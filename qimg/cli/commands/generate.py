"""qimg generate: text to image. Parse -> request -> public API -> render; no model code here."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

import qimg
from qimg.cli.commands.batch import PromptsFormat, run_prompt_file
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
    Guidance,
    LoRA,
    LoRAMode,
    LoRAModeOption,
    Offload,
    OffloadMode,
    Parallel,
    PresetOption,
    Quiet,
    TextEncoderPlace,
    TiledVAE,
    TileOverlap,
    TileSize,
    TransformerOption,
    Verbose,
    VramBudget,
    loras_from,
    on_command_line,
    preset_from,
    require_model,
    runtime_options,
)
from qimg.cli.output import Output, params_token_warnings, process_seconds, show_loaded, timings_line

EXAMPLES = """\
Examples:

\b
  qimg generate "a lighthouse at dusk, oil painting" -o lighthouse.png --model qwen-image
  QIMG_MODEL=qwen-image qimg generate "a red fox in snow" -o fox.png --seed 7 --steps 30
  qimg generate "a poster that says hello" -o poster.png --width 1664 --height 928 --cfg 1
  qimg generate "a red fox" -o fox.png --preset lightning-8 --lora Qwen-Image-Lightning-8steps-V1.1.safetensors
  qimg generate "a cat" -o cat.png --device cuda:1 --dtype bfloat16 --quiet --overwrite
  qimg generate "the same street at night" -o night.png --init-image street.png --strength 0.7
  qimg generate "a red door" -o door.png --init-image house.png --mask door-mask.png
  qimg generate -o fox.png --prompt-embeds fox.safetensors
  qimg generate --from fox.png -o fox-50-steps.png --steps 50
  qimg generate --prompts prompts.txt -o out/ --steps 30
  qimg generate --prompts assets.jsonl -o assets/ --seed 100 --json > log.jsonl
  grep -v draft ideas.txt | qimg generate --prompts - -o out/ --name-template "{index:03d}-{seed}.png"
"""

def cfg_summary(request: qimg.GenerateRequest) -> str:
    """One line saying whether true CFG runs, because it doubles the cost of every step."""
    if request.cfg_enabled:
        return f"CFG on (scale {request.cfg}, negative {json.dumps(request.negative, ensure_ascii=False)})"
    if request.negative is None:
        return "CFG off (no negative prompt)"
    return f"CFG off (scale {request.cfg})"


def generate(
    ctx: typer.Context,  # main.py's error mapping reads the root --debug; --from asks where --model came from
    output: Annotated[
        Path,
        typer.Option(
            "--output", "-o",
            help="Where to write the PNG (must end in .png); with --prompts, the output folder (created if missing).",
        ),
    ],
    prompt: Annotated[
        str | None,
        typer.Argument(help="What to draw (omit it with --prompts, --prompt-embeds or --from).", show_default=False),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            envvar=MODEL_ENV,
            help="A model name (see: qimg models), a repo id, or a local folder in the diffusers layout.",
        ),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(help="Random seed; random when omitted (and then printed). With --prompts: a base, the "
                     "prompt at index i (from 0) gets SEED + i."),
    ] = None,
    steps: Annotated[int | None, typer.Option(help="Denoising steps. Default: the preset's, else the model's.")
                     ] = None,
    cfg: Annotated[
        float | None,
        typer.Option(help="True-CFG scale; 1 or less turns CFG off. Default: the preset's, else the model's."),
    ] = None,
    preset: PresetOption = None,
    guidance: Guidance = None,
    negative: Annotated[
        str | None,
        typer.Option(help="Negative prompt for CFG. Default: the model's (Qwen-Image: a single space; FLUX.1: "
                     "none)."),
    ] = None,
    width: Annotated[
        int | None, typer.Option(help="Image width in pixels, snapped down to a multiple of 16.")
    ] = None,
    height: Annotated[
        int | None, typer.Option(help="Image height in pixels, snapped down to a multiple of 16.")
    ] = None,
    max_sequence_length: Annotated[
        int | None, typer.Option(help="Keep at most this many prompt tokens (1-1024). Default: 512.")
    ] = None,
    device: Device = None,
    dtype: Annotated[
        DType | None,
        typer.Option(help="Compute dtype. Default: bfloat16 on CUDA, float32 on CPU."),
    ] = None,
    init_image: Annotated[
        Path | None,
        typer.Option("--init-image", help="Image to image: start from this picture instead of pure noise."),
    ] = None,
    strength: Annotated[
        float | None,
        typer.Option(help="With --init-image: how much to change it, 0 < S <= 1 (default 0.6; 1 redraws)."),
    ] = None,
    mask: Annotated[
        Path | None,
        typer.Option("--mask", help="With --init-image: repaint only the white part of this mask (inpainting)."),
    ] = None,
    prompt_embeds: Annotated[
        Path | None,
        typer.Option(
            "--prompt-embeds",
            help="Embeddings from `qimg encode-prompt` instead of PROMPT; the text encoder is never loaded.",
        ),
    ] = None,
    from_image: Annotated[
        Path | None,
        typer.Option(
            "--from", metavar="IMAGE",
            help="Replay the parameters stored in a qimg PNG (prompt, negative, seed, steps, cfg, size, init image, "
            "strength, mask, and the model unless --model is given); options given here win.",
        ),
    ] = None,
    prompts: Annotated[
        Path | None,
        typer.Option(
            "--prompts", metavar="FILE",
            help="One image per prompt of FILE (.txt, .jsonl, .csv; - reads stdin) into the folder -o.",
        ),
    ] = None,
    prompts_format: Annotated[
        PromptsFormat,
        typer.Option(
            "--prompts-format",
            help="How to read --prompts. auto: by extension; stdin and other extensions are JSON Lines when the "
            "first prompt line starts with {, else text (CSV is never guessed).",
        ),
    ] = PromptsFormat.auto,
    name_template: Annotated[
        str,
        typer.Option(
            "--name-template", metavar="TEMPLATE",
            help="With --prompts: file names, Python format fields {index} (from 0), {line}, {name}, {slug}, "
            "{seed}, {steps}, {cfg}, {width}, {height}. {name} is the line's name, else {index:04d}-{slug}.",
        ),
    ] = qimg.DEFAULT_NAME_TEMPLATE,
    fail_fast: Annotated[
        bool, typer.Option("--fail-fast", help="With --prompts: stop at the first image that fails.")
    ] = False,
    gpus: Annotated[
        str | None,
        typer.Option("--gpus", metavar="N|all",
                     help="Run on N GPUs of this machine (or all), one process each, started through torchrun: "
                     "with --prompts the lines are shared out (same files and manifest as one process); with "
                     "--parallel one image is."),
    ] = None,
    parallel: Parallel = None,
    json_out: Annotated[
        bool,
        typer.Option("--json", help="Print one JSON object per image (written, skipped or failed) on stdout."),
    ] = False,
    tiled_vae: TiledVAE = False,
    tile_size: TileSize = None,
    tile_overlap: TileOverlap = None,
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
    verbose: Verbose = False,
    quiet: Quiet = False,
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite", help="Replace OUTPUT if it exists; with --prompts, regenerate even unchanged "
                     "images."),
    ] = False,
    debug: Debug = False,
) -> None:
    """Generate an image from a text prompt, or one image per prompt of a file.

    Every PNG carries its parameters (prompt, seed, steps, cfg, size, model) in text chunks, readable with
    `qimg info`, replayable with --from, and shown by other tools through an A1111-style `parameters` chunk.

    With --prompts FILE, -o is a folder. FILE is .txt (a prompt a line; blank lines and # comments skipped),
    .jsonl (objects with "prompt" and optional "negative", "seed", "width", "height", "steps", "cfg", "name",
    "preset", "lora")
    or .csv (a header row naming those columns). A line's values win over the options. The whole file is
    checked before the model loads (a bad line: exit 2, nothing written). Seeds: the line's, else --seed + index,
    else derived from the prompt text, so reruns give the same images. An existing image whose stored prompt,
    negative, seed, steps, cfg, size and model match is skipped; one that differs is regenerated. Each image
    written adds a line to FOLDER/manifest.jsonl. Ctrl-C or SIGTERM stops without half-written files (exit
    130); the same command then finishes the rest. Exit 1 if any image failed.
    """
    out = Output(quiet=quiet)
    check_sources(prompt, prompts, prompt_embeds, from_image, init_image, strength, mask)
    if prompts is None:
        batch_only = [flag for flag, given in (("--prompts-format", prompts_format != PromptsFormat.auto),
                                               ("--name-template", name_template != qimg.DEFAULT_NAME_TEMPLATE),
                                               ("--fail-fast", fail_fast),
                                               ("--gpus", gpus is not None and parallel is None)) if given]
        if batch_only:
            raise qimg.UsageError(f"{batch_only[0]} needs --prompts", hint="it applies to prompt-file batches only")
    elif parallel is not None:
        raise qimg.UsageError("--parallel shares one image; a prompt file's lines are shared out by --gpus alone",
                              hint="leave --parallel out with --prompts")
    runtime = runtime_options(device, dtype, tiled_vae, tile_size, tile_overlap, attention, compile, fp8, offload,
                              vram_budget, text_encoder_device, lora_mode, cuda_graphs=cuda_graphs)
    if parallel is not None:
        runtime = runtime.replace(parallel=parallel.value)
    if gpus is not None:
        count = gpu_processes(gpus, runtime.device)
        if count > 1:  # else this process is the one
            raise typer.Exit(qimg.launch_ranks(count, qimg.without_option(sys.argv[1:], "--gpus")))
    if prompts is not None:
        run_prompt_file(
            out, prompts=prompts, prompts_format=prompts_format, folder=output, model=require_model(model),
            transformer=transformer,
            name_template=name_template, seed=seed,
            defaults={"negative": negative, "steps": steps, "cfg": cfg, "guidance": guidance, "width": width,
                      "height": height,
                      "max_sequence_length": max_sequence_length, "preset": preset_from(preset)},
            overwrite=overwrite, fail_fast=fail_fast, json_out=json_out, runtime=runtime, verbose=verbose,
            loras=qimg.check_loras(loras_from(lora)),
        )
        return
    args = dict(prompt=prompt, prompt_embeds=prompt_embeds, negative=negative, seed=seed, steps=steps, cfg=cfg,
                guidance=guidance, width=width, height=height, init_image=init_image, mask=mask, strength=strength,
                max_sequence_length=max_sequence_length, loras=loras_from(lora) or None, preset=preset_from(preset))
    if from_image is not None:
        given = model if on_command_line(ctx, "model") else None  # the stored model beats QIMG_MODEL
        args = qimg.replay(from_image, model=given, default_model=model, **args)
    else:
        args["model"] = require_model(model)
    if transformer is not None:
        args["model"] = qimg.with_transformer(args["model"], transformer)
    out, runtime, write = for_this_rank(out, runtime, "or give --prompts FILE to share a prompt file's lines")
    try:
        # Everything that can be wrong with the input fails here, before seconds-to-minutes of loading.
        path = qimg.check_output_path(output, overwrite=overwrite)
        job = qimg.prepare_generate(**{k: v for k, v in args.items() if v is not None})
        run_and_save(out, job, path, runtime=runtime, overwrite=overwrite, json_out=json_out, verbose=verbose,
                     write=write)
        if runtime.parallel is not None:
            qimg.leave_world()  # the ranks part together, after an image that went well
    except qimg.QimgError as e:
        if json_out:  # scripts reading stdout get the outcome of a single image too, as batches give it
            typer.echo(json.dumps({"event": "failed", "path": str(output), "error": e.message, "hint": e.hint},
                                  ensure_ascii=False))
        raise


def for_this_rank(out: Output, runtime: qimg.RuntimeOptions, hint: str) -> tuple[Output, qimg.RuntimeOptions, bool]:
    """One image under torchrun: shared by --parallel (each rank on its own GPU; rank 0 reports and writes), or
    refused, since N processes writing one file would race. Outside torchrun: unchanged, and this process writes."""
    world = qimg.world_from_env() if "WORLD_SIZE" in os.environ else None
    if world is None:
        return out, runtime, True
    if runtime.parallel is None:
        raise qimg.UsageError("under torchrun, one image needs --parallel cfg|seq|cfg+seq", hint=hint)
    runtime = runtime.replace(device=qimg.local_device(world, runtime.device))
    return (out if world.leader else Output(quiet=True)), runtime, world.leader


def gpu_processes(gpus: str, device: str | None) -> int:
    """--gpus N|all as a process count, checked against the GPUs present; refused under torchrun, which already
    started the processes, and beside a --device other than cuda (each process takes its own GPU)."""
    size = os.environ.get("WORLD_SIZE", "1").strip()
    if size.isdigit() and int(size) > 1:
        raise qimg.UsageError("--gpus starts torchrun itself; under torchrun leave it out",
                              hint="torchrun's --nproc-per-node sets the process count")
    if device not in (None, "cuda"):
        raise qimg.UsageError(f"--gpus gives each process its own GPU; --device {device} contradicts it",
                              hint="leave --device out (or pass --device cuda)")
    if gpus != "all" and not (gpus.isdigit() and int(gpus) > 0):
        raise qimg.UsageError(f"--gpus takes a positive number or all, not {gpus!r}", hint="e.g. --gpus 2")
    present = qimg.gpu_count()
    if present == 0:
        raise qimg.UsageError("--gpus needs CUDA GPUs and this machine shows none",
                              hint="leave --gpus out to run on one device")
    count = present if gpus == "all" else int(gpus)
    if count > present:
        raise qimg.UsageError(f"--gpus {count}: this machine has {present} GPU{'s' if present != 1 else ''}",
                              hint=f"use --gpus {present} or --gpus all")
    return count


def check_sources(
    prompt: str | None,
    prompts: Path | None,
    prompt_embeds: Path | None,
    from_image: Path | None,
    init_image: Path | None,
    strength: float | None,
    mask: Path | None,
) -> None:
    """PROMPT, --prompts and --prompt-embeds exclude each other; --from fills in what is missing (the rest is
    checked by qimg.prepare_generate)."""
    if prompt is None and prompts is None and prompt_embeds is None and from_image is None:
        raise qimg.UsageError("give PROMPT, --prompts FILE, --prompt-embeds FILE or --from IMAGE",
                              hint='e.g. qimg generate "a red fox" -o fox.png')
    if prompts is not None:
        others = [name for name, value in (("PROMPT", prompt), ("--prompt-embeds", prompt_embeds),
                                           ("--from", from_image), ("--init-image", init_image),
                                           ("--strength", strength), ("--mask", mask)) if value is not None]
        if others:
            raise qimg.UsageError(f"--prompts cannot be combined with {others[0]}",
                                  hint="per-line values go into the prompt file (negative, seed, steps, cfg, size)")


def run_and_save(
    out: Output,
    job: qimg.Job,
    path: Path,
    *,
    runtime: qimg.RuntimeOptions,
    overwrite: bool,
    json_out: bool = False,
    verbose: bool = False,
    write: bool = True,
) -> None:
    """The part every image command shares: say what will run, load, denoise with a bar, write the PNG.
    write False: a rank of a --parallel run other than the first, which computes the image with it but leaves
    the file (and the report) to it."""
    for note in job.notes:
        out.warn(note)
    out.info(f"seed: {job.request.seed}")  # always: a random seed is otherwise lost with the terminal
    out.info(cfg_summary(job.request))
    if verbose and job.request.preset is not None:
        out.info(qimg.PRESETS[job.request.preset].describe())
    started = time.perf_counter()
    # SIGTERM as Ctrl-C: save_png's cleanup then runs, so a killed run leaves no temporary file.
    with qimg.catch_signals():
        with out.status(f"loading {job.ref.name}"):
            pipe = qimg.load(job.ref, runtime, shape=job.shape, loras=job.loras or ())
        loaded = time.perf_counter() - started
        out.info(f"loaded {job.ref.name} on {pipe.device} ({pipe.dtype}) in {loaded:.1f} s")
        show_loaded(out, pipe, verbose)
        with out.steps("denoising") as progress:
            images = pipe.run(job, progress, on_stage=progress.stage)
        params = images[0].info.get("qimg", {})
        writing = time.perf_counter()
        if not write:
            return
        qimg.save_png(images[0], path, overwrite=overwrite)
    out.info(f"wrote {path} (seed {job.request.seed}, {time.perf_counter() - started:.1f} s)")
    if verbose:
        out.info(timings_line(params, loaded, time.perf_counter() - writing, process_seconds()))
    for warning in params_token_warnings(params):
        out.warn(warning)
    if json_out:
        typer.echo(json.dumps({"event": "written", "path": str(path), **params}, ensure_ascii=False))
