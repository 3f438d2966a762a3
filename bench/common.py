"""Helpers every benchmark here shares: timing with device events, the random full-size Qwen MMDiT, and a random
Qwen-Image folder in the official layout."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def time_ms(fn: Callable[[], Any], warmup: int, repeats: int) -> list[float]:
    """Milliseconds per call after warm-up: CUDA events on a GPU (device work is asynchronous), else a host clock."""
    cuda = torch.cuda.is_available()
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1000)
    return times


def time_graph_ms(fn: Callable[[], Any], calls: int = 20, replays: int = 5) -> list[float]:
    """Device milliseconds per call of `fn` with no host in the way: `calls` calls captured in one CUDA graph,
    replayed `replays` times. time_ms puts the host's launch latency (tens of microseconds from Python) inside
    each timed call, which swamps kernels that run for less than that."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up off the capture: compiles, autotuning, allocator pools
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return times


def random_diffusers_mmdit(layers: int, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> Any:
    """diffusers' QwenImageTransformer2DModel at full width (20B params in fp32 would not fit beside anything),
    every parameter random (diffusers zero-initialises some layers)."""
    from diffusers import QwenImageTransformer2DModel

    return random_diffusers(QwenImageTransformer2DModel, dict(num_layers=layers), device, dtype)


def random_diffusers_flux(config: dict, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> Any:
    """diffusers' FluxTransformer2DModel of `config`, every parameter random."""
    from diffusers import FluxTransformer2DModel

    return random_diffusers(FluxTransformer2DModel, config, device, dtype)


def random_diffusers(cls: Any, config: dict, device: torch.device, dtype: torch.dtype) -> Any:
    """A diffusers model of `config` built directly in `dtype` on `device`, every parameter normal(0, 0.02), in eval
    mode without gradients."""
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(**config)
    finally:
        torch.set_default_dtype(torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    return model.eval().requires_grad_(False)


def sharing_qimg_mmdit(ref: Any, layers: int) -> Any:
    """qimg's QwenMMDiT on the very same weight tensors as `ref` (built on meta, parameters assigned)."""
    from qimg.nets.qwen_mmdit import QwenMMDiT
    from qimg.specs import QwenMMDiTParams

    with torch.device("meta"):
        ours = QwenMMDiT(QwenMMDiTParams(num_layers=layers))
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    return ours.eval().requires_grad_(False)


def fp8_compute_copy(model: Any) -> Any:
    """A QwenMMDiT with FP8 compute linears built from `model`'s tensors (the bf16 ones it replaces are freed once
    the caller drops its own references to `model`)."""
    from qimg.families.qwen import mmdit_fp8_layers
    from qimg.nets.qwen_mmdit import QwenMMDiT
    from qimg.runtime.fp8 import apply_fp8

    with torch.device("meta"):
        fresh = QwenMMDiT(model.params)
    fresh.load_state_dict(model.state_dict(), assign=True)
    fresh = fresh.eval().requires_grad_(False)
    apply_fp8(fresh, mmdit_fp8_layers, compute=True)
    return fresh


def write_random_qwen_image(root: Path, tokenizer: Path, *, layers: int = 60, text_layers: int | None = None,
                            shard: str = "5GB") -> None:
    """A random Qwen-Image folder as the Hub lays it out: the full-width MMDiT with `layers` blocks, the 7B text
    encoder (cut to `text_layers` language and vision layers when given), the VAE, every weight random, built on
    the GPU in bf16."""
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLForConditionalGeneration

    from bench.generate import QWEN_SCHEDULE, text_encoder_config

    shutil.rmtree(root, ignore_errors=True)
    dev, dtype = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    with torch.device(dev):
        transformer = QwenImageTransformer2DModel(num_layers=layers).to(dtype)
        vae = AutoencoderKLQwenImage().to(dtype)
    with torch.no_grad():
        for m in (transformer, vae):
            for p in m.parameters():
                p.normal_(0.0, 0.02)
    transformer.save_pretrained(root / "transformer", max_shard_size=shard)
    vae.save_pretrained(root / "vae")
    del transformer, vae
    torch.cuda.empty_cache()
    config = text_encoder_config()
    if text_layers is not None:
        raw = config.to_dict()
        raw["text_config"]["num_hidden_layers"] = text_layers
        raw["text_config"].pop("layer_types", None)  # derived from the layer count when absent
        raw["vision_config"].update(depth=text_layers, fullatt_block_indexes=[text_layers - 1])
        config = type(config).from_dict(raw)
    with torch.device(dev):
        te = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype)
    te.save_pretrained(root / "text_encoder", max_shard_size=shard)
    del te
    torch.cuda.empty_cache()
    shutil.copytree(tokenizer, root / "tokenizer")
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, **QWEN_SCHEDULE}))
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "QwenImagePipeline", "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "text_encoder": ["transformers",
        "Qwen2_5_VLForConditionalGeneration"], "tokenizer": ["transformers", "Qwen2Tokenizer"],
        "transformer": ["diffusers", "QwenImageTransformer2DModel"], "vae": ["diffusers", "AutoencoderKLQwenImage"],
    }))
