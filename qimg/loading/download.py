"""Fetch the files a model needs from the Hugging Face Hub or ModelScope, into their standard caches or a folder.

Only the files the engine reads are fetched (DOWNLOAD_PATTERNS in qimg/specs.py, per component of the model's task).
Hugging Face: files come one at a time through huggingface_hub.hf_hub_download, which retries a cut connection
with an HTTP Range request (resuming the partial file) and checks each file's size; it does not hash plain HTTP
downloads, so qimg checks every file it fetched against the sha256 (LFS files) or git blob id (small files) that the
hub's repo listing gives, and removes a file that does not match. ModelScope: modelscope's snapshot_download, which
resumes and checks sha256 itself. Both hubs' own libraries are imported only here, inside the functions.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import os
import shutil
import socket
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from qimg.errors import ConfigError, ModelNotFoundError, QimgError, UsageError
from qimg.loading.hub import (
    COMPONENTS_BY_TASK,
    REPO_ID,
    SOURCE_NAMES,
    SOURCES,
    download_command,
    find_local_copies,
    hf_cache_dir,
    missing_files,
    modelscope_cache_dir,
    read_spec,
)
from qimg.specs import ALIASES, DOWNLOAD_PATTERNS, MODEL_INDEX_FILE, SPECS, ModelSpec

_TRUE = ("1", "on", "yes", "true")
# modelscope logs each retry of a failed listing as a WARNING line of its own format; qimg says it in one line.
_MODELSCOPE_LOGGERS = ("modelscope", "modelscope_hub")
REACH_TIMEOUT = 5.0  # seconds to connect to the ModelScope host before calling it unreachable


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
    patterns: tuple[str, ...]
    files: tuple[RemoteFile, ...]
    local_dir: Path | None  # None: the hub's standard cache
    destination: Path  # the model folder the files go to (ModelScope's cache: its root; modelscope picks the layout)
    offline: bool = False  # HF_HUB_OFFLINE: listed from a complete local copy, the hub not asked
    unreachable: str | None = None  # why the hub could not be reached; then listed from a complete local copy

    @property
    def total_size(self) -> int:
        return sum(f.size or 0 for f in self.files)

    @property
    def fetch_size(self) -> int:
        return sum(f.size or 0 for f in self.files if not f.present)


def allow_patterns(spec: ModelSpec | None) -> tuple[str, ...]:
    """The files the engine needs: model_index.json and the components of the spec's task. Without a spec (a repo
    id qimg has no alias for) every component qimg knows: a text-to-image repo has no processor/ to match."""
    components = COMPONENTS_BY_TASK[spec.task] if spec else DOWNLOAD_PATTERNS
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
    raise UsageError(
        f"{model!r} is neither a model alias nor a repo id",
        hint=f"aliases: {', '.join(SPECS)}; or a repo id such as Qwen/Qwen-Image",
    )


def plan_download(
    model: str, *, source: str = "hf", revision: str | None = None, local_dir: str | Path | None = None
) -> DownloadPlan:
    """List what download() would fetch, with sizes, from the hub's repo listing; writes nothing."""
    repo_id, spec = repo_for(model, source)
    target = Path(local_dir).expanduser().resolve() if local_dir is not None else None
    patterns = allow_patterns(spec)
    offline = source == "hf" and _hf_offline()
    unreachable, copy = None, None
    try:
        if offline:
            commit, files = _hf_local_listing(model, repo_id, revision, target)
        elif source == "hf":
            commit, files = _hf_listing(model, repo_id, revision)
        else:
            commit, files = None, _modelscope_listing(repo_id, revision)
    except HubUnreachableError as e:
        # No network (or no route to the hub): a complete copy on disk is what the download would give.
        copy = _local_copy(source, repo_id, revision, target)
        if copy is None:
            raise
        unreachable, files = e.message, _local_files(copy)
        commit = copy.name if source == "hf" and target is None else None
    files = [f for f in files if any(fnmatch.fnmatch(f.path, p) for p in patterns)]
    if target is not None:
        destination = target
    elif copy is not None:
        destination = copy
    elif source == "hf":
        destination = hf_cache_dir() / f"models--{repo_id.replace('/', '--')}" / "snapshots" / str(commit)
    else:
        destination = modelscope_cache_dir()
    plan = DownloadPlan(model, source, repo_id, revision, commit, patterns, tuple(sorted(files, key=_order)), target,
                        destination, offline, unreachable)
    _check_layout(plan, spec)
    where = [target] if target is not None else _cached_folders(plan)
    present = [replace(f, present=any(_has(folder, f) for folder in where)) for f in plan.files]
    return replace(plan, files=tuple(present))


