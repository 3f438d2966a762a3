"""FLUX.1 LoRA dialects on the tiny FLUX (fp32, CPU): diffusers/PEFT names and kohya on BFL names against diffusers'
load_lora_weights (per-module delta W and whole images), the fused BFL splits (qkv, single linear1, the final adaLN's
swapped halves) in the kohya, ComfyUI, fal Kontext and bare spellings against hand math, the block-diagonal chunking,
text-encoder keys reported unmatched, and FLUX <-> Qwen-Image refusals.

Diffusers' own FLUX converters assume FLUX.1's full size (single linear1 split 3072*3 + 12288, fal's 19 + 38 blocks),
so single linear1 and the fal / ComfyUI spellings are checked against delta W computed by hand from the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import qimg
from qimg.errors import InputError
from qimg.loading.flux import flux_linears
from qimg.loading.lora import read_lora
from tests.fixtures_flux_model import write_tiny_flux

PROMPT = "a photo of a red fox sitting in the snow"
DOUBLE = ("img_attn.qkv", "img_attn.proj", "img_mlp.0", "img_mlp.2", "img_mod.lin",
          "txt_attn.qkv", "txt_attn.proj", "txt_mlp.0", "txt_mlp.2", "txt_mod.lin")
# BFL module -> (diffusers linears it covers, in order)
SPLITS = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn.proj": ("attn.to_out.0",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "img_mod.lin": ("norm1.linear",),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn.proj": ("attn.to_add_out",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
    "txt_mod.lin": ("norm1_context.linear",),
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation.lin": ("norm.linear",),
}


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-flux-lora") / "model"
    return write_tiny_flux(root), root


@pytest.fixture(scope="module")
def linears(flux):
    return flux_linears(flux[1] / "transformer")


def _targets(bfl: str) -> list[str]:
    """A BFL module name -> the diffusers linears it covers."""
    parts = bfl.split(".")
    if parts[0] == "double_blocks":
        return [f"transformer_blocks.{parts[1]}.{t}" for t in SPLITS[".".join(parts[2:])]]
    if parts[0] == "single_blocks":
        return [f"single_transformer_blocks.{parts[1]}.{t}" for t in SPLITS[".".join(parts[2:])]]
    return {"final_layer.linear": ["proj_out"], "final_layer.adaLN_modulation.1": ["norm_out.linear"],
            "img_in": ["x_embedder"], "txt_in": ["context_embedder"]}[bfl]


def _bfl_pairs(linears, names, rank: int, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for bfl in names:
        targets = _targets(bfl)
        rows, cols = sum(linears[t][0] for t in targets), linears[targets[0]][1]
        out[bfl] = (torch.randn(rank, cols, generator=gen) * 0.3, torch.randn(rows, rank, generator=gen) * 0.3)
    return out


def _by_hand(linears, pairs, scale: float) -> dict[str, torch.Tensor]:
    """delta W of each fused BFL module (scale * up @ down), its rows split over the linears it covers; the final
    adaLN's (shift, scale) halves swapped into diffusers' (scale, shift)."""
    out = {}
    for bfl, (down, up) in pairs.items():
        delta = scale * up @ down
        if bfl == "final_layer.adaLN_modulation.1":
            shift, sc = delta.chunk(2)
            delta = torch.cat([sc, shift])
        start = 0
        for t in _targets(bfl):
            out[t] = delta[start: start + linears[t][0]]
            start += linears[t][0]
    return out


def _write(path: Path, pairs, prefix: str, down: str, up: str, alpha: float | None, underscored: bool = False,
           extra: dict[str, torch.Tensor] | None = None) -> Path:
    state = {}
    for name, (a, b) in pairs.items():
        key = prefix + (name.replace(".", "_") if underscored else name)
        state[key + down], state[key + up] = a.contiguous(), b.contiguous()
        if alpha is not None:
            state[key + ".alpha"] = torch.tensor(alpha)
    state.update(extra or {})
    save_file(state, str(path))
    return path


def _kohya(path, pairs, alpha, extra=None):
    return _write(path, pairs, "lora_unet_", ".lora_down.weight", ".lora_up.weight", alpha, True, extra)


def _ours(lora) -> dict[str, torch.Tensor]:
    return {name: m.dense_delta() for name, m in lora.modules.items()}


def _diffusers_deltas(ref, path: Path) -> dict[str, torch.Tensor]:
    """delta W per linear as diffusers' load_lora_weights (with its own FLUX conversion) and PEFT apply it."""
    ref.load_lora_weights(str(path), adapter_name="oracle")
    try:
        return {name: m.get_delta_weight("oracle").detach().float().clone()
                for name, m in ref.transformer.named_modules()
                if hasattr(m, "lora_A") and "oracle" in getattr(m, "lora_A", {})}
    finally:
        ref.delete_adapters("oracle")


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_diffusers_peft_names_match_diffusers(flux, linears, tmp_path, one_thread):
    from diffusers import FluxPipeline

    ref, _ = flux
    gen = torch.Generator().manual_seed(0)
    names = ("transformer_blocks.0.attn.to_q", "transformer_blocks.1.ff_context.net.2",
             "single_transformer_blocks.1.proj_mlp", "single_transformer_blocks.0.norm.linear", "proj_out")
    layers = {}
    for name in names:
        out, inp = linears[name]
        layers[f"{name}.lora_A.weight"] = torch.randn(4, inp, generator=gen)
        layers[f"{name}.lora_B.weight"] = torch.randn(out, 4, generator=gen)
    meta = {"r": 4, "lora_alpha": 8, "target_modules": sorted({n.rsplit(".", 1)[-1] for n in names})}
    path = tmp_path / "peft.safetensors"
    FluxPipeline.save_lora_weights(tmp_path, transformer_lora_layers=layers, weight_name=path.name,
                                   transformer_lora_adapter_metadata=meta)
    lora = read_lora(path, linears, "flux")
    assert lora.dialect == "diffusers" and set(lora.modules) == set(names) and not lora.unmatched
    assert _max_diff(_ours(lora), _diffusers_deltas(ref, path)) < 1e-5


