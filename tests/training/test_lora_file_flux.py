"""The FLUX LoRA file `qimg train-lora` writes, on the tiny FLUX: random adapters on every linear train-lora can target
(double-block attention, MLP and modulation linears; single-block q, k, v, proj_mlp, proj_out, norm.linear), rank 4,
alpha 8 (alpha != rank, so a reader that drops or doubles alpha shows).

  - each format (diffusers names; comfy and kohya on BFL's fused names) reads back in qimg as the same delta W per
    linear, keys spelled out here, fused modules block-diagonal with alpha n * alpha;
  - diffusers' FluxPipeline.load_lora_weights + fuse_lora gives qimg's delta for the diffusers and kohya files.
    diffusers' kohya converter hard-codes FLUX.1's full widths for a single block's linear1 (split 3072 * 3 + 12288),
    so on the tiny FLUX the kohya file it loads leaves the single blocks' q, k, v, proj_mlp out, and linear1 is checked
    through the converter alone (lora_state_dict, no model) at FLUX.1's full widths. diffusers cannot read the comfy
    file at all (no FLUX converter takes the diffusion_model. prefix: it loads nothing, with a log line); ComfyUI
    reads it as BFL names, which is checked here through qimg's reader only;
  - check_saved passes on each and refuses a key removed or added, a fused alpha or layout that would read back
    with another scale, in one line;
  - a fused module trained in part (only to_q) gets zero blocks and reads back with the exact delta."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qimg.errors import CheckpointError, QimgError
from qimg.loading.flux import flux_linears
from qimg.loading.lora import LoRAModule, read_lora
from qimg.training.lora_file import FORMATS, check_saved, save_lora
from tests.fixtures_flux_model import write_tiny_flux
from tests.test_lora_flux import DOUBLE as BFL_NAMES_DOUBLE
from tests.test_lora_flux import SPLITS

RANK, ALPHA = 4, 8.0
DOUBLE = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
          "attn.to_out.0", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
          "ff_context.net.2", "norm1.linear", "norm1_context.linear")
SINGLE = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out", "norm.linear")
# BFL module within a block -> (the diffusers linears it covers, in row order): the LoRA reader tests' own table,
# spelled out there rather than read from keymaps
BFL_DOUBLE = {m: SPLITS[m] for m in BFL_NAMES_DOUBLE}
BFL_SINGLE = {m: SPLITS[m] for m in ("linear1", "linear2", "modulation.lin")}
SINGLE_LINEAR1 = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
TOL = dict(rtol=1e-5, atol=1e-5)  # fp32 storage: summation order and one fp32 add of W + delta W


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-flux-lora-file") / "model"
    return write_tiny_flux(root), root


@pytest.fixture(scope="module")
def linears(flux):
    return flux_linears(flux[1] / "transformer")


def _targets(linears) -> dict[str, tuple[int, int]]:
    out = {f"transformer_blocks.{i}.{m}": linears[f"transformer_blocks.{i}.{m}"] for i in range(2) for m in DOUBLE}
    out |= {f"single_transformer_blocks.{i}.{m}": linears[f"single_transformer_blocks.{i}.{m}"]
            for i in range(2) for m in SINGLE}
    return out


def _modules(targets, seed: int = 0, size: float = 0.3) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module -> (down (rank, in), up (out, rank)) in fp32, as a trainer holds them."""
    g = torch.Generator().manual_seed(seed)
    return {m: (torch.randn(RANK, i, generator=g) * size, torch.randn(o, RANK, generator=g) * size)
            for m, (o, i) in targets.items()}


def _delta(pair, alpha: float = ALPHA, rank: int = RANK) -> torch.Tensor:
    down, up = pair
    return (up.float() @ down.float()) * (alpha / rank)


def _bfl_stems() -> dict[str, tuple[str, ...]]:
    """Every BFL module of the tiny FLUX's two double and two single blocks -> the linears it covers."""
    stems = {f"double_blocks.{i}.{b}": tuple(f"transformer_blocks.{i}.{m}" for m in ms)
             for i in range(2) for b, ms in BFL_DOUBLE.items()}
    return stems | {f"single_blocks.{i}.{b}": tuple(f"single_transformer_blocks.{i}.{m}" for m in ms)
                    for i in range(2) for b, ms in BFL_SINGLE.items()}


