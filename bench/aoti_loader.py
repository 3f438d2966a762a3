"""Does torch's AOTInductor package loader run a CUDA package on this machine? One Linear + GELU, exported and
packaged once, then loaded in child processes four ways (torch._inductor.aoti_load_package; the C++ loader with
device index -1 and 0; after CUDA is initialised). Each child prints "ok" and the largest difference from eager,
or dies; the parent prints each child's exit code. qimg's loader_works (runtime/packaged.py) makes the same
check, once per GPU model and torch version, before --compile uses packages.

    python -X faulthandler bench/aoti_loader.py build
"""

from __future__ import annotations

import faulthandler
import subprocess
import sys

import torch

PACKAGE = "/tmp/aoti_loader_m.pt2"
WAYS = ("official", "raw-1", "raw0", "raw0-after-cuda-init")


def main() -> None:
    faulthandler.enable()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU()).to(dev, torch.bfloat16).eval()
    x = torch.randn(8, 64, device=dev, dtype=torch.bfloat16)
    how = sys.argv[1]
    if how == "build":
        with torch.no_grad():
            program = torch.export.export(m, (x,), strict=False)
            path = torch._inductor.aoti_compile_and_package(program, package_path=PACKAGE)
        print("built", path, flush=True)
        for way in WAYS:
            done = subprocess.run([sys.executable, "-X", "faulthandler", __file__, way], capture_output=True,
                                  text=True)
            tail = done.stderr.strip().splitlines()[-3:] if done.returncode else ""
            print(way, "rc", done.returncode, done.stdout.strip()[-300:], tail, flush=True)
        return
    if how == "official":
        out = torch._inductor.aoti_load_package(PACKAGE)(x)
    else:
        if how == "raw0-after-cuda-init":
            torch.cuda.init()
            torch.empty(1, device=dev)
        runner = torch._C._aoti.AOTIModelPackageLoader(PACKAGE, "model", False, 1, -1 if how == "raw-1" else 0)
        out = runner.run([x])[0]
    torch.cuda.synchronize()
    with torch.no_grad():
        print("ok", (out - m(x)).abs().max().item())


if __name__ == "__main__":
    main()
