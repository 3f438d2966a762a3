"""qimg edit: change pictures as a prompt says, with Qwen-Image-Edit, -2509 or -2511."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

import qimg
from qimg.cli.commands.generate import for_this_rank, run_and_save
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
    preset_from,
    require_model,
    runtime_options,
)
from qimg.cli.output import Output

EXAMPLES = """\
Examples:

\b
  qimg edit "make the sky purple" -i street.png -o purple.png --model qwen-image-edit
  qimg edit "the cat from Picture 1 on the sofa of Picture 2" -i cat.png -i sofa.png -o out.png \\
      --model qwen-image-edit-2509 --seed 7
  qimg edit "remove the car" -i photo.jpg -o clean.png --keep-size
  qimg edit "make it snow" -i street.png -o snow.png --model qwen-image-edit-2509 --preset lightning-4 \\
      --lora Qwen-Image-Edit-2509-Lightning-4steps-V1.0-bf16.safetensors
"""


def edit(
    ctx: typer.Context,  # read by the error mapping in main.py (root --debug)
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the PNG (must end in .png).")],
    image: Annotated[
        list[Path],
        typer.Option("--image", "-i", help="Input picture; repeat for models that take several (2509, 2511)."),
    ],
    prompt: Annotated[
        str | None, typer.Argument(help="What to change (omit it with --prompt-embeds).", show_default=False)
    ] = None,
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", envvar=MODEL_ENV,
                     help="An edit model: a name (qwen-image-edit, -2509, -2511), a repo id, or a local folder."),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed; random when omitted (and then printed).")] = None,
    steps: Annotated[int | None, typer.Option(help="Denoising steps. Default: the preset's, else the model's (50).")
                     ] = None,
    cfg: Annotated[float | None, typer.Option(help="True-CFG scale; 1 or less turns CFG off. Default: the preset's, "
                                              "else 4.")] = None,
    preset: PresetOption = None,
    guidance: Guidance = None,
    negative: Annotated[str | None, typer.Option(help="Negative prompt. Default: the model's (Qwen: a single "
                                                   "space; FLUX.1-Kontext: none).")] = None,
    width: Annotated[
        int | None, typer.Option(help="Output width. Default: about 1 MP at the last image's aspect.")
    ] = None,
    height: Annotated[int | None, typer.Option(help="Output height (snapped down to a multiple of 16).")] = None,
    keep_size: Annotated[
        bool, typer.Option("--keep-size", help="Resample the result to the first input image's exact size.")
    ] = False,
    prompt_embeds: Annotated[
        Path | None,
        typer.Option("--prompt-embeds", help="Embeddings from `qimg encode-prompt -i ...` made with these images."),
    ] = None,
    device: Device = None,
    dtype: Annotated[DType | None, typer.Option(help="Default: bfloat16 on CUDA, float32 on CPU.")] = None,
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
    parallel: Parallel = None,
    verbose: Verbose = False,
    quiet: Quiet = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUTPUT if it exists.")] = False,
    debug: Debug = False,
) -> None:
    """Edit one or more pictures as the prompt says.

    The pictures go to the vision-language encoder with the prompt and, as reference latents, to the
    transformer. By default the output is about 1 MP at the aspect of the last picture (what diffusers
    gives); --keep-size returns exactly the first picture's size.
    """
    out = Output(quiet=quiet)
    model = require_model(model)
    runtime = runtime_options(device, dtype, tiled_vae, tile_size, tile_overlap, attention, compile, fp8, offload,
                              vram_budget, text_encoder_device, lora_mode, cuda_graphs=cuda_graphs)
    if parallel is not None:
        runtime = runtime.replace(parallel=parallel.value)
    out, runtime, write = for_this_rank(out, runtime, "start it with torchrun's --nproc-per-node and --parallel")
    ref = qimg.with_transformer(model, transformer) if transformer is not None else model
    path = qimg.check_output_path(output, overwrite=overwrite)
    options = dict(prompt_embeds=prompt_embeds, negative=negative, seed=seed, steps=steps, cfg=cfg,
                   guidance=guidance, width=width,
                   height=height, loras=loras_from(lora) or None, preset=preset_from(preset))
    job = qimg.prepare_edit(ref, prompt, image, keep_size=keep_size,
                            **{k: v for k, v in options.items() if v is not None})
    run_and_save(out, job, path, runtime=runtime, overwrite=overwrite, verbose=verbose, write=write)
    if runtime.parallel is not None:
        qimg.leave_world()  # the ranks part together, after an image that went well
