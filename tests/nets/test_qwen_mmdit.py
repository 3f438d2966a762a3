"""The Qwen-Image MMDiT against diffusers' QwenImageTransformer2DModel on the same tiny random weights (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch

from qimg.loading.components import load_qwen_mmdit
from qimg.nets.qwen_mmdit import QwenMMDiT, qwen_rope
from qimg.specs import QwenMMDiTParams
from tests.fixtures import TINY_MMDIT, randomize_

diffusers = pytest.importorskip("diffusers")

# fp32 on CPU: both sides do the same arithmetic in a different order (fused RoPE over the joint sequence, our
# cos/sin vs complex64 multiply), so errors are rounding-level: ~1e-6 relative to outputs of magnitude ~10.
RTOL = 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(diffusers model, ours loaded from the diffusers save in the official layout), zero_cond_t both ways."""
    out = {}
    for zero_cond_t in (False, True):
        ref = randomize_(diffusers.QwenImageTransformer2DModel(**TINY_MMDIT, zero_cond_t=zero_cond_t).eval(), 11)
        folder = tmp_path_factory.mktemp(f"mmdit-{zero_cond_t}")
        ref.save_pretrained(folder)
        out[zero_cond_t] = (ref, load_qwen_mmdit(folder, device="cpu", dtype=torch.float32))
    return out


def _run(ref, ours, shapes, txt_len, mask=None, batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n_img = sum(f * h * w for f, h, w in shapes)
    x = torch.randn(batch, n_img, 64, generator=gen)
    txt = torch.randn(batch, txt_len, TINY_MMDIT["joint_attention_dim"], generator=gen)
    t = torch.rand(batch, generator=gen)
    with torch.no_grad():
        want = ref(hidden_states=x, encoder_hidden_states=txt, encoder_hidden_states_mask=mask, timestep=t,
                   img_shapes=[shapes] * batch, return_dict=False)[0]
        rope = qwen_rope(shapes, txt_len, tuple(TINY_MMDIT["axes_dims_rope"]))
        n_target = shapes[0][0] * shapes[0][1] * shapes[0][2]
        got = ours(x, txt, t, rope, None if mask is None else mask.bool(), n_target=n_target)
    return got, want


@pytest.mark.parity
@pytest.mark.parametrize("grid", [(4, 4), (3, 5), (6, 2)], ids=["square", "wide", "tall"])
def test_forward_matches_diffusers(pair, grid):
    ref, ours = pair[False]
    got, want = _run(ref, ours, [(1, *grid)], txt_len=7)
    assert got.shape == want.shape
    assert _rel(got, want) < RTOL


@pytest.mark.parity
def test_forward_with_text_padding_mask_matches_diffusers(pair):
    ref, ours = pair[False]
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 5:] = 0  # second sample: 4 padding tokens
    got, want = _run(ref, ours, [(1, 3, 5)], txt_len=9, mask=mask)
    assert _rel(got, want) < RTOL
    # The mask must matter: without it the padded sample attends to padding and changes.
    unmasked, _ = _run(ref, ours, [(1, 3, 5)], txt_len=9, mask=None)
    assert _rel(unmasked[1], got[1]) > 1e-3
    assert _rel(unmasked[0], got[0]) < RTOL


@pytest.mark.parity
def test_zero_cond_t_with_reference_frames_matches_diffusers(pair):
    ref, ours = pair[True]
    got, want = _run(ref, ours, [(1, 3, 4), (1, 2, 3), (1, 4, 2)], txt_len=6)
    assert _rel(got, want) < RTOL


def test_rope_grid_is_centred_and_text_follows_the_image():
    table = qwen_rope([(1, 5, 4)], txt_len=3, axes_dims=(4, 6, 6))
    assert table.shape == (3 + 20, 8) and table.dtype == torch.complex64
    # Text token 0 sits at position max(5 // 2, 4 // 2) = 2 on every axis: angle = 2 * inv_freq; first freq is 1.
    assert torch.allclose(table[0, 0], torch.polar(torch.tensor(1.0), torch.tensor(2.0)))
    # Image token 0 is row -3, col -2 (centred grid); the row axis starts at channel pair 2 with inv_freq 1.
    assert torch.allclose(table[3, 2].imag, torch.sin(torch.tensor(-3.0)))
    assert torch.allclose(table[3, 5].imag, torch.sin(torch.tensor(-2.0)))


def test_build_on_meta_has_the_official_key_count():
    with torch.device("meta"):
        model = QwenMMDiT(QwenMMDiTParams())
    keys = model.state_dict()
    assert len(keys) == 1933  # 13 top-level + 32 per block x 60 (diffusers_facts.md 1.2)
    assert sum(t.numel() for t in keys.values()) == 20_430_401_088
