"""Qwen-Image VAE decode/encode: qimg vs diffusers in one process, on the same random full-size weights (bf16, CUDA).

diffusers' AutoencoderKLQwenImage is built and randomised; qimg's 2-D QwenVAE is loaded from its state dict
through the loader's key transform (qimg/loading/keymaps.py), so both run the same weights.

    python bench/vae.py --out bench/results/vae_h100.json
    python bench/vae.py --tiny --out /tmp/vae_tiny.json     # CPU smoke check: tiny config, small images

Reports per configuration the median ms (CUDA events, after warm-up) and the peak
torch.cuda.max_memory_reserved (reset, after empty_cache, before each measurement; both models' weights
stay resident throughout, so every peak includes them): decode and encode at 1024x1024, qimg's tiled decode
at 2048x2048 and 4096x4096 (diffusers with enable_tiling() beside it), and qimg variants applied from outside
the net: channels_last memory format, cudnn.benchmark (switched on around the measured calls only) and
torch.compile of the decoder.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import time_ms  # noqa: E402
from qimg.loading.checkpoint import params_from_config  # noqa: E402
from qimg.loading.keymaps import QWEN_VAE_CONFIG, QWEN_VAE_CONFIG_IGNORED, qwen_vae_tensor  # noqa: E402
from qimg.nets.qwen_vae import QwenVAE  # noqa: E402
from qimg.runtime.tiling import Tiling, decode_tiled, encode_tiled  # noqa: E402
from qimg.specs import QwenVAEParams  # noqa: E402

TINY = dict(base_dim=16, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, attn_scales=[],
            temperal_downsample=[False, True, True])  # tests/fixtures.py TINY_VAE


def measure(fn: Callable[[], object], warmup: int, repeats: int, cuda: bool) -> dict:
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times = time_ms(fn, warmup, repeats)
    row = {"median_ms": round(statistics.median(times), 2), "min_ms": round(min(times), 2), "repeats": repeats}
    if cuda:
        row["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
        row["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return row


@contextlib.contextmanager
def cudnn_benchmark(on: bool) -> Iterator[None]:
    """cudnn autotuning for the calls inside only (it is process-global state)."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = on
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


@torch.no_grad()
def randomize(module: torch.nn.Module, seed: int) -> None:
    """Random everywhere (diffusers zero-initialises some layers): gains 1 + noise, weights noise / sqrt(fan_in)."""
    gen = torch.Generator(next(module.parameters()).device).manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=gen, device=p.device, dtype=torch.float32)
        if name.endswith("gamma"):
            p.copy_(1.0 + 0.1 * noise)
        elif p.ndim >= 2:
            p.copy_(noise / math.sqrt(math.prod(p.shape[1:])))
        else:
            p.copy_(0.1 * noise)


def lean_norms(vae: torch.nn.Module) -> torch.nn.Module:
    """Swap every ChannelRMSNorm's forward for one pass that never materialises an fp32 copy of x: the fp32
    norm is reduced straight from bf16, the scale folded into it. Rounds differently from diffusers (one bf16
    rounding fewer), so it is an opt-in trade measured here, not the default."""
    from qimg.nets.qwen_vae import ChannelRMSNorm

    def forward(self: ChannelRMSNorm, x: torch.Tensor) -> torch.Tensor:
        n = torch.linalg.vector_norm(x, dim=1, keepdim=True, dtype=torch.float32)  # (B, 1, H, W)
        return x * (self.scale / n.clamp_min(1e-12)).to(x.dtype) * self.gamma

    for module in vae.modules():
        if isinstance(module, ChannelRMSNorm):
            module.forward = forward.__get__(module)
    return vae


