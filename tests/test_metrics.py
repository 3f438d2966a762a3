"""PSNR and SSIM against scikit-image on real photos and on random images."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qimg.metrics import psnr, ssim

skimage = pytest.importorskip("skimage")
from skimage import data  # noqa: E402
from skimage.metrics import peak_signal_noise_ratio, structural_similarity  # noqa: E402

# Both sides compute in float64 from the same [0, 1] values; only the summation order differs (a separable
# conv here, scipy's correlate1d there), so they agree to ~1e-12. 1e-9 leaves room for other BLAS builds while
# a wrong window, constant or crop moves SSIM by 1e-3 or more.
TOL = 1e-9


def _photo_pair(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A real photo (HWC, [0, 1]) cropped to 96x80 (odd-shaped on purpose) and a noisy, shifted copy of it."""
    a = data.astronaut()[100:196, 150:230].astype(np.float64) / 255
    rng = np.random.default_rng(seed)
    b = np.clip(np.roll(a, 1, axis=1) * 0.9 + rng.normal(0, 0.05, a.shape) + 0.03, 0, 1)
    return a, b


def _chw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def _sk_ssim(a: np.ndarray, b: np.ndarray) -> float:
    return structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                 data_range=1, channel_axis=-1)


@pytest.mark.parametrize("seed", [0, 1])
def test_psnr_and_ssim_match_scikit_image_on_a_photo(seed: int) -> None:
    a, b = _photo_pair(seed)
    assert abs(psnr(_chw(a), _chw(b)) - peak_signal_noise_ratio(a, b, data_range=1)) < TOL
    expected = _sk_ssim(a, b)
    assert 0.2 < expected < 0.95  # a meaningful middle value, not a trivially saturated one
    assert abs(ssim(_chw(a), _chw(b)) - expected) < TOL


def test_ssim_matches_on_random_images_and_float32_input() -> None:
    rng = np.random.default_rng(3)
    a = rng.random((37, 23, 3))
    b = np.clip(a + rng.normal(0, 0.2, a.shape), 0, 1)
    assert abs(ssim(_chw(a), _chw(b)) - _sk_ssim(a, b)) < TOL
    # float32 inputs are upcast first: the result equals float64 on the float32-rounded values.
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    assert abs(ssim(_chw(a32), _chw(b32)) - _sk_ssim(a32.astype(np.float64), b32.astype(np.float64))) < TOL


def test_batches_average_their_images() -> None:
    pairs = [_photo_pair(s) for s in (0, 1)]
    batch_a = torch.stack([_chw(a) for a, _ in pairs])
    batch_b = torch.stack([_chw(b) for _, b in pairs])
    assert abs(ssim(batch_a, batch_b) - np.mean([_sk_ssim(a, b) for a, b in pairs])) < TOL
    mse = np.mean([np.mean((a - b) ** 2) for a, b in pairs])
    assert abs(psnr(batch_a, batch_b) - 10 * math.log10(1 / mse)) < TOL


def test_identical_images() -> None:
    a = _chw(_photo_pair(0)[0])
    assert psnr(a, a) == math.inf
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-12)


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(torch.zeros(3, 16, 16), torch.zeros(3, 16, 17))
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.zeros(3, 10, 16), torch.zeros(3, 10, 16))
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        ssim(torch.zeros(16, 16), torch.zeros(16, 16))


def test_bands_give_the_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    """Large images are scored in bands of rows (bounded memory); any band height gives the same figures."""
    import qimg.metrics

    a, b = (_chw(x) for x in _photo_pair(2))
    whole = (psnr(a, b), ssim(a, b))
    for band in (1, 7, 40):
        monkeypatch.setattr(qimg.metrics, "BAND", band)
        assert psnr(a, b) == pytest.approx(whole[0], abs=1e-10)
        assert ssim(a, b) == pytest.approx(whole[1], abs=1e-12)
