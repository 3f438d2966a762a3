"""LoRA files in every dialect qimg reads, written in each dialect's exact key layout, and every way a file is refused.

Where diffusers can write or read a dialect, it is the oracle: its own writer for the header alpha, and its own
converter (QwenImagePipeline.lora_state_dict, which bakes alpha into the matrices) for the other layouts.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from qimg.errors import CheckpointError, InputError, QimgError
from qimg.loading.lora import LoRAFile, LoRAModule, read_lora

# A fake denoiser: the names and shapes of a few Qwen-Image linears, scaled down.
LINEARS = {
    "transformer_blocks.0.attn.to_q": (32, 32),
    "transformer_blocks.0.attn.to_out.0": (32, 32),
    "transformer_blocks.0.img_mlp.net.0.proj": (128, 32),
    "transformer_blocks.0.img_mlp.net.2": (32, 128),
    "transformer_blocks.1.img_mod.1": (192, 32),
}
RANK = 4


def _adapters(rank: int = RANK, dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, tuple]:
    """module -> (down (rank, in), up (out, rank)), random."""
    g = torch.Generator().manual_seed(seed)
    return {m: (torch.randn(rank, i, generator=g).to(dtype), torch.randn(o, rank, generator=g).to(dtype))
            for m, (o, i) in LINEARS.items()}


def _kohya(m: str) -> str:
    return "lora_unet_" + m.replace(".", "_")


# dialect -> (key of down, key of up, key of alpha or None) for a module
LAYOUTS = {
    "diffusers": (lambda m: f"transformer.{m}.lora_A.weight", lambda m: f"transformer.{m}.lora_B.weight", None),
    "peft-bare": (lambda m: f"{m}.lora_A.weight", lambda m: f"{m}.lora_B.weight", None),
    "kohya": (lambda m: f"{_kohya(m)}.lora_down.weight", lambda m: f"{_kohya(m)}.lora_up.weight",
              lambda m: f"{_kohya(m)}.alpha"),
    "comfy-AB": (lambda m: f"diffusion_model.{m}.lora_A.weight", lambda m: f"diffusion_model.{m}.lora_B.weight",
                 None),
    "comfy-updown": (lambda m: f"diffusion_model.{m}.lora_down.weight", lambda m: f"diffusion_model.{m}.lora_up.weight",
                     lambda m: f"diffusion_model.{m}.alpha"),
    "diffsynth": (lambda m: f"{m}.lora_A.default.weight", lambda m: f"{m}.lora_B.default.weight", None),
    "lightning": (lambda m: f"{m}.lora_down.weight", lambda m: f"{m}.lora_up.weight", lambda m: f"{m}.alpha"),
    "legacy-lora.down": (lambda m: f"transformer.{m}.lora.down.weight", lambda m: f"transformer.{m}.lora.up.weight",
                         None),
    "legacy-linear-layer": (lambda m: f"transformer.{m}.lora_linear_layer.down.weight",
                            lambda m: f"transformer.{m}.lora_linear_layer.up.weight", None),
}
DIALECT = {"diffusers": "diffusers", "peft-bare": "diffusers", "kohya": "kohya", "comfy-AB": "comfy",
           "comfy-updown": "comfy", "diffsynth": "diffsynth", "lightning": "lightning",
           "legacy-lora.down": "diffusers", "legacy-linear-layer": "diffusers"}


def _write(path, layout: str, adapters, alpha: float | None = None, metadata=None, extra=None):
    down_key, up_key, alpha_key = LAYOUTS[layout]
    state = {}
    for m, (down, up) in adapters.items():
        state[down_key(m)], state[up_key(m)] = down, up
        if alpha is not None and alpha_key is not None:
            state[alpha_key(m)] = torch.tensor(alpha, dtype=down.dtype)  # 0-d, in the save dtype, as kohya writes
    state.update(extra or {})
    save_file(state, str(path), metadata=metadata)
    return path


def _one_line(e: QimgError) -> None:
    assert "\n" not in str(e) and "\n" not in (e.hint or ""), (str(e), e.hint)
    assert e.hint and e.exit_code == 1


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_each_dialect_reads_the_same_tensors(tmp_path, layout):
    adapters = _adapters(dtype=torch.bfloat16)
    has_alpha = LAYOUTS[layout][2] is not None
    f = read_lora(_write(tmp_path / "l.safetensors", layout, adapters, alpha=1.0 if has_alpha else None), LINEARS)
    assert isinstance(f, LoRAFile) and f.dialect == DIALECT[layout] and f.family == "qwen-image"
    assert f.modules.keys() == LINEARS.keys() and f.unmatched == ()
    for m, (down, up) in adapters.items():
        got = f.modules[m]
        assert isinstance(got, LoRAModule) and got.down.dtype == got.up.dtype == torch.bfloat16  # as stored
        assert torch.equal(got.down, down) and torch.equal(got.up, up)
        assert got.rank == RANK
        assert got.alpha == (1.0 if has_alpha else RANK)  # a missing alpha means alpha = rank
        assert got.scale == got.alpha / RANK


@pytest.mark.parametrize("layout", ["kohya", "comfy-updown", "lightning"])
def test_a_missing_alpha_key_means_alpha_is_rank(tmp_path, layout):
    f = read_lora(_write(tmp_path / "l.safetensors", layout, _adapters(rank=8)), LINEARS)
    assert {m.alpha for m in f.modules.values()} == {8.0} and {m.scale for m in f.modules.values()} == {1.0}


def test_comfy_lora_A_B_with_alpha_keys_applies_them(tmp_path):
    """ai-toolkit writes no alpha, but a Comfy-style file that has `.alpha` gets it applied (diffusers drops it)."""
    extra = {f"diffusion_model.{m}.alpha": torch.tensor(2.0) for m in LINEARS}
    f = read_lora(_write(tmp_path / "l.safetensors", "comfy-AB", _adapters(), extra=extra), LINEARS)
    assert {m.scale for m in f.modules.values()} == {0.5}


def test_kohya_names_map_back_only_through_the_models_own_names(tmp_path):
    """Two dotted names with one underscore spelling: the kohya key is ambiguous, so it matches neither."""
    linears = {"a.b_c": (8, 8), "a_b.c": (8, 8), "d.e": (8, 8)}
    state = {}
    for stem in ("a_b_c", "d_e"):
        state[f"lora_unet_{stem}.lora_down.weight"] = torch.randn(2, 8)
        state[f"lora_unet_{stem}.lora_up.weight"] = torch.randn(8, 2)
    save_file(state, str(tmp_path / "k.safetensors"))
    f = read_lora(tmp_path / "k.safetensors", linears)
    assert list(f.modules) == ["d.e"]
    assert f.unmatched == ("lora_unet_a_b_c.lora_down.weight", "lora_unet_a_b_c.lora_up.weight")


# --- alpha from diffusers' header metadata --------------------------------------------------------------------


def test_diffusers_writer_metadata_gives_alpha(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    adapters = _adapters()
    layers = {}
    for m, (down, up) in adapters.items():
        layers[f"{m}.lora_A.weight"], layers[f"{m}.lora_B.weight"] = down, up
    diffusers.QwenImagePipeline.save_lora_weights(
        tmp_path, transformer_lora_layers=layers,
        transformer_lora_adapter_metadata={"r": RANK, "lora_alpha": 8, "target_modules": sorted(LINEARS),
                                           "alpha_pattern": {"transformer_blocks.1.img_mod.1": 2}})
    path = tmp_path / "pytorch_lora_weights.safetensors"
    f = read_lora(path, LINEARS)
    assert f.dialect == "diffusers" and f.modules.keys() == LINEARS.keys() and f.unmatched == ()
    assert "lora_adapter_metadata" in f.metadata
    alphas = {m: a.alpha for m, a in f.modules.items()}
    assert alphas.pop("transformer_blocks.1.img_mod.1") == 2.0
    assert set(alphas.values()) == {8.0}
    assert f.modules["transformer_blocks.0.attn.to_q"].scale == 2.0
    for m, (down, up) in adapters.items():
        assert torch.equal(f.modules[m].down, down) and torch.equal(f.modules[m].up, up)
    # diffusers reads back what qimg reads: its own loader strips the component prefix the same way
    _, meta = diffusers.QwenImagePipeline.lora_state_dict(str(path), return_lora_metadata=True)
    assert meta["transformer.lora_alpha"] == 8


def _peft_metadata(config: dict, prefix: str = "transformer.") -> dict[str, str]:
    """The header as diffusers writes it (lora_base.write_lora_layers / peft.save_lora_adapter)."""
    return {"format": "pt", "lora_adapter_metadata": json.dumps({prefix + k: v for k, v in config.items()},
                                                                indent=2, sort_keys=True)}


def test_model_level_metadata_has_bare_fields(tmp_path):
    """A model's save_lora_adapter writes bare keys and bare LoraConfig fields."""
    meta = _peft_metadata({"r": RANK, "lora_alpha": 16, "alpha_pattern": {}, "rank_pattern": {}}, prefix="")
    f = read_lora(_write(tmp_path / "l.safetensors", "peft-bare", _adapters(), metadata=meta), LINEARS)
    assert f.dialect == "diffusers" and {m.alpha for m in f.modules.values()} == {16.0}


