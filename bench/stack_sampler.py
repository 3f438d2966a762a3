"""Where a qimg command's wall clock goes, every thread at once: a sampling profiler for machines without py-spy or
perf (the GPU machine has neither).

    python bench/stack_sampler.py --out FILE.json [--every-ms 5] -- -m qimg generate "a prompt" -o out.png ...

Runs the module in this process with a thread that reads every thread's Python stack each few milliseconds
(sys._current_frames). Each sample is weighted by the time since the one before, so a call that holds the GIL
(and so delays the sampler) is still charged its full time. The JSON, written at exit (qimg leaves through
os._exit after the atexit handlers), has per thread: the seconds under each function (cumulative, a function
counted once per sample however deep its recursion), the seconds in each innermost frame (self), and a timeline
of the main thread's innermost qimg frame per half second.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import datetime
import json
import runpy
import sys
import threading
import time
from pathlib import Path
from types import FrameType


def _where(frame: FrameType) -> str:
    code = frame.f_code
    path = code.co_filename
    for marker in ("/qimg/", "/torch/", "/transformers/", "/safetensors/", "/bench/", "/concurrent/", "/threading"):
        at = path.rfind(marker)
        if at >= 0:
            path = path[at + 1:]
            break
    else:
        path = Path(path).name
    return f"{path}:{code.co_name}"


class Sampler(threading.Thread):
    def __init__(self, every: float) -> None:
        super().__init__(name="stack-sampler", daemon=True)
        self.every = every
        self.cumulative: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        self.leaf: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        self.timeline: list[tuple[float, str]] = []
        self.started = time.perf_counter()
        self.stopped = threading.Event()
        self.argv = list(sys.argv)

    def run(self) -> None:
        last = time.perf_counter()
        me = threading.get_ident()
        while not self.stopped.is_set():
            time.sleep(self.every)
            now = time.perf_counter()
            weight, last = now - last, now
            names = {t.ident: t.name for t in threading.enumerate()}
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                thread = names.get(ident, str(ident))
                if thread.startswith("qimg-read"):
                    thread = "qimg-read (all)"
                seen: set[str] = set()
                inner_qimg = None
                f: FrameType | None = frame
                leaf = _where(frame)
                while f is not None:
                    where = _where(f)
                    if inner_qimg is None and where.startswith("qimg/"):
                        inner_qimg = where
                    if where not in seen:
                        seen.add(where)
                        self.cumulative[thread][where] += weight
                    f = f.f_back
                self.leaf[thread][leaf] += weight
                if thread == "MainThread":
                    self.timeline.append((now - self.started, inner_qimg or leaf))

    def report(self) -> dict:
        half = collections.OrderedDict()
        for t, where in self.timeline:
            half.setdefault(round(t * 2) / 2, collections.Counter())[where] += 1
        return {
            "command": " ".join(["python", *self.argv]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "seconds_sampled": round(time.perf_counter() - self.started, 2),
            "threads": {
                name: {
                    "cumulative_s": {k: round(v, 3) for k, v in self.cumulative[name].most_common(80)},
                    "self_s": {k: round(v, 3) for k, v in self.leaf[name].most_common(30)},
                }
                for name in self.cumulative
            },
            "main_timeline": {f"{t:.1f}": c.most_common(1)[0][0] for t, c in half.items()},
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--every-ms", type=float, default=5.0)
    ap.add_argument("rest", nargs=argparse.REMAINDER, help="-- -m MODULE ARGS...")
    args = ap.parse_args()
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    if rest[:1] != ["-m"] or len(rest) < 2:
        ap.error("give the command as: -- -m MODULE ARGS...")
    sampler = Sampler(args.every_ms / 1000)

    def dump() -> None:
        sampler.stopped.set()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(sampler.report(), indent=1) + "\n")

    atexit.register(dump)
    sampler.start()
    sys.argv = [rest[1], *rest[2:]]
    runpy.run_module(rest[1], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