def _order(f: RemoteFile) -> tuple[bool, str]:
    return (f.path != MODEL_INDEX_FILE, f.path)  # model_index.json first: it says what the model is


def _check_layout(plan: DownloadPlan, spec: ModelSpec | None) -> None:
    """Refuse a repo that lacks a component qimg needs before fetching gigabytes of it."""
    paths = {f.path for f in plan.files}
    needed = [MODEL_INDEX_FILE] + [f"{c}/{m}" for c, m in COMPONENTS_BY_TASK[spec.task if spec else "t2i"].items()]
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
    return [c.path for c in find_local_copies({"modelscope": plan.repo_id})]


def _has(folder: Path, f: RemoteFile) -> bool:
    path = folder / f.path
    try:
        return path.is_file() and (f.size is None or path.stat().st_size == f.size)
    except OSError:
        return False


def download(
    model: str | DownloadPlan,
    *,
    source: str = "hf",
    revision: str | None = None,
    local_dir: str | Path | None = None,
    progress: DownloadProgress | None = None,
) -> Path:
    """Fetch what plan_download lists (pass its plan to skip listing twice); returns the model folder.

    Files already present are kept. Into the standard cache unless local_dir is given; the folder is checked to be
    a complete model that qimg can run before it is returned.
    """
    plan = model if isinstance(model, DownloadPlan) else plan_download(
        model, source=source, revision=revision, local_dir=local_dir
    )
    _check_disk_space(plan)
    if plan.unreachable is not None and all(f.present for f in plan.files):
        path = plan.destination  # the hub is out of reach and the copy on disk is complete: nothing to fetch
    else:
        path = _hf_download(plan, progress) if plan.source == "hf" else _modelscope_download(plan, progress)
    for f in plan.files:  # sizes of every file, including those that were already there
        if not _has(path, f):
            raise DownloadError(
                f"{f.path} is missing or has the wrong size in {path} after the download",
                hint=f"run: {download_command(plan.name, plan.source)}",
            )
    read_spec(path)  # a model qimg can run ...
    missing = missing_files(path)  # ... and whole
    if missing:
        raise DownloadError(f"{path} still lacks {', '.join(missing[:3])}", hint="the repo on the hub is incomplete")
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


# --- Hugging Face --------------------------------------------------------------------------------------------------


def _hf_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE, which huggingface_hub honours too), read now, not at import."""
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hf_endpoint() -> str | None:
    """HF_ENDPOINT as it is now (a mirror, or the test server); None: huggingface_hub's default."""
    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or None


def _offline_error(name: str, repo_id: str) -> DownloadError:
    return DownloadError(
        f"HF_HUB_OFFLINE is set, so {repo_id} cannot be fetched from the Hugging Face Hub",
        hint=f"unset HF_HUB_OFFLINE and run: {download_command(name)}",
    )


def _hf_local_listing(
    name: str, repo_id: str, revision: str | None, local_dir: Path | None
) -> tuple[str | None, list[RemoteFile]]:
    """Offline, a model already complete on disk is a download with nothing to fetch (so that a script's
    `qimg download X && qimg generate --model X` runs offline too); anything else is an error."""
    folder = _local_copy("hf", repo_id, revision, local_dir)
    if folder is None:
        raise _offline_error(name, repo_id)
    return (None if local_dir is not None else folder.name), _local_files(folder)


def _local_copy(source: str, repo_id: str, revision: str | None, local_dir: Path | None) -> Path | None:
    """The complete copy on disk that stands in for a download the hub cannot serve: local_dir when it holds one,
    else the first complete copy in the source's cache. Not for a --revision: a branch or tag cannot be resolved
    offline with certainty (a commit could, but is rare enough)."""
    if local_dir is not None:
        return local_dir if local_dir.is_dir() and not _missing(local_dir) else None
    if revision is not None:
        return None
    folders = [c.path for c in find_local_copies({source: repo_id}) if c.complete]
    return folders[0] if folders else None