def test_alpha_pattern_matches_as_peft_does(tmp_path):
    """A pattern matches a whole name or a dotted tail ("to_q" -> every to_q); "^..." the whole name only."""
    config = {"r": RANK, "lora_alpha": 8, "alpha_pattern": {"^transformer_blocks.0.img_mlp.net.2": 1, "to_q": 2,
                                                            "net.0.proj": 3, "mod": 99}}
    f = read_lora(_write(tmp_path / "l.safetensors", "diffusers", _adapters(), metadata=_peft_metadata(config)),
                  LINEARS)
    alphas = {m: a.alpha for m, a in f.modules.items()}
    assert alphas == {"transformer_blocks.0.attn.to_q": 2, "transformer_blocks.0.attn.to_out.0": 8,
                      "transformer_blocks.0.img_mlp.net.0.proj": 3, "transformer_blocks.0.img_mlp.net.2": 1,
                      "transformer_blocks.1.img_mod.1": 8}  # "mod" is no whole tail of "img_mod.1"


def test_rslora_scale_is_alpha_over_sqrt_rank(tmp_path):
    config = {"r": 16, "lora_alpha": 8, "use_rslora": True}
    f = read_lora(_write(tmp_path / "l.safetensors", "diffusers", _adapters(rank=16),
                         metadata=_peft_metadata(config)), LINEARS)
    assert {round(m.scale, 12) for m in f.modules.values()} == {round(8 / math.sqrt(16), 12)}


