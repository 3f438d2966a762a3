"""Parallel safetensors reads straight into their destination: GPU memory through small pinned buffers, or host
memory directly, with no whole-file host copy in between.

A cron job loading 57 GB pays for every pass over those bytes. safetensors' get_tensor copies each tensor from the
memory-mapped file into a new host tensor, and .to("cuda") then copies it again through the driver's own staging,
one tensor at a time (measured: ~2 GB/s from a warm page cache on an H200 host). Here worker threads pread file
ranges into per-thread pinned buffers and copy each chunk to the GPU on the thread's own stream while the next
chunk is read; host-bound loads pread straight into the destination tensor. The file header is parsed once per
file (the safetensors layout: an 8-byte little-endian header length, a JSON header, then the raw data).
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import sys
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from qimg.errors import CheckpointError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
CHUNK = 32 * 2**20  # bytes per pinned buffer: large enough for full-speed copies, small enough to stay cheap
THREADS = 8
# CPython's default thread switch interval, and the one qimg's loads run with
DEFAULT_SWITCH_INTERVAL, SWITCH_INTERVAL = 0.005, 0.0001


def quick_thread_handoff() -> None:
    """Let a thread that wants the GIL back get it within 0.1 ms instead of CPython's default 5 ms, unless the
    program chose its own interval.

    Every torch call releases the GIL while it runs and takes it back after. While another thread runs Python
    (transformers' imports and tokenizer parsing on the text encoder's loading thread, the readers' loops), each
    take-back waits for that thread's interval to run out: a block's FP8 quantisation (a few hundred small calls)
    then waited seconds for the GIL. Measured on an H200 host: 16 s of a 37 s load; on a 2-core CPU, 2000 rounds
    of four small ops took 12.0 s beside a Python loop with the default interval and 0.30 s with 0.1 ms.
    Process-wide, so qimg sets it when it starts its loading threads and leaves it set."""
    if sys.getswitchinterval() == DEFAULT_SWITCH_INTERVAL:
        sys.setswitchinterval(SWITCH_INTERVAL)


@dataclass(frozen=True)
class Entry:
    """Where one stored tensor's bytes are: file, absolute byte range, dtype and shape."""

    path: Path
    start: int
    end: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def file_entries(path: Path) -> dict[str, Entry]:
    """Stored key -> Entry, from one safetensors file's header."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
            size = os.fstat(f.fileno()).st_size
    except (OSError, ValueError, struct.error) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e})", hint="re-download it") from e
    base = 8 + n
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            begin, end = (int(v) for v in info["data_offsets"])
            dtype, shape = DTYPES[info["dtype"]], tuple(int(s) for s in info["shape"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: tensor {key[:80]!r} has an unreadable header entry ({e})",
                                  hint="re-download it") from e
        if not 0 <= begin <= end <= size - base:
            raise CheckpointError(f"{path}: tensor {key[:80]!r} lies past the end of the file (truncated?)",
                                  hint="re-download it")
        out[key] = Entry(path, base + begin, base + end, dtype, shape)
    return out


class Reader:
    """Reads Entries into tensors on `device` with a pool of threads; use as a context manager.

    submit(entries) starts reads and returns futures at once, so the caller can prepare the next group of tensors
    while it works on this one. A GPU read's result is safe to use on the caller's current stream (the copies are
    ordered before it through an event).
    """

    def __init__(self, device: torch.device | str, threads: int = THREADS, chunk: int = CHUNK,
                 staged: bool | None = None) -> None:
        quick_thread_handoff()
        self.device = torch.device(device)
        self.chunk = chunk
        # staged: through per-thread buffers (pinned, on a GPU); a host destination is read into directly
        self.staged = self.device.type == "cuda" if staged is None else staged
        self.cuda = self.device.type == "cuda"
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="qimg-read")
        self.local = threading.local()
        self.fds: dict[Path, int] = {}
        self.lock = threading.Lock()
        # the stream results are used on, captured here: worker threads start on the default stream
        self.consumer = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def _fd(self, path: Path) -> int:
        with self.lock:
            if path not in self.fds:
                self.fds[path] = os.open(path, os.O_RDONLY)
            return self.fds[path]

    def submit(self, entries: Iterable[Entry]) -> list[Future[Tensor]]:
        return [self.pool.submit(self._read, e) for e in entries]

    def read(self, entries: Sequence[Entry]) -> list[Tensor]:
        return [f.result() for f in self.submit(entries)]

    def _pread_into(self, fd: int, view: memoryview, offset: int) -> None:
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                raise CheckpointError(f"a weights file ended early at byte {offset + done} (truncated?)",
                                      hint="re-download the model")
            done += n

    def _read(self, e: Entry) -> Tensor:
        nbytes = e.end - e.start
        fd = self._fd(e.path)
        # On a GPU this thread's current stream is the default one: allocating here, not under the copy stream,
        # lets the caching allocator order the memory's reuse after the consumer's work.
        flat = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        if not self.staged:
            if nbytes:
                self._pread_into(fd, memoryview(flat.numpy()).cast("B"), e.start)
            return flat.view(e.dtype).reshape(e.shape)
        state = self._thread_state()
        with torch.cuda.stream(state.stream) if self.cuda else contextlib.nullcontext():
            for i, at in enumerate(range(0, nbytes, self.chunk)):
                n = min(self.chunk, nbytes - at)
                slot = i % 2
                if self.cuda:
                    state.events[slot].synchronize()  # the copy that last read this buffer has finished
                buf = state.buffers[slot]
                self._pread_into(fd, memoryview(buf.numpy()).cast("B")[:n], e.start + at)
                flat[at : at + n].copy_(buf[:n], non_blocking=self.cuda)
                if self.cuda:
                    state.events[slot].record(state.stream)
            if self.cuda:
                done = torch.cuda.Event()
                done.record(state.stream)
                self.consumer.wait_event(done)  # type: ignore[union-attr]
        return flat.view(e.dtype).reshape(e.shape)

    def _thread_state(self) -> threading.local:
        state = self.local
        if not hasattr(state, "buffers"):
            state.buffers = [torch.empty(self.chunk, dtype=torch.uint8, pin_memory=self.cuda) for _ in range(2)]
            if self.cuda:
                state.stream = torch.cuda.Stream(self.device)
                state.events = [torch.cuda.Event() for _ in range(2)]
                for ev in state.events:
                    ev.record(state.stream)
        return state