def _local_files(folder: Path) -> list[RemoteFile]:
    """The files of a copy on disk, as a listing with sizes (the cache's own bookkeeping left out)."""
    return [RemoteFile(p.relative_to(folder).as_posix(), p.stat().st_size) for p in folder.rglob("*")
            if p.is_file() and ".cache" not in p.relative_to(folder).parts]


def _missing(folder: Path) -> tuple[str, ...]:
    try:
        return missing_files(folder)
    except ConfigError:
        return (MODEL_INDEX_FILE,)


def _hf_listing(name: str, repo_id: str, revision: str | None) -> tuple[str, list[RemoteFile]]:
    """(commit, files with sizes and hashes) from one model-info request."""
    from huggingface_hub import HfApi

    with _hf_errors(name, repo_id, revision):
        info = HfApi(endpoint=_hf_endpoint()).model_info(repo_id, revision=revision, files_metadata=True)
    files = [
        RemoteFile(
            path=s.rfilename,
            size=s.lfs.size if s.lfs else s.size,
            sha256=s.lfs.sha256 if s.lfs else None,
            git_sha1=None if s.lfs else s.blob_id,
        )
        for s in info.siblings or []
    ]
    if not info.sha:
        raise DownloadError(f"the hub gave no commit for {repo_id}", hint="check HF_ENDPOINT")
    return info.sha, files


def _hf_download(plan: DownloadPlan, progress: DownloadProgress | None) -> Path:
    """Fetch the plan's files one by one (main thread: Ctrl-C stops at once) and check each one fetched."""
    if _hf_offline():
        if plan.offline and not plan.fetch_size and all(f.present for f in plan.files):
            return plan.destination
        raise _offline_error(plan.name, plan.repo_id)
    from huggingface_hub import hf_hub_download

    where: dict[str, Any] = {"local_dir": str(plan.local_dir)} if plan.local_dir else {"cache_dir": str(hf_cache_dir())}
    folder: Path | None = plan.local_dir
    for i, f in enumerate(plan.files):
        # The first file (model_index.json) is asked for by the revision the user named, so that the cache records
        # refs/<revision> -> commit (how a later lookup by name finds this snapshot); the rest by the commit itself,
        # so that a branch moving during a long download cannot mix two versions.
        rev = (plan.revision or "main") if i == 0 else plan.commit
        if not f.present and folder is not None:
            _discard(folder / f.path)  # there with the wrong size: huggingface_hub would keep it as it is
        if not f.present and progress:
            progress.start(f.path, f.size)
        with _hf_errors(plan.name, plan.repo_id, plan.revision):
            got = Path(hf_hub_download(plan.repo_id, f.path, revision=rev, endpoint=_hf_endpoint(),
                                       tqdm_class=_bar_class(f.path, progress), **where))
        if i == 0:
            folder = got.parent
            if plan.local_dir is None and folder.name != plan.commit:
                raise DownloadError(
                    f"{plan.repo_id} changed on the hub while qimg was listing it (now at {folder.name[:12]})",
                    hint=f"run: {download_command(plan.name)}",
                )
            _check_model_index(plan, folder)
        if not f.present:
            _verify(got, f, plan)
            if progress:
                progress.done(f.path)
    assert folder is not None
    return folder


def _check_model_index(plan: DownloadPlan, folder: Path) -> None:
    """Refuse a model qimg cannot run (or not the one the alias promises) before fetching its weights."""
    spec = read_spec(folder)
    expected = SPECS.get(plan.name) or SPECS.get(ALIASES.get(plan.repo_id, ""))
    if expected is not None and spec.pipeline_class != expected.pipeline_class:
        raise ConfigError(
            f"{plan.repo_id} holds a {spec.pipeline_class} model, not the {expected.pipeline_class} qimg expects",
            hint="check HF_ENDPOINT: the hub served another model under this name",
        )
    listed = {f.path for f in plan.files}
    absent = [f"{c}/{m}" for c, m in COMPONENTS_BY_TASK[spec.task].items() if f"{c}/{m}" not in listed]
    if absent:
        raise ModelNotFoundError(f"{plan.repo_id} has no {', '.join(absent)}", hint="it is not a complete model")


