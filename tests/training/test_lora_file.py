"""The LoRA file `qimg train-lora` writes: each format reads back in qimg as written (keys, matrices, alpha), loads in
diffusers with the same effect as in qimg (the diffusers format through its PEFT header, comfy and kohya through
diffusers' own Qwen-Image converter), is written whole or not at all, and check_saved refuses what would load wrong
or do nothing."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import safetensors.torch
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import qimg
from qimg.errors import CheckpointError, OutputError, QimgError
from qimg.loading.lora import LoRAModule, read_lora
from qimg.nets.qwen_mmdit import qwen_rope
from qimg.training.lora_file import FORMATS, check_saved, save_lora

# A fake denoiser: the names and shapes of a few Qwen-Image linears, scaled down.
LINEARS = {
    "transformer_blocks.0.attn.to_q": (32, 32),
    "transformer_blocks.0.attn.to_out.0": (32, 32),
    "transformer_blocks.0.img_mlp.net.0.proj": (128, 32),
    "transformer_blocks.1.img_mod.1": (192, 32),
}
RANK, ALPHA = 4, 8.0  # scale 2: a reader that drops alpha (scale 1) or applies it twice (4) shows


def _modules(linears=LINEARS, rank: int = RANK, seed: int = 0, size: float = 1.0) -> dict[str, tuple]:
    """module -> (down (rank, in), up (out, rank)) in fp32, as a trainer holds them."""
    g = torch.Generator().manual_seed(seed)
    return {m: (torch.randn(rank, i, generator=g) * size, torch.randn(o, rank, generator=g) * size)
            for m, (o, i) in linears.items()}


def _keys(fmt: str, modules) -> set[str]:
    """The keys each format is specified to write, spelled out (not derived from FORMATS)."""
    keys = set()
    for m in modules:
        if fmt == "diffusers":
            keys |= {f"transformer.{m}.lora_A.weight", f"transformer.{m}.lora_B.weight"}
        elif fmt == "comfy":
            keys |= {f"diffusion_model.{m}.{s}" for s in ("lora_A.weight", "lora_B.weight", "alpha")}
        else:
            k = "lora_unet_" + m.replace(".", "_")
            keys |= {f"{k}.lora_down.weight", f"{k}.lora_up.weight", f"{k}.alpha"}
    return keys


def _one_line(e: QimgError) -> None:
    assert "\n" not in str(e) and e.hint and "\n" not in e.hint, (str(e), e.hint)


def _leftovers(folder) -> list[str]:
    return sorted(os.listdir(folder))


# --- each format reads back in qimg as written -----------------------------------------------------------------


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_each_format_reads_back_as_written(tmp_path, fmt):
    modules = _modules()
    path = save_lora(tmp_path / "l.safetensors", modules, rank=RANK, alpha=ALPHA, fmt=fmt,
                     metadata={"qimg.train.lr": "0.0001", "qimg.train.steps": "500"})
    assert path == tmp_path / "l.safetensors" and _leftovers(tmp_path) == ["l.safetensors"]
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == _keys(fmt, modules)
        header = f.metadata()
        alphas = [f.get_tensor(k) for k in f.keys() if k.endswith(".alpha")]
    assert header["qimg.format"] == fmt and header["qimg.rank"] == "4" and header["qimg.alpha"] == "8.0"
    assert header["qimg.train.lr"] == "0.0001" and header["qimg.train.steps"] == "500"
    # alpha is stored exactly once: the header for diffusers, a 0-d tensor per module for the others
    assert ("lora_adapter_metadata" in header) == (fmt == "diffusers")
    assert all(a.shape == () and a.item() == ALPHA for a in alphas) and len(alphas) == (0 if fmt == "diffusers"
                                                                                         else len(modules))
    f = read_lora(path, LINEARS)
    assert f.dialect == fmt and f.unmatched == () and f.modules.keys() == modules.keys()
    for m, (down, up) in modules.items():
        got = f.modules[m]
        assert isinstance(got, LoRAModule) and got.down.dtype == got.up.dtype == torch.bfloat16
        assert torch.equal(got.down, down.to(torch.bfloat16)) and torch.equal(got.up, up.to(torch.bfloat16))
        assert got.rank == RANK and got.alpha == ALPHA and got.scale == ALPHA / RANK
    check_saved(path, LINEARS)


def test_an_alpha_that_is_not_an_integer_reads_back(tmp_path):
    for fmt in FORMATS:
        path = save_lora(tmp_path / f"{fmt}.safetensors", _modules(), rank=RANK, alpha=2.5, fmt=fmt)
        assert {m.scale for m in read_lora(path, LINEARS).modules.values()} == {2.5 / RANK}
        check_saved(path, LINEARS)


def test_the_stored_dtype_is_the_callers(tmp_path):
    modules = _modules()
    path = save_lora(tmp_path / "l.safetensors", modules, rank=RANK, alpha=ALPHA, fmt="kohya", dtype=torch.float32)
    state = load_file(str(path))
    key = "lora_unet_transformer_blocks_0_attn_to_q"
    assert torch.equal(state[f"{key}.lora_down.weight"], modules["transformer_blocks.0.attn.to_q"][0])
    assert state[f"{key}.alpha"].dtype == torch.float32  # fp32 whatever the matrices' dtype


# --- diffusers: its own writer and its own converter as the oracle -------------------------------------------------


def test_the_diffusers_header_is_byte_for_byte_what_save_lora_weights_writes(tmp_path):
    """The same tensors and LoraConfig through diffusers' QwenImagePipeline.save_lora_weights give the same header
    entry and the same tensors; diffusers reads r and lora_alpha back from it."""
    diffusers = pytest.importorskip("diffusers")
    modules = _modules()
    ours = save_lora(tmp_path / "ours.safetensors", modules, rank=RANK, alpha=ALPHA, dtype=torch.float32)
    with safe_open(str(ours), framework="pt") as f:
        header = f.metadata()
    config = {k.removeprefix("transformer."): v for k, v in json.loads(header["lora_adapter_metadata"]).items()}
    assert config["r"] == RANK and config["lora_alpha"] == ALPHA and not config["use_rslora"]
    assert config["target_modules"] == ["attn.to_out.0", "attn.to_q", "img_mlp.net.0.proj", "img_mod.1"]
    layers = {}
    for m, (down, up) in modules.items():
        layers[f"{m}.lora_A.weight"], layers[f"{m}.lora_B.weight"] = down, up
    diffusers.QwenImagePipeline.save_lora_weights(tmp_path, transformer_lora_layers=layers,
                                                  weight_name="theirs.safetensors",
                                                  transformer_lora_adapter_metadata=config)
    with safe_open(str(tmp_path / "theirs.safetensors"), framework="pt") as f:
        theirs = f.metadata()
    assert theirs["lora_adapter_metadata"] == header["lora_adapter_metadata"] and theirs["format"] == header["format"]
    mine, want = load_file(str(ours)), load_file(str(tmp_path / "theirs.safetensors"))
    assert mine.keys() == want.keys() and all(torch.equal(mine[k], want[k]) for k in want)
    state, meta = diffusers.QwenImagePipeline.lora_state_dict(str(ours), return_lora_metadata=True)
    assert meta["transformer.lora_alpha"] == ALPHA and meta["transformer.r"] == RANK
    assert state.keys() == mine.keys()  # not converted: the header's alpha is the only one applied


@pytest.mark.parametrize("fmt", ["comfy", "kohya"])
def test_diffusers_converts_comfy_and_kohya_with_alpha_baked_in(tmp_path, fmt):
    """diffusers' Qwen-Image converter handles the diffusion_model. and lora_unet_ prefixes and folds alpha / rank
    into the matrices; the delta it gets is qimg's."""
    diffusers = pytest.importorskip("diffusers")
    modules = _modules()
    path = save_lora(tmp_path / "l.safetensors", modules, rank=RANK, alpha=ALPHA, fmt=fmt, dtype=torch.float32)
    ref = diffusers.QwenImagePipeline.lora_state_dict(str(path))
    assert len(ref) == 2 * len(modules)
    for m, (down, up) in modules.items():
        want = ref[f"transformer.{m}.lora_B.weight"] @ ref[f"transformer.{m}.lora_A.weight"]
        torch.testing.assert_close(ALPHA / RANK * (up @ down), want, rtol=1e-5, atol=1e-5)


