"""The fast paths equal the plain path: batched CFG without a mask, attention kernels, compile, FP8 linears."""

from __future__ import annotations

import pytest
import torch

import qimg
from qimg.embeddings import PromptEmbeds
from qimg.errors import InputError
from qimg.families.qwen import mmdit_fp8_layers as qwen_mmdit_fp8_layers
from qimg.nets import layers
from qimg.nets.qwen_mmdit import QwenMMDiT
from qimg.pipelines.qwen import qwen_velocity
from qimg.runtime.attention import use_attention
from qimg.runtime.compile import compile_blocks
from qimg.runtime.fp8 import FP8Linear, apply_fp8, fp8_supported, quantize_rowwise
from qimg.specs import QwenMMDiTParams
from tests.fixtures import randomize_

TINY = QwenMMDiTParams(num_layers=2, head_dim=16, num_heads=2, txt_dim=32, axes_dims_rope=(4, 6, 6))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture
def model() -> QwenMMDiT:
    return randomize_(QwenMMDiT(TINY), 3).eval().requires_grad_(False)


@pytest.fixture(autouse=True)
def _default_attention():
    yield
    layers.set_attention_impl(layers.sdpa)


def _prompts(lengths=(9, 4)):
    gen = torch.Generator().manual_seed(0)
    return [PromptEmbeds(torch.randn(1, n, 32, generator=gen)) for n in lengths]


def test_batched_cfg_with_different_prompt_lengths_equals_two_passes(model):
    cond, uncond = _prompts()
    x, sigma = torch.randn(1, 12, 64), torch.tensor(0.7)
    shapes = [(1, 3, 4)]
    with torch.no_grad():
        batched = qwen_velocity(model, torch.float32, cond, uncond, 4.0, shapes, batch_cfg=True)(x, sigma)
        separate = qwen_velocity(model, torch.float32, cond, uncond, 4.0, shapes, batch_cfg=False)(x, sigma)
    # fp32: the rows are the same arithmetic in a different batch layout, so only rounding differs.
    assert _rel(batched, separate) < 1e-5


def test_attention_backends_by_name():
    assert use_attention("sdpa") == "sdpa"
    assert use_attention("auto", "cpu") == "sdpa"  # no CUDA here: plain SDPA
    assert use_attention("cudnn", "cpu") == "cudnn"  # SDPA with cuDNN preferred; falls back off-GPU
    q = torch.randn(2, 5, 2, 8)
    assert torch.allclose(layers.attention(q, q, q), layers.sdpa(q, q, q).flatten(2), atol=1e-6)
    with pytest.raises(ValueError, match="unknown attention backend"):
        use_attention("magic")
    for name, package in (("flash", "flash-attn"), ("sage", "sageattention")):
        try:
            use_attention(name)
        except ImportError as e:  # the optional kernel is not installed: the message says what to install
            assert package in str(e)


@pytest.mark.slow
def test_compiled_blocks_equal_eager(model):
    # Inductor on CPU compiles C++ for the block (tens of seconds on 2 cores), then must give the same numbers.
    cond, _ = _prompts()
    x, sigma = torch.randn(1, 12, 64), torch.tensor(0.3)
    with torch.no_grad():
        eager = qwen_velocity(model, torch.float32, cond, None, 1.0, [(1, 3, 4)])(x, sigma)
        compile_blocks(model.transformer_blocks)
        compiled = qwen_velocity(model, torch.float32, cond, None, 1.0, [(1, 3, 4)])(x, sigma)
    assert _rel(compiled, eager) < 1e-5


def test_fp8_rowwise_quantisation_error_is_within_e4m3_precision():
    w = torch.randn(64, 128) * torch.logspace(-2, 1, 64)[:, None]  # rows of very different scale
    q, s = quantize_rowwise(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (64, 1)
    back = q.float() * s
    # e4m3 keeps 3 mantissa bits: relative rounding error at most 2^-4 per normal element; per row in L2 ~2-3%.
    assert ((back - w).norm(dim=1) / w.norm(dim=1)).max() < 0.04
    zero, scale = quantize_rowwise(torch.zeros(2, 8))
    assert torch.equal(zero.float(), torch.zeros(2, 8)) and torch.equal(scale, torch.ones(2, 1))


@pytest.mark.parametrize("compute", [False, True], ids=["weights", "compute"])
def test_fp8_linear_matches_the_bf16_linear_within_stated_error(compute):
    linear = torch.nn.Linear(256, 128)
    x = torch.randn(4, 10, 256)
    fp8 = FP8Linear(linear, compute=compute)
    with torch.no_grad():
        err = _rel(fp8(x), linear(x))
    # Weight rounding alone ~2-3%; compute mode also rounds the activations (emulated here, as the GPU does).
    assert err < (0.06 if compute else 0.04), err
    assert fp8.weight_fp8.dtype == torch.float8_e4m3fn and fp8.weight_fp8.element_size() == 1


@pytest.mark.skipif(not (torch.cuda.is_available() and fp8_supported("cuda")), reason="needs FP8 tensor cores")
def test_fp8_compute_runs_every_row_count_of_the_block_shapes_on_the_gpu() -> None:
    # A short prompt's text stream without CFG is a few dozen rows: cuBLASLt had no fast-accumulation algorithm
    # for the MLP's down projection with its bias there (qimg generate --preset lightning-8 --fp8 compute failed)
    gen = torch.Generator("cuda").manual_seed(0)
    for n, k in [(3072, 3072), (12288, 3072), (3072, 12288), (3072, 15360)]:
        linear = torch.nn.Linear(k, n, device="cuda", dtype=torch.bfloat16)
        fp8 = FP8Linear(linear, compute=True)
        for rows in (1, 17, 42, 43, 127, 128, 4096):
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16, generator=gen)
            with torch.no_grad():
                err = _rel(fp8(x), linear(x))
            # e4m3 weights and activations (under 0.06 on the CPU above), fast accumulation
            assert err < 0.08, (rows, n, k, err)