def test_metadata_without_lora_alpha_gets_peft_default(tmp_path):
    f = read_lora(_write(tmp_path / "l.safetensors", "diffusers", _adapters(),
                         metadata=_peft_metadata({"r": RANK})), LINEARS)
    assert {m.alpha for m in f.modules.values()} == {8.0}  # peft.LoraConfig's default, as diffusers applies it


def test_metadata_of_other_components_only_leaves_alpha_rank(tmp_path):
    meta = _peft_metadata({"r": 2, "lora_alpha": 64}, prefix="text_encoder.")
    f = read_lora(_write(tmp_path / "l.safetensors", "diffusers", _adapters(), metadata=meta), LINEARS)
    assert {m.alpha for m in f.modules.values()} == {float(RANK)}


def test_an_alpha_key_wins_over_the_header(tmp_path):
    extra = {"transformer.transformer_blocks.0.attn.to_q.alpha": torch.tensor(1.0)}
    f = read_lora(_write(tmp_path / "l.safetensors", "diffusers", _adapters(), extra=extra,
                         metadata=_peft_metadata({"r": RANK, "lora_alpha": 8})), LINEARS)
    assert f.modules["transformer_blocks.0.attn.to_q"].alpha == 1.0
    assert f.modules["transformer_blocks.0.attn.to_out.0"].alpha == 8.0


