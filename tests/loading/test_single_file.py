"""Single-file transformers (--transformer FILE): every layout loads the folder's exact weights, FP8 files load as
FP8 storage computing the dequantised-weight math, other weights really change the image, and every wrong file is
one line of the right error type."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import qimg
from qimg.errors import CheckpointError, InputError
from qimg.families.qwen import QWEN_IMAGE, mmdit_fp8_layers, qwen_needs
from qimg.loading.single_file import file_sha256, read_transformer_file
from qimg.nets.qwen_mmdit import qwen_rope
from qimg.pipelines import memory
from qimg.pipelines.prompts import QwenPromptEncoder
from qimg.runtime.fp8 import FP8Linear
from qimg.runtime.host_copies import module_tensors
from qimg.runtime.lora import LoRALinear
from qimg.runtime.offload import Residency
from qimg.runtime.planner import MemoryPlan, RequestShape

CPU = torch.device("cpu")
E4M3 = torch.float8_e4m3fn
COMFY = "model.diffusion_model."
RESIDENT = MemoryPlan("none", None, "cpu", False)
NO_TEXT = RequestShape(64, 48, text_encoder=False)  # runs from saved embeddings: no tokenizer to load
OPTIONS = dict(steps=2, seed=3, width=64, height=48, negative="blurry", cfg=4.0)


@pytest.fixture(scope="module")
def state(tiny_qwen: Path) -> dict[str, torch.Tensor]:
    """The tiny model's transformer weights by official name (from its shards)."""
    out: dict[str, torch.Tensor] = {}
    for shard in sorted((tiny_qwen / "transformer").glob("*.safetensors")):
        out.update(load_file(shard))
    return out


@pytest.fixture(scope="module")
def baseline(tiny_qwen: Path, one_thread):
    """The folder's own pipeline, prompt embeddings made once (later pipelines skip the text encoder), its image."""
    pipe = qimg.load(tiny_qwen, device="cpu")
    request = qimg.make_request(pipe.ref.spec, "a fox", **OPTIONS)[0]
    embeddings = pipe.encode_prompts(request)
    return pipe, embeddings, np.asarray(pipe.generate(embeddings=embeddings, **OPTIONS)[0])


def _image(pipe, embeddings) -> np.ndarray:
    return np.asarray(pipe.generate(embeddings=embeddings, **OPTIONS)[0])


def _save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def _load(tiny_qwen: Path, path: Path, fp8: str | None = None, plan: MemoryPlan = RESIDENT):
    return memory.load_denoiser(QWEN_IMAGE, tiny_qwen / "transformer", CPU, torch.float32, plan, fp8=fp8,
                                weights=read_transformer_file(path))


def _velocity(model: torch.nn.Module) -> torch.Tensor:
    """One denoiser call on fixed random inputs (3x4 image tokens, 5 text tokens)."""
    gen = torch.Generator().manual_seed(0)
    img, txt = torch.randn(1, 12, 64, generator=gen), torch.randn(1, 5, 32, generator=gen)
    rope = qwen_rope([(1, 3, 4)], 5, model.params.axes_dims_rope, model.params.rope_theta)
    with torch.inference_mode():
        return model(img, txt, torch.tensor([0.7]), rope)


def _fp8_file(path: Path, state: dict[str, torch.Tensor], style: str) -> tuple[Path, dict[str, torch.Tensor]]:
    """The model in one of ComfyUI's FP8 styles; returns the file and the fp32 values each tensor stands for.

    plain: every tensor cast to e4m3 (biases and norms too), no scales. scaled: the older "scaled fp8" (marker,
    per-tensor .scale_weight, .scale_input). quant_ops: .weight_scale and .comfy_quant records. rowwise: official
    layout, one scale per output row."""
    prefix = "" if style == "rowwise" else COMFY
    out: dict[str, torch.Tensor] = {}
    values: dict[str, torch.Tensor] = {}
    if style == "scaled":
        out[prefix + "scaled_fp8"] = torch.empty(0, dtype=E4M3)
    for key, value in state.items():
        layer = key.removesuffix(".weight")
        if style == "plain":
            q = value.to(E4M3)
            out[prefix + key], values[key] = q, q.float()
        elif key.endswith(".weight") and value.ndim == 2:  # every linear, modulation and embeddings included
            amax = value.float().abs().amax(dim=1) if style == "rowwise" else value.float().abs().amax()
            scale = amax / 448
            q = (value.float() / (scale[:, None] if style == "rowwise" else scale)).to(E4M3)
            out[prefix + key] = q
            values[key] = q.float() * (scale[:, None] if style == "rowwise" else scale)
            name = {"scaled": ".scale_weight", "quant_ops": ".weight_scale", "rowwise": ".weight_scale"}[style]
            out[prefix + layer + name] = scale
            if style == "scaled":
                out[prefix + layer + ".scale_input"] = torch.tensor(1.0)
            if style == "quant_ops":
                out[prefix + layer + ".comfy_quant"] = torch.tensor(list(b'{"format": "float8_e4m3fn"}'),
                                                                      dtype=torch.uint8)
        else:
            out[prefix + key], values[key] = value, value.float()
    return _save(path, out), values


