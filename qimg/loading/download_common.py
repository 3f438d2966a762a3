"""What both hubs' downloads share: the plan and its files, the errors, the progress protocol, and the copies
already on disk that stand in for a download the hub cannot serve (offline, or out of reach)."""

from __future__ import annotations

import fnmatch
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from qimg.errors import ConfigError, QimgError
from qimg.loading.hub import download_command, find_local_copies, missing_files, repo_folders
from qimg.specs import MODEL_INDEX_FILE

LORA_SUFFIX = ".safetensors"  # the only files --file fetches: qimg reads LoRAs as safetensors, never pickles


class DownloadError(QimgError):
    """A download could not be done or produced a file that fails its check (exit 1)."""


class HubUnreachableError(DownloadError):
    """The hub could not be reached at all: no network, a DNS failure, a refused or timed-out connection."""


class DownloadProgress(Protocol):
    """What download() reports while it fetches; calls may come from worker threads."""

    def start(self, path: str, size: int | None) -> None: ...
    def advance(self, path: str, nbytes: int) -> None: ...  # negative when a transfer restarts from zero
    def done(self, path: str) -> None: ...


@dataclass(frozen=True)
class RemoteFile:
    """One file of a repo as the hub lists it."""

    path: str
    size: int | None
    sha256: str | None = None  # of the content: LFS files on the HF hub, every file on ModelScope (when listed)
    git_sha1: str | None = None  # git blob id of a small (non-LFS) file on the HF hub
    present: bool = False  # already where download() would put it, with the right size


@dataclass(frozen=True)
class DownloadPlan:
    """What `download` would fetch: the repo, the revision, the files, and where they go."""

    name: str  # as the user typed it
    source: str  # "hf" or "modelscope"
    repo_id: str
    revision: str | None  # as asked; None: the hub's default branch
    commit: str | None  # the commit that revision resolved to (HF only)
    patterns: tuple[str, ...]  # a model: the components' patterns; files: the --file names or patterns as given
    files: tuple[RemoteFile, ...]
    local_dir: Path | None  # None: the hub's standard cache
    destination: Path  # the model folder the files go to (ModelScope's cache: its root; modelscope picks the layout)
    offline: bool = False  # HF_HUB_OFFLINE: listed from a complete local copy, the hub not asked
    unreachable: str | None = None  # why the hub could not be reached; then listed from a complete local copy
    kind: str = "model"  # "model": a whole model for --model; "files": single .safetensors files (LoRAs) for --lora

    @property
    def total_size(self) -> int:
        return sum(f.size or 0 for f in self.files)

    @property
    def fetch_size(self) -> int:
        return sum(f.size or 0 for f in self.files if not f.present)

    @property
    def lora_names(self) -> tuple[str, ...]:
        """What to pass to --lora for each file: OWNER/REPO/FILE in the cache (qimg.resolve_lora finds it there),
        the file's own path under --local-dir."""
        if self.kind != "files":
            return ()
        if self.local_dir is not None:
            return tuple(str(self.local_dir / f.path) for f in self.files)
        return tuple(f"{self.repo_id}/{f.path}" for f in self.files)


def matches(path: str, pattern: str) -> bool:
    """--file's rule: the exact name, or a glob ('*' crosses folders: '*8steps*' finds sub/x-8steps.safetensors)."""
    return path == pattern or fnmatch.fnmatchcase(path, pattern)


def has_file(folder: Path, f: RemoteFile) -> bool:
    path = folder / f.path
    try:
        return path.is_file() and (f.size is None or path.stat().st_size == f.size)
    except OSError:
        return False


def local_copy(source: str, repo_id: str, revision: str | None, local_dir: Path | None) -> Path | None:
    """The complete model on disk that stands in for a download the hub cannot serve: local_dir when it holds one,
    else the first complete copy in the source's cache. Not for a --revision: a branch or tag cannot be resolved
    offline with certainty (a commit could, but is rare enough)."""
    if local_dir is not None:
        return local_dir if local_dir.is_dir() and not _missing(local_dir) else None
    if revision is not None:
        return None
    folders = [c.path for c in find_local_copies({source: repo_id}) if c.complete]
    return folders[0] if folders else None


def local_file_copy(
    source: str, repo_id: str, revision: str | None, local_dir: Path | None, patterns: tuple[str, ...],
    skip_models: bool = False,
) -> Path | None:
    """As local_copy, for single files: the first folder (in resolve_lora's order) where every pattern names at
    least one .safetensors file. skip_models: not a folder holding (part of) a model, whose weights would match."""
    if local_dir is None and revision is not None:
        return None
    folders = [local_dir] if local_dir is not None else repo_folders(source, repo_id)
    for folder in folders:
        if not folder.is_dir() or (skip_models and (folder / MODEL_INDEX_FILE).exists()):
            continue
        names = [f.path for f in local_files(folder) if f.path.lower().endswith(LORA_SUFFIX)]
        if all(any(matches(n, p) for n in names) for p in patterns):
            return folder
    return None


def local_files(folder: Path) -> list[RemoteFile]:
    """The files of a copy on disk, as a listing with sizes (the cache's own bookkeeping left out)."""
    return [RemoteFile(p.relative_to(folder).as_posix(), p.stat().st_size) for p in folder.rglob("*")
            if p.is_file() and ".cache" not in p.relative_to(folder).parts]


def _missing(folder: Path) -> tuple[str, ...]:
    try:
        return missing_files(folder)
    except ConfigError:
        return (MODEL_INDEX_FILE,)


def discard(path: Path) -> None:
    """Remove a bad file; in the HF cache also the blob its snapshot link points to, which is what is bad."""
    if path.is_symlink():
        blob = path.resolve()
        path.unlink()
        blob.unlink(missing_ok=True)
    elif path.is_file():
        path.unlink()


def network_errors() -> tuple[type[BaseException], ...]:
    """The transport errors of whichever HTTP client the hub libraries use (httpx2, httpx, requests)."""
    found: list[type[BaseException]] = []
    for module, names in (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)),
                          ("requests", ("ConnectionError", "Timeout"))):
        mod = sys.modules.get(module)  # only clients already imported can have raised
        found += [getattr(mod, n) for n in names if mod is not None and hasattr(mod, n)]
    return tuple(found)


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def brief(e: BaseException, limit: int = 120) -> str:
    """A short reason: an OS error's text ("Connection refused"), else the first line, cut to `limit` characters."""
    text = getattr(e, "strerror", None) or first_line(e)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextmanager
def quiet_loggers(names: tuple[str, ...]) -> Iterator[None]:
    """Hold back libraries' warnings (retries, "Trying to resume download...") for the duration; their errors still
    arrive as exceptions. The levels are restored afterwards: qimg may run inside a host program."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def plan_command(plan: DownloadPlan) -> str:
    """The command that fetches exactly this plan again (a rerun resumes), for error hints."""
    files = tuple(f.path for f in plan.files) if plan.kind == "files" else ()
    return download_command(plan.name, plan.source, files)
