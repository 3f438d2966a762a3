"""The Hugging Face half of `download`: the repo listing, the fetch, and the checks of what was fetched.

Files come one at a time through huggingface_hub.hf_hub_download, which retries a cut connection with an HTTP Range
request (resuming the partial file) and checks each file's size; it does not hash plain HTTP downloads, so every
fetched file is checked here against the sha256 (LFS files) or git blob id (small files) that the hub's repo listing
gives, and removed when it does not match. huggingface_hub is imported only inside the functions.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from qimg.errors import ConfigError, ModelNotFoundError
from qimg.loading.download_common import (
    DownloadError,
    DownloadPlan,
    DownloadProgress,
    HubUnreachableError,
    RemoteFile,
    discard,
    first_line,
    network_errors,
    plan_command,
)
from qimg.loading.hub import components_of, hf_cache_dir, read_spec
from qimg.specs import ALIASES, SPECS

_TRUE = ("1", "on", "yes", "true")


def hf_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE, which huggingface_hub honours too), read now, not at import."""
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hf_endpoint() -> str | None:
    """HF_ENDPOINT as it is now (a mirror, or the test server); None: huggingface_hub's default."""
    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or None


def offline_error(repo_id: str, command: str) -> DownloadError:
    return DownloadError(
        f"HF_HUB_OFFLINE is set, so {repo_id} cannot be fetched from the Hugging Face Hub",
        hint=f"unset HF_HUB_OFFLINE and run: {command}",
    )


def hf_listing(repo_id: str, revision: str | None, command: str) -> tuple[str, list[RemoteFile]]:
    """(commit, files with sizes and hashes) from one model-info request."""
    from huggingface_hub import HfApi

    with hf_errors(repo_id, revision, command):
        info = HfApi(endpoint=hf_endpoint()).model_info(repo_id, revision=revision, files_metadata=True)
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


def hf_download(plan: DownloadPlan, progress: DownloadProgress | None) -> Path:
    """Fetch the plan's files one by one (main thread: Ctrl-C stops at once) and check each one fetched."""
    if hf_offline():
        if plan.offline and not plan.fetch_size and all(f.present for f in plan.files):
            return plan.destination
        raise offline_error(plan.repo_id, plan_command(plan))
    from huggingface_hub import hf_hub_download

    where: dict[str, Any] = {"local_dir": str(plan.local_dir)} if plan.local_dir else {"cache_dir": str(hf_cache_dir())}
    folder: Path | None = plan.local_dir
    for i, f in enumerate(plan.files):
        # The first file is asked for by the revision the user named, so that the cache records refs/<revision> ->
        # commit (how a later lookup by name finds this snapshot); the rest by the commit itself, so that a branch
        # moving during a long download cannot mix two versions.
        rev = (plan.revision or "main") if i == 0 else plan.commit
        if not f.present and folder is not None:
            discard(folder / f.path)  # there with the wrong size: huggingface_hub would keep it as it is
        if not f.present and progress:
            progress.start(f.path, f.size)
        with hf_errors(plan.repo_id, plan.revision, plan_command(plan)):
            got = Path(hf_hub_download(plan.repo_id, f.path, revision=rev, endpoint=hf_endpoint(),
                                       tqdm_class=_bar_class(f.path, progress), **where))
        if i == 0:
            # The snapshot folder: a file in a subfolder (sub/x.safetensors) sits deeper than the first level.
            folder = got.parents[f.path.count("/")]
            if plan.local_dir is None and folder.name != plan.commit:
                raise DownloadError(
                    f"{plan.repo_id} changed on the hub while qimg was listing it (now at {folder.name[:12]})",
                    hint=f"run: {plan_command(plan)}",
                )
            if plan.kind == "model":
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
    absent = [f"{c}/{m}" for c, m in components_of(spec).items() if f"{c}/{m}" not in listed]
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
        discard(path)
        raise DownloadError(
            f"{f.path} from {plan.repo_id} is corrupt ({kind} {actual[:12]}... instead of {expected[:12]}...); "
            "the file was removed",
            hint=f"run again: {plan_command(plan)} (if it repeats, suspect HF_ENDPOINT's mirror)",
        )


def _digest(path: Path, git_blob: bool) -> str:
    """sha256 of the content, or the git blob id the hub gives small files (sha1 over "blob <size>\\0" + content)."""
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode()) if git_blob else hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


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


@contextmanager
def hf_errors(repo_id: str, revision: str | None, command: str) -> Iterator[None]:
    """huggingface_hub's exceptions as one-line qimg errors; `command` is what fetches the same again."""
    from huggingface_hub import errors as hf

    endpoint = hf_endpoint() or "https://huggingface.co"
    try:
        yield
    except (hf.GatedRepoError, hf.DisabledRepoError) as e:
        raise ModelNotFoundError(f"{repo_id} on {endpoint} is gated or disabled ({first_line(e)})",
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
                            hint=f"unset HF_HUB_OFFLINE and run: {command}") from e
    except hf.HfHubHTTPError as e:
        raise DownloadError(f"{endpoint} refused {repo_id}: {first_line(e)}",
                            hint="a 401/403 needs HF_TOKEN; a 5xx: try again later") from e
    except (hf.LocalEntryNotFoundError, *network_errors()) as e:
        raise HubUnreachableError(f"cannot reach {endpoint} ({first_line(e)})",
                                  hint="check the network, or HF_ENDPOINT if you use a mirror") from e
    except OSError as e:  # huggingface_hub's size check ("Consistency check failed") and disk errors
        raise DownloadError(f"downloading {repo_id} failed: {first_line(e)}",
                            hint=f"run again to resume: {command}") from e