# -- layouts ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["", COMFY, "diffusion_model."], ids=["official", "comfy", "comfy-bare"])
def test_every_layout_loads_the_folders_exact_weights(tiny_qwen, state, tmp_path, prefix, one_thread):
    path = _save(tmp_path / "t.safetensors", {prefix + k: v for k, v in state.items()})
    found = read_transformer_file(path)
    assert found.prefix == prefix and found.layout == ("diffusers" if not prefix else "ComfyUI")
    model, _ = _load(tiny_qwen, path)
    folder, _ = memory.load_denoiser(QWEN_IMAGE, tiny_qwen / "transformer", CPU, torch.float32, RESIDENT)
    got, want = model.state_dict(), folder.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_pipeline_with_a_transformer_file_records_it_and_matches_the_folder(tiny_qwen, state, baseline, tmp_path):
    folder, embeddings, want = baseline
    path = _save(tmp_path / "qwen_image_bf16.safetensors", {COMFY + k: v for k, v in state.items()})
    pipe = qimg.load(tiny_qwen, device="cpu", transformer=path, shape=NO_TEXT)
    assert pipe.ref.transformer == path.resolve() and pipe.notes == ()
    image = pipe.generate(embeddings=embeddings, **OPTIONS)[0]
    assert np.array_equal(np.asarray(image), want)
    params = image.info["qimg"]
    assert params["transformer"] == str(path.resolve())
    assert params["transformer_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    assert "transformer" not in folder.generate(embeddings=embeddings, **OPTIONS)[0].info["qimg"]


def test_an_all_in_one_checkpoint_gives_its_transformer_and_says_the_rest_is_the_folders(tiny_qwen, state, baseline,
                                                                                        tmp_path):
    """ComfyUI's checkpoints also hold the VAE and text encoders (Comfy-Org's flux1-dev-fp8, say): qimg reads only
    the transformer, from the file, and says so; the image is the folder's."""
    _, embeddings, want = baseline
    others = {"first_stage_model.decoder.conv_out.bias": torch.zeros(2),
              "text_encoders.qwen25_7b.transformer.model.norm.weight": torch.ones(4)}
    path = _save(tmp_path / "checkpoint.safetensors", {**{COMFY + k: v for k, v in state.items()}, **others})
    found = read_transformer_file(path)
    assert found.components == ("first_stage_model.", "text_encoders.") and found.foreign == ()
    pipe = qimg.load(tiny_qwen, device="cpu", transformer=path, shape=NO_TEXT)
    assert pipe.notes == ("checkpoint.safetensors is an all-in-one checkpoint: qimg reads only its transformer "
                          "(first_stage_model., text_encoders. weights come from the model folder instead)",)
    assert np.array_equal(np.asarray(pipe.generate(embeddings=embeddings, **OPTIONS)[0]), want)


def test_other_weights_change_the_image(tiny_qwen, state, baseline, tmp_path):
    _, embeddings, want = baseline
    gen = torch.Generator().manual_seed(1)
    other = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in state.items()}
    path = _save(tmp_path / "finetune.safetensors", other)
    got = _image(qimg.load(tiny_qwen, device="cpu", transformer=path, shape=NO_TEXT), embeddings)
    assert np.abs(got.astype(int) - want.astype(int)).max() > 8


