"""What a new process pays to run an already-compiled Qwen-Image block, three ways, each in its own new process:

- trace: what `--compile` does today (regional torch.compile; the second process finds inductor's cache warm but
  still imports torch.compile's machinery and traces the block with dynamo);
- dynamo-aot: dynamo's experimental precompile (`torch.compile(fn).aot_compile`, saved and loaded back with
  `torch.compiler.load_compiled_function`);
- aoti: an AOTInductor package (`torch.export` + `aoti_compile_and_package`) of the block with its weights as
  inputs, so one package serves every block, loaded with torch's C++ loader (`torch._C._aoti.AOTIModelPackageLoader`).

Each row: seconds to import torch and build the blocks, to set the compiled form up, for the first call of three
blocks (different weights), the steady time per block call, the largest difference from eager, and whether
torch._dynamo / torch._inductor were imported. The fused Triton kernels are off (QIMG_FUSED_KERNELS=0): they are
custom ops, which an AOTInductor package would call back through Python.

    python bench/compile_reuse.py --out bench/results/compile_reuse_cpu.json                 # tiny block, CPU
    python bench/compile_reuse.py --device cuda --full --out bench/results/compile_reuse_h200.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FULL = {"dim": 3072, "heads": 24, "head_dim": 128, "image_tokens": 4096, "text_tokens": 128}
TINY = {"dim": 256, "heads": 4, "head_dim": 64, "image_tokens": 256, "text_tokens": 16}


def child(mode: str, device: str, dims: dict[str, int], work: Path) -> dict:
    t0 = time.perf_counter()
    import torch
    from torch.func import functional_call

    from qimg.nets.qwen_mmdit import QwenBlock

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    dim, li, lt = dims["dim"], dims["image_tokens"], dims["text_tokens"]
    with torch.device(device):
        blocks = [QwenBlock(dim, dims["heads"], dims["head_dim"]).to(dtype).eval() for _ in range(3)]
        x, c, temb = (torch.randn(1, li, dim, dtype=dtype), torch.randn(1, lt, dim, dtype=dtype),
                      torch.randn(1, dim, dtype=dtype))
        rope = torch.polar(torch.ones(lt + li, dims["head_dim"] // 2), torch.randn(lt + li, dims["head_dim"] // 2))
    cs = torch.view_as_real(rope)
    names = [n for n, _ in blocks[0].named_parameters()]
    weights = [[p.detach() for p in b.parameters()] for b in blocks]
    with torch.no_grad():
        want = [b(x, c, temb, rope, None) for b in blocks]
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(work / "inductor")
    os.environ["TRITON_CACHE_DIR"] = str(work / "triton")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t1 = time.perf_counter()

    class Functional(torch.nn.Module):
        def __init__(self, block: torch.nn.Module) -> None:
            super().__init__()
            self.block = block

        def forward(self, x, c, temb, cs, *weights):  # noqa: ANN001, ANN202
            return functional_call(self.block, dict(zip(names, weights, strict=True)),
                                   (x, c, temb, torch.view_as_complex(cs), None))

    def run(block, *args):  # noqa: ANN001, ANN202
        return block(*args)

    package, saved = work / "block.pt2", work / "block.dynamo"
    with torch.no_grad():
        if mode == "trace":
            for b in blocks:
                b.compile(fullgraph=True)
            call = lambda i: blocks[i](x, c, temb, rope, None)  # noqa: E731
        elif mode == "dynamo-aot-save":
            torch._dynamo.config.enable_aot_compile = True
            compiled = torch.compile(run, fullgraph=True).aot_compile(((blocks[0], x, c, temb, rope, None), {}))
            compiled.save_compiled_function(str(saved))
            call = lambda i: compiled(blocks[i], x, c, temb, rope, None)  # noqa: E731
        elif mode == "dynamo-aot-load":
            with open(saved, "rb") as f:
                compiled = torch.compiler.load_compiled_function(f)
            call = lambda i: compiled(blocks[i], x, c, temb, rope, None)  # noqa: E731
        elif mode == "aoti-save":
            exported = torch.export.export(Functional(blocks[0]), (x, c, temb, cs, *weights[0]))
            torch._inductor.aoti_compile_and_package(exported, package_path=str(package))
            mode_loader = torch._C._aoti.AOTIModelPackageLoader(str(package), "model", False, 1, -1)
            call = lambda i: mode_loader.run([x, c, temb, cs, *weights[i]])  # noqa: E731
        elif mode == "aoti-load":
            loader = torch._C._aoti.AOTIModelPackageLoader(str(package), "model", False, 1, -1)
            call = lambda i: loader.run([x, c, temb, cs, *weights[i]])  # noqa: E731
        else:
            raise SystemExit(f"unknown mode {mode}")
        sync()
        t2 = time.perf_counter()
        got = [call(i) for i in range(3)]
        sync()
        t3 = time.perf_counter()
        for _ in range(3):
            for i in range(3):
                call(i)
        sync()
        steady = (time.perf_counter() - t3) / 9
    err = max(float((g.float() - w.float()).abs().max()) for gg, ww in zip(got, want, strict=True)
              for g, w in zip(gg, ww, strict=True))
    return {"mode": mode, "import_and_build_s": round(t1 - t0, 3), "setup_s": round(t2 - t1, 3),
            "first_calls_s": round(t3 - t2, 3), "steady_ms_per_block": round(steady * 1e3, 3),
            "max_abs_diff_vs_eager": err, "imported_dynamo": "torch._dynamo" in sys.modules,
            "imported_inductor": "torch._inductor" in sys.modules}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--full", action="store_true", help="the released model's block width and a 1024x1024 image")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    dims = FULL if args.full else TINY
    if args.child:
        print(json.dumps(child(args.child, args.device, dims, args.work)))
        return
    work = Path(tempfile.mkdtemp())
    env = {**os.environ, "QIMG_FUSED_KERNELS": "0", "PYTHONPATH": str(ROOT)}
    rows = []
    for mode in ("trace", "trace", "dynamo-aot-save", "dynamo-aot-load", "dynamo-aot-load", "aoti-save",
                 "aoti-load", "aoti-load"):
        started = time.perf_counter()
        done = subprocess.run([sys.executable, __file__, "--child", mode, "--device", args.device, "--work",
                               str(work), *(["--full"] if args.full else [])], capture_output=True, text=True,
                              env=env)
        wall = round(time.perf_counter() - started, 3)
        row = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else {
            "mode": mode, "error": done.stderr[-1500:]}
        row["process_wall_s"] = wall
        rows.append(row)
        print(json.dumps(row), flush=True)
    import torch

    report = {"bench": "compile_reuse", "device": torch.cuda.get_device_name() if args.device == "cuda"
              else f"cpu ({os.cpu_count()} cores)", "torch": torch.__version__, "dims": dims,
              "command": " ".join(["python", *sys.argv]),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "rows": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