def _keys(fmt: str, modules) -> set[str]:
    if fmt == "diffusers":
        return {f"transformer.{m}.lora_{s}.weight" for m in modules for s in "AB"}
    if fmt == "comfy":
        return {f"diffusion_model.{b}.{s}" for b in _bfl_stems() for s in ("lora_A.weight", "lora_B.weight", "alpha")}
    return {f"lora_unet_{b.replace('.', '_')}.{s}" for b in _bfl_stems()
            for s in ("lora_down.weight", "lora_up.weight", "alpha")}


def _one_line(e: QimgError) -> None:
    assert "\n" not in str(e) and e.hint and "\n" not in e.hint, (str(e), e.hint)


def _rewrite(path, extra=None, drop=()):
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        state = {k: f.get_tensor(k) for k in f.keys() if k not in drop}
    save_file(state | (extra or {}), str(path), metadata=meta)
    return path


# --- (a) each format reads back in qimg as the same delta W ----------------------------------------------------------


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_each_format_reads_back_with_the_same_delta(linears, tmp_path, fmt):
    targets = _targets(linears)
    assert len(targets) == 40
    modules = _modules(targets)
    path = save_lora(tmp_path / f"{fmt}.safetensors", modules, rank=RANK, alpha=ALPHA, fmt=fmt, family="flux",
                     linears=linears, dtype=torch.float32)
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == _keys(fmt, modules)
        header, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    assert header["qimg.format"] == fmt and header["qimg.rank"] == "4" and header["qimg.alpha"] == "8.0"
    if fmt == "diffusers":  # "proj_out" would also name the final proj_out, which is not adapted
        config = json.loads(header["lora_adapter_metadata"])
        assert config["transformer.r"] == RANK and config["transformer.lora_alpha"] == ALPHA
        assert config["transformer.target_modules"] == sorted(
            [f"attn.{m}" for m in ("add_k_proj", "add_q_proj", "add_v_proj", "to_add_out", "to_k", "to_out.0",
                                   "to_q", "to_v")]
            + ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "norm.linear",
               "norm1.linear", "norm1_context.linear", "proj_mlp", "single_transformer_blocks.0.proj_out",
               "single_transformer_blocks.1.proj_out"])
    else:  # a fused module: rank n * 4 and alpha n * 8, so alpha / rank stays 2
        alphas = {k.rsplit(".", 1)[0].removeprefix("diffusion_model.").removeprefix("lora_unet_"): float(v)
                  for k, v in state.items() if k.endswith(".alpha")}
        down = ".lora_A.weight" if fmt == "comfy" else ".lora_down.weight"
        for stem, parts in _bfl_stems().items():
            spelled = stem if fmt == "comfy" else stem.replace(".", "_")
            assert alphas[spelled] == ALPHA * len(parts)
            assert state[("diffusion_model." if fmt == "comfy" else "lora_unet_") + spelled + down].shape[0] == (
                RANK * len(parts))
    lora = read_lora(path, linears, "flux")
    assert lora.dialect == fmt and lora.unmatched == () and set(lora.modules) == set(modules)
    for m, pair in modules.items():
        got = lora.modules[m]
        assert isinstance(got, LoRAModule) and got.rank == RANK and got.alpha == ALPHA  # per part, as written
        torch.testing.assert_close(got.dense_delta(), _delta(pair), rtol=1.3e-6, atol=1e-6)


def test_the_fused_layout_is_block_diagonal(linears, tmp_path):
    targets = {f"single_transformer_blocks.0.{m}": linears[f"single_transformer_blocks.0.{m}"]
               for m in SINGLE_LINEAR1}
    modules = _modules(targets)
    path = save_lora(tmp_path / "l.safetensors", modules, rank=RANK, alpha=ALPHA, fmt="comfy", family="flux",
                     dtype=torch.float32)
    with safe_open(str(path), framework="pt") as f:
        down = f.get_tensor("diffusion_model.single_blocks.0.linear1.lora_A.weight")
        up = f.get_tensor("diffusion_model.single_blocks.0.linear1.lora_B.weight")
    row = 0
    for j, (d, u) in enumerate(modules.values()):
        assert torch.equal(down[j * RANK: (j + 1) * RANK], d)
        block = up[row: row + u.shape[0]]
        assert torch.equal(block[:, j * RANK: (j + 1) * RANK], u)
        assert not block[:, : j * RANK].any() and not block[:, (j + 1) * RANK:].any()
        row += u.shape[0]
    assert row == up.shape[0] == sum(o for o, _ in targets.values())


