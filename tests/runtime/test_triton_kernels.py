"""The fused Triton kernels (qimg.runtime.triton_kernels) equal the eager PyTorch code they replace.

Without CUDA they run on the CPU under Triton's interpreter, on small shapes (it is slow); with CUDA on the real
model's row widths. The quantising ops are checked twice: with fp32 output (the scaled values before the e4m3
rounding, against eager's up to fp32 ulps) and with e4m3 output (against eager's cast). Interpreted, the kernels
round to e4m3 and bf16 by hand, so the interpreter's truncating casts do not get in the way; on the GPU they use
its casts, which round the same way (test_the_gpu_casts_round_as_the_hand_rounding checks it there).
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
QUANT_DTYPES = [torch.float32, torch.float8_e4m3fn]
E4M3_MAX = 448.0
# (M, K) for gelu_quant, (B, L, K) for norm_modulate, (B, Lt, Li, H, D) for qk_norm_rope
GELU_SHAPE = (64, 12288) if CUDA else (6, 96)
NORM_SHAPE = (2, 64, 3072) if CUDA else (2, 5, 80)
QK_SHAPE = (2, 16, 64, 24, 128) if CUDA else (2, 3, 5, 3, 16)


@pytest.fixture(scope="module")
def tk():
    """The kernels module. Without CUDA its kernels are decorated with TRITON_INTERPRET=1 set; Triton reads the
    variable only when decorating, so it is restored afterwards for the rest of the session."""
    name = "qimg.runtime.triton_kernels"
    if CUDA:
        return importlib.import_module(name)
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        module = importlib.import_module(name)
    finally:
        if before is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = before
    if type(module._quant_rows_kernel).__name__ != "InterpretedFunction":
        pytest.skip("qimg.runtime.triton_kernels was imported before TRITON_INTERPRET could be set")
    return module


def _randn(*shape: int, dtype: torch.dtype, seed: int, std: float = 1.0, mean: float = 0.0) -> torch.Tensor:
    # drawn on the CPU: the same values whatever the device
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * std + mean).to(dtype).to(DEVICE)


def _ulp(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of dtype's values at |v| (normal range)."""
    mantissa = {torch.bfloat16: 7, torch.float32: 23}[dtype]
    return torch.exp2(torch.floor(torch.log2(v.float().abs().clamp_min(2.0**-100))) - mantissa)


def _e4m3_step(v: torch.Tensor) -> torch.Tensor:
    """Spacing of e4m3 values at |v|: 3 mantissa bits, 2^-9 through the subnormals (below 2^-6)."""
    return torch.exp2(torch.floor(torch.log2(v.abs().clamp_min(2.0**-6))) - 3)


