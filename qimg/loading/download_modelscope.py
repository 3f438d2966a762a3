"""The ModelScope half of `download`: one listing call (failing fast when the host is out of reach), then
modelscope's snapshot_download, which resumes and checks sha256 itself. modelscope is imported only inside the
functions: it is an optional dependency, absent from GPU machines that only run models."""

from __future__ import annotations

import glob
import socket
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from qimg.loading.download_common import (
    DownloadError,
    DownloadPlan,
    DownloadProgress,
    HubUnreachableError,
    RemoteFile,
    brief,
    first_line,
    network_errors,
    plan_command,
    quiet_loggers,
)
from qimg.loading.hub import modelscope_cache_dir

# modelscope logs each retry of a failed listing as a WARNING line of its own format; qimg says it in one line.
_MODELSCOPE_LOGGERS = ("modelscope", "modelscope_hub")
REACH_TIMEOUT = 5.0  # seconds to connect to the ModelScope host before calling it unreachable


def modelscope_listing(repo_id: str, revision: str | None) -> list[RemoteFile]:
    """The repo's files from one listing call; a host that cannot be reached fails at once, in one line (modelscope
    itself retries for seconds, logging every try)."""
    from modelscope.hub.api import HubApi

    hint = "check the network (ModelScope: modelscope.cn, or MODELSCOPE_ENDPOINT)"
    try:
        api = HubApi()
        endpoint = str(api.endpoint).rstrip("/")
    except Exception as e:
        raise DownloadError(f"cannot set up the ModelScope client ({brief(e)})", hint=hint) from e
    _check_reachable(endpoint, hint)
    try:
        with quiet_loggers(_MODELSCOPE_LOGGERS):
            listed = api.get_model_files(repo_id, revision=revision or "master", recursive=True)
    except Exception as e:  # modelscope raises its own types (and requests') for not-found and network errors
        if _is_network_error(e):
            raise HubUnreachableError(f"cannot reach {endpoint} ({brief(e)})", hint=hint) from e
        raise DownloadError(f"cannot list {repo_id} on ModelScope ({brief(e)})",
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
        raise HubUnreachableError(f"cannot reach {endpoint} ({brief(e)})", hint=hint) from e


def _is_network_error(e: BaseException) -> bool:
    """A transport failure (DNS, refused, timeout): modelscope_hub's network errors are ConnectionErrors; older
    modelscope versions let requests' through."""
    return isinstance(e, (ConnectionError, TimeoutError, socket.gaierror, *network_errors()))


def modelscope_download(plan: DownloadPlan, progress: DownloadProgress | None) -> Path:
    """modelscope's snapshot_download with the plan's patterns; it resumes, and checks sha256 when listed.

    Single files (plan.kind "files") go through it too, by their exact names (escaped: a '[' in a name is not a
    pattern): it lands them in the same cache layout as modelscope's one-file download and, unlike that, reports
    progress.
    """
    from modelscope.hub.snapshot_download import snapshot_download

    patterns = list(plan.patterns) if plan.kind == "model" else [glob.escape(f.path) for f in plan.files]
    callbacks = [_modelscope_callback(progress)] if progress else None
    where: dict[str, Any] = (
        {"local_dir": str(plan.local_dir)} if plan.local_dir else {"cache_dir": str(modelscope_cache_dir())}
    )
    try:
        path = snapshot_download(plan.repo_id, revision=plan.revision, allow_patterns=patterns,
                                 progress_callbacks=callbacks, **where)
    except Exception as e:
        raise DownloadError(f"ModelScope download of {plan.repo_id} failed: {first_line(e)}",
                            hint=f"run again to resume: {plan_command(plan)}") from e
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
