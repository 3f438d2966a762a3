"""A stand-in for the Hugging Face Hub on 127.0.0.1, for download tests without the network.

It answers what huggingface_hub 2.x asks when HF_ENDPOINT points at it (seen with its debug log):
  GET  /api/models/{repo}[/revision/{rev}][?blobs=true]  model info: sha, siblings with size, blobId, lfs.sha256
  GET  /api/models/{repo}/tree/{rev}[?recursive=true]     the file tree (snapshot_download lists with it)
  HEAD /{repo}/resolve/{rev}/{path}                        X-Repo-Commit, ETag, X-Linked-Etag/-Size for LFS files
  GET  /{repo}/resolve/{rev}/{path}                        the bytes; Range requests answered with 206
It never sends X-Xet-* headers or xetHash fields, so the client downloads over plain HTTP and never tries xet.
Faults for tests: cut a file's first transfer half-way, corrupt a file (same size, wrong sha256), fail a file.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?$")
TREE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$")
RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    """A repo at one commit; big files and safetensors are LFS files, as on the hub."""

    repo_id: str
    files: dict[str, bytes]
    commit: str = ""

    def __post_init__(self) -> None:
        digest = hashlib.sha1(self.repo_id.encode())
        for path in sorted(self.files):
            digest.update(path.encode() + git_blob_sha1(self.files[path]).encode())
        self.commit = digest.hexdigest()

    def is_lfs(self, path: str) -> bool:
        return path.endswith(".safetensors") or len(self.files[path]) > 10_000_000

    def sibling(self, path: str) -> dict:
        data = self.files[path]
        entry: dict = {"rfilename": path, "size": len(data), "blobId": git_blob_sha1(data)}
        if self.is_lfs(path):
            entry["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return entry


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # the URL path, unquoted
    range: str | None
    authorization: str | None


@dataclass
class HubServer:
    """Serve repos until stop(); `url` goes into HF_ENDPOINT."""

    repos: dict[str, Repo] = field(default_factory=dict)
    log: list[Request] = field(default_factory=list)
    cut_once: set[str] = field(default_factory=set)  # repo file paths whose next GET stops half-way
    corrupt: set[str] = field(default_factory=set)  # served with one byte flipped, advertised with the true sha256
    fail: dict[str, int] = field(default_factory=dict)  # path -> HTTP status for its GET
    gated: set[str] = field(default_factory=set)  # repo ids answered 401 GatedRepo without an Authorization header
    _httpd: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._httpd is not None
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        handler = type("Handler", (_Handler,), {"hub": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)  # port 0: a free one
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def gets(self, path: str) -> list[Request]:
        """The GET requests for one repo file."""
        return [r for r in self.log if r.method == "GET" and "/resolve/" in r.path and r.path.endswith("/" + path)]


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"  # keep-alive, as the client expects; every answer has a Content-Length
    timeout = 10  # a stuck client cannot hold a server thread for longer

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        """Quiet: the test reads hub.log instead."""

    def do_HEAD(self) -> None:
        self._route(body=False)

    def do_GET(self) -> None:
        self._route(body=True)

    def _route(self, body: bool) -> None:
        url = urlsplit(self.path)
        path = unquote(url.path)
        self.hub.log.append(Request(self.command, path, self.headers.get("Range"), self.headers.get("Authorization")))
        if m := TREE.match(path):
            repo = self._repo(m["repo"], m["rev"])
            if repo:
                recursive = parse_qs(url.query).get("recursive", ["false"])[0].lower() == "true"
                self._json(self._tree(repo, m["path"] or "", recursive), body)
        elif m := API.match(path):
            repo = self._repo(m["repo"], m["rev"] or "main")
            if repo:
                info = {"id": repo.repo_id, "modelId": repo.repo_id, "sha": repo.commit, "private": False,
                        "siblings": [repo.sibling(p) for p in sorted(repo.files)]}
                self._json(info, body)
        elif m := RESOLVE.match(path):
            repo = self._repo(m["repo"], m["rev"])
            if repo:
                self._file(repo, m["path"], body)
        else:
            self._error(404, "NotFound")

    def _repo(self, repo_id: str, rev: str) -> Repo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound")
        elif repo_id in self.hub.gated and not self.headers.get("Authorization"):
            self._error(401, "GatedRepo", repo)  # what the hub answers for a gated repo (FLUX.1-dev) without a token
        elif rev not in ("main", repo.commit):
            self._error(404, "RevisionNotFound", repo)
        else:
            return repo
        return None

    def _tree(self, repo: Repo, root: str, recursive: bool) -> list[dict]:
        prefix = f"{root.strip('/')}/" if root.strip("/") else ""
        entries, folders = [], set()
        for path in sorted(repo.files):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix):]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/")[0])
                continue
            folders.update(prefix + "/".join(rest.split("/")[: i + 1]) for i in range(rest.count("/")))
            s = repo.sibling(path)
            entry = {"type": "file", "path": path, "size": s["size"], "oid": s["blobId"]}
            if "lfs" in s:
                entry["lfs"] = {"oid": s["lfs"]["sha256"], "size": s["size"], "pointerSize": 134}
            entries.append(entry)
        return [{"type": "directory", "path": f, "oid": "0" * 40, "size": 0} for f in sorted(folders)] + entries

    def _file(self, repo: Repo, path: str, body: bool) -> None:
        if path not in repo.files:
            self._error(404, "EntryNotFound", repo)
            return
        if body and path in self.hub.fail:
            self._error(self.hub.fail[path], "ServerError", repo)
            return
        data = repo.files[path]
        true_sha256 = hashlib.sha256(data).hexdigest()
        if path in self.hub.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        start = 0
        if rng := re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or ""):
            start = int(rng[1])
        self.send_response(206 if start else 200)
        self.send_header("X-Repo-Commit", repo.commit)
        self.send_header("ETag", f'"{git_blob_sha1(repo.files[path])}"')
        if repo.is_lfs(path):
            self.send_header("X-Linked-Etag", f'"{true_sha256}"')
            self.send_header("X-Linked-Size", str(len(data)))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        if not body:
            return
        if path in self.hub.cut_once:
            self.hub.cut_once.discard(path)
            self.wfile.write(data[start: start + (len(data) - start) // 2])
            self.wfile.flush()
            # Drop the connection mid-body, as a flaky network does: the client sees a short read.
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        self.wfile.write(data[start:])

    def _json(self, value: object, body: bool) -> None:
        payload = json.dumps(value).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if body:
            self.wfile.write(payload)

    def _error(self, status: int, code: str, repo: Repo | None = None) -> None:
        payload = json.dumps({"error": code}).encode()
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        if repo is not None:
            self.send_header("X-Repo-Commit", repo.commit)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)


# --- fixtures (import them into a test module to use them) ----------------------------------------------------------

# Files a real repo has beside the model, which qimg must not fetch.
EXTRA_FILES = {
    "README.md": b"# tiny\n",
    "assets/example.png": b"\x89PNG\r\n\x1a\n" + b"\0" * 64,
    "transformer/diffusion_pytorch_model.bin": b"pickled weights qimg never unpickles",
    "text_encoder/pytorch_model.pt": b"more pickles",
}


def go_online(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    """Undo the suite's offline default for one test, with every request going to `url` (127.0.0.1)."""
    import huggingface_hub.constants as hf_constants

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", url)
    # huggingface_hub read these at import: its offline switch, and the telemetry setting of its user-agent code,
    # which would otherwise fetch a registry from huggingface.co on its own.
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_TELEMETRY", True)
    # And a guard: a request for any other host fails at once instead of reaching out.
    refuse_other_hosts(monkeypatch)
    # Small read chunks, so that a transfer cut half-way has written most of what it received (the default, 10 MB,
    # is larger than these tiny files: a cut would then lose everything and resuming would be invisible).
    monkeypatch.setattr(hf_constants, "DOWNLOAD_CHUNK_SIZE", 16 * 1024)