def _quantize_ref(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """qimg.runtime.fp8.quantize_rowwise as it runs on CUDA, before its final e4m3 cast: (fp32 values, fp32 scales).
    There `amax / 448.0` is amax * fp32(1 / 448), as written here (on the CPU it divides: an ulp apart at times,
    and then ~0.2% of the e4m3 values, which sit at rounding midpoints, come out a step apart)."""
    amax = y.abs().amax(-1, keepdim=True).float()
    scale = torch.where(amax > 0, amax * (1 / E4M3_MAX), torch.ones_like(amax))
    return (y.float() / scale).clamp(-E4M3_MAX, E4M3_MAX), scale


def _check_quant(q: torch.Tensor, s: torch.Tensor, y: torch.Tensor, out_dtype: torch.dtype) -> None:
    q_ref, s_ref = _quantize_ref(y)
    assert q.dtype == out_dtype and q.shape == y.shape and s.dtype == torch.float32 and s.shape == (y.shape[0], 1)
    assert torch.equal(s, s_ref)
    if out_dtype == torch.float32:
        # atol: 1e-4 on rows scaled to +-448 is 2e-7 of their max. It covers GELU's negative tail, where eager
        # computes 1 + tanh(u) with tanh near -1 and a one-ulp difference in tanh (Sleef's, the kernel's) is a
        # large relative difference in tiny values (which all round to zero in e4m3).
        torch.testing.assert_close(q, q_ref, rtol=1e-5, atol=1e-4)
    else:
        # exp, rsqrt and the reductions differ from eager's by an fp32 ulp at times, and so may a bf16 rounding of
        # y; and the kernels multiply by 1 / scale where eager divides (triton_kernels._quantize), an fp32 ulp
        # apart at times. An e4m3 value within that ulp of a rounding midpoint then lands a step away: one step at
        # most, for up to ~0.2% of a row of bf16 values (5e-3 leaves room; the division measured a third of
        # gelu_quant's time on an H200).
        got, want = q.float(), q_ref.to(out_dtype).float()
        diff = (got - want).abs()
        assert (diff > 0).float().mean().item() <= 5e-3
        assert (diff <= torch.maximum(_e4m3_step(want), _e4m3_step(got))).all()


@pytest.mark.parametrize("out_dtype", QUANT_DTYPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_gelu_quant(tk, dtype: torch.dtype, out_dtype: torch.dtype) -> None:
    M, K = GELU_SHAPE
    h = _randn(M, K, dtype=dtype, seed=0, std=3.0)
    h[0] = torch.linspace(-12, 12, K, dtype=dtype)  # the tanh tail, the zero crossing and the linear part
    q, s = tk.gelu_quant(h, out_dtype)
    _check_quant(q, s, F.gelu(h, approximate="tanh"), out_dtype)


@pytest.mark.parametrize("out_dtype", QUANT_DTYPES, ids=str)
def test_gelu_quant_a_wide_row(tk, out_dtype: torch.dtype) -> None:
    # a row wider than the CPU shapes' one block, not a power of two, its largest value near the masked tail
    h = _randn(2, 5000, dtype=torch.bfloat16, seed=16)
    h[:, -3] = 9.0
    q, s = tk.gelu_quant(h, out_dtype)
    _check_quant(q, s, F.gelu(h, approximate="tanh"), out_dtype)


@pytest.mark.parametrize("out_dtype", QUANT_DTYPES, ids=str)
def test_gelu_quant_zero_row(tk, out_dtype: torch.dtype) -> None:
    h = _randn(3, GELU_SHAPE[1], dtype=torch.bfloat16, seed=1)
    h[1] = 0
    q, s = tk.gelu_quant(h, out_dtype)
    assert s[1].item() == 1.0 and (q[1].float() == 0).all()


def _norm_modulate_ref(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6) * (1 + scale) + shift


def _check_close(got: torch.Tensor, want: torch.Tensor, magnitude: torch.Tensor) -> None:
    """bf16: at most 1% of the elements differ, by one bf16 ulp of the magnitude that a one-ulp difference
    upstream would move. Eager's and the kernel's fp32 reductions and rsqrt may differ by an fp32 ulp, which can
    flip a bf16 rounding of an intermediate; on the CPU no element differs with these inputs, while a single
    missed rounding step makes ~15% differ. fp32: 1e-5."""
    assert got.dtype == want.dtype and got.shape == want.shape
    if want.dtype == torch.bfloat16:
        diff = (got.float() - want.float()).abs()
        assert (diff > 0).float().mean().item() <= 0.01
        assert (diff <= _ulp(magnitude, torch.bfloat16)).all()
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("per_token", [False, True], ids=["shift-B1K", "shift-BLK"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_norm_modulate(tk, dtype: torch.dtype, per_token: bool) -> None:
    B, L, K = NORM_SHAPE
    x = _randn(B, L, K + 16, dtype=dtype, seed=2, std=2.0, mean=0.5)[..., 8 : K + 8]  # strided rows
    shift = _randn(B, L if per_token else 1, K, dtype=dtype, seed=3)
    scale = _randn(B, L if per_token else 1, K, dtype=dtype, seed=4, std=0.5)
    y, empty = tk.norm_modulate(x, shift, scale, False)
    want = _norm_modulate_ref(x, shift, scale)
    n_scaled = F.layer_norm(x, (K,), eps=1e-6) * (1 + scale)  # the product that shift may cancel
    _check_close(y, want, torch.maximum(want.float().abs(), n_scaled.float().abs()))
    assert empty.shape == (0,) and empty.dtype == torch.float32


def test_norm_modulate_out_dtype(tk) -> None:
    B, L, K = NORM_SHAPE
    x = _randn(B, L, K, dtype=torch.bfloat16, seed=5)
    shift, scale = _randn(B, 1, K, dtype=torch.bfloat16, seed=6), _randn(B, 1, K, dtype=torch.bfloat16, seed=7)
    y, _ = tk.norm_modulate(x, shift, scale, False)
    y32, _ = tk.norm_modulate(x, shift, scale, False, out_dtype=torch.float32)
    assert y32.dtype == torch.float32 and torch.equal(y32, y.float())  # the bf16 roundings, then the cast


@pytest.mark.parametrize("out_dtype", QUANT_DTYPES, ids=str)
def test_norm_modulate_quant(tk, out_dtype: torch.dtype) -> None:
    B, L, K = NORM_SHAPE
    x = _randn(B, L, K, dtype=torch.bfloat16, seed=8, std=2.0)
    shift, scale = _randn(B, 1, K, dtype=torch.bfloat16, seed=9), _randn(B, 1, K, dtype=torch.bfloat16, seed=10)
    q, s = tk.norm_modulate(x, shift, scale, True, out_dtype=out_dtype)
    _check_quant(q, s, _norm_modulate_ref(x, shift, scale).reshape(B * L, K), out_dtype)


def _rms_ref(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:  # qimg.nets.layers.RMSNorm
    y = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    if w.dtype in (torch.float16, torch.bfloat16):
        y = y.to(w.dtype)
    return (y * w).to(x.dtype)


def _rope_ref(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:  # qimg.nets.layers.apply_rope, eager
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(xc * rope[None, :, None, :]).flatten(-2).to(x.dtype)


def _qk_inputs(dtype: torch.dtype, w_dtype: torch.dtype, text: bool) -> tuple[torch.Tensor, ...]:
    B, Lt, Li, H, D = QK_SHAPE
    Lt = Lt if text else 0
    # q's slices of fused (B, L, 3 * H * D) qkv projections: strided on every dim but the last
    t = _randn(B, Lt, 3 * H * D, dtype=dtype, seed=11, std=3.0).unflatten(-1, (3, H, D))[:, :, 0]
    i = _randn(B, Li, 3 * H * D, dtype=dtype, seed=12, std=3.0).unflatten(-1, (3, H, D))[:, :, 0]
    wt, wi = _randn(D, dtype=w_dtype, seed=13, mean=1.0), _randn(D, dtype=w_dtype, seed=14, mean=1.0)
    angles = _randn(Lt + Li, D // 2, dtype=torch.float32, seed=15, std=3.0)
    return t, wt, i, wi, torch.polar(torch.ones_like(angles), angles)


@pytest.mark.parametrize("text", [False, True], ids=["Lt0", "Lt>0"])
@pytest.mark.parametrize(
    ("dtype", "w_dtype"),
    [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float32, torch.float32)],
    ids=["bf16", "bf16-fp32-weights", "fp32"],
)
def test_qk_norm_rope(tk, dtype: torch.dtype, w_dtype: torch.dtype, text: bool) -> None:
    t, wt, i, wi, rope = _qk_inputs(dtype, w_dtype, text)
    assert not i.is_contiguous() and (t.numel() == 0 or not t.is_contiguous())
    out = tk.qk_norm_rope(t, wt, i, wi, rope)
    want = _rope_ref(torch.cat([_rms_ref(t, wt), _rms_ref(i, wi)], dim=1), rope)
    assert out.is_contiguous()
    pair_norm = want.float().unflatten(-1, (-1, 2)).norm(dim=-1, keepdim=True).expand(*want.shape[:-1], -1, 2)
    _check_close(out, want, pair_norm.flatten(-2))  # a rotation moves an ulp of either input by at most that


def test_qk_norm_rope_heads_in_several_programs(tk) -> None:
    # a program takes 1024 // D heads: 12 heads of 128 are two programs a token, the second half masked
    B, Lt, Li, H, D = 1, 2, 3, 12, 128
    t = _randn(B, Lt, H, D, dtype=torch.bfloat16, seed=17, std=2.0)
    i = _randn(B, Li, H, D, dtype=torch.bfloat16, seed=18, std=2.0)
    wt, wi = _randn(D, dtype=torch.bfloat16, seed=19, mean=1.0), _randn(D, dtype=torch.bfloat16, seed=20, mean=1.0)
    angles = _randn(Lt + Li, D // 2, dtype=torch.float32, seed=21, std=3.0)
    rope = torch.polar(torch.ones_like(angles), angles)
    out = tk.qk_norm_rope(t, wt, i, wi, rope)
    want = _rope_ref(torch.cat([_rms_ref(t, wt), _rms_ref(i, wi)], dim=1), rope)
    pair_norm = want.float().unflatten(-1, (-1, 2)).norm(dim=-1, keepdim=True).expand(*want.shape[:-1], -1, 2)
    _check_close(out, want, pair_norm.flatten(-2))


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device: interpreted kernels always round by hand")
def test_the_gpu_casts_round_as_the_hand_rounding(tk) -> None:
    # norm_modulate always rounds by hand (its launcher says why)
    h = _randn(256, 12288, dtype=torch.bfloat16, seed=22, std=3.0)
    qk = _qk_inputs(torch.bfloat16, torch.bfloat16, True)
    w = _randn(512, 3072, dtype=torch.bfloat16, seed=26, std=0.02)
    wq, ws = tk.quantize_rows(w)
    results = []
    try:
        for hw in (False, True):
            tk.hw_casts = hw
            results.append([*tk.gelu_quant(h), tk.qk_norm_rope(*qk), *tk.quantize_rows(w),
                            tk.dequantize_rows(wq, ws, torch.bfloat16)])
    finally:
        tk.hw_casts = None
    for hand, gpu in zip(*results, strict=True):
        assert torch.equal(hand.view(torch.uint8), gpu.view(torch.uint8))


def _all_ops(tk, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, h: torch.Tensor, qk: tuple) -> tuple:
    y, _ = tk.norm_modulate(x, shift, scale, False)
    q, s = tk.norm_modulate(x, shift, scale, True, out_dtype=torch.float32)
    g, gs = tk.gelu_quant(h, torch.float32)
    return y * 2, q * s, g * gs, tk.qk_norm_rope(*qk) + 1


def test_ops_compile_fullgraph(tk) -> None:
    # aot_eager on the CPU: it traces through the fake implementations like inductor, without a C++ build
    B, L, K = NORM_SHAPE
    x, shift, scale = (_randn(B, L, K, dtype=torch.bfloat16, seed=s) for s in (16, 17, 18))
    args = (x, shift[:, :1], scale[:, :1], _randn(*GELU_SHAPE, dtype=torch.bfloat16, seed=19),
            _qk_inputs(torch.bfloat16, torch.bfloat16, True))
    torch._dynamo.reset()
    compiled = torch.compile(_all_ops, fullgraph=True, backend="inductor" if CUDA else "aot_eager")
    for got, want in zip(compiled(tk, *args), _all_ops(tk, *args), strict=True):
        assert torch.equal(got, want)


def test_opcheck(tk) -> None:
    """Schemas, fake implementations (shapes, dtypes) and dispatch under AOT tracing, dynamic shapes included."""
    x = _randn(2, 3, 40, dtype=torch.bfloat16, seed=20)
    shift, scale = x[:, :1] * 0.5, x[:, :1] * 0.25
    h = _randn(3, 40, dtype=torch.bfloat16, seed=21)
    cases = [
        (tk.gelu_quant, (h, torch.float32)),
        (tk.gelu_quant, (h,)),
        (tk.norm_modulate, (x, shift, scale, False)),
        (tk.norm_modulate, (x, shift, scale, True)),
        (tk.qk_norm_rope, _qk_inputs(torch.bfloat16, torch.bfloat16, True)),
    ]
    for op, args in cases:
        torch.library.opcheck(op.op, args)


def test_a_dispatched_call_does_not_import_the_compiler() -> None:
    """A compiled block package (runtime/packaged.py) calls the ops through the dispatcher, in a process that
    never imports torch._dynamo otherwise; a torch.library.custom_op's kernel would import it on its first call."""
    import subprocess
    import sys
    from pathlib import Path

    script = ("import sys, torch; import qimg.runtime.triton_kernels\n"
              f"h = torch.randn(3, 40, dtype=torch.bfloat16, device={DEVICE!r})\n"
              "q, s = torch.ops.qimg.gelu_quant.default(h)\n"
              "print(q.dtype, 'torch._dynamo' in sys.modules)")
    env = {**os.environ, "TRITON_INTERPRET": "0" if CUDA else "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["torch.float8_e4m3fn", "False"]


def test_errors(tk) -> None:
    x = torch.zeros(2, 3, 8, dtype=torch.bfloat16, device=DEVICE)
    with pytest.raises(ValueError, match=r"\(M, K\)"):
        tk.gelu_quant(x)
    with pytest.raises(ValueError, match="broadcast"):
        tk.norm_modulate(x, x[:, :, :4], x, False)
    with pytest.raises(ValueError, match="shift"):
        tk.norm_modulate(x, x.float(), x, False)
    t = torch.zeros(2, 1, 2, 8, dtype=torch.bfloat16, device=DEVICE)
    w, rope = torch.ones(8, device=DEVICE), torch.ones(2, 4, dtype=torch.complex64, device=DEVICE)
    with pytest.raises(ValueError, match="rope"):
        tk.qk_norm_rope(t, w, t, w, rope[:1])
    with pytest.raises(ValueError, match="weights"):
        tk.qk_norm_rope(t, w[:4], t, w, rope)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dequantize_rows_equals_the_eager_form(tk, dtype: torch.dtype) -> None:
    from qimg.runtime.fp8 import _dequantize

    w = _randn(7, 300, dtype=torch.float32, seed=5, std=0.05)  # 2100 elements: a partial last block
    scale = (w.abs().amax(-1, keepdim=True) / 448.0).reshape(1, -1)
    q = (w / scale.t()).to(torch.float8_e4m3fn)
    got = tk.dequantize_rows(q, scale, dtype)
    assert got.dtype == dtype and got.shape == q.shape
    assert torch.equal(got, _dequantize(q, scale, dtype))  # same roundings: bit for bit


@pytest.mark.parametrize("out_dtype", QUANT_DTYPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_quantize_rows_equals_quantize_rowwise(tk, dtype: torch.dtype, out_dtype: torch.dtype) -> None:
    """The one-pass weight quantisation loading uses, against the eager form; on CUDA bit for bit (the same
    scale, the same correctly rounded division), a zero row keeping scale 1."""
    from qimg.runtime.fp8 import quantize_rowwise

    M, K = GELU_SHAPE
    w = _randn(M, K, dtype=dtype, seed=7, std=0.02)
    w[1] = 0
    q, s = tk.quantize_rows(w, out_dtype)
    _check_quant(q, s, w, out_dtype)
    assert s[1].item() == 1.0 and (q[1].float() == 0).all()
    if CUDA and out_dtype == torch.float8_e4m3fn:
        q_eager, s_eager = quantize_rowwise(w)
        assert torch.equal(s, s_eager) and torch.equal(q.view(torch.uint8), q_eager.view(torch.uint8))
