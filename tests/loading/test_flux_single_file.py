"""FLUX.1 transformers in BFL's own key layout (--transformer FILE): the file written from a tiny folder's weights
(checked against diffusers' own converter) loads those weights exactly, bare or under ComfyUI's prefixes, dev and
Kontext; FP8 casts load as FP8 storage with the right scale on every part of a fused tensor; every wrong file is
one line naming the tensor; and the CLI's image is the folder's."""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import qimg
from qimg.cli.main import app
from qimg.errors import CheckpointError
from qimg.families.flux import FLUX
from qimg.loading.single_file import read_transformer_file
from qimg.nets.flux import FluxTransformer, flux_ids, flux_rope
from qimg.pipelines import memory
from qimg.runtime.fp8 import FP8Linear
from qimg.runtime.planner import MemoryPlan
from qimg.specs import FluxParams
from tests.fixtures_flux_model import write_tiny_flux

CPU = torch.device("cpu")
E4M3 = torch.float8_e4m3fn
COMFY = "model.diffusion_model."
RESIDENT = MemoryPlan("none", None, "cpu", False)
PROMPT = "a lighthouse on a cliff at dusk"


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Tiny FLUX.1-dev and FLUX.1-Kontext-dev folders (diffusers layout)."""
    root = tmp_path_factory.mktemp("tiny-flux-bfl")
    write_tiny_flux(root / "dev", seed=5)
    write_tiny_flux(root / "kontext", kontext=True, seed=9)
    return {"dev": root / "dev", "kontext": root / "kontext"}


def _state(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors")


def to_bfl(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The test's own inverse map: diffusers-named FLUX.1 weights -> BFL's names, fused as BFL stores them."""
    out: dict[str, torch.Tensor] = {}

    def put(bfl: str, *names: str, swap: bool = False) -> None:
        for kind in ("weight", "bias"):
            fused = torch.cat([state[f"{n}.{kind}"] for n in names])
            if swap:  # diffusers' norm_out has (scale, shift); BFL's final adaLN stores (shift, scale)
                scale, shift = fused.chunk(2)
                fused = torch.cat([shift, scale])
            out[f"{bfl}.{kind}"] = fused

    put("img_in", "x_embedder")
    put("txt_in", "context_embedder")
    for bfl, net in (("time_in", "timestep"), ("vector_in", "text"), ("guidance_in", "guidance")):
        if f"time_text_embed.{net}_embedder.linear_1.weight" in state:
            put(f"{bfl}.in_layer", f"time_text_embed.{net}_embedder.linear_1")
            put(f"{bfl}.out_layer", f"time_text_embed.{net}_embedder.linear_2")
    doubles = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("transformer_blocks."))
    singles = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("single_transformer_blocks."))
    for i in range(doubles):
        d, t = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        put(d + "img_mod.lin", t + "norm1.linear")
        put(d + "txt_mod.lin", t + "norm1_context.linear")
        put(d + "img_attn.qkv", t + "attn.to_q", t + "attn.to_k", t + "attn.to_v")
        put(d + "txt_attn.qkv", t + "attn.add_q_proj", t + "attn.add_k_proj", t + "attn.add_v_proj")
        put(d + "img_attn.proj", t + "attn.to_out.0")
        put(d + "txt_attn.proj", t + "attn.to_add_out")
        put(d + "img_mlp.0", t + "ff.net.0.proj")
        put(d + "img_mlp.2", t + "ff.net.2")
        put(d + "txt_mlp.0", t + "ff_context.net.0.proj")
        put(d + "txt_mlp.2", t + "ff_context.net.2")
        for stream, q, k in (("img", "norm_q", "norm_k"), ("txt", "norm_added_q", "norm_added_k")):
            out[f"{d}{stream}_attn.norm.query_norm.scale"] = state[f"{t}attn.{q}.weight"]
            out[f"{d}{stream}_attn.norm.key_norm.scale"] = state[f"{t}attn.{k}.weight"]
    for i in range(singles):
        s, t = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        put(s + "linear1", t + "attn.to_q", t + "attn.to_k", t + "attn.to_v", t + "proj_mlp")
        put(s + "linear2", t + "proj_out")
        put(s + "modulation.lin", t + "norm.linear")
        out[s + "norm.query_norm.scale"] = state[t + "attn.norm_q.weight"]
        out[s + "norm.key_norm.scale"] = state[t + "attn.norm_k.weight"]
    put("final_layer.linear", "proj_out")
    put("final_layer.adaLN_modulation.1", "norm_out.linear", swap=True)
    return out


