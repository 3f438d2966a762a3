"""The fused-kernel switch (qimg/runtime/kernels.py): off on the CPU and on request, and on a GPU the fused paths
equal the PyTorch ones inside whole networks (the kernels themselves: test_triton_kernels.py)."""

from __future__ import annotations

import pytest
import torch

from qimg.families.qwen import mmdit_fp8_layers
from qimg.nets import layers
from qimg.nets.qwen_mmdit import QwenMMDiT, qwen_rope
from qimg.runtime import fp8, kernels
from qimg.runtime.fp8 import apply_fp8
from qimg.specs import QwenMMDiTParams
from tests.fixtures import randomize_

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused kernels run on CUDA devices")
TINY = QwenMMDiTParams(num_layers=2, head_dim=16, num_heads=2, txt_dim=32, axes_dims_rope=(4, 6, 6))


@pytest.fixture(autouse=True)
def _switched_off():
    yield
    kernels.use_fused_kernels("cpu")


def test_off_on_the_cpu_and_the_plain_forms_back() -> None:
    assert kernels.use_fused_kernels("cpu") is False
    assert layers._norm_rope_impl is layers._norm_rope_torch
    assert fp8._fused is None


def test_turned_off_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QIMG_FUSED_KERNELS", "0")
    assert kernels.fused_kernels_available("cuda:0") is False


def test_cpu_tensors_take_the_plain_path_even_when_switched_on() -> None:
    # the fused form checks each call: CPU tensors, fp32 and gradients go through PyTorch
    torch.manual_seed(0)
    t, i = torch.randn(1, 3, 2, 8), torch.randn(1, 5, 2, 8)
    nt, ni = layers.RMSNorm(8), layers.RMSNorm(8)
    rope = layers.rope_table(torch.randn(8, 4))
    want = layers._norm_rope_torch(t, nt, i, ni, rope)
    assert torch.equal(kernels._norm_rope_fused(t, nt, i, ni, rope), want)
    up = torch.nn.Linear(8, 32)
    assert torch.equal(kernels._linear_gelu_fused(up, i), layers._linear_gelu_torch(up, i))


def _model(dtype: torch.dtype) -> QwenMMDiT:
    return randomize_(QwenMMDiT(TINY), 3).to("cuda", dtype).eval().requires_grad_(False)


def _inputs(dtype: torch.dtype):
    g = torch.Generator("cuda").manual_seed(1)
    x = torch.randn(1, 64, 64, device="cuda", dtype=dtype, generator=g)
    txt = torch.randn(1, 7, 32, device="cuda", dtype=dtype, generator=g)
    t = torch.full((1,), 0.4, device="cuda", dtype=dtype)
    return x, txt, t, qwen_rope([(1, 8, 8)], 7, TINY.axes_dims_rope).cuda()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@cuda
@torch.inference_mode()
def test_fused_norm_rope_in_the_mmdit() -> None:
    model, args = _model(torch.bfloat16), _inputs(torch.bfloat16)
    kernels.use_fused_kernels("cpu")
    want = model(*args)
    assert kernels.use_fused_kernels("cuda")
    got = model(*args)
    # The q/k kernel keeps eager's roundings (only the order of its fp32 sums differs), but the GELU epilogue
    # rounds once where eager rounds the matmul output and then the GELU: bf16 noise of a few 2^-8 steps through
    # two blocks. Measured 4.0e-3 on an H200; before the epilogue joined, the 60-layer model's error against
    # diffusers was 0.0164 with the fused q/k kernel and without (bench/results/speed_h200.json).
    assert _rel(got, want) < 1e-2


@cuda
@torch.inference_mode()
@pytest.mark.parametrize("compute", [True, False], ids=["fp8-compute", "fp8-weights"])
def test_fused_fp8_paths_in_the_mmdit(compute: bool) -> None:
    if compute and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 compute needs FP8 tensor cores")
    model, args = _model(torch.bfloat16), _inputs(torch.bfloat16)
    apply_fp8(model, mmdit_fp8_layers, compute=compute)
    kernels.use_fused_kernels("cpu")
    want = model(*args)
    assert kernels.use_fused_kernels("cuda")
    got = model(*args)
    if compute:  # GELU + quantisation fused: rare one-step e4m3 differences in the hidden activation
        assert _rel(got, want) < 1e-2
        # eager activations are quantised by one kernel launch, bit for bit as quantize_rowwise
        w = next(m for m in model.modules() if isinstance(m, fp8.FP8Linear))
        x = torch.randn(2, 7, w.in_features, device="cuda", dtype=torch.bfloat16)
        q, s = fp8.quantize_rowwise(x.reshape(-1, w.in_features))
        assert torch.equal(w(x), w.forward_quantized(q, s, x.shape[:-1]))
    else:  # the one-pass dequantisation gives the same weights bit for bit; q/k norms as above
        assert _rel(got, want) < 2e-3
        w = next(m for m in model.modules() if isinstance(m, fp8.FP8Linear))
        assert torch.equal(w.dequantized_weight(torch.bfloat16),
                           fp8._dequantize(w.weight_fp8, w.weight_scale, torch.bfloat16))
