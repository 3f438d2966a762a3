"""qimg download: fetch a model's files, or a LoRA file of a repo, into the standard cache. Parse -> plan ->
public API -> render."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

import qimg
from qimg.cli.options import Debug
from qimg.cli.output import Output

EXAMPLES = """\
Examples:

\b
  qimg download qwen-image
  qimg download qwen-image-edit-2511 --dry-run
  qimg download qwen-image --source modelscope
  qimg download Qwen/Qwen-Image-2512 --revision main --local-dir /data/models/Qwen-Image-2512
  HF_ENDPOINT=https://hf-mirror.com qimg download qwen-image --quiet
  qimg generate "a red fox in snow" -o fox.png --model qwen-image
  qimg download lightx2v/Qwen-Image-Lightning --file '*8steps*' --dry-run
  qimg download lightx2v/Qwen-Image-Lightning --file Qwen-Image-Lightning-8steps-V1.0.safetensors
  qimg generate "a red fox" -o fox.png --model qwen-image --preset lightning-8 \\
      --lora lightx2v/Qwen-Image-Lightning/Qwen-Image-Lightning-8steps-V1.0.safetensors
"""

# Loggers of the hub libraries: their warnings (e.g. a retried connection) are progress talk, not errors.
HUB_LOGGERS = ("huggingface_hub", "modelscope", "modelscope_hub")


def complete_alias(incomplete: str) -> list[str]:
    """Shell completion of MODEL: the aliases qimg knows."""
    return [entry.name for entry in qimg.list_models() if entry.name.startswith(incomplete)]


class Source(str, Enum):
    """Where to download from."""

    hf = "hf"
    modelscope = "modelscope"


def download(
    ctx: typer.Context,  # read by the error mapping in main.py (root --debug)
    model: Annotated[
        str,
        typer.Argument(help="A model alias (see: qimg models), a repo id such as Qwen/Qwen-Image, or a LoRA repo "
                       "such as lightx2v/Qwen-Image-Lightning.", show_default=False, autocompletion=complete_alias),
    ],
    file: Annotated[
        list[str] | None,
        typer.Option("--file", metavar="NAME", show_default=False,
                     help="Fetch only this .safetensors file of the repo (a LoRA): its name in the repo, or a glob "
                     "such as '*8steps*'. Repeatable."),
    ] = None,
    source: Annotated[
        Source, typer.Option("--source", help="The hub: hf (Hugging Face, honours HF_ENDPOINT) or modelscope.")
    ] = Source.hf,
    revision: Annotated[
        str | None, typer.Option("--revision", help="Branch, tag or commit. Default: the repo's main branch.")
    ] = None,
    local_dir: Annotated[
        Path | None,
        typer.Option("--local-dir", help="Put the files in this folder (then pass it to --model, or a file in it "
                     "to --lora) instead of the hub's cache."),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List the files that would be fetched, with sizes; fetch nothing.")
    ] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Print nothing but errors (and the folder, or the --lora names).")
    ] = False,
    debug: Debug = False,
) -> None:
    """Download the files a model needs, and only those (safetensors weights, configs, tokenizer); or LoRA files.

    They go to the standard cache of the hub, where `--model NAME` finds them: the Hugging Face cache
    (HF_HUB_CACHE, else HF_HOME/hub) or the ModelScope cache (MODELSCOPE_CACHE); files another tool downloaded
    there are reused. A rerun resumes where an interrupted download stopped. Each file is checked against the
    sizes and hashes the hub lists. HF_TOKEN is sent for private or gated repos; HF_HUB_OFFLINE=1 refuses to
    download. When the hub cannot be reached, a complete copy already on disk counts as downloaded (with a note).
    On success the model folder is printed on stdout.

    LoRAs: --file fetches the .safetensors files it names from any repo. A repo that is not a model needs no
    --file when it holds a single .safetensors file; with several, qimg lists them and asks which. On success
    the name to pass to --lora (OWNER/REPO/FILE, found in the cache without the network) is printed on stdout,
    one line per file.
    """
    out = Output(quiet=quiet)
    with quiet_hub_loggers(quiet), out.status(f"listing {model} on {source.value}"):
        plan = qimg.plan_download(model, source=source.value, revision=revision, local_dir=local_dir,
                                  files=tuple(file or ()))
    if dry_run:
        print_plan(plan)
        return
    if plan.offline:
        out.note("HF_HUB_OFFLINE is set: the copy on disk is used as it is, without asking the hub for updates")
    elif plan.unreachable is not None:
        out.note(f"{plan.unreachable}: the complete copy on disk is used as it is, without checking for updates")
    present = sum(f.present for f in plan.files)
    out.info(f"{describe(plan)}: {count(plan.files)}, {format_size(plan.total_size)}"
             + (f" ({present} already here, {format_size(plan.fetch_size)} to fetch)" if present else ""))
    with quiet_hub_loggers(quiet), progress_for(out, plan) as progress:
        path = qimg.download(plan, progress=progress)
    if plan.kind == "files":
        print_loras(out, plan, path)
        return
    use = str(path) if plan.local_dir else plan.name
    out.info(f"ready: {path}")
    out.info(f"use it with: qimg generate PROMPT -o OUT.png --model {use}")
    typer.echo(str(path))


def print_loras(out: Output, plan: Any, folder: Path) -> None:
    """Where each file is (stderr) and the --lora name for it (stdout, one a line: LORA=$(qimg download ... -q))."""
    for f, name in zip(plan.files, plan.lora_names, strict=True):
        where = folder / f.path
        out.info(f"ready: {name}" + (f" ({where})" if str(where) != name else ""))
    out.info(f"use it with: qimg generate PROMPT -o OUT.png --model MODEL --lora {plan.lora_names[0]}")
    for name in plan.lora_names:
        typer.echo(name)


def count(files: Any) -> str:
    return "1 file" if len(files) == 1 else f"{len(files)} files"


def describe(plan: Any) -> str:
    """"Qwen/Qwen-Image on hf (main, commit 1a2b3c4d5e6f)"."""
    rev = plan.revision or ("main" if plan.source == "hf" else "master")
    commit = f", commit {plan.commit[:12]}" if plan.commit and plan.commit != plan.revision else ""
    return f"{plan.repo_id} on {plan.source} ({rev}{commit})"


def print_plan(plan: Any) -> None:
    """The dry run, on stdout: one line per file (size, path, whether it is already here), then the total."""
    typer.echo(f"{describe(plan)} -> {plan.destination}")
    for f in plan.files:
        size = format_size(f.size) if f.size is not None else "?"
        typer.echo(f"  {size:>10}  {f.path}" + ("  (already here)" if f.present else ""))
    to_fetch = [f for f in plan.files if not f.present]
    typer.echo(f"total: {count(plan.files)}, {format_size(plan.total_size)}; "
               f"to fetch: {count(to_fetch)}, {format_size(plan.fetch_size)}")


def format_size(n: int) -> str:
    """Decimal units, as both hubs show sizes."""
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000:
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


class BarProgress:
    """Rich bars for a download: the whole plan, and one bar per file being fetched (from the library's events)."""

    def __init__(self, progress: Progress, total: int) -> None:
        self.progress = progress
        self.overall = progress.add_task("total", total=total or None)
        self.tasks: dict[str, Any] = {}

    def start(self, path: str, size: int | None) -> None:
        self.tasks[path] = self.progress.add_task(path, total=size)

    def advance(self, path: str, nbytes: int) -> None:
        if path in self.tasks:
            self.progress.update(self.tasks[path], advance=nbytes)
        self.progress.update(self.overall, advance=nbytes)

    def done(self, path: str) -> None:
        if path in self.tasks:
            self.progress.remove_task(self.tasks.pop(path))


class LineProgress:
    """Off a terminal (cron logs, pipes): one line per fetched file instead of redrawn bars."""

    def __init__(self, out: Output, sizes: dict[str, int | None]) -> None:
        self.out = out
        self.sizes = sizes

    def start(self, path: str, size: int | None) -> None:
        self.sizes.setdefault(path, size)

    def advance(self, path: str, nbytes: int) -> None:
        return None

    def done(self, path: str) -> None:
        size = self.sizes.get(path)
        self.out.info(f"fetched {path}" + (f" ({format_size(size)})" if size is not None else ""))


def quiet_hub_loggers(quiet: bool) -> Any:
    """With --quiet, the hub libraries' warnings are held back (qimg.quiet_loggers)."""
    return qimg.quiet_loggers(HUB_LOGGERS if quiet else ())


@contextmanager
def progress_for(out: Output, plan: Any) -> Iterator[Any]:
    """The progress the library reports to: bars on a terminal, lines elsewhere, nothing with --quiet."""
    if out.quiet:
        yield None
        return
    if not out.live:
        yield LineProgress(out, {f.path: f.size for f in plan.files})
        return
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=out.console,
        transient=False,
    )
    with progress:
        yield BarProgress(progress, plan.fetch_size)
