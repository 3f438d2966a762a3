"""FLUX.1 LoRA dialects on the tiny FLUX (fp32, CPU): diffusers/PEFT names, kohya on BFL names and XLabs' processor
names against diffusers' load_lora_weights (per-module delta W and whole images, XLabs' through the CLI), the fused BFL
splits (qkv, single linear1, the final adaLN's swapped halves) in the kohya, ComfyUI, fal Kontext and bare spellings
against hand math, the block-diagonal chunking, text-encoder keys reported unmatched, FLUX <-> Qwen-Image refusals,
and BFL's Control LoRAs (Canny/Depth) refused in one line.

Diffusers' own FLUX converters assume FLUX.1's full size (single linear1 split 3072*3 + 12288, fal's 19 + 38 blocks),
so single linear1 and the fal / ComfyUI spellings are checked against delta W computed by hand from the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import qimg
from qimg.cli.main import app
from qimg.errors import CheckpointError, InputError
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
    # XLabs (x-flux): lora1 adds to the image stream, lora2 to the text stream; a single block's qkv_lora to
    # linear1's q, k, v rows (not proj_mlp), its proj_lora to linear2
    "processor.qkv_lora1": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "processor.proj_lora1": ("attn.to_out.0",),
    "processor.qkv_lora2": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "processor.proj_lora2": ("attn.to_add_out",),
    "processor.qkv_lora": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "processor.proj_lora": ("proj_out",),
}
XLABS = [f"double_blocks.{i}.processor.{m}_lora{s}" for i in range(2) for m in ("qkv", "proj") for s in (1, 2)]
XLABS += [f"single_blocks.{i}.processor.{m}_lora" for i in range(2) for m in ("qkv", "proj")]


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


def _xlabs(path, pairs, prefix="", extra=None):
    """x-flux's save: down/up of each LoRALinearLayer, no alpha (its network_alpha is not saved)."""
    return _write(path, pairs, prefix, ".down.weight", ".up.weight", alpha=None, extra=extra)


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


@pytest.mark.parametrize("prefix", ["", "diffusion_model."])
def test_xlabs_names_match_diffusers(prefix, flux, linears, tmp_path, one_thread):
    ref, _ = flux
    pairs = _bfl_pairs(linears, XLABS, rank=4, seed=8)
    path = _xlabs(tmp_path / "xlabs.safetensors", pairs, prefix)
    lora = read_lora(path, linears, "flux")
    assert lora.dialect == "xlabs" and not lora.unmatched
    assert len(lora.modules) == 2 * (3 + 1 + 3 + 1) + 2 * (3 + 1)
    assert "single_transformer_blocks.0.proj_mlp" not in lora.modules
    ours = _ours(lora)
    assert _max_diff(ours, _by_hand(linears, pairs, 1.0)) < 1e-6  # no alpha: delta W = up @ down
    assert _max_diff(ours, _diffusers_deltas(ref, path)) < 1e-5
    # a random up is not block-diagonal: q, k, v each keep the whole down, as diffusers copies it
    assert lora.modules["transformer_blocks.1.attn.add_v_proj"].rank == 4


def test_xlabs_alpha_and_misfits(linears, tmp_path):
    pairs = _bfl_pairs(linears, ["double_blocks.0.processor.qkv_lora1"], rank=4, seed=9)
    alpha = {"double_blocks.0.processor.qkv_lora1.alpha": torch.tensor(2.0)}
    lora = read_lora(_xlabs(tmp_path / "a.safetensors", pairs, extra=alpha), linears, "flux")
    assert lora.summary().startswith("xlabs LoRA: 3 modules, rank 4, alpha 2")
    assert _max_diff(_ours(lora), _by_hand(linears, pairs, 2.0 / 4)) < 1e-6
    down, up = pairs["double_blocks.0.processor.qkv_lora1"]
    bad = {"double_blocks.0.processor.qkv_lora1": (down, up[:64])}  # a 2-way split where q, k, v need 3
    with pytest.raises(CheckpointError, match="double_blocks.0.processor.qkv_lora1"):
        read_lora(_xlabs(tmp_path / "bad.safetensors", bad), linears, "flux")
    # a bare ".down.weight" is XLabs' suffix only: on diffusers names it names nothing
    save_file({"transformer.transformer_blocks.0.attn.to_q.down.weight": down,
               "transformer.transformer_blocks.0.attn.to_q.up.weight": up[:32]}, str(tmp_path / "loose.safetensors"))
    with pytest.raises(InputError, match="no key of this LoRA matches"):
        read_lora(tmp_path / "loose.safetensors", linears, "flux")