# --- cross-tool: the same file in diffusers and in qimg on the tiny Qwen-Image -------------------------------------


@pytest.fixture(scope="module")
def pipe(tiny_qwen):
    return qimg.load(tiny_qwen, device="cpu", dtype="float32")


def _targets(transformer: nn.Module) -> dict[str, tuple[int, int]]:
    """Every linear of a few kinds, in both streams (so each leaf in the PEFT header names exactly these)."""
    kinds = (".attn.to_q", ".attn.add_k_proj", ".attn.to_out.0", ".img_mlp.net.0.proj", ".txt_mlp.net.2", ".txt_mod.1")
    return {n: (m.out_features, m.in_features) for n, m in transformer.named_modules()
            if isinstance(m, nn.Linear) and n.endswith(kinds)}


def _inputs(p):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(1, 12, p.in_channels, generator=gen), torch.randn(1, 5, p.txt_dim, generator=gen)


def _forward_qimg(model) -> torch.Tensor:
    p = model.params
    x, txt = _inputs(p)
    with torch.inference_mode():
        return model(x, txt, torch.tensor([0.6]), qwen_rope([(1, 3, 4)], 5, p.axes_dims_rope, p.rope_theta))


def _forward_diffusers(transformer, p) -> torch.Tensor:
    x, txt = _inputs(p)
    with torch.no_grad():
        return transformer(hidden_states=x, encoder_hidden_states=txt, encoder_hidden_states_mask=torch.ones(1, 5),
                           timestep=torch.tensor([0.6]), img_shapes=[[(1, 3, 4)]], return_dict=False)[0]


