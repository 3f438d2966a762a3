"""`qimg generate --prompts FILE --gpus N`: the same command as N processes started by torch's own launcher,
`python -m torch.distributed.run --standalone --nproc-per-node N -m qimg ...` (torchrun), one per GPU; each
process finds its rank in the environment torchrun sets (qimg/runtime/distributed.py). Several machines: run
torchrun itself with its rendezvous flags. Torch-free until called.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence


def gpu_count() -> int:
    """CUDA devices this process can see."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def without_option(argv: Sequence[str], name: str) -> list[str]:
    """argv without `name VALUE` / `name=VALUE` (the launcher must not start launchers)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(name + "="):
            out.append(arg)
    return out


def launch_ranks(count: int, argv: Sequence[str], *, python: str | None = None) -> int:
    """Run `qimg ARGV` as `count` torchrun processes on this machine; returns the exit code for the shell: 130
    when interrupted (SIGINT or SIGTERM, which torchrun passes to every rank: each stops between images, leaving
    only complete files), else torchrun's."""
    cmd = [python or sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={count}",
           "-m", "qimg", *argv]
    env = dict(os.environ)
    # torchrun sets 1 and says so on stderr when unset; a share of the cores is the same intent, quietly
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // count)))
    proc = subprocess.Popen(cmd, env=env)
    interrupted = False

    def forward(signum: int, frame: object) -> None:
        nonlocal interrupted
        interrupted = True
        if signum == signal.SIGTERM and proc.poll() is None:
            proc.send_signal(signum)

    # Ctrl-C reaches torchrun and every rank through the terminal's process group (a second SIGINT would cut
    # torchrun's own shutdown short, so it is not sent again); a SIGTERM sent to this process alone (a cron
    # timeout) is handed on. Either way this process waits for the ranks to stop.
    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if interrupted:
        return 130
    return 128 - code if code < 0 else code