def diffusers_convert(bfl: dict[str, torch.Tensor], width: int) -> dict[str, torch.Tensor]:
    """diffusers' own BFL converter (the oracle). It hard-codes FLUX.1's width 3072 in its linear1 split (3072,
    3072, 3072, 12288); scaled to `width` that is the same (d, d, d, 4d) split, so torch.split is scaled for it."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    split = torch.split
    checkpoint = dict(bfl)

    def scaled(tensor: torch.Tensor, sizes: list[int], dim: int = 0) -> tuple[torch.Tensor, ...]:
        return split(tensor, [s * width // 3072 for s in sizes], dim)

    with mock.patch.object(torch, "split", scaled):
        out = convert_flux_transformer_checkpoint_to_diffusers(checkpoint)
    assert not checkpoint, f"diffusers' converter does not know {sorted(checkpoint)[:3]}"  # it pops what it reads
    return out


def _save(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file({k: v.clone() for k, v in tensors.items()}, str(path))  # clone: a test may store one tensor twice
    return path


def _load(folder: Path, path: Path, fp8: str | None = None) -> torch.nn.Module:
    model, _ = memory.load_denoiser(FLUX, folder / "transformer", CPU, torch.float32, RESIDENT, fp8=fp8,
                                    weights=read_transformer_file(path, "flux"))
    return model


def _velocity(model: torch.nn.Module) -> torch.Tensor:
    """One denoiser call on fixed random inputs (2x3 image tokens, 5 text tokens)."""
    gen = torch.Generator().manual_seed(0)
    img, txt, pooled = (torch.randn(*s, generator=gen) for s in ((1, 6, 64), (1, 5, 32), (1, 32)))
    rope = flux_rope(flux_ids(5, [(0, 2, 3)]), model.params.axes_dims_rope)
    with torch.inference_mode():
        return model(img, txt, torch.tensor([0.7]), torch.tensor([3.5]), pooled, rope)


def _one_line(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and excinfo.value.hint and "\n" not in excinfo.value.hint
    return message


# -- the file and the oracle ------------------------------------------------------------------------------------


def test_the_bfl_file_is_what_diffusers_converter_reads(folders):
    state = _state(folders["dev"])
    converted = diffusers_convert(to_bfl(state), state["x_embedder.weight"].shape[0])
    assert converted.keys() == state.keys() and all(torch.equal(converted[k], state[k]) for k in state)


def test_full_size_names_and_shapes_match_diffusers_and_the_net(tmp_path):
    """The released FLUX.1-dev's shapes (on the meta device): diffusers' converter, unpatched, and qimg's reading of
    a BFL header (no tensor data: the layout and its split are read from the header alone) give the net's."""
    with torch.device("meta"):
        state = FluxTransformer(FluxParams()).state_dict()
    bfl = to_bfl(state)
    want = {k: tuple(v.shape) for k, v in state.items()}
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    assert {k: tuple(v.shape) for k, v in convert_flux_transformer_checkpoint_to_diffusers(dict(bfl)).items()} == want
    header = {k: {"dtype": "BF16", "shape": list(v.shape), "data_offsets": [0, 0]} for k, v in bfl.items()}
    raw = json.dumps(header).encode()
    path = tmp_path / "flux1-dev.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw)
    found = read_transformer_file(path, "flux")
    assert (found.layout, found.prefix, found.foreign) == ("BFL", "", ())
    assert {n: s for n, (_, s) in found.tensors.items()} == want
    assert found.parts is not None and found.parts["single_transformer_blocks.0.proj_mlp.weight"] == ((9216, 21504),)
    assert found.parts["norm_out.linear.bias"] == ((3072, 6144), (0, 3072))


# -- loading ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant,prefix", [("dev", ""), ("dev", COMFY), ("dev", "diffusion_model."),
                                            ("kontext", COMFY)])