@pytest.mark.parity
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_diffusers_load_lora_weights_applies_the_file_as_qimg_does(pipe, tiny_qwen_pipe_and_dir, tmp_path, fmt,
                                                                   one_thread):
    """diffusers: alpha from the PEFT header (diffusers format) or baked in by its converter (comfy, kohya); qimg: its
    own reader. fp32 storage, the same branch arithmetic: equal to summation-order rounding. With alpha / rank = 2,
    a reader that dropped alpha or applied it twice would be off by the whole LoRA."""
    ref, _ = tiny_qwen_pipe_and_dir
    targets = _targets(pipe.transformer)
    assert len(targets) >= 6
    path = save_lora(tmp_path / f"{fmt}.safetensors", _modules(targets, seed=3, size=0.3), rank=RANK, alpha=ALPHA,
                     fmt=fmt, dtype=torch.float32)
    check_saved(path, {n: (m.out_features, m.in_features) for n, m in pipe.transformer.named_modules()
                       if isinstance(m, nn.Linear)})
    base = _forward_qimg(pipe.transformer)
    lora = pipe.load_lora(path, name="trained")
    try:
        assert lora.dialect == fmt and set(lora.modules) == set(targets)
        ours = _forward_qimg(pipe.transformer)
    finally:
        pipe.unload_lora("trained")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # PEFT warns when the header's targets differ from the file's
        ref.load_lora_weights(str(path), adapter_name=f"trained_{fmt}")
    try:
        want = _forward_diffusers(ref.transformer, pipe.transformer.params)
    finally:
        ref.delete_adapters(f"trained_{fmt}")
    assert not torch.allclose(ours, base, atol=1e-3)  # the LoRA does something
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5)


# --- atomic writes -------------------------------------------------------------------------------------------------


def _failing_save(error: BaseException):
    def save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:  # half a file, then the failure
            f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
        raise error
    return save_file


def test_a_failure_mid_write_leaves_no_file(tmp_path, monkeypatch):
    monkeypatch.setattr(safetensors.torch, "save_file", _failing_save(RuntimeError("interrupted")))
    with pytest.raises(RuntimeError, match="interrupted"):
        save_lora(tmp_path / "l.safetensors", _modules(), rank=RANK, alpha=ALPHA)
    assert _leftovers(tmp_path) == []


def test_a_failure_mid_write_keeps_the_existing_file_whole(tmp_path, monkeypatch):
    path = save_lora(tmp_path / "l.safetensors", _modules(seed=1), rank=RANK, alpha=ALPHA, fmt="comfy")
    before = path.read_bytes()
    monkeypatch.setattr(safetensors.torch, "save_file", _failing_save(OSError(28, "No space left on device")))
    with pytest.raises(OutputError, match="No space left on device") as e:
        save_lora(path, _modules(seed=2), rank=RANK, alpha=ALPHA)
    _one_line(e.value)
    assert path.read_bytes() == before and _leftovers(tmp_path) == ["l.safetensors"]