@pytest.mark.parametrize("raw, what", [
    ("{not json", "not a JSON object"),
    ("[1, 2]", "not a JSON object"),
    ('{"transformer.lora_alpha": "eight"}', "not a number"),
    ('{"transformer.lora_alpha": true}', "not a number"),
    ('{"transformer.lora_alpha": 8, "transformer.alpha_pattern": [1]}', "alpha_pattern"),
    ('{"transformer.lora_alpha": 8, "transformer.alpha_pattern": {"(": 1}}', "not a regular expression"),
    ('{"transformer.lora_alpha": 8, "transformer.alpha_pattern": {"to_q": null}}', "not a number"),
])
def test_bad_metadata_is_one_line(tmp_path, raw, what):
    meta = {"lora_adapter_metadata": raw}
    with pytest.raises(CheckpointError, match=what) as e:
        read_lora(_write(tmp_path / "l.safetensors", "diffusers", _adapters(), metadata=meta), LINEARS)
    _one_line(e.value)
    assert "l.safetensors" in str(e.value)


# --- diffusers' own converter as the oracle for the delta ------------------------------------------------------


@pytest.mark.parametrize("layout, alpha", [("kohya", 1.0), ("kohya", 16.0), ("comfy-updown", 2.0), ("comfy-AB", None),
                                           ("diffsynth", None), ("lightning", 8.0)])
def test_delta_matches_diffusers_conversion(tmp_path, layout, alpha):
    """diffusers bakes alpha into A and B; qimg keeps it as a scale. strength 1: the same delta W."""
    diffusers = pytest.importorskip("diffusers")
    path = _write(tmp_path / "l.safetensors", layout, _adapters(), alpha=alpha)
    f = read_lora(path, LINEARS)
    ref = diffusers.QwenImagePipeline.lora_state_dict(str(path))
    assert len(ref) == 2 * len(f.modules)
    for m, a in f.modules.items():
        want = ref[f"transformer.{m}.lora_B.weight"] @ ref[f"transformer.{m}.lora_A.weight"]
        torch.testing.assert_close(a.scale * (a.up @ a.down), want, rtol=1e-5, atol=1e-5)


# --- partial matches -----------------------------------------------------------------------------------------


def test_partial_match_fills_unmatched_in_file_order(tmp_path):
    extra = {
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(4, 8),
        "lora_unet_transformer_blocks_9_attn_to_q.lora_down.weight": torch.randn(4, 32),  # no block 9
        "lora_unet_transformer_blocks_9_attn_to_q.lora_up.weight": torch.randn(32, 4),
        "lora_unet_transformer_blocks_0_attn_to_k.lora_down.weight": torch.randn(4, 32),  # half a pair
        "lora_unet_transformer_blocks_0_attn_to_q.lora_up.bias": torch.randn(32),  # not understood
    }
    adapters = _adapters()
    del adapters["transformer_blocks.1.img_mod.1"]
    f = read_lora(_write(tmp_path / "l.safetensors", "kohya", adapters, alpha=4.0, extra=extra), LINEARS)
    assert f.dialect == "kohya" and len(f.modules) == 4
    assert set(f.unmatched) == set(extra) and list(f.unmatched) == sorted(f.unmatched)  # safetensors orders keys
    assert f.summary() == "kohya LoRA: 4 modules, rank 4, alpha 4, 5 unmatched keys"