def synthetic_photo(side: int):
    """A smooth RGB picture with some texture (no image files on the GPU machine), as a PIL image."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:side, 0:side] / side
    rgb = np.stack([0.5 + 0.4 * np.sin(6 * x + 3 * y), 0.5 + 0.4 * np.cos(9 * y), x * y], axis=-1)
    rgb += 0.05 * np.random.default_rng(0).standard_normal(rgb.shape)
    return Image.fromarray((np.clip(rgb, 0, 1) * 255).round().astype(np.uint8))


def save_model(ref: torch.nn.Module, root: Path) -> None:
    """The random VAE as a model folder qimg.resolve_model accepts: vae/ real, the other components markers."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "QwenImagePipeline"}))
    ref.save_pretrained(root / "vae")
    for component, marker in (("transformer", "config.json"), ("text_encoder", "config.json"),
                              ("tokenizer", "tokenizer_config.json"), ("scheduler", "scheduler_config.json")):
        (root / component).mkdir(exist_ok=True)
        (root / component / marker).write_text("{}")


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny VAE, fp32, small images")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--tile", type=int, default=512, help="qimg tile size in pixels")
    ap.add_argument("--overlap", type=int, default=64, help="qimg tile overlap in pixels")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    ap.add_argument("--no-diffusers-tiled", action="store_true", help="skip diffusers' (slow) tiled decodes")
    ap.add_argument("--save-model", type=Path, help="also write the random VAE as a model folder (for a CLI run)")
    args = ap.parse_args()

    from diffusers import AutoencoderKLQwenImage

    cuda = not args.tiny
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    config = TINY if args.tiny else {}
    # "1024" etc. are the names; the tiny run uses 1/16 of each side so that it finishes in seconds on a CPU.
    side = {1024: 64, 2048: 128, 4096: 256} if args.tiny else {1024: 1024, 2048: 2048, 4096: 4096}
    tiling = Tiling(64, 16) if args.tiny else Tiling(args.tile, args.overlap)
    warmup, repeats = (1, 2) if args.tiny else (args.warmup, args.repeats)

    with torch.device(dev):
        ref = AutoencoderKLQwenImage(**config).to(dtype)
    randomize(ref, seed=0)
    ref.eval().requires_grad_(False)
    params = params_from_config(QwenVAEParams, dict(ref.config), QWEN_VAE_CONFIG, QWEN_VAE_CONFIG_IGNORED)
    with torch.device("meta"):
        ours = QwenVAE(params)
    state = {k: qwen_vae_tensor(k, v) for k, v in ref.state_dict().items() if ".time_conv." not in k}
    ours.load_state_dict(state, strict=True, assign=True)
    ours.eval().requires_grad_(False)
    # The variants get their own copies so that each is measured as it would be used.
    ours_cl = copy.deepcopy(ours).to(memory_format=torch.channels_last)
    ours_lean = lean_norms(copy.deepcopy(ours_cl))

    results: list[dict] = []
    accuracy: dict[str, float] = {}
    tiled_info: dict[str, object] = {}

    def write_report() -> None:
        """Written after every row too, so that a run stopped at its time limit still leaves its numbers."""
        report = {
            "benchmark": "qwen-image vae decode/encode" + (" (tiny smoke run)" if args.tiny else ""),
            "device": torch.cuda.get_device_name(dev) if cuda else platform.processor() or "cpu",
            "torch": torch.__version__,
            "diffusers": __import__("diffusers").__version__,
            "python": platform.python_version(),
            "dtype": str(dtype).removeprefix("torch."),
            "params": sum(p.numel() for p in ours.parameters()),
            "command": " ".join(["python", *sys.argv]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "warmup": warmup,
            "repeats": repeats,
            "accuracy": accuracy,
            "tiling": tiled_info,
            "results": results,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")

    def record(name: str, row: dict) -> None:
        row = {"config": name, **row}
        results.append(row)
        print(json.dumps(row), flush=True)
        write_report()

    gen = torch.Generator(dev).manual_seed(1)
    s = side[1024]
    z = torch.randn(1, params.z_dim, s // 8, s // 8, device=dev, dtype=dtype, generator=gen)
    x = (torch.rand(1, 3, s, s, device=dev, generator=gen) * 2 - 1).to(dtype)
    z_cl, x_cl = z.contiguous(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)

    with torch.inference_mode():
        want = ref.decode(z[:, :, None]).sample[:, :, 0]
        accuracy.update({"decode_rel_l2_vs_diffusers": rel_l2(ours.decode(z), want),
                    "decode_channels_last_rel_l2_vs_diffusers": rel_l2(ours_cl.decode(z_cl), want),
                    "decode_lean_norms_rel_l2_vs_diffusers": rel_l2(ours_lean.decode(z_cl), want)})
        want_mean = ref.encode(x[:, :, None]).latent_dist.mean[:, :, 0]
        accuracy["encode_rel_l2_vs_diffusers"] = rel_l2(ours.encode(x)[0], want_mean)
        del want, want_mean
        print(json.dumps(accuracy), flush=True)

        m = (warmup, repeats, cuda)
        # -- 1024x1024 decode
        record(f"decode {s}: diffusers", measure(lambda: ref.decode(z[:, :, None]).sample, *m))
        record(f"decode {s}: qimg", measure(lambda: ours.decode(z), *m))
        record(f"decode {s}: qimg channels_last", measure(lambda: ours_cl.decode(z_cl), *m))
        if cuda:
            with cudnn_benchmark(True):
                record(f"decode {s}: diffusers cudnn.benchmark",
                       measure(lambda: ref.decode(z[:, :, None]).sample, *m))
                record(f"decode {s}: qimg cudnn.benchmark", measure(lambda: ours.decode(z), *m))
                record(f"decode {s}: qimg channels_last cudnn.benchmark", measure(lambda: ours_cl.decode(z_cl), *m))
                record(f"decode {s}: qimg channels_last cudnn.benchmark lean norms",
                       measure(lambda: ours_lean.decode(z_cl), *m))
        # -- 1024x1024 encode
        record(f"encode {s}: diffusers", measure(lambda: ref.encode(x[:, :, None]).latent_dist.mean, *m))
        record(f"encode {s}: qimg", measure(lambda: ours.encode(x), *m))
        record(f"encode {s}: qimg channels_last", measure(lambda: ours_cl.encode(x_cl), *m))
        if cuda:
            with cudnn_benchmark(True):
                record(f"encode {s}: qimg channels_last cudnn.benchmark", measure(lambda: ours_cl.encode(x_cl), *m))

        # -- large images: qimg tiled (untiled too at 2048 for its peak), diffusers with its own tiling
        tiled_info.update({"qimg_tile_px": tiling.tile, "qimg_overlap_px": tiling.overlap,
                           "diffusers_tiling": "enable_tiling() defaults: 256 px tiles, 192 px stride"})
        print(json.dumps(tiled_info), flush=True)
        for name in (2048, 4096):
            big = side[name]
            zb = torch.randn(1, params.z_dim, big // 8, big // 8, device=dev, dtype=dtype, generator=gen)
            zb_cl = zb.contiguous(memory_format=torch.channels_last)
            few = (1, 3, cuda)
            record(f"tiled decode {big}: qimg", measure(lambda zb=zb: decode_tiled(ours, zb, tiling), *few))
            record(f"tiled decode {big}: qimg channels_last",
                   measure(lambda zb=zb_cl: decode_tiled(ours_cl, zb, tiling), *few))
            if name == 4096:
                wide = Tiling(1024, 128) if cuda else Tiling(128, 32)
                with cudnn_benchmark(cuda):
                    record(f"tiled decode {big}: qimg channels_last cudnn.benchmark tile {wide.tile}/{wide.overlap}",
                           measure(lambda zb=zb_cl, t=wide: decode_tiled(ours_cl, zb, t), *few))
            if name == 2048:
                record(f"decode {big}: qimg untiled", measure(lambda zb=zb: ours.decode(zb), *few))
                tiled, full = decode_tiled(ours, zb, tiling), ours.decode(zb)
                accuracy[f"tiled_vs_untiled_{big}_rel_l2"] = rel_l2(tiled, full)
                accuracy[f"tiled_vs_untiled_{big}_mean_abs"] = (tiled.float() - full.float()).abs().mean().item()
                del tiled, full
                xb = (torch.rand(1, 3, big, big, device=dev, generator=gen) * 2 - 1).to(dtype)
                record(f"tiled encode {big}: qimg", measure(lambda xb=xb: encode_tiled(ours, xb, tiling), *few))
                del xb
            if not args.no_diffusers_tiled:
                ref.enable_tiling()
                runs = (0, 1, cuda) if name == 4096 else (1, 2, cuda)
                record(f"tiled decode {big}: diffusers",
                       measure(lambda zb=zb: ref.decode(zb[:, :, None]).sample, *runs))
                ref.disable_tiling()
            del zb, zb_cl

        # -- the library round trip as `qimg vae roundtrip` runs it (channels_last VAE, metrics included)
        from qimg.roundtrip import vae_roundtrip

        for name, t in ((1024, None), (4096, tiling)):
            picture = synthetic_photo(side[name])
            vae_roundtrip(ours_cl, picture, tiling=t)  # warm-up
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            r = vae_roundtrip(ours_cl, picture, tiling=t)
            row = {"median_ms": round(1000 * (r.encode_seconds + r.decode_seconds), 2),
                   "encode_ms": round(1000 * r.encode_seconds, 2), "decode_ms": round(1000 * r.decode_seconds, 2),
                   "whole_call_s": round(time.perf_counter() - started, 3), "psnr": round(r.psnr, 3),
                   "ssim": round(r.ssim, 5)}
            if cuda:
                row["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
            record(f"roundtrip {side[name]}: qimg.roundtrip.vae_roundtrip" + (" tiled" if t else ""), row)

        # -- torch.compile of the decoder: the fusion (norm + SiLU + casts) eager cannot do, at a compile cost
        if cuda and not args.no_compile:
            compiled = copy.deepcopy(ours_cl)
            compiled.decoder = torch.compile(compiled.decoder, dynamic=False)
            t = time.perf_counter()
            compiled.decode(z_cl)
            torch.cuda.synchronize()
            compile_s = time.perf_counter() - t
            row = measure(lambda: compiled.decode(z_cl), *m)
            row["first_call_s"] = round(compile_s, 1)
            row["rel_l2_vs_diffusers"] = rel_l2(compiled.decode(z_cl), ref.decode(z[:, :, None]).sample[:, :, 0])
            record(f"decode {s}: qimg channels_last torch.compile(decoder)", row)

    write_report()
    if args.save_model:
        save_model(ref, args.save_model)
    print(f"{'config':<72}{'median ms':>11}{'peak GiB':>10}")
    for r in results:
        print(f"{r['config']:<72}{r['median_ms']:>11}{r.get('peak_reserved_gib', '-'):>10}")


if __name__ == "__main__":
    main()
