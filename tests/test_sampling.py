"""Sigma schedules, noise, packing and CFG against diffusers' scheduler and pipeline formulas."""

from __future__ import annotations

import pytest
import torch

from qimg.sampling import (
    FlowSchedule,
    calculate_shift,
    cfg,
    denoise,
    flow_sigmas,
    pack,
    seeded_noise,
    true_cfg,
    unpack,
)
from tests.fixtures import QWEN_SCHEDULER

QWEN = FlowSchedule(**QWEN_SCHEDULER)


def _diffusers_sigmas(steps: int, seq_len: int, config: dict) -> torch.Tensor:
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift as d_shift

    sched = FlowMatchEulerDiscreteScheduler(**config)
    mu = d_shift(seq_len, sched.config.get("base_image_seq_len", 256), sched.config.get("max_image_seq_len", 4096),
                 sched.config.get("base_shift", 0.5), sched.config.get("max_shift", 1.15))
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return sched.sigmas


@pytest.mark.parity
@pytest.mark.parametrize("width,height", [(1024, 1024), (1328, 1328), (1664, 928), (512, 512), (64, 48)])
@pytest.mark.parametrize("steps", [2, 4, 20, 50])
def test_qwen_sigmas_equal_diffusers_bit_for_bit(width, height, steps):
    seq = (width // 16) * (height // 16)
    ours = flow_sigmas(steps, QWEN, seq)
    assert ours.dtype == torch.float32 and ours.shape == (steps + 1,)
    assert torch.equal(ours, _diffusers_sigmas(steps, seq, QWEN_SCHEDULER))


@pytest.mark.parity
def test_static_shift_and_linear_time_shift_equal_diffusers():
    for config in (dict(shift=3.0), dict(use_dynamic_shifting=True, time_shift_type="linear", max_shift=1.15)):
        ours = flow_sigmas(28, FlowSchedule(**config), 4096)
        assert torch.equal(ours, _diffusers_sigmas(28, 4096, config))


def test_one_step_schedule_is_finite():
    # diffusers' terminal stretch divides 0 by 0 for a single step and yields NaN; qimg skips the stretch.
    assert flow_sigmas(1, QWEN, 4096).tolist() == [1.0, 0.0]


def test_worked_values_from_the_reference():
    assert calculate_shift(4096, QWEN) == pytest.approx(0.693548, abs=1e-6)
    assert calculate_shift(6889, QWEN) == pytest.approx(0.834325, abs=1e-6)
    s = flow_sigmas(50, QWEN, 4096)
    assert s[:3].tolist() == pytest.approx([1.0, 0.989701, 0.979192], abs=1e-6)
    assert s[-2].item() == pytest.approx(0.02, abs=1e-7) and s[-1].item() == 0.0


def test_seeded_noise_is_the_cpu_generator_stream_in_the_requested_dtype():
    a = seeded_noise((1, 1, 16, 4, 6), 42, torch.bfloat16)
    want = torch.randn((1, 1, 16, 4, 6), generator=torch.Generator("cpu").manual_seed(42), dtype=torch.bfloat16)
    assert a.dtype == torch.bfloat16 and torch.equal(a, want)
    assert not torch.equal(a, seeded_noise((1, 1, 16, 4, 6), 43, torch.bfloat16))


@pytest.mark.parity
def test_pack_and_unpack_match_diffusers_and_invert():
    from diffusers import QwenImagePipeline

    z = torch.randn(2, 16, 6, 10)
    packed = pack(z)
    want = QwenImagePipeline._pack_latents(z, 2, 16, 6, 10)
    assert torch.equal(packed, want)
    assert torch.equal(unpack(packed, 6, 10), z)
    # diffusers' unpack takes pixel sizes (latent * 8) and returns a frame axis.
    assert torch.equal(QwenImagePipeline._unpack_latents(packed, 48, 80, 8)[:, :, 0], z)


def test_true_cfg_rescales_to_the_conditional_norm_per_token():
    cond, uncond = torch.randn(1, 5, 64), torch.randn(1, 5, 64)
    out = true_cfg(cond, uncond, 4.0)
    comb = uncond + 4.0 * (cond - uncond)
    assert torch.allclose(out.norm(dim=-1), cond.norm(dim=-1), rtol=1e-5)
    assert torch.allclose(out / out.norm(dim=-1, keepdim=True), comb / comb.norm(dim=-1, keepdim=True), atol=1e-6)


def test_denoise_integrates_a_constant_velocity_exactly_and_reports_progress():
    seen = []
    sigmas = flow_sigmas(5, QWEN, 256)
    x = denoise(lambda x, s: torch.ones_like(x), torch.zeros(3), sigmas, lambda i, n: seen.append((i, n)))
    assert torch.allclose(x, torch.full((3,), -1.0))  # integral of dsigma from 1 to 0
    assert seen == [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]


def test_cfg_without_the_norm_rescale_is_the_plain_formula_and_qwen_keeps_it():
    gen = torch.Generator().manual_seed(3)
    cond, uncond = torch.randn(1, 5, 8, generator=gen), torch.randn(1, 5, 8, generator=gen)
    assert torch.equal(cfg(cond, uncond, 3.0), uncond + 3.0 * (cond - uncond))
    assert torch.equal(cfg(cond, uncond, 3.0, norm_rescale=True), true_cfg(cond, uncond, 3.0))
    from qimg.families.qwen import QWEN_IMAGE

    assert QWEN_IMAGE.cfg_norm_rescale  # Qwen-Image's pipelines rescale; a family without it gets plain CFG
