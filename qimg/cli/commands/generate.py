"""qimg generate: text to image. Parse -> request -> public API -> render; no model code here."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

import qimg
from qimg.cli.options import MODEL_ENV, DType, TiledVAE, TileOverlap, TileSize, require_model, tiling_from
from qimg.cli.options import check_device as _check_device
from qimg.cli.output import Output

EXAMPLES = """\
Examples:

\b
  qimg generate "a lighthouse at dusk, oil painting" -o lighthouse.png --model ~/models/Qwen-Image
  QIMG_MODEL=~/models/Qwen-Image qimg generate "a red fox in snow" -o fox.png --seed 7 --steps 30
  qimg generate "a poster that says hello" -o poster.png --width 1664 --height 928 --cfg 1
  qimg generate "a cat" -o cat.png --device cuda:1 --dtype bfloat16 --quiet --overwrite
  qimg generate "the same street at night" -o night.png --init-image street.png --strength 0.7
  qimg generate "a red door" -o door.png --init-image house.png --mask door-mask.png
  qimg generate -o fox.png --prompt-embeds fox.safetensors
"""

def cfg_summary(request: qimg.GenerateRequest) -> str:
    """One line saying whether true CFG runs, because it doubles the cost of every step."""
    if request.cfg_enabled:
        return f"CFG on (scale {request.cfg}, negative {json.dumps(request.negative, ensure_ascii=False)})"
    if request.negative is None:
        return "CFG off (no negative prompt)"
    return f"CFG off (scale {request.cfg})"


def generate(
    ctx: typer.Context,  # unused here; the error mapping in main.py reads the root --debug from it
    output: Annotated[
        Path,
        typer.Option("--output", "-o", help="Where to write the PNG (must end in .png)."),
    ],
    prompt: Annotated[
        str | None, typer.Argument(help="What to draw (omit it with --prompt-embeds).", show_default=False)
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            envvar=MODEL_ENV,
            help="Local model folder in the diffusers layout (with model_index.json).",
        ),
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Random seed; random when omitted (and then printed).")
    ] = None,
    steps: Annotated[int | None, typer.Option(help="Denoising steps. Default: the model's.")] = None,
    cfg: Annotated[
        float | None,
        typer.Option(help="True-CFG scale; 1 or less turns CFG off. Default: the model's."),
    ] = None,
    negative: Annotated[
        str | None,
        typer.Option(help="Negative prompt for CFG. Default: the model's (a single space)."),
    ] = None,
    width: Annotated[
        int | None, typer.Option(help="Image width in pixels, snapped down to a multiple of 16.")
    ] = None,
    height: Annotated[
        int | None, typer.Option(help="Image height in pixels, snapped down to a multiple of 16.")
    ] = None,
    device: Annotated[
        str | None,
        typer.Option(callback=_check_device, help="cpu, cuda or cuda:N. Default: cuda if present, else cpu."),
    ] = None,
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
    tiled_vae: TiledVAE = False,
    tile_size: TileSize = None,
    tile_overlap: TileOverlap = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUTPUT if it exists.")] = False,
    # Read by the error mapping in main.py (guarded), not here.
    debug: Annotated[
        bool,
        typer.Option("--debug", envvar="QIMG_DEBUG", help="Print the full traceback when something fails."),
    ] = False,
) -> None:
    """Generate an image from a text prompt.

    Writes one PNG with every parameter (prompt, seed, steps, cfg, size, model) in its text chunks,
    so that `qimg` or any PNG reader can tell how it was made.
    """
    out = Output(quiet=quiet)
    model = require_model(model)
    check_prompt_source(prompt, prompt_embeds, negative)
    if init_image is None and (strength is not None or mask is not None):
        raise qimg.UsageError("--strength and --mask need --init-image", hint="add --init-image PICTURE")
    # Everything that can be wrong with the input fails here, before seconds-to-minutes of loading.
    path = qimg.check_output_path(output, overwrite=overwrite)
    tiling = tiling_from(tiled_vae, tile_size, tile_overlap)
    ref = qimg.resolve_model(model)
    if ref.spec.task != "t2i":
        raise qimg.UsageError(f"{model} is an edit model", hint="use: qimg edit PROMPT -i IMAGE -o OUT.png")
    inputs: dict = {}
    extra: dict = {}
    if prompt_embeds is not None:
        prompt, negative = read_prompt_embeds(prompt_embeds, inputs, extra)
    if init_image is not None:
        inputs["init_image"] = qimg.open_image(init_image, "init image")
        extra.update(init_image=str(init_image))
        strength = 0.6 if strength is None else strength
    if mask is not None:
        inputs["mask"] = qimg.open_image(mask, "mask")
        extra["mask"] = str(mask)
    request, notes = qimg.make_request(
        ref.spec, prompt or "", negative=negative, seed=seed, steps=steps, cfg=cfg, width=width, height=height,
        strength=strength, init_size=inputs["init_image"].size if init_image is not None else None,
    )
    if prompt_embeds is not None and inputs["embeddings"].uncond is None:
        request = dataclasses.replace(request, negative=None)  # saved without a negative: CFG cannot run
    if init_image is not None and (request.width, request.height) != inputs["init_image"].size:
        w, h = inputs["init_image"].size
        notes.append(f"init image is {w}x{h}; generating {request.width}x{request.height}")
    run_and_save(out, ref, request, notes, "generate", inputs, extra, path, device=device, dtype=dtype,
                 tiling=tiling, overwrite=overwrite)


def check_prompt_source(prompt: str | None, prompt_embeds: Path | None, negative: str | None) -> None:
    """Exactly one of PROMPT and --prompt-embeds; saved embeddings already hold their negative prompt."""
    if (prompt is None) == (prompt_embeds is None):
        raise qimg.UsageError("give either PROMPT or --prompt-embeds", hint="qimg encode-prompt makes the file")
    if prompt_embeds is not None and negative is not None:
        raise qimg.UsageError(
            "--negative cannot change saved embeddings", hint="pass it to qimg encode-prompt instead"
        )


def read_prompt_embeds(path: Path, inputs: dict, extra: dict) -> tuple[str, str | None]:
    """Load --prompt-embeds into the call's inputs; returns the prompt and negative it was made from."""
    inputs["embeddings"] = qimg.load_embeddings(path)
    extra["prompt_embeds"] = str(path)
    meta = inputs["embeddings"].meta
    return str(meta.get("prompt", "")), meta.get("negative")


def run_and_save(
    out: Output,
    ref: qimg.ModelRef,
    request: qimg.GenerateRequest,
    notes: list[str],
    method: str,
    inputs: dict,
    extra: dict,
    path: Path,
    *,
    device: str | None,
    dtype: DType | None,
    tiling: Any,
    overwrite: bool,
) -> None:
    """The part every image command shares: say what will run, load, denoise with a bar, write the PNG."""
    for note in notes:
        out.warn(note)
    out.info(f"seed: {request.seed}")  # always: a random seed is otherwise lost with the terminal
    out.info(cfg_summary(request))
    started = time.perf_counter()
    with out.status(f"loading {ref.name}"):
        pipe = qimg.load(ref, device=device, dtype=dtype.value if dtype else None, vae_tiling=tiling)
    out.info(f"loaded {ref.name} on {pipe.device} ({pipe.dtype}) in {time.perf_counter() - started:.1f} s")
    with out.steps("denoising") as progress:
        images = getattr(pipe, method)(request=request, progress=progress, **inputs)
    images[0].info.setdefault("qimg", {}).update(extra)
    qimg.save_png(images[0], path, overwrite=overwrite)
    out.info(f"wrote {path} (seed {request.seed}, {time.perf_counter() - started:.1f} s)")
