"""Fetch a model's files, or single .safetensors files of a repo (LoRAs), from the Hugging Face Hub or ModelScope,
into their standard caches or a folder.

A model: only the files the engine reads (DOWNLOAD_PATTERNS in qimg/specs.py, per component of the model's task).
Single files: the repo's .safetensors files that `files` names (exact names or globs); without `files`, a repo that
is not a model gives its one .safetensors file, and one with several is refused with their names (a LoRA repo
often holds a dozen variants of a gigabyte each: fetching all of them unasked would be a surprise). They land in the
same caches, where resolve_lora finds them as OWNER/REPO/FILE.

The hubs' halves are qimg/loading/download_hf.py and download_modelscope.py; the shared types are in
download_common.py and re-exported here, where the rest of qimg imports them from.
"""

from __future__ import annotations

import fnmatch
import shutil
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from qimg.errors import ModelNotFoundError, UsageError
from qimg.loading.download_common import (
    LORA_SUFFIX,
    DownloadError,
    DownloadPlan,
    DownloadProgress,
    HubUnreachableError,
    RemoteFile,
    has_file,
    local_copy,
    local_file_copy,
    local_files,
    matches,
    plan_command,
    quiet_loggers,
)
from qimg.loading.download_hf import hf_download, hf_listing, hf_offline, offline_error
from qimg.loading.download_modelscope import modelscope_download, modelscope_listing
from qimg.loading.hub import (
    COMPONENTS,
    LORA_NAME,
    REPO_ID,
    SOURCE_NAMES,
    SOURCES,
    components_of,
    download_command,
    find_local_copies,
    hf_cache_dir,
    missing_files,
    modelscope_cache_dir,
    read_spec,
)
from qimg.specs import ALIASES, DOWNLOAD_PATTERNS, MODEL_INDEX_FILE, SPECS, ModelSpec

__all__ = [
    "DownloadError",
    "DownloadPlan",
    "DownloadProgress",
    "HubUnreachableError",
    "RemoteFile",
    "allow_patterns",
    "download",
    "plan_download",
    "quiet_loggers",
    "repo_for",
]


def allow_patterns(spec: ModelSpec | None) -> tuple[str, ...]:
    """The files the engine needs: model_index.json and the components of the spec's task. Without a spec (a repo
    id qimg has no alias for) every component qimg knows: a text-to-image repo has no processor/ to match."""
    components = components_of(spec) if spec else DOWNLOAD_PATTERNS
    return (MODEL_INDEX_FILE, *(p for c in components for p in DOWNLOAD_PATTERNS[c]))


def repo_for(model: str, source: str) -> tuple[str, ModelSpec | None]:
    """(repo id on `source`, spec if qimg knows the model) for an alias or a repo id."""
    if source not in SOURCES:
        raise UsageError(f"unknown source {source!r}", hint=f"use one of: {', '.join(SOURCES)}")
    if model in SPECS:
        spec = SPECS[model]
        if source not in spec.repos:
            raise UsageError(f"{model} is not published on {SOURCE_NAMES[source]}", hint="try --source hf")
        return spec.repos[source], spec
    if REPO_ID.fullmatch(model):
        return model, SPECS.get(ALIASES.get(model, ""))
    if m := LORA_NAME.fullmatch(model):  # the --lora name of a file, typed where the repo goes
        raise UsageError(f"{model!r} names a file, not a repo",
                         hint=f"run: {download_command(m['repo'], source, (m['file'],))}")
    raise UsageError(
        f"{model!r} is neither a model alias nor a repo id",
        hint=f"aliases: {', '.join(SPECS)}; or a repo id such as Qwen/Qwen-Image",
    )