def _verify(path: Path, f: RemoteFile, plan: DownloadPlan) -> None:
    """Hash a freshly fetched file against the hub's listing; a mismatch removes it (a rerun fetches it again)."""
    if f.sha256:
        kind, expected, actual = "sha256", f.sha256, _digest(path, git_blob=False)
    elif f.git_sha1:
        kind, expected, actual = "git blob id", f.git_sha1, _digest(path, git_blob=True)
    else:
        return
    if actual != expected:
        _discard(path)
        raise DownloadError(
            f"{f.path} from {plan.repo_id} is corrupt ({kind} {actual[:12]}... instead of {expected[:12]}...); "
            "the file was removed",
            hint=f"run again: {download_command(plan.name, plan.source)} (if it repeats, suspect HF_ENDPOINT's mirror)",
        )


def _digest(path: Path, git_blob: bool) -> str:
    """sha256 of the content, or the git blob id the hub gives small files (sha1 over "blob <size>\\0" + content)."""
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode()) if git_blob else hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _discard(path: Path) -> None:
    """Remove a bad file; in the HF cache also the blob its snapshot link points to, which is what is bad."""
    if path.is_symlink():
        blob = path.resolve()
        path.unlink()
        blob.unlink(missing_ok=True)
    elif path.is_file():
        path.unlink()


def _bar_class(path: str, progress: DownloadProgress | None) -> type:
    """A class with the slice of tqdm's interface that huggingface_hub's downloads use (plain HTTP and xet), sending
    the byte counts to `progress`: qimg draws its own progress, and huggingface_hub's bars never appear."""

    class Bar:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.n = 0
            self.total = kwargs.get("total")
            initial = kwargs.get("initial") or 0
            if initial:
                self.update(initial)

        def __enter__(self) -> Bar:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

        def update(self, n: float | None = 1) -> None:
            self.n += int(n or 0)
            if progress and n:
                progress.advance(path, int(n))

        def update_transfer(self, n: float | None = 1) -> None:
            """xet's network bytes; the written bytes (update) are what the bar shows."""

        def _ignore(self, *args: Any, **kwargs: Any) -> None:
            """Text and redraw calls: qimg draws its own display."""

        set_postfix_str = set_transfer_postfix_str = set_description = refresh = close = _ignore

    return Bar


def _network_errors() -> tuple[type[BaseException], ...]:
    """The transport errors of whichever HTTP client huggingface_hub uses (httpx2 in 2.x, httpx in 1.x)."""
    found: list[type[BaseException]] = []
    for module, names in (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)),
                          ("requests", ("ConnectionError", "Timeout"))):
        mod = sys.modules.get(module)  # only clients already imported can have raised
        found += [getattr(mod, n) for n in names if mod is not None and hasattr(mod, n)]
    return tuple(found)


@contextmanager
def _hf_errors(name: str, repo_id: str, revision: str | None) -> Iterator[None]:
    """huggingface_hub's exceptions as one-line qimg errors."""
    from huggingface_hub import errors as hf

    endpoint = _hf_endpoint() or "https://huggingface.co"
    try:
        yield
    except (hf.GatedRepoError, hf.DisabledRepoError) as e:
        raise ModelNotFoundError(f"{repo_id} on {endpoint} is gated or disabled ({_first_line(e)})",
                                 hint="accept its license on the model page and set HF_TOKEN") from e
    except hf.RepositoryNotFoundError as e:
        raise ModelNotFoundError(f"{repo_id} was not found on {endpoint}",
                                 hint="check the name (qimg models lists the aliases); a private repo needs HF_TOKEN"
                                 ) from e
    except hf.RevisionNotFoundError as e:
        raise ModelNotFoundError(f"{repo_id} has no revision {revision!r} on {endpoint}",
                                 hint="pass a branch, tag or commit of that repo to --revision") from e
    except hf.OfflineModeIsEnabled as e:  # HF_HUB_OFFLINE was set before huggingface_hub was imported
        raise DownloadError(f"HF_HUB_OFFLINE is set, so {repo_id} cannot be fetched",
                            hint=f"unset HF_HUB_OFFLINE and run: {download_command(name)}") from e
    except hf.HfHubHTTPError as e:
        raise DownloadError(f"{endpoint} refused {repo_id}: {_first_line(e)}",
                            hint="a 401/403 needs HF_TOKEN; a 5xx: try again later") from e
    except (hf.LocalEntryNotFoundError, *_network_errors()) as e:
        raise HubUnreachableError(f"cannot reach {endpoint} ({_first_line(e)})",
                                  hint="check the network, or HF_ENDPOINT if you use a mirror") from e
    except OSError as e:  # huggingface_hub's size check ("Consistency check failed") and disk errors
        raise DownloadError(f"downloading {repo_id} failed: {_first_line(e)}",
                            hint=f"run again to resume: {download_command(name)}") from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# --- ModelScope ----------------------------------------------------------------------------------------------------