def test_apply_fp8_keeps_the_sensitive_layers_in_high_precision(model):
    n = apply_fp8(model, qwen_mmdit_fp8_layers, compute=True)
    assert n == 12 * TINY.num_layers  # q, k, v, out of both streams + the two linears of both MLPs
    kept = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert {"img_in", "txt_in", "proj_out", "norm_out.linear", "time_text_embed.timestep_embedder.linear_1"} <= set(
        kept)
    assert all(".img_mod." in k or ".txt_mod." in k for k in kept if k.startswith("transformer_blocks."))


def test_fp8_velocity_error_against_bf16_on_random_inputs(model):
    cond, uncond = _prompts()
    x, sigma = torch.randn(1, 12, 64), torch.tensor(0.5)
    with torch.no_grad():
        full = qwen_velocity(model, torch.float32, cond, uncond, 4.0, [(1, 3, 4)])(x, sigma)
        apply_fp8(model, qwen_mmdit_fp8_layers, compute=True)
        fp8 = qwen_velocity(model, torch.float32, cond, uncond, 4.0, [(1, 3, 4)])(x, sigma)
    # The stated error of FP8 compute (README): relative L2 of the velocity under 10% on random inputs.
    assert _rel(fp8, full) < 0.10


def test_fp8_compute_is_refused_without_an_fp8_gpu_and_weights_mode_runs(tiny_qwen):
    with pytest.raises(InputError, match="needs an FP8 GPU"):
        qimg.load(tiny_qwen, device="cpu", fp8="compute")
    pipe = qimg.load(tiny_qwen, device="cpu", fp8="weights")
    assert any(isinstance(m, FP8Linear) for m in pipe.transformer.modules())
    image = pipe.generate("a cat", seed=1, steps=2, width=32, height=32)[0]
    assert image.size == (32, 32)


def test_missing_attention_kernel_is_a_clear_error(tiny_qwen):
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        with pytest.raises(InputError, match="flash-attn"):
            qimg.load(tiny_qwen, device="cpu", attention="flash")
    # A bad option value is a usage error (exit 2), checked by RuntimeOptions before anything loads.
    with pytest.raises(qimg.UsageError, match="unknown attention backend"):
        qimg.load(tiny_qwen, device="cpu", attention="fastest")


def test_fp8_storage_trains_through_a_linear_that_keeps_only_the_e4m3_weight():
    """--fp8 weights in training: the input's gradient is that of the upcast linear, and what backward keeps is
    the e4m3 weight and its scales, never an upcast copy (that would cost the bf16 model's bytes per block)."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 96)
    fp8 = FP8Linear(linear, compute=False)
    x = torch.randn(3, 5, 64, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = fp8(x)
    (y * torch.linspace(-1, 1, 96)).sum().backward()
    want_x = x.detach().clone().requires_grad_(True)
    plain = torch.nn.functional.linear(want_x, fp8.dequantized_weight(torch.float32), fp8.bias)
    (plain * torch.linspace(-1, 1, 96)).sum().backward()
    assert torch.equal(y, plain)
    torch.testing.assert_close(x.grad, want_x.grad, rtol=1e-6, atol=1e-6)  # the same matmul, maybe another kernel
    assert {t.dtype for t in saved} == {torch.float8_e4m3fn, torch.float32}
    assert sum(t.numel() for t in saved if t.dtype == torch.float32) == 96  # the scales only
    assert fp8.bias.grad is None and not fp8.weight_fp8.requires_grad


@pytest.mark.skipif(not (torch.cuda.is_available() and fp8_supported("cuda")), reason="needs FP8 tensor cores")
def test_compiled_fp8_blocks_take_a_second_prompt_length_on_the_gpu(model) -> None:
    # A second shape makes the compiled block dynamic in the row count; the fast-accumulation choice must then be
    # a guard, not a symbolic value (_scaled_mm takes a plain bool)
    gpu = model.to("cuda", torch.bfloat16)
    apply_fp8(gpu, qwen_mmdit_fp8_layers, compute=True)
    compile_blocks(gpu.transformer_blocks)
    for n_txt in (7, 9, 150):
        txt = torch.randn(1, n_txt, TINY.txt_dim, device="cuda", dtype=torch.bfloat16)
        cond = PromptEmbeds(txt)
        x, sigma = torch.randn(1, 12, 64, device="cuda"), torch.tensor(0.3, device="cuda")
        with torch.no_grad():
            v = qwen_velocity(gpu, torch.bfloat16, cond, None, 1.0, [(1, 3, 4)])(x, sigma)
        assert torch.isfinite(v).all(), n_txt
