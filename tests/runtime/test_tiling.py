"""Tiled VAE encode/decode: the blend is exact where the net is local, close to untiled on a real VAE, exact
when the image fits one tile, and its seams do not step (while a hard-cut grid's do, so the check can fail)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qimg.loading.checkpoint import params_from_config
from qimg.loading.keymaps import QWEN_VAE_CONFIG, QWEN_VAE_KNOWN_UNUSED, qwen_vae_tensor
from qimg.nets.qwen_vae import QwenVAE
from qimg.runtime.tiling import Tiling, axis_weights, decode_tiled, encode_tiled, tile_spans
from qimg.specs import QwenVAEParams
from tests.fixtures import TINY_VAE, randomize_

H, W = 128, 160  # pixels; neither a multiple of most tiles below, and not square

# Tiled output differs from untiled for two reasons no blend can remove: the mid block's attention sees one
# tile instead of the whole image, and pixels near a tile border see zero padding instead of neighbours (the
# decoder's receptive field spans many latents). With random weights both effects are large (attention is
# not trained to look locally), so the bounds are empirical: measured on this photo at the grids below, decode
# |diff| <= 0.033 mean and 0.21 max on a [-1, 1] image whose mean |value| is 0.29; encode <= 0.061 mean and
# 0.52 max on latents of mean |value| 0.39. The bounds leave ~1.5x headroom. A wrong weight normalisation or
# a misplaced tile moves the mean by 0.1 or more, and the exact tests on a local net below catch the rest.
DECODE_MEAN, DECODE_MAX = 0.05, 0.35
ENCODE_MEAN, ENCODE_MAX = 0.1, 0.8
# Blended grids with >= 24 px of overlap; none divides the 160 px width, (64, 40) puts three tiles over some
# pixels, (128, 32) tiles the width only.
GRIDS = [Tiling(64, 32), Tiling(80, 24), Tiling(64, 40), Tiling(128, 32)]
SEAM_RATIO = 3.0  # boundary jumps / typical jumps; blended grids measure <= 1.8, the hard cut 27

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vae() -> QwenVAE:
    """The tiny random Qwen VAE (tests.fixtures.TINY_VAE) in diffusers' layout, loaded through our key transform."""
    from diffusers import AutoencoderKLQwenImage

    ref = randomize_(AutoencoderKLQwenImage(**TINY_VAE).eval(), seed=0)
    net = QwenVAE(params_from_config(QwenVAEParams, TINY_VAE, QWEN_VAE_CONFIG))
    state = {k: qwen_vae_tensor(k, v) for k, v in ref.state_dict().items() if k not in _unused(ref)}
    net.load_state_dict(state, strict=True)
    return net.eval().requires_grad_(False)


def _unused(ref: nn.Module) -> set[str]:
    import fnmatch

    return {k for k in ref.state_dict() if any(fnmatch.fnmatch(k, pat) for pat in QWEN_VAE_KNOWN_UNUSED)}


@pytest.fixture(scope="module")
def photo() -> Tensor:
    """skimage's astronaut, downscaled to 160x128, as (1, 3, H, W) in [-1, 1]."""
    from PIL import Image
    from skimage import data

    img = Image.fromarray(data.astronaut()).resize((W, H), Image.BICUBIC)
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 127.5 - 1


