"""qimg vae ...: the VAE on its own. `roundtrip`: image -> latents -> image, with PSNR, SSIM and timings.

Parse -> checks -> public API -> render, like generate. main.py mounts the sub-app built by build_app, passing
its `guarded` so that errors are mapped in the one place.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

import qimg
from qimg.cli.options import (
    MODEL_ENV,
    Device,
    DType,
    Quiet,
    TiledVAE,
    TileOverlap,
    TileSize,
    require_model,
    tiling_from,
)
from qimg.cli.output import Output

HELP = "Work with the VAE alone: round-trip an image through it to see what it keeps."

# "\b" keeps the help formatter from re-wrapping the example lines into one paragraph.
ROUNDTRIP_EXAMPLES = """\
Examples:

\b
  qimg vae roundtrip photo.jpg -o photo-vae.png --model qwen-image
  QIMG_MODEL=qwen-image qimg vae roundtrip photo.jpg -o rt.png --latents photo.safetensors
  qimg vae roundtrip big-scan.png -o rt.png --tiled-vae --tile-size 512 --tile-overlap 64
  qimg vae roundtrip photo.jpg -o rt.png --device cpu --dtype float32 --quiet --overwrite
"""


def roundtrip(
    ctx: typer.Context,  # unused here; the error mapping in main.py reads the root --debug from it
    image: Annotated[Path, typer.Argument(help="The image to encode and decode (PNG, JPEG, WebP, ...).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the decoded PNG (*.png).")],
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", envvar=MODEL_ENV,
                     help="A model name (see: qimg models), a repo id, or a local folder; only its vae/ is loaded."),
    ] = None,
    device: Device = None,
    dtype: Annotated[
        DType | None, typer.Option(help="Compute dtype. Default: bfloat16 on CUDA, float32 on CPU.")
    ] = None,
    tiled_vae: TiledVAE = False,
    tile_size: TileSize = None,
    tile_overlap: TileOverlap = None,
    latents: Annotated[
        Path | None,
        typer.Option("--latents", metavar="FILE.safetensors",
                     help="Also save the latents: the raw posterior mean, not normalised (see the file's metadata)."),
    ] = None,
    quiet: Quiet = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUTPUT and --latents if they exist.")] = False,
    # Read by the error mapping in main.py (guarded), not here.
    debug: Annotated[
        bool, typer.Option("--debug", envvar="QIMG_DEBUG", help="Print the full traceback when something fails.")
    ] = False,
) -> None:
    """Encode an image with the model's VAE and decode it again.

    The image is center-cropped by the few pixels over a multiple of 8 if needed (nothing is resampled).
    Prints PSNR and SSIM of the result against the (cropped) input and the encode and decode times; writes
    the decoded PNG with those figures in its metadata.
    """
    out = Output(quiet=quiet)
    model = require_model(model)
    # Everything that can be wrong with the input fails here, before the VAE is loaded, and nothing is written.
    path = qimg.check_output_path(output, overwrite=overwrite)
    latents_path = qimg.check_latents_path(latents, overwrite=overwrite) if latents is not None else None
    tiling = tiling_from(tiled_vae, tile_size, tile_overlap)
    picture = qimg.open_image(image)
    ref = qimg.resolve_model(model)

    started = time.perf_counter()
    with out.status(f"loading the VAE of {ref.name}"):
        vae = qimg.load_vae(ref, device=device, dtype=dtype.value if dtype else None)
    out.info(f"loaded the VAE of {ref.name} in {time.perf_counter() - started:.1f} s")
    with out.status("encoding and decoding"):
        result = qimg.vae_roundtrip(vae, picture, tiling=tiling, model=ref.name, source=str(image))
    for note in result.notes:
        out.note(note)
    p = result.params
    how = f"tiles of {tiling.tile} px, overlap {tiling.overlap} px" if tiling else "untiled"
    out.info(f"{p['width']}x{p['height']} on {p['device']} ({p['dtype']}, {how})")
    out.info(f"PSNR {result.psnr:.2f} dB, SSIM {result.ssim:.4f}")
    out.info(f"encode {result.encode_seconds:.3f} s, decode {result.decode_seconds:.3f} s")
    if latents_path is not None:
        qimg.save_latents(result, latents_path, overwrite=overwrite)
    qimg.save_png(result.image, path, overwrite=overwrite)
    written = f"{path} and {latents_path}" if latents_path is not None else f"{path}"
    out.info(f"wrote {written} ({time.perf_counter() - started:.1f} s)")


def build_app(guard: Callable[[Any], Any] = lambda command: command) -> typer.Typer:
    """The `vae` sub-app; main.py passes its `guarded` so that exceptions are mapped in one place."""
    app = typer.Typer(name="vae", help=HELP, no_args_is_help=True, rich_markup_mode=None,
                      pretty_exceptions_enable=False)
    app.command("roundtrip", epilog=ROUNDTRIP_EXAMPLES, no_args_is_help=True)(guard(roundtrip))
    return app