def test_writing_over_a_file_replaces_it_whole(tmp_path):
    path = save_lora(tmp_path / "l.safetensors", _modules(), rank=RANK, alpha=ALPHA, fmt="kohya")
    fewer = dict(list(_modules(rank=2, seed=5).items())[:2])
    save_lora(path, fewer, rank=2, alpha=1.0, fmt="diffusers")
    f = read_lora(path, LINEARS)
    assert f.dialect == "diffusers" and f.modules.keys() == fewer.keys() and f.unmatched == ()
    assert {m.scale for m in f.modules.values()} == {0.5}
    assert _leftovers(tmp_path) == ["l.safetensors"]


def test_a_missing_folder_is_an_output_error(tmp_path):
    with pytest.raises(OutputError, match="cannot write") as e:
        save_lora(tmp_path / "nope" / "l.safetensors", _modules(), rank=RANK, alpha=ALPHA)
    _one_line(e.value)


# --- refused arguments ---------------------------------------------------------------------------------------------


def _with(module: str, down=None, up=None) -> dict:
    modules = _modules()
    d, u = modules[module]
    modules[module] = (d if down is None else down, u if up is None else up)
    return modules


Q = "transformer_blocks.0.attn.to_q"


@pytest.mark.parametrize("kwargs, message", [
    (dict(modules={}), "no modules"),
    (dict(modules=_with(Q, down=torch.zeros(3, 32))), "not a rank-4 pair"),
    (dict(modules=_with(Q, up=torch.zeros(32, 5))), "not a rank-4 pair"),
    (dict(modules=_with(Q, down=torch.zeros(4, 32, 1))), "not a rank-4 pair"),
    (dict(modules=_with(Q, down=torch.full((4, 32), float("nan")))), "NaN or infinite"),
    (dict(modules=_with(Q, up=torch.full((32, 4), float("inf")))), "NaN or infinite"),
    (dict(modules=_with(Q, up=torch.full((32, 4), 1e6)), dtype=torch.float16), "overflows float16"),
    (dict(modules=_with(Q, up=torch.zeros(32, 4, dtype=torch.int32))), "not floating point"),
    (dict(modules={Q: (torch.zeros(4, 32),)}), "pair"),
    (dict(fmt="peft"), "unknown LoRA format 'peft'; known: diffusers, comfy, kohya"),
    (dict(rank=0), "rank must be"),
    (dict(rank=4.0), "rank must be"),
    (dict(alpha=0.0), "alpha must be"),
    (dict(alpha=float("nan")), "alpha must be"),
    (dict(alpha=-1.0), "alpha must be"),
    (dict(dtype=torch.float64), "stored as"),
    (dict(metadata={"qimg.rank": "8"}), "written by save_lora"),
    (dict(metadata={"lora_adapter_metadata": "{}"}), "written by save_lora"),
    (dict(metadata={"qimg.train.steps": 500}), "strings"),
    (dict(name="l.pt"), "saved as .safetensors"),
    (dict(fmt="kohya", modules={"a.b_c": (torch.zeros(4, 8), torch.zeros(8, 4)),
                                "a_b.c": (torch.zeros(4, 8), torch.zeros(8, 4))}), "both written as"),
])
def test_bad_arguments_are_refused_and_write_nothing(tmp_path, kwargs, message):
    args = dict(modules=_modules(), rank=RANK, alpha=ALPHA, name="l.safetensors") | kwargs
    name = args.pop("name")
    with pytest.raises(ValueError, match=message):
        save_lora(tmp_path / name, args.pop("modules"), **args)
    assert _leftovers(tmp_path) == []


# --- check_saved ---------------------------------------------------------------------------------------------------


def _rewrite(path, extra=None, drop=(), header=None):
    """The saved file with keys added or dropped, or its header changed (what a damaged save would hold)."""
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        state = {k: f.get_tensor(k) for k in f.keys() if k not in drop}
    save_file(state | (extra or {}), str(path), metadata=meta | (header or {}))
    return path


