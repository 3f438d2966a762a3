"""qimg models: the model aliases, their repos, and which are downloaded (where, and their size on disk)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

import qimg
from qimg.cli.commands.download import format_size
from qimg.cli.options import Debug

EXAMPLES = """\
Examples:

\b
  qimg models
  qimg models --json | jq -r '.[] | select(.local[].complete) | .name'
  qimg download qwen-image-2512
  qimg generate "a red fox in snow" -o fox.png --model qwen-image-2512
"""

TASKS = {"t2i": "text-to-image", "edit": "edit"}


def models(
    ctx: typer.Context,  # read by the error mapping in main.py (root --debug)
    as_json: Annotated[
        bool, typer.Option("--json", help="Print a JSON list (one object per alias) instead of text.")
    ] = False,
    debug: Debug = False,
) -> None:
    """List the model names --model accepts, their repos, and which are downloaded.

    Looks in the Hugging Face cache (HF_HUB_CACHE, else HF_HOME/hub) and the ModelScope cache
    (MODELSCOPE_CACHE) without touching the network. Sizes are on disk, each blob counted once.
    """
    entries = [entry_dict(entry) for entry in qimg.list_models()]
    if as_json:
        typer.echo(json.dumps(entries, indent=2))
        return
    width = max(len(e["name"]) for e in entries)
    for e in entries:
        typer.echo(f"{e['name']:<{width}}  {TASKS.get(e['task'], e['task']):<13}  {repos_text(e['repos'])}")
        for copy in e["local"]:
            where = f"{copy['source']}: {copy['path']}  {format_size(copy['size_bytes'] or 0)}"
            typer.echo(f"    {where}" + ("" if copy["complete"] else f"  (incomplete: {len(copy['missing'])} "
                                                                       f"missing, e.g. {copy['missing'][0]})"))
        if not any(copy["complete"] for copy in e["local"]):
            typer.echo(f"    not downloaded: qimg download {e['name']}")


def entry_dict(entry: Any) -> dict[str, Any]:
    """One alias as plain data (the --json form)."""
    return {
        "name": entry.name,
        "family": entry.spec.family,
        "task": entry.spec.task,
        "pipeline_class": entry.spec.pipeline_class,
        "repos": dict(entry.spec.repos),
        "local": [
            {
                "source": copy.source,
                "repo_id": copy.repo_id,
                "path": str(copy.path),
                "complete": copy.complete,
                "missing": list(copy.missing),
                "size_bytes": copy.size_bytes,
            }
            for copy in entry.copies
        ],
    }


def repos_text(repos: dict[str, str]) -> str:
    """"Qwen/Qwen-Image (hf, modelscope)" when both hubs use one id, else each one."""
    if len(set(repos.values())) == 1:
        return f"{next(iter(repos.values()))} ({', '.join(repos)})"
    return ", ".join(f"{source}: {repo}" for source, repo in repos.items())
