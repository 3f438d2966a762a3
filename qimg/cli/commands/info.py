"""qimg info: show the parameters a qimg PNG carries (what `qimg generate --from` replays)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

import qimg
from qimg.cli.options import Debug

EXAMPLES = """\
Examples:

\b
  qimg info fox.png
  qimg info fox.png --json | jq .seed
  qimg generate --from fox.png -o fox-again.png
"""

# The order people read them in; any other key follows, sorted.
_FIRST = ("prompt", "negative", "seed", "steps", "cfg", "cfg_enabled", "width", "height", "strength", "init_image",
          "mask", "images", "prompt_embeds", "model", "model_family", "dtype", "max_sequence_length", "qimg_version",
          "seconds")


def info(
    ctx: typer.Context,  # read by the error mapping in main.py (root --debug)
    image: Annotated[Path, typer.Argument(help="A PNG written by qimg.", show_default=False)],
    json_out: Annotated[bool, typer.Option("--json", help="Print the parameters as one JSON object.")] = False,
    debug: Debug = False,
) -> None:
    """Show the parameters stored in a PNG that qimg wrote.

    Prints one "key: value" line per parameter on stdout (strings quoted as JSON, so a prompt with line
    breaks stays on one line), or with --json the object itself. Exit 1 for a file without qimg parameters.
    """
    params = qimg.read_params(image)
    if not params:
        raise qimg.QimgError(f"{image} carries no qimg parameters", hint="only PNGs written by qimg have them")
    if json_out:
        typer.echo(json.dumps(params, ensure_ascii=False, sort_keys=True))
        return
    for key in [k for k in _FIRST if k in params] + sorted(set(params) - set(_FIRST)):
        if params[key] is not None:  # e.g. strength of a text-to-image run: noise to a reader (--json keeps it)
            typer.echo(f"{key}: {_show(params[key])}")


def _show(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return json.dumps(value, ensure_ascii=False)  # strings quoted, None as null, lists as JSON