def _modelscope_listing(repo_id: str, revision: str | None) -> list[RemoteFile]:
    """The repo's files from one listing call; a host that cannot be reached fails at once, in one line (modelscope
    itself retries for seconds, logging every try)."""
    from modelscope.hub.api import HubApi

    hint = "check the network (ModelScope: modelscope.cn, or MODELSCOPE_ENDPOINT)"
    try:
        api = HubApi()
        endpoint = str(api.endpoint).rstrip("/")
    except Exception as e:
        raise DownloadError(f"cannot set up the ModelScope client ({_brief(e)})", hint=hint) from e
    _check_reachable(endpoint, hint)
    try:
        with quiet_loggers(_MODELSCOPE_LOGGERS):
            listed = api.get_model_files(repo_id, revision=revision or "master", recursive=True)
    except Exception as e:  # modelscope raises its own types (and requests') for not-found and network errors
        if _is_network_error(e):
            raise HubUnreachableError(f"cannot reach {endpoint} ({_brief(e)})", hint=hint) from e
        raise DownloadError(f"cannot list {repo_id} on ModelScope ({_brief(e)})",
                            hint="check the name and the network (ModelScope: modelscope.cn)") from e
    return [
        RemoteFile(path=item["Path"], size=item.get("Size") or None, sha256=item.get("Sha256") or None)
        for item in listed
        if item.get("Type", "blob") != "tree" and item.get("Path")
    ]


def _check_reachable(endpoint: str, hint: str) -> None:
    """HubUnreachableError unless a TCP connection to the endpoint's host opens within REACH_TIMEOUT. Skipped when
    a proxy carries the requests: the host may then be reachable only through it."""
    url = urllib.parse.urlsplit(endpoint)
    host = url.hostname
    proxies = urllib.request.getproxies()
    if not host or ((proxies.get(url.scheme) or proxies.get("all")) and not urllib.request.proxy_bypass(host)):
        return
    try:
        socket.create_connection((host, url.port or (443 if url.scheme == "https" else 80)), REACH_TIMEOUT).close()
    except OSError as e:
        raise HubUnreachableError(f"cannot reach {endpoint} ({_brief(e)})", hint=hint) from e


def _is_network_error(e: BaseException) -> bool:
    """A transport failure (DNS, refused, timeout): modelscope_hub's network errors are ConnectionErrors; older
    modelscope versions let requests' through."""
    return isinstance(e, (ConnectionError, TimeoutError, socket.gaierror, *_network_errors()))


def _brief(e: BaseException, limit: int = 120) -> str:
    """A short reason: an OS error's text ("Connection refused"), else the first line, cut to `limit` characters."""
    text = getattr(e, "strerror", None) or _first_line(e)
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


def _modelscope_download(plan: DownloadPlan, progress: DownloadProgress | None) -> Path:
    """modelscope's snapshot_download with the component patterns; it resumes, and checks sha256 when listed."""
    from modelscope.hub.snapshot_download import snapshot_download

    callbacks = [_modelscope_callback(progress)] if progress else None
    where: dict[str, Any] = (
        {"local_dir": str(plan.local_dir)} if plan.local_dir else {"cache_dir": str(modelscope_cache_dir())}
    )
    try:
        path = snapshot_download(plan.repo_id, revision=plan.revision, allow_patterns=list(plan.patterns),
                                 progress_callbacks=callbacks, **where)
    except Exception as e:
        raise DownloadError(f"ModelScope download of {plan.repo_id} failed: {_first_line(e)}",
                            hint=f"run again to resume: {download_command(plan.name, 'modelscope')}") from e
    return Path(path)


def _modelscope_callback(progress: DownloadProgress) -> type:
    """modelscope makes one instance per file: (filename, file_size), then update(bytes) and end()."""

    class Callback:
        def __init__(self, filename: str, file_size: int) -> None:
            self.filename = filename
            progress.start(filename, file_size or None)

        def update(self, size: int) -> None:
            progress.advance(self.filename, size)

        def end(self) -> None:
            progress.done(self.filename)

    return Callback