def test_text_encoder_keys_are_unmatched(tmp_path):
    extra = {"text_encoder.layers.0.q_proj.lora_A.weight": torch.randn(4, 8),
             "text_encoder.layers.0.q_proj.lora_B.weight": torch.randn(8, 4)}
    f = read_lora(_write(tmp_path / "l.safetensors", "diffusers", _adapters(), extra=extra), LINEARS)
    assert set(f.unmatched) == set(extra) and len(f.modules) == len(LINEARS)


def test_summary_lists_several_ranks_and_alphas(tmp_path):
    state = {}
    for i, m in enumerate(LINEARS):
        o, n = LINEARS[m]
        state[f"{_kohya(m)}.lora_down.weight"] = torch.randn(i + 1, n)
        state[f"{_kohya(m)}.lora_up.weight"] = torch.randn(o, i + 1)
        state[f"{_kohya(m)}.alpha"] = torch.tensor(0.5 * (i + 1))
    save_file(state, str(tmp_path / "l.safetensors"))
    f = read_lora(tmp_path / "l.safetensors", LINEARS)
    assert f.summary() == "kohya LoRA: 5 modules, rank 1..5 (5 values), alpha 0.5..2.5 (5 values), 0 unmatched keys"
    assert "\n" not in f.summary()


def test_alpha_zero_means_rank_as_kohya_reads_it(tmp_path):
    f = read_lora(_write(tmp_path / "l.safetensors", "kohya", _adapters(), alpha=0.0), LINEARS)
    assert {m.scale for m in f.modules.values()} == {1.0}


# --- errors: each one line, with its class ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["lora.bin", "lora.pt", "lora.ckpt", "lora.pth"])
def test_pickle_suffixes_are_refused_unread(tmp_path, name):
    path = tmp_path / name
    save_file({"a": torch.zeros(1)}, str(path))  # even a safetensors body: the name says pickle, it is not opened
    with pytest.raises(CheckpointError, match="is not a safetensors file; qimg reads LoRAs as safetensors only") as e:
        read_lora(path, LINEARS)
    _one_line(e.value)
    assert name in str(e.value)


def test_a_pickle_named_safetensors_is_never_unpickled(tmp_path, monkeypatch):
    path = tmp_path / "lora.safetensors"
    torch.save({"a": torch.zeros(1)}, path)

    def no_unpickling(*args, **kwargs):
        raise AssertionError("unpickled")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(CheckpointError, match="is not a safetensors file") as e:
        read_lora(path, LINEARS)
    _one_line(e.value)


@pytest.mark.parametrize("cut", [4, 20, -3])
def test_a_corrupt_header_is_one_line_naming_the_file(tmp_path, cut):
    path = _write(tmp_path / "lora.safetensors", "kohya", _adapters(), alpha=1.0)
    data = path.read_bytes()
    path.write_bytes(data[:cut])
    with pytest.raises(CheckpointError) as e:
        read_lora(path, LINEARS)
    _one_line(e.value)
    assert str(path) in str(e.value)


def test_a_header_of_broken_json_is_damaged(tmp_path):
    path = _write(tmp_path / "lora.safetensors", "kohya", _adapters(), alpha=1.0)
    data = bytearray(path.read_bytes())
    data[9:14] = b"\n\x00{[\""
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="damaged safetensors header") as e:
        read_lora(path, LINEARS)
    _one_line(e.value)


def test_missing_file_and_folder_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist") as e:
        read_lora(tmp_path / "nope.safetensors", LINEARS)
    _one_line(e.value)
    with pytest.raises(InputError, match="is a folder") as e:
        read_lora(tmp_path, LINEARS)
    _one_line(e.value)