def test_kohya_bfl_names_match_diffusers(flux, linears, tmp_path, one_thread):
    ref, _ = flux
    names = [f"double_blocks.{i}.{m}" for i in range(2) for m in DOUBLE]
    names += [f"single_blocks.{i}.{m}" for i in range(2) for m in ("linear2", "modulation.lin")]
    pairs = _bfl_pairs(linears, names, rank=8, seed=1)
    path = _kohya(tmp_path / "kohya.safetensors", pairs, alpha=4.0)
    lora = read_lora(path, linears, "flux")
    assert lora.dialect == "kohya" and not lora.unmatched
    assert len(lora.modules) == 2 * 14 + 2 * 2
    ours, want = _ours(lora), _diffusers_deltas(ref, path)
    assert _max_diff(ours, want) < 1e-5
    assert _max_diff(ours, _by_hand(linears, pairs, 4.0 / 8)) < 1e-5
    # a random up is not block-diagonal: q, k, v each keep the whole down (rank 8)
    assert lora.modules["transformer_blocks.0.attn.to_k"].rank == 8


@pytest.mark.parametrize("dialect", ["kohya", "comfy", "fal", "bfl"])
def test_fused_and_final_layer_splits_match_hand_math(dialect, linears, tmp_path):
    names = ["single_blocks.0.linear1", "single_blocks.1.linear1", "double_blocks.1.txt_attn.qkv",
             "final_layer.adaLN_modulation.1", "final_layer.linear", "img_in", "txt_in"]
    pairs = _bfl_pairs(linears, names, rank=4, seed=2)
    path = tmp_path / f"{dialect}.safetensors"
    if dialect == "kohya":
        _kohya(path, pairs, alpha=2.0)
        scale = 0.5
    elif dialect == "comfy":
        _write(path, pairs, "diffusion_model.", ".lora_A.weight", ".lora_B.weight", alpha=8.0)
        scale = 2.0
    elif dialect == "fal":  # fal Kontext: no alpha, so alpha = rank
        _write(path, pairs, "base_model.model.", ".lora_A.weight", ".lora_B.weight", alpha=None)
        scale = 1.0
    else:
        _write(path, pairs, "", ".lora_A.weight", ".lora_B.weight", alpha=None)
        scale = 1.0
    lora = read_lora(path, linears, "flux")
    assert lora.dialect == dialect and not lora.unmatched
    want = _by_hand(linears, pairs, scale)
    assert set(lora.modules) == set(want)
    assert {lora.modules[f"single_transformer_blocks.0.{t}"].up.shape[0] for t in SPLITS["linear1"]} == {32, 128}
    assert _max_diff(_ours(lora), want) < 1e-5