def test_a_bfl_file_loads_the_folders_exact_weights(folders, tmp_path, variant, prefix):
    folder = folders[variant]
    path = _save(tmp_path / "flux1.safetensors", {prefix + k: v for k, v in to_bfl(_state(folder)).items()})
    found = read_transformer_file(path, "flux")
    assert (found.layout, found.prefix) == ("BFL", prefix) and found.summary().startswith("flux1.safetensors: BFL")
    got = _load(folder, path).state_dict()
    want, _ = memory.load_denoiser(FLUX, folder / "transformer", CPU, torch.float32, RESIDENT)
    want = want.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_an_all_in_one_flux_checkpoint_gives_its_transformer(folders, tmp_path):
    """Comfy-Org's flux1-dev-fp8.safetensors layout: the BFL transformer under model.diffusion_model. beside the
    VAE and both text encoders; only the transformer is read."""
    folder = folders["dev"]
    others = {"vae.decoder.conv_out.bias": torch.zeros(3),
              "text_encoders.t5xxl.transformer.encoder.final_layer_norm.weight": torch.ones(4),
              "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": torch.ones(4)}
    path = _save(tmp_path / "flux1-dev-fp8.safetensors",
                 {**{COMFY + k: v for k, v in to_bfl(_state(folder)).items()}, **others})
    found = read_transformer_file(path, "flux")
    assert (found.layout, found.components, found.foreign) == ("BFL", ("text_encoders.", "vae."), ())
    got = _load(folder, path).state_dict()
    want = memory.load_denoiser(FLUX, folder / "transformer", CPU, torch.float32, RESIDENT)[0].state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("style", ["plain", "scaled", "rowwise"])
def test_an_fp8_file_keeps_e4m3_parts_with_their_fused_tensors_scale(folders, tmp_path, style):
    """plain: every tensor cast to e4m3 (flux1-dev-fp8 casts); scaled: ComfyUI's scaled fp8, one scale per fused
    tensor, shared by its q, k, v (and MLP) parts; rowwise: one scale per stored row, which a part takes its rows of
    (the final adaLN's halves swapped with its rows)."""
    folder = folders["dev"]
    state = _state(folder)
    bfl = to_bfl(state)
    out: dict[str, torch.Tensor] = {COMFY + "scaled_fp8": torch.empty(0, dtype=E4M3)} if style == "scaled" else {}
    values: dict[str, torch.Tensor] = {}  # the fp32 value each stored tensor stands for
    for key, value in bfl.items():
        if style == "plain" or value.ndim != 2:
            out[COMFY + key] = value.to(E4M3) if style == "plain" else value
            values[key] = out[COMFY + key].float()
            continue
        scale = (value.abs().amax(dim=1, keepdim=True) if style == "rowwise" else value.abs().amax()) / 448
        out[COMFY + key] = (value / scale).to(E4M3)
        values[key] = out[COMFY + key].float() * scale
        name = key.removesuffix(".weight") + (".weight_scale" if style == "rowwise" else ".scale_weight")
        out[COMFY + name] = scale.reshape(-1)
    path = _save(tmp_path / f"{style}.safetensors", out)
    expected = diffusers_convert(values, state["x_embedder.weight"].shape[0])
    model = _load(folder, path)
    kept = {n: m for n, m in model.named_modules() if isinstance(m, FP8Linear)}
    assert sorted(kept) == sorted(n.removesuffix(".weight") for n, v in state.items() if v.ndim == 2)
    for name, m in kept.items():
        # The stored e4m3 rows as they are (never requantised), with the scale of the rows they came from.
        assert m.weight_fp8.dtype == E4M3 and m.weight_scale.shape == (1, m.out_features)
        weight = m.weight_fp8.float() * m.weight_scale.t()
        assert torch.equal(weight, expected[f"{name}.weight"]), name
        # e4m3 keeps 3 mantissa bits: a value is off by at most half a step, 2^-4 of itself, or, below the smallest
        # normal (2^-6 of the scale), by half the smallest subnormal (2^-10 of the scale).
        original, step = state[f"{name}.weight"], m.weight_scale.t()
        assert bool(((weight - original).abs() <= original.abs() * 2**-4 + step * 2**-10).all()), name
    others = {n: t for n, t in model.state_dict().items() if n.rsplit(".", 1)[0] not in kept}
    assert all(torch.equal(t, expected[n]) for n, t in others.items())
    # The same network with every weight at the value its stored form stands for, in fp32, computes the same.
    reference = _load(folder, _save(tmp_path / "dequantised.safetensors", to_bfl(expected)))
    assert torch.equal(_velocity(model), _velocity(reference))


