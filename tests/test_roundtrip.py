"""qimg.roundtrip: image preparation, parity with diffusers' encode(mode) + decode, metrics, tiling, latents files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import qimg
from qimg.errors import InputError, OutputError
from qimg.loading.components import load_qwen_vae
from qimg.nets.qwen_vae import QwenVAE
from qimg.roundtrip import (
    check_latents_path,
    make_tiling,
    prepare_image,
    save_latents,
    vae_roundtrip,
)
from qimg.runtime.tiling import Tiling
from tests.fixtures import TINY_VAE, randomize_

# Latents: fp32 on the CPU, 2-D vs 3-D convs differ only in summation order (tests/nets/test_qwen_vae.py
# measured <= 1.6e-6 of the output scale); 2e-5 as there. Decoded 8-bit images: the same tiny float
# differences can flip a value that sits at a rounding boundary by one level, so at most 1 and rarely.
RTOL = 2e-5

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory):
    """(folder, diffusers VAE): a model folder whose vae/ is the tiny random VAE saved by diffusers; the other
    components are only the marker files resolve_model looks for."""
    from diffusers import AutoencoderKLQwenImage

    from qimg.loading.hub import QWEN_IMAGE_COMPONENTS

    ref = randomize_(AutoencoderKLQwenImage(**TINY_VAE).eval(), seed=0)
    root = tmp_path_factory.mktemp("model")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "QwenImagePipeline"}))
    ref.save_pretrained(root / "vae")
    for component, marker in QWEN_IMAGE_COMPONENTS.items():
        (root / component).mkdir(exist_ok=True)
        if not (root / component / marker).exists():
            (root / component / marker).write_text("{}")
    return root, ref


@pytest.fixture(scope="module")
def vae(model_dir) -> QwenVAE:
    """As `qimg vae roundtrip` loads it: through load_vae, channels-last."""
    return qimg.load_vae(str(model_dir[0]), device="cpu", dtype="float32")


def photo(width: int, height: int, mode: str = "RGB") -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut()).resize((width, height), Image.BICUBIC).convert(mode)


@pytest.mark.parity
def test_roundtrip_matches_diffusers(model_dir, vae: QwenVAE) -> None:
    from diffusers.image_processor import VaeImageProcessor
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    ref = model_dir[1]
    image = photo(96, 80)
    processor = VaeImageProcessor(vae_scale_factor=16)  # what QwenImagePipeline builds (8 * 2)
    with torch.no_grad():
        x = processor.preprocess(image)  # (1, 3, 80, 96) in [-1, 1]
        mode = ref.encode(x[:, :, None]).latent_dist.mode()
        expected = processor.postprocess(ref.decode(mode).sample[:, :, 0], output_type="pil")[0]

    result = vae_roundtrip(vae, image, model="tiny")
    assert result.notes == ()
    assert result.latents.shape == (1, 16, 10, 12) and result.latents.dtype == torch.float32
    err = (result.latents - mode[:, :, 0]).abs().max()
    assert err <= RTOL * mode.abs().max(), err

    ours, theirs = np.asarray(result.image).astype(int), np.asarray(expected).astype(int)
    assert ours.shape == theirs.shape == (80, 96, 3)
    assert np.abs(ours - theirs).max() <= 1 and (ours != theirs).mean() < 0.01  # measured: identical, 7.8e-7

    # The scores are those of the written 8-bit image against the input, as scikit-image computes them.
    a, b = np.asarray(image) / 255.0, ours / 255.0
    assert result.psnr == pytest.approx(peak_signal_noise_ratio(a, b, data_range=1), abs=1e-6)
    sk_ssim = structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                    data_range=1, channel_axis=-1)
    assert result.ssim == pytest.approx(sk_ssim, abs=1e-6)
    assert result.encode_seconds > 0 and result.decode_seconds > 0


def test_metadata_and_png(vae: QwenVAE, tmp_path: Path) -> None:
    result = vae_roundtrip(vae, photo(64, 48), model="/models/Qwen-Image")
    params = result.image.info["qimg"]
    assert params["command"] == "vae roundtrip" and params["model"] == "/models/Qwen-Image"
    assert (params["width"], params["height"], params["dtype"], params["device"]) == (64, 48, "float32", "cpu")
    assert params["latents"] == "raw_posterior_mean" and params["tile_size"] is None
    assert params["psnr"] == round(result.psnr, 4) and params["qimg_version"] == qimg.__version__
    out = qimg.save_png(result.image, tmp_path / "rt.png")
    assert qimg.read_params(out)["ssim"] == params["ssim"]


def test_odd_sizes_are_center_cropped_not_resampled() -> None:
    image = photo(100, 70)
    prepared, notes = prepare_image(image)
    assert prepared.size == (96, 64)
    assert np.array_equal(np.asarray(prepared), np.asarray(image)[3:67, 2:98])
    (note,) = notes
    assert note.startswith("cropped 100x70 to 96x64 (left 2, right 2, top 3, bottom 3 px)")
    assert prepare_image(photo(32, 48))[1] == ()


def test_multiples_of_8_go_through_whole(vae: QwenVAE) -> None:
    """The VAE needs multiples of 8 px (its spatial factor), not of 16: 200x200 comes back 200x200, uncropped,
    untiled and tiled; 203x201 loses only the 3 and 1 px that are over."""
    image = photo(200, 200)
    plain = vae_roundtrip(vae, image)
    assert plain.size == (200, 200) and plain.notes == () and plain.params["notes"] is None
    assert plain.latents.shape == (1, 16, 25, 25)  # an odd latent grid
    tiled = vae_roundtrip(vae, image, tiling=Tiling(128, 32))
    assert tiled.size == (200, 200) and tiled.latents.shape == plain.latents.shape

    odd = photo(203, 201)
    result = vae_roundtrip(vae, odd)
    assert result.size == (200, 200)
    (note,) = result.notes
    assert note.startswith("cropped 203x201 to 200x200 (left 1, right 2, top 0, bottom 1 px)")
    assert "multiples of 8" in note
    prepared, _ = prepare_image(odd)
    assert np.array_equal(np.asarray(prepared), np.asarray(odd)[0:200, 1:201])


def test_alpha_is_dropped_with_a_note_and_small_images_refused(vae: QwenVAE) -> None:
    result = vae_roundtrip(vae, photo(33, 32, "RGBA"))
    assert result.size == (32, 32)
    assert [n.split(" ")[0] for n in result.notes] == ["dropped", "cropped"]
    assert result.params["notes"].count(" | ") == 1
    with pytest.raises(InputError, match="15x40 px"):
        prepare_image(photo(15, 40))


def test_tiled_roundtrip(vae: QwenVAE) -> None:
    image = photo(160, 128)
    plain = vae_roundtrip(vae, image)
    tiled = vae_roundtrip(vae, image, tiling=Tiling(64, 32))
    assert (tiled.params["tile_size"], tiled.params["tile_overlap"]) == (64, 32)
    assert tiled.latents.shape == plain.latents.shape
    # A random VAE is a poor autoencoder, so PSNR itself is low; tiling must not make it much worse.
    assert abs(tiled.psnr - plain.psnr) < 1.0
    fits = vae_roundtrip(vae, image, tiling=Tiling(256, 64))  # one tile: bit-identical to untiled
    assert torch.equal(fits.latents, plain.latents) and fits.image.tobytes() == plain.image.tobytes()


def test_make_tiling_speaks_to_people() -> None:
    assert make_tiling(256, 32) == Tiling(256, 32)
    with pytest.raises(InputError, match="multiple of 8") as info:
        make_tiling(100, 16)
    assert "--tile-size" in (info.value.hint or "")
    with pytest.raises(InputError, match="smaller than the tile size"):
        make_tiling(64, 64)


def test_paths_are_opened_and_bad_files_refused(vae: QwenVAE, tmp_path: Path) -> None:
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(InputError, match="not a readable image"):
        vae_roundtrip(vae, tmp_path / "notes.png")
    with pytest.raises(InputError, match="does not exist"):
        vae_roundtrip(vae, tmp_path / "nope.png")


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    """A phone photo stored sideways with Orientation = 6 (turn 90 degrees clockwise) goes through upright."""
    image = photo(64, 32)
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(tmp_path / "side.jpg", exif=exif.tobytes(), quality=95)
    prepared, notes = prepare_image(qimg.open_image(tmp_path / "side.jpg"))
    assert prepared.size == (32, 64)
    assert notes == ("turned the image upright as its EXIF orientation asks",)


def test_latents_file(vae: QwenVAE, tmp_path: Path) -> None:
    photo(48, 32).save(tmp_path / "in.png")
    result = vae_roundtrip(vae, tmp_path / "in.png", model="tiny")  # a path is opened with open_image
    assert result.params["source"] == str(tmp_path / "in.png")
    path = save_latents(result, tmp_path / "z.safetensors")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        assert torch.equal(f.get_tensor("latents"), result.latents)
    assert meta["latents"] == "raw_posterior_mean" and meta["normalized"] == "false"
    assert (meta["model"], meta["width"], meta["height"]) == ("tiny", "48", "32")
    assert meta["qimg_version"] == qimg.__version__
    assert json.loads(meta["latents_mean"]) == list(vae.params.latents_mean)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png", "z.safetensors"]  # no temporary left
    with pytest.raises(OutputError, match="already exists"):
        save_latents(result, path)
    save_latents(result, path, overwrite=True)
    with pytest.raises(OutputError, match=r"\.safetensors"):
        check_latents_path(tmp_path / "z.pt")
    with pytest.raises(OutputError, match="does not exist"):
        check_latents_path(tmp_path / "missing" / "z.safetensors")


def test_load_vae_reads_only_the_vae(model_dir, vae: QwenVAE) -> None:
    weight = vae.decoder.conv_in.weight
    assert weight.dtype == torch.float32 and weight.is_contiguous(memory_format=torch.channels_last)
    plain = load_qwen_vae(model_dir[0] / "vae", device="cpu", dtype=torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), vae.state_dict().values(), strict=True))
    half = qimg.load_vae(str(model_dir[0]), device="cpu", dtype="bfloat16")
    assert next(half.parameters()).dtype == torch.bfloat16