@pytest.fixture(scope="module")
def untiled(vae: QwenVAE, photo: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    with torch.no_grad():
        mean, logvar = vae.encode(photo)
        return mean, logvar, vae.decode(mean)


@pytest.fixture(scope="module")
def decoded(vae: QwenVAE, untiled: tuple[Tensor, Tensor, Tensor]):
    """decoded(tiling): the tiled decode of the photo's latents, computed once per tiling (CPU time is scarce)."""
    cache: dict[Tiling, Tensor] = {}

    def get(tiling: Tiling) -> Tensor:
        if tiling not in cache:
            with torch.no_grad():
                cache[tiling] = decode_tiled(vae, untiled[0], tiling)
        return cache[tiling]

    return get


# ---------------------------------------------------------------------------------------------- the grid itself


def test_bad_tilings_are_refused_with_plain_messages() -> None:
    for args, words in [((100, 8), "not a multiple of 8"), ((64, 64), "smaller than the tile size"),
                        ((64, -8), "0 or more"), ((64, 12), "overlap 12 px is not a multiple"),
                        ((0, 0), "too small")]:  # fmt: skip
        with pytest.raises(ValueError, match=words):
            Tiling(*args)
    assert Tiling() == Tiling(512, 64)


@pytest.mark.parametrize("size,tile,overlap", [(20, 8, 2), (16, 8, 0), (17, 8, 3), (8, 8, 2), (5, 8, 2), (30, 6, 5)])
def test_spans_cover_the_axis_with_full_tiles(size: int, tile: int, overlap: int) -> None:
    spans = tile_spans(size, tile, overlap)
    assert spans[0][0] == 0 and spans[-1][1] == size
    assert all(e - s == min(tile, size) for s, e in spans)
    assert all(b[0] <= a[1] for a, b in zip(spans, spans[1:], strict=False))  # no gaps


@pytest.mark.parametrize("size,tile,overlap,scale", [(20, 8, 2, 8), (17, 8, 3, 1), (30, 6, 5, 1), (16, 8, 0, 8)])
def test_weights_sum_to_one_everywhere(size: int, tile: int, overlap: int, scale: int) -> None:
    spans = tile_spans(size, tile, overlap)
    total = torch.zeros(size * scale)
    for (s, _), w in zip(spans, axis_weights(spans, scale, torch.device("cpu")), strict=True):
        assert (w > 0).all()
        total[s * scale : s * scale + w.numel()] += w
    torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=1e-6)
    if overlap == 0 and size % tile == 0:  # an exact grid without overlap: hard cuts, every weight 1
        assert all(bool((w == 1).all()) for w in axis_weights(spans, scale, torch.device("cpu")))