# --- (b) diffusers applies the file as qimg does ---------------------------------------------------------------------


def _fused_deltas(ref, path, names) -> dict[str, torch.Tensor]:
    """W after load_lora_weights + fuse_lora minus W before, per linear; the pipeline is restored after."""
    transformer = ref.transformer
    before = {k: v.detach().clone() for k, v in transformer.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # PEFT warns when the header's targets differ from the file's
        ref.load_lora_weights(str(path), adapter_name="oracle")
    try:
        ref.fuse_lora(components=["transformer"], lora_scale=1.0, adapter_names=["oracle"])
        modules = dict(transformer.named_modules())
        out = {}
        for name in names:
            module = modules[name]
            weight = module.base_layer.weight if hasattr(module, "base_layer") else module.weight
            out[name] = weight.detach().float() - before[f"{name}.weight"].float()
        ref.unfuse_lora(components=["transformer"])
    finally:
        ref.unload_lora_weights()
        transformer.load_state_dict(before)
    return out


@pytest.mark.parity
@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_diffusers_fuses_the_file_as_qimg_reads_it(flux, linears, tmp_path, fmt, one_thread):
    """Tolerance 1e-5: fp32 storage; diffusers bakes alpha / rank (2, a power of two: exact) into the kohya matrices,
    and W + delta W rounds once in fp32. A wrong scale or a wrong row split would be off by O(0.1)."""
    ref, _ = flux
    targets = _targets(linears)
    if fmt == "kohya":  # diffusers' converter splits linear1 at FLUX.1's full widths: checked below, without a model
        targets = {m: s for m, s in targets.items()
                   if not (m.startswith("single_transformer_blocks.") and m.endswith(SINGLE_LINEAR1))}
    modules = _modules(targets, seed=3)
    path = save_lora(tmp_path / f"{fmt}.safetensors", modules, rank=RANK, alpha=ALPHA, fmt=fmt, family="flux",
                     linears=linears, dtype=torch.float32)
    check_saved(path, linears, "flux")
    ours = {m: a.dense_delta() for m, a in read_lora(path, linears, "flux").modules.items()}
    theirs = _fused_deltas(ref, path, list(linears))
    for name in linears:  # every linear: the adapted ones by their delta, every other one untouched
        want = ours.get(name, torch.zeros(linears[name]))
        torch.testing.assert_close(theirs[name], want, **TOL, msg=name)
        if name in modules:
            assert float(want.abs().max()) > 0.1


def test_diffusers_converts_a_kohya_linear1_at_full_flux_widths(tmp_path):
    """lora_state_dict runs diffusers' kohya FLUX converter without a model: a single block's linear1 at FLUX.1's
    widths (q, k, v 3072 rows each, proj_mlp 12288) comes back as its four linears' pairs, alpha / rank baked in."""
    from diffusers import FluxPipeline

    widths = {"attn.to_q": 3072, "attn.to_k": 3072, "attn.to_v": 3072, "proj_mlp": 12288}
    targets = {f"single_transformer_blocks.5.{m}": (o, 3072) for m, o in widths.items()}
    targets["transformer_blocks.7.attn.add_k_proj"] = (3072, 3072)  # a txt_attn.qkv trained in part
    full = flux_linears(None)  # FLUX.1-dev's, built on the meta device
    assert all(full[m] == s for m, s in targets.items())
    modules = _modules(targets, seed=4)
    path = save_lora(tmp_path / "kohya.safetensors", modules, rank=RANK, alpha=ALPHA, fmt="kohya", family="flux",
                     linears=full, dtype=torch.float32)
    state = FluxPipeline.lora_state_dict(str(path))
    for name in (*targets, "transformer_blocks.7.attn.add_q_proj", "transformer_blocks.7.attn.add_v_proj"):
        a, b = state[f"transformer.{name}.lora_A.weight"], state[f"transformer.{name}.lora_B.weight"]
        assert a.shape[0] == RANK  # the block-diagonal up is chunked, not every part given the whole down
        want = _delta(modules[name]) if name in modules else torch.zeros(3072, 3072)
        torch.testing.assert_close(b @ a, want, **TOL, msg=name)


def test_diffusers_loads_nothing_from_the_comfy_file(flux, linears, tmp_path):
    """The reason the comfy file is checked through qimg's reader only (ComfyUI reads BFL names natively)."""
    ref, _ = flux
    path = save_lora(tmp_path / "comfy.safetensors", _modules(_targets(linears)), rank=RANK, alpha=ALPHA,
                     fmt="comfy", family="flux", linears=linears)
    ref.load_lora_weights(str(path), adapter_name="comfy")
    try:
        assert not any(hasattr(m, "lora_A") for m in ref.transformer.modules())
    finally:
        ref.unload_lora_weights()


@pytest.mark.parity
def test_the_layers_outside_the_blocks(flux, linears, tmp_path, one_thread):
    """train-lora never trains them, but save_lora writes them right or not at all. comfy: BFL names, the final
    adaLN's up with its halves swapped (BFL (shift, scale), diffusers (scale, shift)), read back exactly by qimg.
    diffusers: applied by diffusers as by qimg (the header names the top-level proj_out whole, since its tail also
    names every single block's proj_out). kohya: refused, since diffusers' kohya converter (0.42) drops these
    adapters (it names them without the transformer. prefix)."""
    ref, _ = flux
    targets = {m: linears[m] for m in ("norm_out.linear", "proj_out", "x_embedder")}
    modules = _modules(targets, seed=5)
    path = save_lora(tmp_path / "comfy.safetensors", modules, rank=RANK, alpha=ALPHA, fmt="comfy", family="flux",
                     linears=linears, dtype=torch.float32)
    check_saved(path, linears, "flux")
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == {f"diffusion_model.{b}.{s}" for b in ("final_layer.adaLN_modulation.1",
                                                                      "final_layer.linear", "img_in")
                                 for s in ("lora_A.weight", "lora_B.weight", "alpha")}
        up = f.get_tensor("diffusion_model.final_layer.adaLN_modulation.1.lora_B.weight")
    given = modules["norm_out.linear"][1]
    assert torch.equal(up, torch.cat([given[32:], given[:32]]))
    lora = read_lora(path, linears, "flux")
    for m, pair in modules.items():
        torch.testing.assert_close(lora.modules[m].dense_delta(), _delta(pair), rtol=1.3e-6, atol=1e-6)

    path = save_lora(tmp_path / "diffusers.safetensors", modules, rank=RANK, alpha=ALPHA, family="flux",
                     linears=linears, dtype=torch.float32)
    check_saved(path, linears, "flux")
    with safe_open(str(path), framework="pt") as f:  # a list entry "proj_out" would name every proj_out
        config = json.loads(f.metadata()["lora_adapter_metadata"])
    assert config["transformer.target_modules"] == r"proj_out|(?:.*\.)?(?:norm_out\.linear|x_embedder)"
    theirs = _fused_deltas(ref, path, list(modules))
    for m, pair in modules.items():
        torch.testing.assert_close(theirs[m], _delta(pair), **TOL, msg=m)

    for m in modules:
        with pytest.raises(ValueError, match="diffusers drops the kohya adapter"):
            save_lora(tmp_path / "no.safetensors", {m: modules[m]}, rank=RANK, alpha=ALPHA, fmt="kohya",
                      family="flux")
    assert not (tmp_path / "no.safetensors").exists()


# --- (c) check_saved --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(linears, tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved")
    modules = _modules(_targets(linears), seed=6)
    return {fmt: save_lora(folder / f"{fmt}.safetensors", modules, rank=RANK, alpha=ALPHA, fmt=fmt, family="flux",
                           linears=linears) for fmt in FORMATS}


def _copy(saved, fmt, tmp_path):
    path = tmp_path / f"{fmt}.safetensors"
    path.write_bytes(saved[fmt].read_bytes())
    return path


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_check_saved_passes_on_each_format(saved, linears, fmt):
    check_saved(saved[fmt], linears, "flux")


# (format, key dropped, message)
DROPPED = [
    ("diffusers", "transformer.transformer_blocks.1.attn.to_k.lora_A.weight", "key.? match"),
    ("comfy", "diffusion_model.double_blocks.0.img_attn.qkv.alpha", "lacks diffusion_model.double_blocks.0.img_attn"),
    ("comfy", "diffusion_model.single_blocks.1.linear1.lora_B.weight", "keys match no linear"),
    ("kohya", "lora_unet_single_blocks_0_linear1.alpha", "lacks lora_unet_single_blocks_0_linear1.alpha"),
    ("kohya", "lora_unet_double_blocks_1_txt_mod_lin.lora_down.weight", "key.? match"),
]


@pytest.mark.parametrize("fmt, key, message", DROPPED)
def test_check_saved_refuses_a_key_removed(saved, linears, tmp_path, fmt, key, message):
    path = _copy(saved, fmt, tmp_path)
    with pytest.raises(CheckpointError, match=message) as e:
        check_saved(_rewrite(path, drop=(key,)), linears, "flux")
    _one_line(e.value)


# (format, keys added, message)
ADDED = [
    ("diffusers", {"transformer.transformer_blocks.0.attn.to_q.alpha": torch.tensor(8.0)}, "holds transformer"),
    ("comfy", {"diffusion_model.final_layer.linear.alpha": torch.tensor(8.0)}, "1 key matches no linear"),
    # the same linear twice: as part of its BFL qkv and on its diffusers name
    ("comfy", {"diffusion_model.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 32),
               "diffusion_model.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 4)}, "two LoRAs"),
    # an adapter that reads fine, on a linear save_lora would have spelled with its BFL name
    ("kohya", {"lora_unet_proj_out.lora_down.weight": torch.zeros(4, 32),
               "lora_unet_proj_out.lora_up.weight": torch.zeros(64, 4),
               "lora_unet_proj_out.alpha": torch.tensor(8.0)}, "holds lora_unet_proj_out"),
]


@pytest.mark.parametrize("fmt, extra, message", ADDED)
def test_check_saved_refuses_a_key_added(saved, linears, tmp_path, fmt, extra, message):
    path = _copy(saved, fmt, tmp_path)
    with pytest.raises(CheckpointError, match=message) as e:
        check_saved(_rewrite(path, extra=extra), linears, "flux")
    _one_line(e.value)


def test_check_saved_refuses_a_fused_module_read_back_at_another_scale(saved, linears, tmp_path):
    """A fused alpha of alpha (not 3 * alpha) would apply a third of the trained scale; an up that is not
    block-diagonal gives every part the whole down (rank 12): both read back unlike the header."""
    key = "diffusion_model.double_blocks.0.img_attn.qkv"
    path = _copy(saved, "comfy", tmp_path)
    with pytest.raises(CheckpointError, match="reads back as rank 4, alpha 2.66") as e:
        check_saved(_rewrite(path, extra={f"{key}.alpha": torch.tensor(ALPHA)}), linears, "flux")
    _one_line(e.value)
    path = _copy(saved, "comfy", tmp_path)
    with safe_open(str(path), framework="pt") as f:
        up = f.get_tensor(f"{key}.lora_B.weight").clone()
    up[0, RANK] = 1.0  # to_q's first row now reads to_k's slice of the down
    with pytest.raises(CheckpointError, match="reads back as rank 12, alpha 24") as e:
        check_saved(_rewrite(path, extra={f"{key}.lora_B.weight": up}), linears, "flux")
    _one_line(e.value)


def test_check_saved_refuses_diffusers_names_in_a_flux_comfy_file(linears, tmp_path):
    """What a family-unaware save would write: every key reads, but ComfyUI and sd-scripts expect BFL's names."""
    modules = _modules(_targets(linears))
    path = save_lora(tmp_path / "l.safetensors", modules, rank=RANK, alpha=ALPHA, fmt="comfy")  # family qwen-image
    with pytest.raises(CheckpointError, match="holds diffusion_model.single_transformer_blocks") as e:
        check_saved(path, linears, "flux")
    _one_line(e.value)


# --- (d) a fused module trained in part -------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["comfy", "kohya"])
def test_a_partly_trained_fused_module_gets_zero_blocks(linears, tmp_path, fmt):
    targets = {m: linears[m] for m in ("transformer_blocks.0.attn.to_q", "single_transformer_blocks.1.proj_mlp")}
    modules = _modules(targets, seed=7)
    path = save_lora(tmp_path / "l.safetensors", modules, rank=RANK, alpha=ALPHA, fmt=fmt, family="flux",
                     linears=linears, dtype=torch.float32)
    stem = {"comfy": "diffusion_model.{}.lora_{}.weight", "kohya": "lora_unet_{}.lora_{}.weight"}[fmt]
    spell = (lambda s: s) if fmt == "comfy" else (lambda s: s.replace(".", "_"))
    names = ("A", "B") if fmt == "comfy" else ("down", "up")
    with safe_open(str(path), framework="pt") as f:
        qkv = [f.get_tensor(stem.format(spell("double_blocks.0.img_attn.qkv"), n)) for n in names]
        linear1 = [f.get_tensor(stem.format(spell("single_blocks.1.linear1"), n)) for n in names]
        assert len(list(f.keys())) == 6
    (down, up), q = qkv, modules["transformer_blocks.0.attn.to_q"]
    assert down.shape == (3 * RANK, 32) and up.shape == (3 * 32, 3 * RANK)
    assert torch.equal(down[:RANK], q[0]) and not down[RANK:].any()
    assert torch.equal(up[:32, :RANK], q[1]) and not up[32:].any() and not up[:, RANK:].any()
    (down, up), mlp = linear1, modules["single_transformer_blocks.1.proj_mlp"]
    assert down.shape == (4 * RANK, 32) and up.shape == (3 * 32 + 128, 4 * RANK)
    assert torch.equal(down[3 * RANK:], mlp[0]) and torch.equal(up[96:, 3 * RANK:], mlp[1])
    assert not down[: 3 * RANK].any() and not up[:96].any() and not up[96:, : 3 * RANK].any()

    lora = read_lora(path, linears, "flux")
    assert len(lora.modules) == 3 + 4  # the untrained parts read back as zero adapters
    for name, adapter in lora.modules.items():
        want = _delta(modules[name]) if name in modules else torch.zeros(linears[name])
        assert adapter.rank == RANK and adapter.alpha == ALPHA
        torch.testing.assert_close(adapter.dense_delta(), want, rtol=1.3e-6, atol=1e-6, msg=name)
    check_saved(path, linears, "flux")


def test_a_partly_trained_fused_module_needs_the_linears(linears, tmp_path):
    modules = _modules({"transformer_blocks.0.attn.to_q": linears["transformer_blocks.0.attn.to_q"]})
    with pytest.raises(ValueError, match="transformer_blocks.0.attn.to_k is not trained.*pass linears="):
        save_lora(tmp_path / "l.safetensors", modules, rank=RANK, alpha=ALPHA, fmt="kohya", family="flux")
    # the diffusers names need no fusing, so no linears
    save_lora(tmp_path / "l.safetensors", modules, rank=RANK, alpha=ALPHA, fmt="diffusers", family="flux")
    assert [p.name for p in tmp_path.iterdir()] == ["l.safetensors"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(family="sdxl"), "unknown family 'sdxl'; known: flux, qwen-image"),
    (dict(modules={"blocks.0.to_q": (torch.zeros(4, 32), torch.zeros(32, 4))}), "not a FLUX linear with a BFL name"),
    (dict(modules={"transformer_blocks.0.attn.to_q": (torch.zeros(4, 16), torch.zeros(32, 4))}, linears=True),
     r"do not fit its linear \(out 32, in 32\)"),
    (dict(modules={"transformer_blocks.9.attn.to_q": (torch.zeros(4, 32), torch.zeros(32, 4))}, linears=True),
     "not a linear of the denoiser"),
])
def test_bad_flux_arguments_are_refused_and_write_nothing(linears, tmp_path, kwargs, message):
    args = dict(modules=_modules(_targets(linears)), rank=RANK, alpha=ALPHA, fmt="comfy", family="flux") | kwargs
    if args.get("linears") is True:
        args["linears"] = linears
    with pytest.raises(ValueError, match=message):
        save_lora(tmp_path / "l.safetensors", args.pop("modules"), **args)
    assert list(tmp_path.iterdir()) == []