# -- FP8 ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["plain", "scaled", "quant_ops", "rowwise"])
def test_fp8_file_loads_as_fp8_storage_with_the_dequantised_math(tiny_qwen, state, tmp_path, style, one_thread):
    path, values = _fp8_file(tmp_path / f"{style}.safetensors", state, style)
    stored = load_file(path)
    prefix = "" if style == "rowwise" else COMFY
    model, _ = _load(tiny_qwen, path)
    kept = [n for n, m in model.named_modules() if isinstance(m, FP8Linear)]
    # Every linear the file stores in e4m3 stays FP8 storage, the modulation ones too: upcasting them would change
    # no number and cost memory (6.8B parameters of Qwen-Image).
    assert sorted(kept) == sorted(k.removeprefix(prefix).removesuffix(".weight") for k, v in stored.items()
                                  if v.dtype == E4M3 and v.ndim == 2)
    assert "transformer_blocks.0.img_mod.1" in kept and any(mmdit_fp8_layers(n, None) for n in kept)
    for name in kept:
        m = model.get_submodule(name)
        # The stored e4m3 bytes as they are (never requantised), and the scale broadcast per row.
        assert torch.equal(m.weight_fp8.view(torch.uint8), stored[prefix + name + ".weight"].view(torch.uint8))
        assert m.weight_scale.shape == (1, m.out_features) and m.compute is False
        assert torch.equal(m.weight_fp8.float() * m.weight_scale.t(), values[name + ".weight"])
    # The reference: the same network with every weight set to the value its stored form stands for, in fp32.
    reference = _save(tmp_path / "dequantised.safetensors", values)
    plain, _ = _load(tiny_qwen, reference)
    assert torch.equal(_velocity(model), _velocity(plain))


def test_fp8_notes_and_memory_plan_count_fp8_storage(tiny_qwen, state, tmp_path, one_thread):
    path, _ = _fp8_file(tmp_path / "qwen_image_fp8_e4m3fn.safetensors", state, "plain")
    pipe = qimg.load(tiny_qwen, device="cpu", transformer=path, shape=NO_TEXT)
    assert pipe.fp8_mode == "weights" and pipe.options.fp8 is None
    assert len(pipe.notes) == 2 and "stay FP8" in pipe.notes[0] and "upcast" in pipe.notes[1]
    needs = qwen_needs(tiny_qwen, torch.float32, None, "t2i", RequestShape(), weights=pipe.transformer_file)
    size = sum(t.numel() * t.element_size() for t in module_tensors(pipe.transformer))
    assert needs.transformer.weights == size
    assert needs.transformer.blocks[0] == sum(t.numel() * t.element_size()
                                              for t in module_tensors(pipe.transformer.transformer_blocks[0]))
    folder = qwen_needs(tiny_qwen, torch.float32, None, "t2i", RequestShape())
    assert needs.transformer.weights < folder.transformer.weights


def test_fp8_compute_and_quantisation_of_bf16_layers_compose(tiny_qwen, state, tmp_path, one_thread):
    """--fp8 compute: the file's FP8 linears compute in FP8; quantisable linears it stores in bf16 get quantised."""
    path, _ = _fp8_file(tmp_path / "mixed.safetensors", state, "scaled")
    tensors = load_file(path)
    key = COMFY + "transformer_blocks.1.attn.to_q"
    tensors[key + ".weight"] = state["transformer_blocks.1.attn.to_q.weight"]
    del tensors[key + ".scale_weight"], tensors[key + ".scale_input"]
    model, _ = _load(tiny_qwen, _save(path, tensors), fp8="compute")
    fp8 = {n: m for n, m in model.named_modules() if isinstance(m, FP8Linear)}
    # FP8 matmuls only where qimg's own --fp8 compute puts them; modulation and the outer layers stay storage.
    assert all(m.compute == mmdit_fp8_layers(n, None) for n, m in fp8.items())
    assert "transformer_blocks.1.attn.to_q" in fp8 and not fp8["transformer_blocks.0.img_mod.1"].compute