def plan_download(
    model: str,
    *,
    source: str = "hf",
    revision: str | None = None,
    local_dir: str | Path | None = None,
    files: Sequence[str] = (),
) -> DownloadPlan:
    """List what download() would fetch, with sizes, from the hub's repo listing; writes nothing.

    files: .safetensors files of the repo to fetch alone (names or glob patterns); the plan's kind is then "files".
    Without them an alias, a known repo or a repo with a model_index.json is a model; any other repo, its one
    .safetensors file.
    """
    repo_id, spec = repo_for(model, source)
    wanted = tuple(files)
    target = Path(local_dir).expanduser().resolve() if local_dir is not None else None
    command = download_command(model, source, wanted)
    offline = source == "hf" and hf_offline()
    unreachable, copy, kind = None, None, None
    try:
        if offline:
            copy, kind = _stand_in(source, repo_id, revision, target, spec, wanted) or (None, None)
            if copy is None:
                raise offline_error(repo_id, command)
            commit, listing = (None if target is not None else copy.name), local_files(copy)
        elif source == "hf":
            commit, listing = hf_listing(repo_id, revision, command)
        else:
            commit, listing = None, modelscope_listing(repo_id, revision)
    except HubUnreachableError as e:
        # No network (or no route to the hub): a complete copy on disk is what the download would give.
        copy, kind = _stand_in(source, repo_id, revision, target, spec, wanted) or (None, None)
        if copy is None:
            raise
        unreachable, listing = e.message, local_files(copy)
        commit = copy.name if source == "hf" and target is None else None
    if kind is None:
        is_model = spec is not None or any(f.path == MODEL_INDEX_FILE for f in listing)
        kind = "files" if wanted or not is_model else "model"
    if kind == "model":
        patterns = allow_patterns(spec)
        chosen = [f for f in listing if any(fnmatch.fnmatch(f.path, p) for p in patterns)]
    else:
        patterns = wanted or (f"*{LORA_SUFFIX}",)
        chosen = _choose_files(model, repo_id, source, revision, listing, wanted)
    if target is not None:
        destination = target
    elif copy is not None:
        destination = copy
    elif source == "hf":
        destination = hf_cache_dir() / f"models--{repo_id.replace('/', '--')}" / "snapshots" / str(commit)
    else:
        destination = modelscope_cache_dir()
    plan = DownloadPlan(model, source, repo_id, revision, commit, patterns, tuple(sorted(chosen, key=_order)), target,
                        destination, offline, unreachable, kind)
    if kind == "model":
        _check_layout(plan, spec)
    where = [target] if target is not None else _cached_folders(plan)
    present = [replace(f, present=any(has_file(folder, f) for folder in where)) for f in plan.files]
    return replace(plan, files=tuple(present))


def _stand_in(
    source: str, repo_id: str, revision: str | None, target: Path | None, spec: ModelSpec | None,
    wanted: tuple[str, ...],
) -> tuple[Path, str] | None:
    """(folder, kind) of the copy on disk that is what a download the hub cannot serve would give: a complete
    model, or a folder holding every file asked for; None when there is none."""
    if not wanted:
        folder = local_copy(source, repo_id, revision, target)
        if folder is not None:
            return folder, "model"
        if spec is not None:
            return None
    # Without --file, a model's half-fetched snapshot is no stand-in: its weights are not the repo's one LoRA.
    folder = local_file_copy(source, repo_id, revision, target, wanted or (f"*{LORA_SUFFIX}",), skip_models=not wanted)
    return (folder, "files") if folder is not None else None


def _choose_files(
    name: str, repo_id: str, source: str, revision: str | None, listing: list[RemoteFile], wanted: tuple[str, ...]
) -> list[RemoteFile]:
    """The .safetensors files of the listing that --file names: each name or pattern must match at least one.
    Without --file the repo's only one; several are refused with their names (see the module's docstring)."""
    candidates = sorted((f for f in listing if f.path.lower().endswith(LORA_SUFFIX)), key=lambda f: f.path)
    names = [f.path for f in candidates]
    where = f"{repo_id} on {SOURCE_NAMES[source]}" + (f" at revision {revision}" if revision else "")
    there = f"its .safetensors files: {_summary(names, 3)}" if names else "it holds no .safetensors file"
    for pattern in wanted:
        if not any(matches(n, pattern) for n in names):
            raise ModelNotFoundError(f"{where} has no .safetensors file matching {pattern!r}",
                                     hint=f"{there} (qimg reads LoRAs as safetensors only)")
    if wanted:
        return [f for f in candidates if any(matches(f.path, p) for p in wanted)]
    if not candidates:
        raise ModelNotFoundError(
            f"{where} is neither a model (no {MODEL_INDEX_FILE}) nor holds a .safetensors file",
            hint="qimg runs Qwen-Image models in the diffusers layout (see: qimg models) and LoRAs as .safetensors",
        )
    if len(candidates) > 1:
        raise UsageError(
            f"{where} holds {len(candidates)} .safetensors files ({_summary(names, 3)}): pick with --file",
            hint=f"e.g. {download_command(name, source, (names[0],))}; list them with --file '*.safetensors' --dry-run",
        )
    return candidates


