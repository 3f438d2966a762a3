"""Host memory of a --fp8 weights plan that streams, on the full-size Qwen-Image, from meta-device builds (no
weights are written or read): the bytes of every host buffer qimg allocates, per run phase, before and after the
issue 15 change. Pinned buffers used to come from the caching pinned allocator (rounded up to a power of two
each, kept cached after being freed); they are now registered at their exact size.

    python bench/host_accounting.py [--streamed 48] [--te-streamed 3]    # the 8 GiB plan's split by default
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GiB = 1024**3


def _align(n: int) -> int:
    return -(-n // 256) * 256  # each tensor's offset in a HostCopy is 256-byte aligned


def _bytes(tensors: list[torch.Tensor], fp8: set[int] = frozenset()) -> int:  # type: ignore[assignment]
    """Packed bytes: the weights in `fp8` (ids) as e4m3 values plus an fp32 scale per row, the rest in bf16."""
    return sum(_align(t.numel()) + _align(4 * t.shape[0]) if id(t) in fp8 else _align(2 * t.numel())
               for t in tensors)


def pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streamed", type=int, default=48, help="denoiser blocks streamed (of 60)")
    ap.add_argument("--te-streamed", type=int, default=3, help="text encoder layers streamed (of 28)")
    args = ap.parse_args()
    from diffusers import QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLForConditionalGeneration

    from bench.generate import text_encoder_config
    from qimg.families.qwen import mmdit_fp8_layers, text_encoder_fp8_layers

    with torch.device("meta"):
        mmdit = QwenImageTransformer2DModel(num_layers=60)  # sizes only: _bytes counts bf16 itself
        te = Qwen2_5_VLForConditionalGeneration._from_config(text_encoder_config(), dtype=torch.bfloat16)
    block, layer = mmdit.transformer_blocks[0], te.model.language_model.layers[0]
    t_fp8 = {id(m.weight) for n, m in block.named_modules()
             if isinstance(m, nn.Linear) and mmdit_fp8_layers(f"transformer_blocks.0.{n}", m)}
    t_block = _bytes(list(block.parameters()), t_fp8)
    t_rest = _bytes([t for n, t in mmdit.named_parameters() if not n.startswith("transformer_blocks.")])
    te_fp8 = {id(m.weight) for n, m in layer.named_modules()
              if isinstance(m, nn.Linear) and text_encoder_fp8_layers(f"layers.0.{n}", m)}
    te_layer = _bytes(list(layer.parameters()), te_fp8)
    te_rest = _bytes([t for n, t in te.model.language_model.named_parameters() if ".layers." not in f".{n}"])
    n_t, n_te = 60, 28
    s, s_te = args.streamed, args.te_streamed
    old = {  # every block and layer packed (pinned, each rounded to a power of two), the encoder after the denoiser
        "load": n_t * pow2(t_block) + pow2(t_rest),
        "text": n_t * pow2(t_block) + pow2(t_rest) + n_te * pow2(te_layer) + pow2(te_rest),
        "denoise": n_t * pow2(t_block) + pow2(t_rest) + n_te * pow2(te_layer) + pow2(te_rest),  # freed: cached
    }
    new = {  # exact sizes; nothing of the denoiser's blocks before its first visit; resident ones never packed
        "load": t_rest,
        "text": t_rest + s_te * te_layer + te_rest,
        "denoise": t_rest + s * t_block,
        "text (a later image)": t_rest + s * t_block + s_te * te_layer + te_rest,
    }
    report = {
        "sizes_gib": {"denoiser block (fp8)": t_block / GiB, "denoiser rest (bf16)": t_rest / GiB,
                      "text encoder layer (fp8)": te_layer / GiB, "text encoder rest (bf16 embeddings, norm)":
                      te_rest / GiB},
        "streamed": {"denoiser": f"{s} of {n_t}", "text_encoder": f"{s_te} of {n_te}"},
        "before_gib": {k: round(v / GiB, 2) for k, v in old.items()},
        "after_gib": {k: round(v / GiB, 2) for k, v in new.items()},
        "not_counted": "process baseline (Python, torch, CUDA context; ~0.9 GiB on the H200 run) and the "
                       "checkpoint reader's pinned staging buffers (8 threads x 2 x 32 MiB)",
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