def test_zero_matches_is_an_input_error_naming_keys_and_dialect(tmp_path):
    state = {"lora_unet_blocks_0_foo.lora_down.weight": torch.randn(4, 32),
             "lora_unet_blocks_0_foo.lora_up.weight": torch.randn(32, 4),
             "lora_unet_blocks_0_foo.alpha": torch.tensor(4.0)}
    save_file(state, str(tmp_path / "x.safetensors"))
    with pytest.raises(InputError) as e:
        read_lora(tmp_path / "x.safetensors", LINEARS)
    assert str(e.value) == (f"{tmp_path / 'x.safetensors'}: no key of this LoRA matches the qwen-image transformer "
                            "(3 keys; dialect kohya)")
    assert "lora_unet_blocks_0_foo.alpha" in e.value.hint
    _one_line(e.value)


def test_zero_matches_of_a_text_encoder_only_file_says_so(tmp_path):
    save_file({"lora_te1_x.lora_down.weight": torch.randn(2, 4), "lora_te1_x.lora_up.weight": torch.randn(4, 2)},
              str(tmp_path / "te.safetensors"))
    with pytest.raises(InputError, match="no key of this LoRA matches") as e:
        read_lora(tmp_path / "te.safetensors", LINEARS)
    assert "text-encoder" in e.value.hint
    _one_line(e.value)


def test_an_empty_file_matches_nothing(tmp_path):
    save_file({}, str(tmp_path / "e.safetensors"))
    with pytest.raises(InputError, match=r"\(0 keys; dialect unknown\)") as e:
        read_lora(tmp_path / "e.safetensors", LINEARS)
    _one_line(e.value)


@pytest.mark.parametrize("key", [
    "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight",  # kohya, BFL names
    "transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight",  # diffusers
    "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight",  # Comfy
    "lora_unet_single_blocks_3_linear1.lora_up.weight",
    "transformer.transformer_blocks.0.ff_context.net.2.lora_A.weight",
])
def test_flux_keys_are_refused_by_name(tmp_path, key):
    extra = {key: torch.randn(4, 4)}
    path = _write(tmp_path / "flux.safetensors", "diffusers", _adapters(), extra=extra)  # even with Qwen keys too
    with pytest.raises(InputError) as e:
        read_lora(path, LINEARS)
    assert str(e.value) == f"{path} is a FLUX LoRA; this model is qwen-image"
    _one_line(e.value)


def test_flux_model_spec_header_is_refused(tmp_path):
    """FLUX's diffusers names for attention are Qwen-Image's; the model-spec header tells them apart."""
    path = _write(tmp_path / "f.safetensors", "diffusers", _adapters(),
                  metadata={"modelspec.architecture": "flux-1-dev/lora"})
    with pytest.raises(InputError, match="is a FLUX LoRA; this model is qwen-image") as e:
        read_lora(path, LINEARS)
    _one_line(e.value)
    ok = _write(tmp_path / "q.safetensors", "diffusers", _adapters(), metadata={"modelspec.architecture": "qwen-image"})
    assert read_lora(ok, LINEARS).family == "qwen-image"


@pytest.mark.parametrize("key, shape", [
    ("transformer.transformer_blocks.0.attn.to_q.lora_A.weight", (5, 32)),  # rank differs from up's
    ("transformer.transformer_blocks.0.attn.to_q.lora_A.weight", (4, 16)),  # in_features
    ("transformer.transformer_blocks.0.attn.to_q.lora_B.weight", (16, 4)),  # out_features
    ("transformer.transformer_blocks.0.attn.to_q.lora_A.weight", (4, 32, 1, 1)),  # a conv kernel
    ("transformer.transformer_blocks.0.attn.to_q.lora_A.weight", (0, 32)),  # rank 0
])
def test_shapes_that_do_not_fit_the_linear_are_checkpoint_errors(tmp_path, key, shape):
    path = _write(tmp_path / "l.safetensors", "diffusers", _adapters(), extra={key: torch.zeros(shape)})
    with pytest.raises(CheckpointError) as e:
        read_lora(path, LINEARS)
    msg = str(e.value)
    assert msg.startswith(f"{path}: the LoRA for transformer_blocks.0.attn.to_q has down (")
    assert str(tuple(shape)) in msg and "its linear is (32, 32)" in msg
    _one_line(e.value)