@pytest.fixture(scope="session")
def tiny_qwen_repo(tiny_qwen: Path) -> Repo:
    """The tiny Qwen-Image folder as the hub would hold it under Qwen/Qwen-Image (read once)."""
    files = {p.relative_to(tiny_qwen).as_posix(): p.read_bytes() for p in sorted(tiny_qwen.rglob("*")) if p.is_file()}
    return Repo("Qwen/Qwen-Image", {**files, **EXTRA_FILES})


@pytest.fixture
def hf_hub(tiny_qwen_repo: Repo, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    """A running local hub serving Qwen/Qwen-Image, with HF_ENDPOINT pointing at it and offline mode off."""
    server = HubServer(repos={tiny_qwen_repo.repo_id: tiny_qwen_repo}).start()
    go_online(monkeypatch, server.url)
    try:
        yield server
    finally:
        server.stop()


def refuse_other_hosts(monkeypatch) -> None:
    """A guard: a lookup of any host but this machine fails at once instead of reaching out."""
    real_getaddrinfo = socket.getaddrinfo

    def local_only(host: str, *args: object, **kwargs: object) -> list:
        if host not in ("127.0.0.1", "localhost"):
            raise OSError(f"test tried to reach {host}")
        return real_getaddrinfo(host, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", local_only)


# A LoRA repo as lightx2v/Qwen-Image-Lightning is laid out: several variants, a pickle twin, a README; plus a
# subfolder, and a repo holding a single LoRA.
LIGHTNING = "lightx2v/Qwen-Image-Lightning"
EIGHT_STEPS = "Qwen-Image-Lightning-8steps-V1.0.safetensors"
FOUR_STEPS = "Qwen-Image-Lightning-4steps-V1.0.safetensors"
NESTED = "sub/dir/style.safetensors"
SINGLE = "someone/one-lora"
LORA_REPOS = {
    LIGHTNING: {EIGHT_STEPS: b"8" * 3000, FOUR_STEPS: b"4" * 2000, NESTED: b"s" * 500,
                "Qwen-Image-Lightning-8steps-V1.0.bin": b"a pickle qimg never fetches", "README.md": b"# lightning\n"},
    SINGLE: {"one.safetensors": b"1" * 1000, "README.md": b"# one\n"},
}


@pytest.fixture
def lora_hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    """A running local hub serving the LoRA repos (no model: nothing to build), HF_ENDPOINT pointing at it."""
    server = HubServer(repos={name: Repo(name, files) for name, files in LORA_REPOS.items()}).start()
    go_online(monkeypatch, server.url)
    try:
        yield server
    finally:
        server.stop()