@pytest.mark.parity
def test_xlabs_lora_through_the_cli_matches_diffusers(flux, linears, tmp_path, one_thread):
    ref, root = flux
    path = _xlabs(tmp_path / "realism.safetensors", _bfl_pairs(linears, XLABS, rank=4, seed=10))
    out = tmp_path / "fox.png"
    done = CliRunner().invoke(app, ["generate", PROMPT, "-o", str(out), "--model", str(root), "--seed", "5",
                                    "--steps", "2", "--width", "32", "--height", "32", "--device", "cpu", "--dtype",
                                    "float32", "--lora", str(path), "-v"])
    assert done.exit_code == 0, done.output
    assert "lora: " in done.stderr and "xlabs" in done.stderr
    from PIL import Image

    got = np.asarray(Image.open(out)).astype(np.int16)
    options = dict(num_inference_steps=2, width=32, height=32, guidance_scale=3.5, output_type="np")
    with torch.no_grad():
        base = ref(PROMPT, generator=torch.Generator("cpu").manual_seed(5), **options).images[0]
    ref.load_lora_weights(str(path), adapter_name="xlabs")
    try:
        with torch.no_grad():
            want = ref(PROMPT, generator=torch.Generator("cpu").manual_seed(5), **options).images[0]
    finally:
        ref.delete_adapters("xlabs")
    want, base = (np.round(x * 255).astype(np.int16) for x in (want, base))
    assert np.abs(want - base).max() > 8  # the LoRA visibly changes the image
    assert np.abs(got - want).max() <= 1, np.abs(got - want).max()


def _control(path: Path, linears, prefix: str = "", norms: bool = True) -> Path:
    """A tiny BFL Control LoRA: img_in's LoRA reads noise + control latents (twice the channels), lora_B biases, and
    (norms) the QK-norm scales it replaces outright."""
    gen = torch.Generator().manual_seed(11)
    out, inp = linears["x_embedder"]
    state = {f"{prefix}img_in.lora_A.weight": torch.randn(4, 2 * inp, generator=gen),
             f"{prefix}img_in.lora_B.weight": torch.randn(out, 4, generator=gen),
             f"{prefix}img_in.lora_B.bias": torch.randn(out, generator=gen)}
    for name, (down, up) in _bfl_pairs(linears, ["double_blocks.0.img_attn.qkv"], 4, 12).items():
        state[f"{prefix}{name}.lora_A.weight"], state[f"{prefix}{name}.lora_B.weight"] = down, up
    if norms:
        for stream in ("img", "txt"):
            for norm in ("query_norm", "key_norm"):
                state[f"{prefix}double_blocks.0.{stream}_attn.norm.{norm}.scale"] = torch.ones(16)
    save_file(state, str(path))
    return path


def test_a_control_lora_is_refused_in_one_line(flux, linears, tmp_path):
    _, root = flux
    path = _control(tmp_path / "canny.safetensors", linears)
    out = tmp_path / "fox.png"
    done = CliRunner().invoke(app, ["generate", PROMPT, "-o", str(out), "--model", str(root), "--steps", "1",
                                    "--width", "32", "--height", "32", "--device", "cpu", "--lora", str(path)])
    assert done.exit_code == 1, done.output
    error = next(line for line in done.stderr.splitlines() if line.startswith("error: "))
    assert "canny.safetensors is a FLUX Control LoRA (Canny/Depth" in error
    assert "img_attn.norm.key_norm.scale replaces a QK-norm scale" in error and "control-image pipeline" in error
    assert "FLUX.1 Control is not supported" in done.stderr and "FLUX.1-dev" in done.stderr
    assert "Traceback" not in done.output and not out.exists()
    # without the norm scales, img_in (x_embedder) taking twice the latent channels tells it, in any dialect
    bare = _control(tmp_path / "depth.safetensors", linears, prefix="diffusion_model.", norms=False)
    save_file({"transformer.x_embedder.lora_A.weight": torch.zeros(4, 128),
               "transformer.x_embedder.lora_B.weight": torch.zeros(32, 4)}, str(tmp_path / "named.safetensors"))
    for plain in (bare, tmp_path / "named.safetensors"):
        with pytest.raises(InputError) as e:
            read_lora(plain, linears, "flux")
        text = str(e.value)
        assert "is a FLUX Control LoRA" in text and "takes 128 input channels, twice the model's 64" in text
        assert "\n" not in text
    # on a Qwen-Image model it is a FLUX LoRA, said as such
    with pytest.raises(InputError, match="is a FLUX LoRA; this model is qwen-image"):
        read_lora(path, {"transformer_blocks.0.attn.to_q": (32, 32)}, "qwen-image")


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