@pytest.mark.parametrize("change,words", [
    ("missing", "does not match the network: 1 missing (model.diffusion_model.double_blocks.1.txt_attn.qkv.weight)"),
    ("extra", "1 unexpected (model.diffusion_model.double_blocks.0.img_attn.extra.weight)"),
    ("diffusers-name", "1 unexpected (model.diffusion_model.x_embedder.weight)"),
    ("shape", "1 with the wrong shape (model.diffusion_model.img_in.weight [32, 48] != [32, 64])"),
    ("fused-shape", "1 with the wrong shape (model.diffusion_model.double_blocks.0.img_attn.qkv.weight [48, 31] != "
                    "[96, 32])"),
    ("unsplittable", "single_blocks.1.linear1.weight has shape [220, 32], whose rows do not split 1:1:1:4 into"),
    ("schnell", "is a FLUX.1 transformer of 2 double + 2 single blocks, width 32, without guidance embedding; "
                "transformer/config.json describes 2 double + 2 single blocks, width 32, with guidance embedding"),
    ("larger", "is a FLUX.1 transformer of 3 double + 2 single blocks"),
])
def test_a_wrong_bfl_file_is_one_line_naming_the_tensor(folders, tmp_path, change, words):
    folder = folders["dev"]
    bfl = to_bfl(_state(folder))
    if change == "missing":
        del bfl["double_blocks.1.txt_attn.qkv.weight"]
    elif change == "extra":
        bfl["double_blocks.0.img_attn.extra.weight"] = torch.zeros(2, 2)
    elif change == "diffusers-name":
        bfl["x_embedder.weight"] = bfl["img_in.weight"]
    elif change == "shape":
        bfl["img_in.weight"] = bfl["img_in.weight"][:, :48]
    elif change == "fused-shape":
        bfl["double_blocks.0.img_attn.qkv.weight"] = torch.zeros(48, 31)
    elif change == "unsplittable":
        bfl["single_blocks.1.linear1.weight"] = bfl["single_blocks.1.linear1.weight"][:-4]
    elif change == "schnell":
        bfl = {k: v for k, v in bfl.items() if not k.startswith("guidance_in.")}
    else:
        bfl.update({k.replace("double_blocks.1.", "double_blocks.2."): v for k, v in bfl.items()
                    if k.startswith("double_blocks.1.")})
    path = _save(tmp_path / "bad.safetensors", {COMFY + k: v for k, v in bfl.items()})
    with pytest.raises(CheckpointError) as e:
        _load(folder, path)
    message = _one_line(e)
    assert words in message and message.startswith(("bad.safetensors (BFL layout)", str(path))), message


# -- end to end -----------------------------------------------------------------------------------------------------


def test_cli_with_a_bfl_transformer_gives_the_folders_image(folders, tmp_path):
    folder = folders["dev"]
    path = _save(tmp_path / "flux1-dev.safetensors", {COMFY + k: v for k, v in to_bfl(_state(folder)).items()})
    runner = CliRunner()
    base = [PROMPT, "--model", str(folder), "--steps", "2", "--width", "64", "--height", "64", "--device", "cpu",
            "--dtype", "float32", "--seed", "1"]
    made = runner.invoke(app, ["generate", *base, "-o", str(tmp_path / "bfl.png"), "--transformer", str(path)])
    assert made.exit_code == 0, made.output
    plain = runner.invoke(app, ["generate", *base, "-o", str(tmp_path / "plain.png")])
    assert plain.exit_code == 0, plain.output
    image = np.asarray(qimg.open_image(tmp_path / "bfl.png"))
    assert np.array_equal(image, np.asarray(qimg.open_image(tmp_path / "plain.png")))
    assert qimg.read_params(tmp_path / "bfl.png")["transformer"] == str(path.resolve())