def test_fp8_file_streamed_and_with_a_lora_gives_the_resident_result(tiny_qwen, state, baseline, tmp_path):
    embeddings = baseline[1]
    path, _ = _fp8_file(tmp_path / "scaled.safetensors", state, "scaled")
    pipe = qimg.load(tiny_qwen, device="cpu", transformer=path, shape=NO_TEXT)
    want = _image(pipe, embeddings)
    plan = MemoryPlan("layer", None, "cuda", False, {"transformer": (1,), "text_encoder": ()},
                      {"text": {"text_encoder", "vae"}, "denoise": {"transformer", "vae"}, "vae": {"vae"}})
    transformer, off = _load(tiny_qwen, path, plan=plan)
    assert len(off.block_copies) == 2  # the blocks are read when the denoiser first comes to the device
    residency = Residency({"transformer": off}, plan.phases)
    prompts = QwenPromptEncoder(pipe.ref, QWEN_IMAGE, CPU, torch.float32, plan=plan, residency=residency)
    streamed = dataclasses.replace(pipe, transformer=transformer, plan=plan, needs=None, residency=residency,
                                   transformer_offload=off, prompts=prompts)
    assert np.array_equal(_image(streamed, embeddings), want)
    assert isinstance(transformer.transformer_blocks[1].attn.to_q, FP8Linear)
    gen = torch.Generator().manual_seed(2)
    lora = _save(tmp_path / "lora.safetensors", {
        "transformer_blocks.1.attn.to_q.lora_A.weight": torch.randn(4, 32, generator=gen),
        "transformer_blocks.1.attn.to_q.lora_B.weight": torch.randn(32, 4, generator=gen)})
    for p in (pipe, streamed):
        p.load_lora(lora, 1.0)
        layer = p.transformer.transformer_blocks[1].attn.to_q
        assert isinstance(layer, LoRALinear) and isinstance(layer.base, FP8Linear)
    with_lora = _image(pipe, embeddings)
    assert not np.array_equal(with_lora, want)
    assert np.array_equal(_image(streamed, embeddings), with_lora)


# -- strictness -------------------------------------------------------------------------------------------------