def test_block_diagonal_up_chunks_the_down(linears, tmp_path):
    gen = torch.Generator().manual_seed(3)
    down = torch.randn(6, 32, generator=gen)
    diag = torch.zeros(96, 6)
    for j in range(3):
        diag[32 * j: 32 * (j + 1), 2 * j: 2 * (j + 1)] = torch.randn(32, 2, generator=gen)
    dense = diag.clone()
    dense[0, 5] = 0.25  # one entry off the diagonal blocks: the down must be copied whole
    for up, rank in ((diag, 2), (dense, 6)):
        pairs = {"double_blocks.0.img_attn.qkv": (down, up)}
        lora = read_lora(_kohya(tmp_path / f"r{rank}.safetensors", pairs, alpha=3.0), linears, "flux")
        assert {m.rank for m in lora.modules.values()} == {rank}
        assert _max_diff(_ours(lora), _by_hand(linears, pairs, 3.0 / 6)) < 1e-6


def test_text_encoder_keys_are_reported_not_applied(linears, tmp_path):
    pairs = _bfl_pairs(linears, ["double_blocks.0.img_attn.proj"], rank=2, seed=4)
    te = {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(2, 16),
          "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.randn(16, 2),
          "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha": torch.tensor(2.0)}
    lora = read_lora(_kohya(tmp_path / "te.safetensors", pairs, alpha=2.0, extra=te), linears, "flux")
    assert set(lora.modules) == {"transformer_blocks.0.attn.to_out.0"}
    assert set(lora.unmatched) == set(te) and lora.summary().endswith("3 unmatched keys")
    save_file(te, str(tmp_path / "te_only.safetensors"))
    with pytest.raises(InputError) as e:
        read_lora(tmp_path / "te_only.safetensors", linears, "flux")
    assert "text-encoder" in e.value.hint


def test_each_family_refuses_the_others_lora(linears, tmp_path):
    flux_file = _kohya(tmp_path / "f.safetensors", _bfl_pairs(linears, ["double_blocks.0.img_mlp.0"], 2, 5), 1.0)
    qwen_file = tmp_path / "q.safetensors"
    save_file({"lora_unet_transformer_blocks_0_img_mlp_net_2.lora_down.weight": torch.randn(2, 32),
               "lora_unet_transformer_blocks_0_img_mlp_net_2.lora_up.weight": torch.randn(32, 2)}, str(qwen_file))
    qwen_linears = {"transformer_blocks.0.img_mlp.net.2": (32, 32), "transformer_blocks.0.attn.to_q": (32, 32)}
    for path, lin, family, other in ((flux_file, qwen_linears, "qwen-image", "FLUX"),
                                     (qwen_file, linears, "flux", "Qwen-Image")):
        with pytest.raises(InputError) as e:
            read_lora(path, lin, family)
        text = str(e.value)
        assert f"is a {other} LoRA; this model is {family}" in text and "\n" not in text


@pytest.mark.parity
def test_kohya_lora_image_matches_diffusers(flux, linears, tmp_path, one_thread):
    ref, root = flux
    names = [f"double_blocks.{i}.{m}" for i in range(2) for m in DOUBLE]
    names += [f"single_blocks.{i}.{m}" for i in range(2) for m in ("linear2", "modulation.lin")]
    path = _kohya(tmp_path / "img.safetensors", _bfl_pairs(linears, names, rank=4, seed=6), alpha=4.0)
    pipe = qimg.load(root, device="cpu", dtype="float32")
    options = dict(seed=3, steps=2, width=32, height=32)
    base = np.asarray(pipe.generate(PROMPT, **options)[0]).astype(np.int16)
    lora = pipe.load_lora(path)
    assert lora.dialect == "kohya"
    got = np.asarray(pipe.generate(PROMPT, **options)[0]).astype(np.int16)
    ref.load_lora_weights(str(path), adapter_name="img")
    try:
        with torch.no_grad():
            want = ref(PROMPT, num_inference_steps=2, width=32, height=32, guidance_scale=3.5,
                       generator=torch.Generator("cpu").manual_seed(3), output_type="np").images[0]
    finally:
        ref.delete_adapters("img")
    want = np.round(want * 255).astype(np.int16)
    assert np.abs(got - base).max() > 8  # the LoRA visibly changes the image
    assert np.abs(got - want).max() <= 1, np.abs(got - want).max()
