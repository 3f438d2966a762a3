"""qimg train-lora on the tiny edit models (Qwen-Image-Edit, -2511): runs from the library and the CLI, the loss
against diffusers' transformer (with -2511's t = 0 modulation of the control tokens), the loss on target tokens
only, batches that never mix control sizes, and the dataset refusals that come before anything loads."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

import qimg
from qimg.cli.main import app
from qimg.embeddings import PromptEmbeds, load_embeddings
from qimg.nets.qwen_mmdit import qwen_rope
from qimg.pipelines.common import image_to_tensor
from qimg.pipelines.prompts import image_fingerprint
from qimg.png import read_image
from qimg.sampling import pack
from qimg.specs import SPECS
from qimg.training.data import epoch_batches
from qimg.training.images import DatasetError
from qimg.training.step import flow_loss, qwen_shift, step_generator
from qimg.training.trainer import TrainConfig, Trainer, train_items

CPU = qimg.RuntimeOptions(device="cpu", dtype="float32")


def _picture(size: tuple[int, int], seed: int) -> Image.Image:
    width, height = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx / width, yy / height, 0.5 + 0.5 * np.sin(xx / 7.0 + yy / 11.0)], -1)
    return Image.fromarray(((0.85 * base + 0.15 * rng.random((height, width, 3))) * 255).astype(np.uint8))


def _edit_dataset(folder: Path, controls: Sequence[Sequence[tuple[int, int]]], target: tuple[int, int] = (256, 256)
                  ) -> Path:
    """A folder dataset: imgI.png with its caption, and for each item the control sizes given: control/imgI.png
    for one, control/imgI_0.png, imgI_1.png, ... for several."""
    (folder / "control").mkdir(parents=True, exist_ok=True)
    for i, sizes in enumerate(controls):
        _picture(target, 100 + i).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"make thing {i} sks", encoding="utf-8")
        names = [f"img{i}.png"] if len(sizes) == 1 else [f"img{i}_{k}.png" for k in range(len(sizes))]
        for k, (name, size) in enumerate(zip(names, sizes, strict=True)):
            _picture(size, 10 * i + k).save(folder / "control" / name)
    return folder


@pytest.fixture
def small_input_areas(monkeypatch):
    """The edit specs with their input images at about 256x256 for the VAE and the VL encoder instead of ~1 MP:
    the same code paths, several times faster on the CPU (the loss test below keeps the released areas)."""
    for name in ("qwen-image-edit", "qwen-image-edit-2509", "qwen-image-edit-2511"):
        spec = SPECS[name]
        monkeypatch.setitem(SPECS, name, replace(spec, vae_image_area=256 * 256,
                                                 vl_image_area=min(spec.vl_image_area, 256 * 256)))


def _config(model: Path, data: Path, **changes) -> TrainConfig:
    base = dict(model=str(model), data=str(data), steps=2, rank=4, alpha=4.0, lr=1e-3, warmup=1, resolution=256,
                save_every=2, keep=2)
    return TrainConfig(**{**base, **changes})


@pytest.mark.parametrize("variant", ["edit", "edit-2511"])
def test_edit_models_train_and_the_lora_changes_an_edit(tiny_edit_model, tmp_path, one_thread, small_input_areas,
                                                        variant):
    _, folder = tiny_edit_model(variant)
    data = _edit_dataset(tmp_path / "data", [[(96, 64)]])
    path = qimg.train_lora(_config(folder, data, steps=3, lr=5e-2, save_every=3), tmp_path / "run", CPU)
    assert path == tmp_path / "run" / "lora.safetensors"
    pipe = qimg.load(folder, device="cpu", dtype="float32")
    control = read_image(data / "control" / "img0.png")[0]
    request, _ = qimg.make_request(pipe.ref.spec, "make thing sks", steps=2, cfg=1.0, seed=1, width=32, height=32)
    embeddings = pipe.encode_prompts(request, with_negative=False, images=[control])
    plain = np.asarray(pipe.edit(request=request, images=[control], embeddings=embeddings)[0])
    lora = pipe.load_lora(path)
    assert not lora.unmatched and len(lora.modules) == 2 * 12
    styled = np.asarray(pipe.edit(request=request, images=[control], embeddings=embeddings)[0])
    assert not np.array_equal(plain, styled)


def test_the_2511_loss_is_diffusers_with_controls_at_t0(tiny_edit_model, tmp_path, one_thread):
    """One cached edit item: the trainer's loss equals the MSE of diffusers' QwenImageTransformer2DModel on [noisy
    target tokens, control latents] over the target tokens, with the same noise and timestep; the cache holds
    inference's control latents and the VL prompt that saw the control."""
    ref, folder = tiny_edit_model("edit-2511")
    # 1024x1024 is the control's VAE size (about 1 MP at 1:1), so inference resizes it no more than training does.
    data = _edit_dataset(tmp_path / "data", [[(1024, 1024)]])
    config = _config(folder, data)
    pipe = qimg.load(folder, device="cpu", dtype="float32")
    assert pipe.transformer.params.zero_cond_t
    (tmp_path / "run").mkdir()
    trainer = Trainer(config, tmp_path / "run", pipe)
    trainer.prepare(train_items(config, pipe.ref))
    cached = load_file(str(trainer.cache[0]))
    control = read_image(data / "control" / "img0.png")[0]
    with torch.no_grad():
        as_inference = pack(pipe.vae.normalize(pipe.encode_image(image_to_tensor(control, 1024, 1024))[0]))
    # load_image scales by 1/127.5, image_to_tensor by 2/255: the pixels differ in the last bit at most.
    torch.testing.assert_close(cached["control_0"], as_inference.float(), rtol=1e-5, atol=1e-5)
    assert cached["control_grids"].tolist() == [[1, 64, 64]]
    text = load_embeddings(trainer.cache[0].with_suffix(".text.safetensors"))
    assert text.meta["images"] == [image_fingerprint(control)]  # encoded with the control, as `qimg edit` does

    step, micro = 3, 0
    with torch.no_grad():
        got = float(trainer.loss([0], step, micro))
    gen = step_generator(config.seed, step, micro)  # flow_loss's draws, in its order
    x0, refs = cached["latents"], cached["control_0"]
    noise = torch.randn(x0.shape, generator=gen)
    t = qwen_shift(torch.sigmoid(torch.randn(1, generator=gen)), x0.shape[1])
    xt = (1 - t) * x0 + t * noise
    hidden = torch.cat([xt, refs], dim=1)
    with torch.no_grad():
        # diffusers takes the timestep in [0, 1] and scales it by 1000 itself (Timesteps(scale=1000)), as qimg.
        pred = ref.transformer(hidden_states=hidden, encoder_hidden_states=text.cond.embeds,
                               encoder_hidden_states_mask=None, timestep=t, img_shapes=[[(1, 16, 16), (1, 64, 64)]],
                               return_dict=False)[0]
    want = float(F.mse_loss(pred[:, :256], noise - x0))
    # fp32 both: only summation order may differ (on this CPU the two agree to the bit), hence 1e-5 relative.
    assert got == pytest.approx(want, rel=1e-5)

    # Not vacuous: the same call with every token at t (no n_target, so no t = 0 rows) gives another loss.
    params = pipe.transformer.params
    rope = qwen_rope([(1, 16, 16), (1, 64, 64)], text.cond.embeds.shape[1], params.axes_dims_rope, params.rope_theta)
    with torch.no_grad():
        all_at_t = pipe.transformer(hidden, text.cond.embeds, t, rope, None)[:, :256]
    assert abs(float(F.mse_loss(all_at_t, noise - x0)) - want) > 1e-3 * want


