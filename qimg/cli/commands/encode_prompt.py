"""qimg encode-prompt: run only the text encoder and save the embeddings for later `--prompt-embeds` runs."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

import qimg
from qimg.cli.options import MODEL_ENV, Debug, Device, DType, Quiet, require_model
from qimg.cli.output import Output, dropped_token_warnings

EXAMPLES = """\
Examples:

\b
  qimg encode-prompt "a red fox in fresh snow" -o fox.safetensors --model qwen-image
  qimg encode-prompt "a red fox" -o fox.safetensors --negative "blurry, low quality"
  qimg generate -o fox.png --prompt-embeds fox.safetensors --seed 7
  qimg encode-prompt "make it snow" -i street.png -o snow.safetensors --model qwen-image-edit
  qimg edit -i street.png -o snow.png --prompt-embeds snow.safetensors
"""


def encode_prompt(
    ctx: typer.Context,  # read by the error mapping in main.py (root --debug)
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Where to write the embeddings (must end in .safetensors).")
    ],
    prompt: Annotated[str, typer.Argument(help="The prompt to encode.")],
    image: Annotated[
        list[Path] | None,
        typer.Option("--image", "-i", help="Input picture(s) of an edit model, as you will pass them to qimg edit."),
    ] = None,
    negative: Annotated[
        str | None,
        typer.Option(help="Negative prompt, encoded too. Default: the model's (a single space), so CFG can run."),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", envvar=MODEL_ENV,
                     help="A model name (see: qimg models), a repo id, or a local folder in the diffusers layout."),
    ] = None,
    max_sequence_length: Annotated[
        int | None, typer.Option(help="Keep at most this many prompt tokens (1-1024). Default: 512.")
    ] = None,
    device: Device = None,
    dtype: Annotated[DType | None, typer.Option(help="Default: bfloat16 on CUDA, float32 on CPU.")] = None,
    quiet: Quiet = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUTPUT if it exists.")] = False,
    debug: Debug = False,
) -> None:
    """Encode a prompt with the model's text encoder and save it.

    The file holds the prompt and negative-prompt embeddings and masks, with the model family, prompt
    template and text-encoder identity. `qimg generate --prompt-embeds FILE` then runs without loading the
    text encoder and gives the same image as generating from the prompt.
    """
    out = Output(quiet=quiet)
    model = require_model(model)
    path = qimg.check_output_path(output, overwrite=overwrite, suffix=".safetensors")
    ref = qimg.check_prompt_inputs(model, len(image or []))
    pictures = []
    for picture in image or []:
        loaded, notes = qimg.read_image(picture, "input image")  # as qimg edit reads it: upright, RGB
        pictures.append(loaded)
        for note in notes:
            out.warn(note)
    started = time.perf_counter()
    with out.status(f"encoding with {ref.name}'s text encoder"):
        data = qimg.encode_prompt(
            ref, prompt, negative=negative, images=pictures, max_sequence_length=max_sequence_length, device=device,
            dtype=dtype.value if dtype else None,
        )
    qimg.save_embeddings(path, data, overwrite=overwrite)
    tokens = data.cond.embeds.shape[1]
    neg = f", negative {data.uncond.embeds.shape[1]} tokens" if data.uncond is not None else ""
    out.info(f"wrote {output} ({tokens} prompt tokens{neg}, {time.perf_counter() - started:.1f} s)")
    dropped = data.meta.get("dropped_tokens") or {}
    msl = data.meta.get("max_sequence_length") or 512
    for warning in dropped_token_warnings(dropped, msl, data.meta.get("family")):
        out.warn(warning)
