"""qimg train-lora on the tiny FLUX.1-dev and FLUX.1-Kontext-dev: the loss against diffusers' transformer on the
same weights (guidance 1.0, flux_shift, Kontext controls at frame 1), the shift itself, the targets, and whole
runs from the library and the CLI whose LoRA loads in qimg and diffusers and changes the image."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import qimg
from qimg.cli.main import app
from qimg.embeddings import PromptEmbeds
from qimg.training.flux_step import TRAIN_GUIDANCE, flux_flow_loss, flux_shift
from qimg.training.step import step_generator
from qimg.training.trainer import TrainConfig, Trainer, train_items
from tests.fixtures_flux_model import TINY_FLUX, write_tiny_flux
from tests.training.test_edit_training import _picture

CPU = qimg.RuntimeOptions(device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory):
    """(diffusers pipeline, folder) of the tiny FLUX.1-dev and of the tiny FLUX.1-Kontext-dev."""
    root = tmp_path_factory.mktemp("flux-train")
    return {"dev": (write_tiny_flux(root / "dev", seed=3), root / "dev"),
            "kontext": (write_tiny_flux(root / "kontext", kontext=True, seed=7), root / "kontext")}


def _dataset(folder: Path, n: int = 1, control: tuple[int, int] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if control is not None:
        (folder / "control").mkdir()
    for i in range(n):
        _picture((256, 256), i).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a photo of sks thing {i}", encoding="utf-8")
        if control is not None:
            _picture(control, 50 + i).save(folder / "control" / f"img{i}.png")
    return folder


def _config(folder: Path, data: Path, **changes) -> TrainConfig:
    base = dict(model=str(folder), data=str(data), steps=3, rank=4, alpha=8.0, lr=5e-2, warmup=1, resolution=256,
                save_every=3, keep=2)
    return TrainConfig(**{**base, **changes})


def _ids(rows: int, cols: int, frame: int) -> torch.Tensor:
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.stack([torch.full_like(r, frame), r, c], -1).reshape(-1, 3).float()


def _diffusers_loss(transformer, x0, texts, size, gen, *, guidance, refs=None, ref_grid=None) -> torch.Tensor:
    """The same step written against diffusers' FluxTransformer2DModel: noise, then the sigmoid-normal timestep
    with FLUX's resolution-matched shift, then the velocity MSE on the target tokens."""
    noise = torch.randn(x0.shape, generator=gen)
    s = math.exp(0.5 + 0.65 * (x0.shape[1] - 256) / 3840)
    t = torch.sigmoid(torch.randn(x0.shape[0], generator=gen))
    t = s * t / (1 + (s - 1) * t)
    xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
    w, h = size
    img_ids = _ids(h // 16, w // 16, 0)
    hidden = xt
    if refs is not None:
        img_ids = torch.cat([img_ids, _ids(*ref_grid, 1)])
        hidden = torch.cat([xt, refs], dim=1)
    txt = torch.cat([p.embeds for p in texts])
    out = transformer(hidden_states=hidden, encoder_hidden_states=txt,
                      pooled_projections=torch.cat([p.pooled for p in texts]), timestep=t, img_ids=img_ids,
                      txt_ids=torch.zeros(txt.shape[1], 3), guidance=torch.full((x0.shape[0],), guidance),
                      return_dict=False)[0]
    return F.mse_loss(out[:, : x0.shape[1]], noise - x0)


def _texts(n: int, seed: int, length: int = 512) -> list[PromptEmbeds]:
    """Random T5 states and pooled CLIP vectors of the tiny encoders' widths (TINY_FLUX's joint and pooled dims)."""
    gen = torch.Generator().manual_seed(seed)
    return [PromptEmbeds(torch.randn(1, length, TINY_FLUX["joint_attention_dim"], generator=gen), None,
                         torch.randn(1, TINY_FLUX["pooled_projection_dim"], generator=gen)) for _ in range(n)]


def test_flux_shift_matches_the_sampler_mu_at_256_and_4096_tokens():
    t = torch.tensor([0.25, 0.5, 0.75])
    for tokens, mu in ((256, 0.5), (4096, 1.15)):
        s = math.exp(mu)
        torch.testing.assert_close(flux_shift(t, tokens), s * t / (1 + (s - 1) * t))
    assert flux_shift(torch.tensor([0.5]), 4096).item() == pytest.approx(math.exp(1.15) / (1 + math.exp(1.15)))


@pytest.mark.parametrize("kontext", [False, True])
def test_the_loss_equals_diffusers_transformer_at_guidance_one(tiny_flux, kontext):
    ref, folder = tiny_flux["kontext" if kontext else "dev"]
    pipe = qimg.load(folder, CPU)
    size = (64, 48)  # 4 x 3 target tokens
    gen = torch.Generator().manual_seed(11)
    x0 = torch.randn(2, 12, 64, generator=gen)
    texts = _texts(2, seed=2, length=7)  # any length: T5 pads to max_sequence_length, the loss takes what it gets
    refs, grid = (torch.randn(2, 6, 64, generator=gen), (2, 3)) if kontext else (None, None)
    shapes = [(1, *grid)] if kontext else []
    with torch.no_grad():
        got = flux_flow_loss(pipe.transformer, x0, texts, size, step_generator(0, 4, 0), torch.float32,
                             torch.device("cpu"), refs=refs, ref_shapes=shapes)
        want = _diffusers_loss(ref.transformer, x0, texts, size, step_generator(0, 4, 0), guidance=TRAIN_GUIDANCE,
                               refs=refs, ref_grid=grid)
        sampling_guidance = _diffusers_loss(ref.transformer, x0, texts, size, step_generator(0, 4, 0), guidance=3.5,
                                            refs=refs, ref_grid=grid)
    # fp32 on the CPU, the same weights: only summation order differs.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # The guidance input reaches the loss: a test that could not tell 1.0 from 3.5 would prove nothing.
    assert abs(float(sampling_guidance) - float(want)) > 1e-4


def test_the_loss_refuses_mixed_text_lengths(tiny_flux):
    pipe = qimg.load(tiny_flux["dev"][1], CPU)
    texts = _texts(1, 0, 5) + _texts(1, 1, 6)
    with pytest.raises(ValueError, match="mixes text lengths"):
        flux_flow_loss(pipe.transformer, torch.zeros(2, 12, 64), texts, (64, 48), torch.Generator(), torch.float32,
                       torch.device("cpu"))


def test_flux_dev_trains_every_block_linear_but_the_modulation_and_the_lora_loads_in_diffusers(tiny_flux, tmp_path,
                                                                                              one_thread):
    ref, folder = tiny_flux["dev"]
    data = _dataset(tmp_path / "data")
    path = qimg.train_lora(_config(folder, data), tmp_path / "run", CPU)
    pipe = qimg.load(folder, CPU)
    options = dict(steps=2, seed=1, width=64, height=64)
    plain = np.asarray(pipe.generate("a photo of sks thing", **options)[0])
    lora = pipe.load_lora(path)
    p = pipe.transformer.params
    # 12 linears per double block (both streams' q, k, v, out and MLPs), 5 per single block (q, k, v, proj_mlp,
    # proj_out): musubi's FLUX targets.
    assert lora.dialect == "diffusers" and not lora.unmatched
    assert len(lora.modules) == 12 * p.num_layers + 5 * p.num_single_layers
    assert not any("norm" in m for m in lora.modules)
    styled = np.asarray(pipe.generate("a photo of sks thing", **options)[0])
    assert not np.array_equal(plain, styled)
    ref.load_lora_weights(str(path), adapter_name="trained")
    try:
        with torch.no_grad():
            want = ref(prompt="a photo of sks thing", num_inference_steps=2, width=64, height=64, guidance_scale=3.5,
                       generator=torch.Generator("cpu").manual_seed(1), output_type="np").images[0]
    finally:
        ref.delete_adapters("trained")
    # diffusers applies the file at the same scale (alpha 8 / rank 4 from the header): the same image.
    assert np.abs(styled.astype(np.int16) - np.round(want * 255).astype(np.int16)).max() <= 1


def test_the_loss_falls_on_an_image_it_overfits(tiny_flux, tmp_path, one_thread):
    _, folder = tiny_flux["dev"]
    config = _config(folder, _dataset(tmp_path / "data"), steps=25, lr=2e-2, save_every=25, targets="all")
    pipe = qimg.load(folder, CPU)
    trainer = Trainer(config, tmp_path / "run", pipe)
    (tmp_path / "run").mkdir()
    trainer.prepare(train_items(config, pipe.ref))
    # --targets all adds the modulation of both block kinds
    assert {"transformer_blocks.0.norm1.linear.down", "single_transformer_blocks.0.norm.linear.down"} <= set(
        trainer.params)
    with torch.no_grad():
        before = [float(trainer.loss([0], step=1000 + k, micro=0)) for k in range(4)]
    trainer.run()
    with torch.no_grad():
        after = [float(trainer.loss([0], step=1000 + k, micro=0)) for k in range(4)]
    assert sum(after) < 0.8 * sum(before), (before, after)


def test_kontext_trains_on_control_pairs_at_its_training_resolution(tiny_flux, tmp_path, one_thread, monkeypatch):
    from dataclasses import replace

    from qimg.specs import SPECS

    _, folder = tiny_flux["kontext"]
    # Kontext's preferred resolutions are ~1 MP; two small ones keep the same code path fast on the CPU.
    spec = SPECS["flux-kontext-dev"]
    monkeypatch.setitem(SPECS, "flux-kontext-dev", replace(spec, input_sizes=((96, 64), (64, 96))))
    data = _dataset(tmp_path / "data", control=(90, 62))
    config = _config(folder, data)
    pipe = qimg.load(folder, CPU)
    trainer = Trainer(config, tmp_path / "run", pipe)
    (tmp_path / "run").mkdir()
    trainer.prepare(train_items(config, pipe.ref))
    assert trainer.ref_shapes == [((1, 4, 6),)]  # 90x62 -> the nearest training resolution 96x64 -> 6 x 4 tokens
    _, _, refs, shapes = trainer._batch([0])
    assert refs.shape == (1, 24, 64) and shapes == ((1, 4, 6),)
    path = trainer.run()
    edit = qimg.load(folder, CPU)
    image = _picture((96, 64), 3)
    options = dict(steps=2, seed=4, width=96, height=64)
    plain = np.asarray(edit.edit("make it sks", [image], **options)[0])
    edit.load_lora(path)
    styled = np.asarray(edit.edit("make it sks", [image], **options)[0])
    assert not np.array_equal(plain, styled)


def test_cli_train_lora_on_flux(tiny_flux, tmp_path, one_thread):
    _, folder = tiny_flux["dev"]
    data = _dataset(tmp_path / "data")
    runner = CliRunner()
    base = ["train-lora", "--model", str(folder), "--data", str(data), "--device", "cpu", "--rank", "4",
            "--resolution", "256", "--steps", "2", "--save-every", "2"]
    done = runner.invoke(app, [*base, "-o", str(tmp_path / "run"), "--json", "--format", "kohya"])
    assert done.exit_code == 0, done.output
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert [e["event"] for e in events] == ["step", "step", "saved"]
    out = tmp_path / "out.png"
    gen = runner.invoke(app, ["generate", "a photo of sks thing", "-o", str(out), "--model", str(folder), "--lora",
                              str(tmp_path / "run" / "lora.safetensors"), "--steps", "2", "--width", "64",
                              "--height", "64", "--device", "cpu", "--dtype", "float32", "-v"])
    assert gen.exit_code == 0, gen.output
    assert "kohya" in gen.stderr and out.is_file()


def test_the_training_plan_counts_flux_blocks_at_their_measured_saved_activations(tiny_flux):
    """FLUX's per-block saved activations are its own measured count (18 copies), not Qwen-Image's 22: with
    Qwen's, a 48 GiB budget would checkpoint blocks that fit (bench/results/flux_train_h200.json)."""
    from qimg.families.flux import FLUX, FLUX_TRAIN_SAVED_COPIES

    folder = tiny_flux["dev"][1]
    tokens, dim = 256 + 512, TINY_FLUX["num_attention_heads"] * TINY_FLUX["attention_head_dim"]
    needs = FLUX.train_needs(folder, torch.bfloat16, None, tokens, 2, 1000)
    assert FLUX_TRAIN_SAVED_COPIES == 18
    assert needs.saved == 18 * 2 * tokens * dim * 2 and needs.inputs == 2 * tokens * dim * 2
    assert needs.adapters == 16 * 1000
