"""Writing that survives interruption, for long runs: SIGINT and SIGTERM as KeyboardInterrupt with sections that
defer them, an append-only manifest whose lines are whole or absent, a lock so that two batches never write into
one folder, and the removal of temporaries that a killed run (SIGKILL, power loss) left behind.

Nothing here acts on import: handlers are installed by catch_signals for the span of a with-block only.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from qimg.errors import OutputError

try:
    import fcntl
except ImportError:  # Windows: no flock; folders and manifests go unlocked
    fcntl = None  # type: ignore[assignment]


class _Deferral:
    """How deep we are in deferred_signals sections, and the signal that arrived meanwhile (if any)."""

    depth = 0
    pending: int | None = None
    received: int | None = None  # the last signal caught in the current catch_signals block


_DEFER = _Deferral()
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _interrupt(signum: int, frame: Any) -> None:
    _DEFER.received = signum
    if _DEFER.depth:
        _DEFER.pending = signum  # raised when the section ends
        return
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextmanager
def catch_signals() -> Iterator[None]:
    """Inside the block, SIGTERM behaves like Ctrl-C (KeyboardInterrupt, so every `finally` and temporary-file
    cleanup runs; a bare SIGTERM would kill the process mid-write), and both wait for deferred_signals
    sections to end. The previous handlers come back afterwards. Off the main thread, where Python cannot set
    handlers, it does nothing.

    An interrupt raised inside native code can come back out as another error (safetensors' reader turns it
    into a ValueError about an UntypedStorage); an error leaving the block after a signal arrived is therefore
    re-raised as the interrupt, so the run still ends as interrupted (exit 130), not as a damaged file."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in _SIGNALS}
    for sig in _SIGNALS:
        signal.signal(sig, _interrupt)
    _DEFER.received = None
    try:
        yield
    except Exception as exc:
        if _DEFER.received is None:
            raise
        raise KeyboardInterrupt(signal.Signals(_DEFER.received).name) from exc
    finally:
        _DEFER.received = None
        for sig, handler in previous.items():
            # None: a handler set outside Python; the default is the closest we can restore.
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


@contextmanager
def deferred_signals() -> Iterator[None]:
    """A section that an interrupt may not split (a PNG and its manifest line): a SIGINT or SIGTERM arriving
    inside raises KeyboardInterrupt once the section is over. Effective inside catch_signals."""
    _DEFER.depth += 1
    try:
        yield
    finally:
        _DEFER.depth -= 1
        if not _DEFER.depth and _DEFER.pending is not None:
            signum, _DEFER.pending = _DEFER.pending, None
            raise KeyboardInterrupt(signal.Signals(signum).name)


@contextmanager
def folder_lock(folder: Path, *, create: bool) -> Iterator[None]:
    """Hold an exclusive lock on `folder` (created first when `create`), so that a second batch started by
    an overlapping cron job fails at once instead of interleaving writes. flock on the folder itself: no
    lock file to leave behind, and the kernel drops it when the process dies."""
    if create:
        try:
            folder.mkdir(exist_ok=True)
        except OSError as e:
            raise OutputError(f"cannot create the output folder {folder} ({e.strerror})") from e
    if fcntl is None or not folder.is_dir():
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputError(
                f"another qimg batch is writing into {folder}", hint="wait for it to end, or use another -o folder"
            ) from None
        except OSError:
            pass  # a filesystem without flock (some network mounts): run unlocked rather than not at all
        yield
    finally:
        os.close(fd)  # releases the lock


def remove_stale_temporaries(folder: Path, names: Iterable[str]) -> None:
    """Delete the temporaries (.NAME.*.tmp, see png.save_png) of these outputs that a killed run left; only
    call this under folder_lock, where no other writer can own them."""
    if not folder.is_dir():
        return
    for name in names:
        for tmp in folder.glob(f".{glob.escape(name)}.*.tmp"):
            tmp.unlink(missing_ok=True)


def append_manifest(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line to `path`, whole or not at all: written with O_APPEND, fsynced, and cut back if
    the write fails halfway (disk full). A torn last line left by a killed process is cut off first, so every
    line of the file parses."""
    data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        if fcntl is not None:  # processes of one batch (torchrun ranks) append to one manifest: one at a time
            fcntl.flock(fd, fcntl.LOCK_EX)
        end = _drop_torn_tail(fd)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except BaseException:
            os.ftruncate(fd, end)
            raise
    finally:
        os.close(fd)


def _drop_torn_tail(fd: int) -> int:
    """Size of the file after removing an unterminated last line."""
    size = os.fstat(fd).st_size
    if size == 0:
        return 0
    os.lseek(fd, size - 1, os.SEEK_SET)
    if os.read(fd, 1) == b"\n":
        return size
    os.lseek(fd, 0, os.SEEK_SET)
    content = b""
    while len(content) < size:
        chunk = os.read(fd, size - len(content))
        if not chunk:
            break
        content += chunk
    end = content.rfind(b"\n") + 1
    os.ftruncate(fd, end)
    return end
