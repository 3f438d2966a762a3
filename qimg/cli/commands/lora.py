"""qimg lora ...: LoRA files on their own. `inspect`: what qimg reads in a file, before any model loads."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

import qimg
from qimg.cli.options import Debug

HELP = "Work with LoRA files: see what qimg reads in one before you generate with it."

INSPECT_EXAMPLES = """\
Examples:

\b
  qimg lora inspect watercolor.safetensors
  qimg lora inspect lightning-8steps.safetensors --model qwen-image-edit-2511
  qimg lora inspect style.safetensors --json | jq .ranks
"""


def inspect(
    ctx: typer.Context,  # read by the error mapping in main.py (root --debug)
    path: Annotated[Path, typer.Argument(help="A LoRA file (.safetensors).", show_default=False)],
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help="Match against this model's transformer config (nothing loads). "
                     "Default: the released Qwen-Image architecture."),
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
    debug: Debug = False,
) -> None:
    """Show a LoRA file's dialect, family, modules, ranks, alphas, targets, size and metadata.

    The file is read exactly as --lora reads it, so a file that would fail there fails here with the same line,
    and keys that would be ignored are listed.
    """
    info = qimg.inspect_lora(path, model).describe()
    if json_out:
        typer.echo(json.dumps(info, ensure_ascii=False))
        return
    for line in describe_lines(info):
        typer.echo(line)


def describe_lines(info: dict[str, Any]) -> list[str]:
    """The inspection for people, a fact a line."""
    targets = ", ".join(f"{kind} x{n}" for kind, n in info["targets"].items())
    kinds = "".join(f"{n} {kind}, " for kind, n in info.get("kinds", {}).items())
    lines = [
        f"file: {info['path']} ({info['size_bytes'] / 2**20:.1f} MiB)",
        f"dialect: {info['dialect']}, for {info['family']}",
        f"modules: {info['modules']} ({kinds}{info['parameters']:,} parameters)",
        f"rank: {'/'.join(str(r) for r in info['ranks']) or 'full'}; "
        f"alpha: {'/'.join(f'{a:g}' for a in info['alphas']) or '-'}",
        f"targets: {targets}",
    ]
    if info["unmatched"]:
        lines.append(f"unmatched: {len(info['unmatched'])} key(s), ignored when applied "
                     f"({', '.join(info['unmatched'][:3])}{', ...' if len(info['unmatched']) > 3 else ''})")
    for key, value in sorted(info["metadata"].items()):
        text = value if len(value) <= 100 else value[:97] + "..."
        lines.append(f"metadata {key}: {text}")
    return lines


def build_app(guarded: Callable[[Callable[..., Any]], Callable[..., Any]]) -> typer.Typer:
    """The `qimg lora` sub-app; `guarded` maps errors in main.py's one place."""
    app = typer.Typer(name="lora", help=HELP, no_args_is_help=True, rich_markup_mode=None,
                      pretty_exceptions_enable=False)
    app.command("inspect", epilog=INSPECT_EXAMPLES, no_args_is_help=True)(guarded(inspect))
    return app