def _summary(names: list[str], n: int) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _order(f: RemoteFile) -> tuple[bool, str]:
    return (f.path != MODEL_INDEX_FILE, f.path)  # model_index.json first: it says what the model is


def _check_layout(plan: DownloadPlan, spec: ModelSpec | None) -> None:
    """Refuse a repo that lacks a component qimg needs before fetching gigabytes of it."""
    paths = {f.path for f in plan.files}
    wanted = components_of(spec) if spec else COMPONENTS[("qwen-image", "t2i")]
    needed = [MODEL_INDEX_FILE] + [f"{c}/{m}" for c, m in wanted.items()]
    absent = [p for p in needed if p not in paths]
    if absent:
        at = f" at revision {plan.revision}" if plan.revision else ""
        raise ModelNotFoundError(
            f"{plan.repo_id} on {SOURCE_NAMES[plan.source]}{at} has no {', '.join(absent[:3])}",
            hint="qimg runs Qwen-Image models in the diffusers layout; see: qimg models",
        )


def _cached_folders(plan: DownloadPlan) -> list[Path]:
    if plan.source == "hf":
        return [plan.destination]  # the snapshot of exactly this commit, whether or not refs/main names it yet
    # The folders modelscope itself writes into or reuses: a file in another snapshot would be fetched again.
    return [c.path for c in find_local_copies({"modelscope": plan.repo_id})]


def download(
    model: str | DownloadPlan,
    *,
    source: str = "hf",
    revision: str | None = None,
    local_dir: str | Path | None = None,
    files: Sequence[str] = (),
    progress: DownloadProgress | None = None,
) -> Path:
    """Fetch what plan_download lists (pass its plan to skip listing twice); returns the folder the files are in
    (a model: the model folder, checked to be complete and runnable; files: the snapshot or local_dir).

    Files already present are kept. Into the standard cache unless local_dir is given.
    """
    plan = model if isinstance(model, DownloadPlan) else plan_download(
        model, source=source, revision=revision, local_dir=local_dir, files=files
    )
    _check_disk_space(plan)
    if plan.unreachable is not None and all(f.present for f in plan.files):
        path = plan.destination  # the hub is out of reach and the copy on disk is complete: nothing to fetch
    else:
        path = hf_download(plan, progress) if plan.source == "hf" else modelscope_download(plan, progress)
    for f in plan.files:  # sizes of every file, including those that were already there
        if not has_file(path, f):
            raise DownloadError(
                f"{f.path} is missing or has the wrong size in {path} after the download",
                hint=f"run: {plan_command(plan)}",
            )
    if plan.kind == "model":
        read_spec(path)  # a model qimg can run ...
        missing = missing_files(path)  # ... and whole
        if missing:
            raise DownloadError(f"{path} still lacks {', '.join(missing[:3])}",
                                hint="the repo on the hub is incomplete")
    return path


def _check_disk_space(plan: DownloadPlan) -> None:
    target = plan.local_dir or (hf_cache_dir() if plan.source == "hf" else modelscope_cache_dir())
    existing = next(p for p in (target, *target.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if plan.fetch_size > free:
        raise DownloadError(
            f"{plan.repo_id} needs {plan.fetch_size / 1e9:.1f} GB but {existing} has {free / 1e9:.1f} GB free",
            hint="free some space, or pass --local-dir on a larger disk",
        )