def test_integer_matrices_are_refused(tmp_path):
    key = "transformer.transformer_blocks.0.attn.to_q.lora_B.weight"
    path = _write(tmp_path / "l.safetensors", "diffusers", _adapters(),
                  extra={key: torch.zeros(32, 4, dtype=torch.int8)})
    with pytest.raises(CheckpointError, match="stored as I8, not floating point") as e:
        read_lora(path, LINEARS)
    _one_line(e.value)


@pytest.mark.parametrize("alpha, what", [(torch.tensor(float("nan")), "not a finite alpha"),
                                         (torch.tensor([1.0, 2.0]), "should hold one number"),
                                         (torch.tensor(True), "should hold one number")])
def test_bad_alpha_tensors_are_checkpoint_errors(tmp_path, alpha, what):
    path = _write(tmp_path / "l.safetensors", "kohya", _adapters(),
                  extra={_kohya("transformer_blocks.0.attn.to_q") + ".alpha": alpha})
    with pytest.raises(CheckpointError, match=what) as e:
        read_lora(path, LINEARS)
    _one_line(e.value)


def test_integer_alpha_is_read(tmp_path):
    path = _write(tmp_path / "l.safetensors", "kohya", _adapters(),
                  extra={_kohya(m) + ".alpha": torch.tensor(2, dtype=torch.int64) for m in LINEARS})
    assert {m.alpha for m in read_lora(path, LINEARS).modules.values()} == {2.0}


@pytest.mark.parametrize("key, kind", [
    ("lycoris_transformer_blocks_0_attn_to_q.hada_t1", "LyCORIS Tucker"),  # LoKr/LoHa: tests/loading/test_lycoris.py
    ("lora_unet_transformer_blocks_0_attn_to_q.lokr_t2", "LyCORIS Tucker"),
    ("diffusion_model.transformer_blocks.0.attn.to_q.dora_scale", "DoRA"),
    ("transformer.transformer_blocks.0.attn.to_q.lora_magnitude_vector", "DoRA"),
])
def test_adapters_qimg_cannot_apply_exactly_are_refused(tmp_path, key, kind):
    path = _write(tmp_path / "l.safetensors", "kohya", _adapters(), alpha=1.0, extra={key: torch.randn(4, 4)})
    with pytest.raises(InputError, match=f"is a {kind}.* file .*; qimg does not read {kind}.* files yet") as e:
        read_lora(path, LINEARS)
    _one_line(e.value)


def test_dora_in_the_header_is_refused(tmp_path):
    path = _write(tmp_path / "l.safetensors", "diffusers", _adapters(),
                  metadata=_peft_metadata({"r": RANK, "lora_alpha": 8, "use_dora": True}))
    with pytest.raises(InputError, match="DoRA") as e:
        read_lora(path, LINEARS)
    _one_line(e.value)


def test_one_module_named_twice_is_refused(tmp_path):
    m = "transformer_blocks.0.attn.to_q"
    extra = {f"diffusion_model.{m}.lora_down.weight": torch.randn(4, 32),
             f"diffusion_model.{m}.lora_up.weight": torch.randn(32, 4)}
    path = _write(tmp_path / "l.safetensors", "diffusers", _adapters(), extra=extra)
    with pytest.raises(CheckpointError, match=f"holds two LoRAs for {m}") as e:
        read_lora(path, LINEARS)
    _one_line(e.value)


def test_messages_stay_one_line_whatever_the_keys_hold(tmp_path):
    state = {"evil\nkey.lora_down.weight": torch.randn(2, 2), "x\r\n\x1b[31m": torch.randn(1)}
    save_file(state, str(tmp_path / "e.safetensors"))
    with pytest.raises(InputError) as e:
        read_lora(tmp_path / "e.safetensors", LINEARS)
    _one_line(e.value)