def test_check_saved_refuses_a_lora_whose_up_matrices_are_all_zero(tmp_path):
    modules = {m: (down, torch.zeros_like(up)) for m, (down, up) in _modules().items()}
    path = save_lora(tmp_path / "l.safetensors", modules, rank=RANK, alpha=ALPHA)
    with pytest.raises(CheckpointError, match="every up matrix is zero") as e:
        check_saved(path, LINEARS)
    _one_line(e.value)
    modules[Q] = (modules[Q][0], torch.ones(32, RANK))  # one nonzero up: it does something
    check_saved(save_lora(path, modules, rank=RANK, alpha=ALPHA), LINEARS)


@pytest.mark.parametrize("fmt, extra, message", [
    ("comfy", {"diffusion_model.transformer_blocks.7.attn.to_q.lora_A.weight": torch.zeros(4, 32)},
     "1 key matches no linear"),
    ("diffusers", {"transformer.transformer_blocks.0.attn.to_q.alpha": torch.tensor(8.0)},
     "holds transformer.transformer_blocks.0.attn.to_q.alpha"),
    ("kohya", {"lora_unet_transformer_blocks_1_img_mod_1.dora_scale": torch.ones(192, 1)}, "DoRA"),
])
def test_check_saved_refuses_a_file_with_an_extra_key(tmp_path, fmt, extra, message):
    path = save_lora(tmp_path / "l.safetensors", _modules(), rank=RANK, alpha=ALPHA, fmt=fmt)
    with pytest.raises(CheckpointError, match=message) as e:
        check_saved(_rewrite(path, extra=extra), LINEARS)
    _one_line(e.value)


def test_check_saved_refuses_an_adapter_outside_the_files_format(tmp_path):
    """A whole extra pair that does match a linear, but in another dialect's keys: not what save_lora wrote."""
    modules = _modules()
    path = save_lora(tmp_path / "l.safetensors", dict(list(modules.items())[:3]), rank=RANK, alpha=ALPHA, fmt="comfy")
    m, (down, up) = list(modules.items())[3]
    extra = {f"transformer.{m}.lora_A.weight": down, f"transformer.{m}.lora_B.weight": up}
    with pytest.raises(CheckpointError, match=f"holds transformer.{m}.lora_A.weight") as e:
        check_saved(_rewrite(path, extra=extra), LINEARS)
    _one_line(e.value)


def test_check_saved_refuses_a_missing_alpha_and_one_that_disagrees_with_the_header(tmp_path):
    path = save_lora(tmp_path / "l.safetensors", _modules(), rank=RANK, alpha=ALPHA, fmt="kohya")
    key = "lora_unet_transformer_blocks_0_attn_to_q.alpha"
    with pytest.raises(CheckpointError, match=f"lacks {key}") as e:
        check_saved(_rewrite(path, drop=(key,)), LINEARS)  # every reader would apply alpha = rank here
    _one_line(e.value)
    path = save_lora(path, _modules(), rank=RANK, alpha=ALPHA, fmt="kohya")
    with pytest.raises(CheckpointError, match="reads back as rank 4, alpha 4.0; the header says rank 4, alpha 8") as e:
        check_saved(_rewrite(path, extra={key: torch.tensor(4.0)}), LINEARS)
    _one_line(e.value)
    path = save_lora(path, _modules(), rank=RANK, alpha=ALPHA, fmt="diffusers")
    with pytest.raises(CheckpointError, match="the header says rank 4, alpha 2") as e:
        check_saved(_rewrite(path, header={"qimg.alpha": "2.0"}), LINEARS)
    _one_line(e.value)


def test_check_saved_turns_read_errors_into_checkpoint_errors(tmp_path):
    path = save_lora(tmp_path / "l.safetensors", _modules(), rank=RANK, alpha=ALPHA)
    with pytest.raises(CheckpointError, match="no key of this LoRA matches") as e:
        check_saved(path, {"proj_out": (8, 8)})  # another model: read_lora's InputError
    _one_line(e.value)
    with pytest.raises(CheckpointError, match="no qimg.format header") as e:
        check_saved(_rewrite(path, header={"qimg.format": "mine"}), LINEARS)
    _one_line(e.value)