def _one_line(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and excinfo.value.hint and "\n" not in excinfo.value.hint
    return message


@pytest.mark.parametrize("change,words", [
    ("missing", "1 missing (transformer_blocks.1.attn.to_k.weight)"),
    ("extra", f"1 unexpected ({COMFY}transformer_blocks.9.attn.to_q.weight)"),
    ("shape", "1 with the wrong shape (proj_out.bias (3,) != (64,))"),
    ("foreign", "1 unexpected (img_in.weight)"),
])
def test_key_mismatches_are_reported_as_for_the_folder(tiny_qwen, state, tmp_path, change, words):
    tensors = {COMFY + k: v for k, v in state.items()}
    if change == "missing":
        del tensors[COMFY + "transformer_blocks.1.attn.to_k.weight"]
    elif change == "extra":
        tensors[COMFY + "transformer_blocks.9.attn.to_q.weight"] = torch.zeros(2, 2)
    elif change == "shape":
        tensors[COMFY + "proj_out.bias"] = torch.zeros(3)
    else:  # a key outside the layout's prefix
        tensors["img_in.weight"] = state["img_in.weight"].clone()
    path = _save(tmp_path / "bad.safetensors", tensors)
    with pytest.raises(CheckpointError) as e:
        _load(tiny_qwen, path)
    assert words in _one_line(e) and "bad.safetensors (ComfyUI layout) does not match" in str(e.value)


def _comfy_quant(fmt: str) -> torch.Tensor:
    return torch.tensor(list(json.dumps({"format": fmt}).encode()), dtype=torch.uint8)


@pytest.mark.parametrize("kind,error,words", [
    ("flux", InputError, f"is a FLUX transformer (key {COMFY}double_blocks.0.img_attn.qkv.weight)"),
    ("lora", InputError, "is a LoRA (key transformer_blocks.0.attn.to_q.lora_A.weight)"),
    ("vae", InputError, "looks like a VAE"),
    ("pickle", CheckpointError, "is not a safetensors file"),
    ("gguf", CheckpointError, "is a GGUF file"),
    ("missing", InputError, "does not exist"),
    ("e5m2", CheckpointError, "as FP8 e5m2 (e.g. transformer_blocks.0.attn.to_q.weight)"),
    ("int8", CheckpointError, "as integer (quantised)"),
    ("nvfp4", CheckpointError, "stores layers as ComfyUI nvfp4"),
    ("bnb", CheckpointError, "is bitsandbytes-quantised"),
    ("blockwise", CheckpointError, "is not one number or one per output row"),
])
def test_files_qimg_cannot_use_are_refused_in_one_line(tiny_qwen, state, tmp_path, kind, error, words):
    path = tmp_path / "file.safetensors"
    q = "transformer_blocks.0.attn.to_q.weight"
    tensors = {COMFY + k: v for k, v in state.items()}
    if kind == "flux":
        _save(path, {COMFY + "double_blocks.0.img_attn.qkv.weight": torch.zeros(2, 2), **tensors})
    elif kind == "lora":
        _save(path, {"transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 32)})
    elif kind == "vae":
        _save(path, {"encoder.conv_in.weight": torch.zeros(2, 2), "decoder.conv_out.bias": torch.zeros(2)})
    elif kind == "pickle":
        path = tmp_path / "model.pt"
        torch.save(state, path)
    elif kind == "gguf":
        path.write_bytes(b"GGUF" + bytes(60))
    elif kind == "missing":
        path = tmp_path / "nowhere.safetensors"
    elif kind in ("e5m2", "int8"):
        tensors[COMFY + q] = state[q].to(torch.float8_e5m2) if kind == "e5m2" else state[q].to(torch.int8)
        _save(path, tensors)
    elif kind == "nvfp4":
        _save(path, {**tensors, COMFY + "transformer_blocks.0.attn.to_q.comfy_quant": _comfy_quant("nvfp4")})
    elif kind == "bnb":
        _save(path, {**tensors, COMFY + q + ".absmax": torch.zeros(4)})
    else:  # one scale per 2x2 block of a 32x32 weight
        _save(path, {**tensors, COMFY + q: state[q].to(E4M3),
                     COMFY + "transformer_blocks.0.attn.to_q.weight_scale": torch.ones(16, 16)})
    with pytest.raises(error) as e:
        qimg.with_transformer(tiny_qwen, path)
    assert words in _one_line(e)


def test_edit_2511_marker_needs_a_zero_cond_t_folder(tiny_qwen, state, tmp_path):
    path = _save(tmp_path / "qwen_image_edit_2511_bf16.safetensors",
                 {**{COMFY + k: v for k, v in state.items()}, COMFY + "__index_timestep_zero__": torch.empty(0)})
    assert read_transformer_file(path).flags == ("__index_timestep_zero__",)
    with pytest.raises(CheckpointError) as e:
        _load(tiny_qwen, path)
    assert "is a Qwen-Image-Edit-2511 transformer" in _one_line(e)


def test_with_transformer_none_keeps_the_folders_weights(tiny_qwen, state, tmp_path):
    path = _save(tmp_path / "t.safetensors", state)
    ref = qimg.with_transformer(str(tiny_qwen), path)
    assert ref.transformer == path.resolve() and qimg.with_transformer(ref, None).transformer is None
    assert qimg.inspect_transformer(path).summary().startswith("t.safetensors: diffusers layout")


def test_a_lora_on_fp8_stored_layers_runs_as_a_branch_never_merged_into_e4m3(tiny_qwen, state, tmp_path):
    """--lora-mode auto merges LoRAs into weights loaded from bf16; the layers an FP8 file stores stay as stored,
    so a LoRA on them runs as a side branch, and an explicit merge is refused in one line."""
    path, _ = _fp8_file(tmp_path / "scaled.safetensors", state, "scaled")
    gen = torch.Generator().manual_seed(5)
    lora = _save(tmp_path / "lora.safetensors", {
        "transformer_blocks.1.attn.to_q.lora_A.weight": torch.randn(4, 32, generator=gen),
        "transformer_blocks.1.attn.to_q.lora_B.weight": torch.randn(32, 4, generator=gen)})
    pipe = qimg.load(tiny_qwen, device="cpu", transformer=path, shape=NO_TEXT, loras=[(lora, 1.0)])
    layer = pipe.transformer.transformer_blocks[1].attn.to_q
    assert isinstance(layer, LoRALinear) and isinstance(layer.base, FP8Linear)
    assert [a.merged for a in pipe.adapters.attached.values()] == [False]
    with pytest.raises(qimg.QimgError, match="merging would round the LoRA into e4m3") as excinfo:
        qimg.load(tiny_qwen, device="cpu", transformer=path, shape=NO_TEXT, loras=[(lora, 1.0)], lora_mode="merge")
    assert "\n" not in str(excinfo.value.message)


def test_cli_transformer_is_recorded_replayed_and_compared(tiny_qwen, state, tmp_path, one_thread):
    from typer.testing import CliRunner

    from qimg.cli.main import app

    gen = torch.Generator().manual_seed(6)
    other = {k: v + 0.05 * torch.randn(v.shape, generator=gen) if v.ndim == 2 else v for k, v in state.items()}
    path = _save(tmp_path / "finetune.safetensors", {COMFY + k: v for k, v in other.items()})
    runner = CliRunner()
    base = ["--model", str(tiny_qwen), "--device", "cpu", "--steps", "1", "--width", "32", "--height", "32"]
    made = runner.invoke(app, ["generate", "a fox", "-o", str(tmp_path / "a.png"), *base, "--seed", "2",
                               "--transformer", str(path)])
    assert made.exit_code == 0, made.output
    params = qimg.read_params(tmp_path / "a.png")
    assert params["transformer"] == str(path.resolve()) and len(params["transformer_sha256"]) == 16
    plain = runner.invoke(app, ["generate", "a fox", "-o", str(tmp_path / "plain.png"), *base, "--seed", "2"])
    assert plain.exit_code == 0
    again = runner.invoke(app, ["generate", "--from", str(tmp_path / "a.png"), "-o", str(tmp_path / "b.png"),
                                "--device", "cpu"])
    assert again.exit_code == 0, again.output
    image = np.asarray(qimg.open_image(tmp_path / "a.png"))
    assert np.array_equal(np.asarray(qimg.open_image(tmp_path / "b.png")), image)
    assert not np.array_equal(np.asarray(qimg.open_image(tmp_path / "plain.png")), image)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a fox\n", encoding="utf-8")
    batch = ["generate", "--prompts", str(prompts), "-o", str(tmp_path / "out"), *base]
    assert runner.invoke(app, [*batch, "--transformer", str(path)]).exit_code == 0
    rerun = runner.invoke(app, batch)
    assert rerun.exit_code == 0 and "transformer differ" in rerun.stderr, rerun.output


def test_a_sharded_release_loads_from_its_folder_or_index(tiny_qwen, state, tmp_path, one_thread):
    """DiffSynth's Qwen-Image-Distill-Full ships as diffusion_pytorch_model-0000N-of-0000M shards with an index:
    --transformer takes the folder or the index, and the weights are the folder's own, bit for bit."""
    shards = tmp_path / "distill"
    shards.mkdir()
    names = sorted(state)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:]), start=1):
        file = f"diffusion_pytorch_model-0000{i}-of-00002.safetensors"
        _save(shards / file, {k: state[k] for k in part})
        weight_map.update(dict.fromkeys(part, file))
    index = shards / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}), encoding="utf-8")
    folder, _ = memory.load_denoiser(QWEN_IMAGE, tiny_qwen / "transformer", CPU, torch.float32, RESIDENT)
    for named in (shards, index):
        found = read_transformer_file(named)
        assert len(found.files) == 2 and "in 2 shards" in found.summary()
        model, _ = _load(tiny_qwen, named)
        got, want = model.state_dict(), folder.state_dict()
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert len(file_sha256(shards)) == 16 and file_sha256(shards) == file_sha256(index)
    _save(shards / "diffusion_pytorch_model-00002-of-00002.safetensors", {k: state[k] for k in names[half:-1]})
    with pytest.raises(qimg.QimgError, match="does not match the network"):
        _load(tiny_qwen, shards)  # a shard short of a tensor: strict, as for the folder
    index.unlink()
    with pytest.raises(qimg.QimgError, match=r"a folder with 2 \.safetensors files and no index") as e:
        qimg.with_transformer(tiny_qwen, shards)
    assert "\n" not in _one_line(e)