class _NaNForControls(torch.nn.Module):
    """The model, with whatever it predicts for the control tokens replaced by NaN."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner, self.params = inner, inner.params

    def forward(self, img, txt, t, rope, mask=None, n_target=None):
        assert n_target is not None, "an edit loss tells the model where the targets end"
        out = self.inner(img, txt, t, rope, mask, n_target=n_target)
        return torch.cat([out[:, :n_target], torch.full_like(out[:, n_target:], float("nan"))], dim=1)


def test_the_loss_covers_the_target_tokens_only(tiny_edit_model, one_thread):
    _, folder = tiny_edit_model("edit")
    model = qimg.load(folder, device="cpu", dtype="float32").transformer
    rng = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 3 * 4, 64, generator=rng)  # two 64x48 targets
    refs = torch.randn(2, 4 * 5, 64, generator=rng)  # one control each, a 4x5 token grid
    texts = [PromptEmbeds(torch.randn(1, 6, 32, generator=rng)), PromptEmbeds(torch.randn(1, 6, 32, generator=rng))]

    def loss(net, controls, shapes=((1, 4, 5),)):
        with torch.no_grad():
            return flow_loss(net, x0, texts, (64, 48), torch.Generator().manual_seed(1), torch.float32,
                             torch.device("cpu"), refs=controls, ref_shapes=shapes)

    base = loss(model, refs)
    assert torch.isfinite(base) and torch.equal(loss(_NaNForControls(model), refs), base)
    assert not torch.allclose(loss(model, refs + 0.5), base)  # the controls condition the targets' prediction
    with pytest.raises(ValueError, match="refs of shape"):
        loss(model, refs, shapes=((1, 4, 4),))


def test_batches_never_mix_control_sizes(tiny_edit_model, tmp_path, one_thread):
    _, folder = tiny_edit_model("edit-2511")
    # Same target size and control count; the third control is 2:1, so its latents have another token grid.
    data = _edit_dataset(tmp_path / "data", [[(64, 64)], [(64, 64)], [(128, 64)]])
    config = _config(folder, data, batch_size=2, steps=4, save_every=4)
    (tmp_path / "run").mkdir()
    trainer = Trainer(config, tmp_path / "run", qimg.load(folder, device="cpu", dtype="float32"))
    trainer.prepare(train_items(config, trainer.pipe.ref))
    assert trainer.ref_shapes == [((1, 64, 64),), ((1, 64, 64),), ((1, 46, 90),)]
    # Grouped by size and control count alone, the epochs trained here would put a square control and the wide
    # one in one batch (which cannot stack).
    ungrouped = [b for epoch in (0, 1) for b in epoch_batches(trainer.items, trainer.sizes, batch_size=2,
                                                                seed=config.seed, epoch=epoch)]
    assert any(len({trainer.ref_shapes[i] for i in batch}) > 1 for batch in ungrouped)
    taken: list[list[int]] = []
    inner = trainer.loss

    def recording(indices, step, micro):
        taken.append(list(indices))
        return inner(indices, step, micro)

    trainer.loss = recording
    trainer.run()
    assert len(taken) == 4 and sorted(map(sorted, taken[:2])) == [[0, 1], [2]]
    assert all(len({trainer.ref_shapes[i] for i in batch}) == 1 for batch in taken)


def test_epoch_batches_group_keys_split_groups_and_change_nothing_else():
    from qimg.training.data import TrainItem

    items = [TrainItem(Path(f"{i}.png"), "", (Path(f"c{i}.png"),), 64, 64) for i in range(9)]
    sizes = [(64, 64)] * 9
    plain = epoch_batches(items, sizes, batch_size=2, seed=3, epoch=1)
    assert epoch_batches(items, sizes, batch_size=2, seed=3, epoch=1, groups=[()] * 9) == plain
    keys = [((1, 4, 4),) if i % 3 else ((1, 2, 8),) for i in range(9)]
    split = epoch_batches(items, sizes, batch_size=2, seed=3, epoch=1, groups=keys)
    assert sorted(i for b in split for i in b) == list(range(9))
    assert all(len({keys[i] for i in b}) == 1 for b in split)
    assert split == epoch_batches(items, sizes, batch_size=2, seed=3, epoch=1, groups=keys)
    with pytest.raises(ValueError, match="group keys"):
        epoch_batches(items, sizes, batch_size=2, seed=3, epoch=1, groups=keys[:-1])


def test_cli_trains_an_edit_model_with_samples_and_refuses_data_without_controls(tiny_edit_model, tmp_path,
                                                                                 one_thread, small_input_areas):
    _, folder = tiny_edit_model("edit")
    data = _edit_dataset(tmp_path / "data", [[(80, 64)]])
    prompts = tmp_path / "samples.jsonl"
    prompts.write_text('{"prompt": "make it sks", "width": 32, "height": 32, "steps": 1, "cfg": 1.0}\n',
                       encoding="utf-8")
    base = ["train-lora", "--model", str(folder), "--device", "cpu", "--rank", "4", "--resolution", "256",
            "--steps", "2", "--save-every", "2"]
    runner = CliRunner()
    done = runner.invoke(app, [*base, "--data", str(data), "-o", str(tmp_path / "run"), "--sample-every", "2",
                               "--sample-prompts", str(prompts)])
    assert done.exit_code == 0, done.output
    assert (tmp_path / "run" / "lora.safetensors").is_file()
    with Image.open(tmp_path / "run" / "samples" / "step000002-00.png") as sample:
        assert sample.size == (32, 32)  # an edit of the first item's control, at the line's size
    plain = tmp_path / "plain"
    plain.mkdir()
    _picture((256, 256), 0).save(plain / "img0.png")
    (plain / "img0.txt").write_text("a thing", encoding="utf-8")
    bad = runner.invoke(app, [*base, "--data", str(plain), "-o", str(tmp_path / "bad")])
    assert bad.exit_code == 1 and not (tmp_path / "bad").exists()
    assert f"{plain} has no control/ folder: an edit model trains on (control, target) pairs" in bad.stderr


def test_more_controls_than_the_model_takes_are_refused_before_loading(tiny_edit_model, tmp_path, monkeypatch):
    _, edit = tiny_edit_model("edit")
    _, plus = tiny_edit_model("edit-2511")
    data = _edit_dataset(tmp_path / "data", [[(64, 64)], [(64, 64), (32, 48)]])

    def no_loading(*args, **kwargs):
        raise AssertionError("the model loaded before the dataset was checked")

    monkeypatch.setattr(qimg, "load", no_loading)
    with pytest.raises(DatasetError, match=r"img1\.png has 2 control images; qwen-image-edit takes at most 1"):
        qimg.train_lora(_config(edit, data), tmp_path / "run", CPU)
    assert not (tmp_path / "run").exists()
    items = train_items(_config(plus, data), qimg.resolve_model(str(plus)))  # -2511 takes any number
    assert [len(item.controls) for item in items] == [1, 2]