class LocalVAE(nn.Module):
    """A VAE-shaped net with no spatial context (8x8 average pool / nearest 8x upsample and 1x1 convs), so that
    tiling cannot change its output: any difference from untiled is a blending bug."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.enc = nn.Conv2d(3, 32, 1)
        self.post_quant_conv = nn.Conv2d(16, 16, 1)
        self.dec = nn.Conv2d(16, 3, 1)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mean, logvar = self.enc(F.avg_pool2d(x, 8)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    scale_factor = 8

    def decoder(self, z: Tensor) -> Tensor:
        return F.interpolate(self.dec(z), scale_factor=8.0, mode="nearest") * 3  # * 3: some pixels clamp

    def decode_unclamped(self, z: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(z))

    def decode(self, z: Tensor) -> Tensor:
        return self.decode_unclamped(z).clamp(-1.0, 1.0)


@pytest.mark.parametrize("tiling", [*GRIDS, Tiling(64, 0), Tiling(40, 8), Tiling(40, 24)], ids=str)
@torch.no_grad()
def test_blend_is_exact_for_a_local_net(tiling: Tiling) -> None:
    net = LocalVAE().eval()
    x = torch.rand(2, 3, 88, 136, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z = torch.randn(2, 16, 11, 17, generator=torch.Generator().manual_seed(2))
    for got, want in zip(encode_tiled(net, x, tiling), net.encode(x), strict=True):  # type: ignore[arg-type]
        torch.testing.assert_close(got, want, rtol=0, atol=2e-6)
    want = net.decode(z)
    assert (want.abs() == 1).any()  # the clamp is exercised
    torch.testing.assert_close(decode_tiled(net, z, tiling), want, rtol=0, atol=2e-6)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------- on the real tiny VAE


@pytest.mark.parametrize("tiling", [Tiling(160, 32), Tiling(512, 64), Tiling(128, 120)], ids=str)
@torch.no_grad()
def test_an_image_that_fits_one_tile_is_untiled_bit_for_bit(vae, photo, untiled, tiling: Tiling) -> None:
    mean, logvar, image = untiled
    if tiling.tile >= max(H, W):
        got_mean, got_logvar = encode_tiled(vae, photo, tiling)
        assert torch.equal(got_mean, mean) and torch.equal(got_logvar, logvar)
        assert torch.equal(decode_tiled(vae, mean, tiling), image)
    else:  # a 128x128 crop fits the 128 px tile
        crop = photo[..., :128]
        assert all(torch.equal(a, b) for a, b in zip(encode_tiled(vae, crop, tiling), vae.encode(crop), strict=True))
        assert torch.equal(decode_tiled(vae, mean[..., :16], tiling), vae.decode(mean[..., :16]))


@pytest.mark.parametrize("tiling", GRIDS, ids=str)
@torch.no_grad()
def test_tiled_stays_close_to_untiled(vae, photo, untiled, decoded, tiling: Tiling) -> None:
    mean, logvar, image = untiled
    got = decoded(tiling)
    assert got.shape == image.shape and got.dtype == image.dtype
    assert got.abs().max() <= 1.0  # clamped like QwenVAE.decode
    diff = (got - image).abs()
    assert diff.mean() <= DECODE_MEAN and diff.max() <= DECODE_MAX, (diff.mean().item(), diff.max().item())
    got_mean, got_logvar = encode_tiled(vae, photo, tiling)
    for a, b in ((got_mean, mean), (got_logvar, logvar)):
        d = (a - b).abs()
        assert d.mean() <= ENCODE_MEAN and d.max() <= ENCODE_MAX, (d.mean().item(), d.max().item())


def seam_ratio(diff: Tensor, tiling: Tiling) -> float:
    """Mean jump of the tiled-minus-untiled difference across tile edges, over the median jump elsewhere.

    Jumps are taken between neighbouring rows (and, transposed, columns), averaged over channels and the
    other axis. The edges are where a tile starts or ends, in pixels: where a hard cut puts its step.
    """
    ratios = []
    for d in (diff, diff.transpose(2, 3)):
        spans = tile_spans(d.shape[2] // 8, tiling.tile // 8, tiling.overlap // 8)
        edges = sorted({8 * s for s, _ in spans[1:]} | {8 * e for _, e in spans[:-1]})
        if not edges:
            continue
        jumps = (d[:, :, 1:] - d[:, :, :-1]).abs().mean(dim=(0, 1, 3))  # jumps[r - 1]: between rows r - 1 and r
        at = torch.tensor(edges) - 1
        elsewhere = torch.ones_like(jumps, dtype=torch.bool)
        elsewhere[at] = False
        ratios.append((jumps[at].mean() / jumps[elsewhere].median()).item())
    return max(ratios)


@pytest.mark.parametrize("tiling", GRIDS, ids=str)
@torch.no_grad()
def test_seams_do_not_step(untiled, decoded, tiling: Tiling) -> None:
    assert seam_ratio(decoded(tiling) - untiled[2], tiling) < SEAM_RATIO


def test_the_seam_check_catches_a_hard_cut(untiled, decoded) -> None:
    """Without overlap the 128-row image splits exactly at row 64: a visible step the check must flag."""
    hard = Tiling(64, 0)
    assert seam_ratio(decoded(hard) - untiled[2], hard) > SEAM_RATIO


@torch.no_grad()
def test_batches_are_tiled_per_image(vae, untiled, decoded) -> None:
    mean, tiling = untiled[0], Tiling(64, 32)
    pair = decode_tiled(vae, torch.cat([mean.flip(-1), mean]), tiling)
    torch.testing.assert_close(pair[1:], decoded(tiling), rtol=0, atol=1e-5)


@torch.no_grad()
def test_half_precision_in_half_precision_out() -> None:
    net = LocalVAE().to(torch.bfloat16).eval()
    x = (torch.rand(1, 3, 88, 136, generator=torch.Generator().manual_seed(1)) * 2 - 1).to(torch.bfloat16)
    z = net.encode(x)[0]
    assert encode_tiled(net, x, Tiling(40, 16))[0].dtype == torch.bfloat16  # type: ignore[arg-type]
    out = decode_tiled(net, z, Tiling(40, 16))  # type: ignore[arg-type]
    assert out.dtype == torch.bfloat16
    # Blended in fp32 and rounded once: within one bf16 step (2^-8 relative) of the untiled output.
    assert (out.float() - net.decode(z).float()).abs().max() <= 2**-7


def test_encode_refuses_sizes_off_the_latent_grid(vae) -> None:
    with pytest.raises(ValueError, match="multiples of 8"):
        encode_tiled(vae, torch.zeros(1, 3, 60, 64), Tiling(32, 8))
