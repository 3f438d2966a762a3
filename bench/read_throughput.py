"""How fast this machine moves safetensors bytes from the page cache, the floor under a model's load time.

    python bench/read_throughput.py --folder /tmp/qwen/transformer --out FILE.json [--threads 1,4,8,16]

Rows: (1) pread of every file into a per-thread host buffer with T threads (the page cache alone), and once into
fresh host memory for every piece (what first-touching anonymous memory costs on top); (2) qimg's
Reader (loading/reader.py) moving every tensor of the folder to the GPU with T threads (page cache, pinned staging,
host-to-device copy), each tensor freed once read; (3) one pinned host-to-device copy of 1 GiB (the link alone).
Every row reports GB/s over the bytes it moved. The first pass over the files warms the page cache and is
reported apart.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qimg.loading.reader import Reader, file_entries  # noqa: E402


def pread_all(files: list[Path], threads: int, chunk: int = 64 * 2**20, fresh: bool = False) -> tuple[int, float]:
    """pread every file in `chunk` pieces on `threads` threads, each into its own reused buffer, or (fresh) into a
    new buffer per piece: fresh anonymous memory, whose first touch this machine's VM makes slow."""
    jobs = []
    for path in files:
        size = path.stat().st_size
        jobs += [(path, at, min(chunk, size - at)) for at in range(0, size, chunk)]
    local = threading.local()

    def one(job: tuple[Path, int, int]) -> int:
        path, at, n = job
        if fresh or not hasattr(local, "buf"):
            local.buf = bytearray(chunk)
        fd = os.open(path, os.O_RDONLY)
        try:
            return os.preadv(fd, [memoryview(local.buf)[:n]], at)
        finally:
            os.close(fd)

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        total = sum(pool.map(one, jobs))
    return total, time.perf_counter() - started


def reader_all(files: list[Path], threads: int) -> tuple[int, float]:
    entries = [e for path in files for e in file_entries(path).values()]
    total = sum(e.end - e.start for e in entries)
    torch.cuda.synchronize()
    started = time.perf_counter()
    with Reader("cuda", threads=threads) as reader:
        for i in range(0, len(entries), 64):  # about a block's worth at a time, freed as it goes
            out = reader.read(entries[i : i + 64])
            del out
        torch.cuda.synchronize()
    return total, time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--threads", default="1,4,8,16")
    args = ap.parse_args()
    files = sorted(args.folder.glob("*.safetensors"))
    counts = [int(t) for t in args.threads.split(",")]
    rows: dict[str, dict] = {}

    def row(name: str, moved: int, seconds: float) -> None:
        rows[name] = {"gb": round(moved / 1e9, 2), "s": round(seconds, 3), "gb_per_s": round(moved / 1e9 / seconds, 2)}
        print(name, rows[name], flush=True)

    row("pread first pass, 16 threads", *pread_all(files, 16))
    for t in counts:
        row(f"pread, {t} threads", *pread_all(files, t))
    row("pread into fresh host memory per 64 MiB, 8 threads", *pread_all(files, 8, fresh=True))
    if torch.cuda.is_available():
        for t in counts:
            row(f"Reader to GPU, {t} threads", *reader_all(files, t))
        host = torch.empty(2**30, dtype=torch.uint8, pin_memory=True)
        dev = torch.empty_like(host, device="cuda")
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(4):
            dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        row("pinned host-to-device copy, 4 x 1 GiB", 4 * 2**30, time.perf_counter() - started)
    report = {"bench": "read_throughput", "folder": str(args.folder), "files": len(files),
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "cpus": os.cpu_count(), "command": " ".join(["python", *sys.argv]),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
