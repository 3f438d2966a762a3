"""LoRAs merged into the weights as the model loads (RuntimeOptions.lora_mode "auto"/"merge"), against the side
branch and the math by hand: fp32, FP8 quantised from the merged weights, streamed blocks, the CLI's choice."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import qimg
from qimg.cli.main import app
from qimg.families.qwen import QWEN_IMAGE
from qimg.pipelines import memory
from qimg.pipelines.loras import read_for_merge
from qimg.pipelines.prompts import QwenPromptEncoder
from qimg.runtime.fp8 import FP8Linear, quantize_rowwise
from qimg.runtime.lora import LoRALinear
from qimg.runtime.offload import Residency
from qimg.runtime.planner import MemoryPlan
from tests.test_lora import CPU, OPTIONS, TARGETS, _forward, _lora_tensors, _write_kohya, _write_peft


@pytest.fixture(scope="module")
def files(tiny_qwen, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    pipe = qimg.load(tiny_qwen, device="cpu", dtype="float32")
    a, b = _lora_tensors(pipe, 4, 11), _lora_tensors(pipe, 2, 12)
    return {"a": _write_kohya(folder / "a.safetensors", a, alpha=2.0), "a_tensors": a,
            "b": _write_peft(folder / "b.safetensors", b, alpha=2.0, rank=2), "b_tensors": b}


def _wrapped(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def test_a_merged_load_equals_the_branch_and_the_weights_hold_the_delta(tiny_qwen, files, one_thread):
    wanted = [(files["a"], 0.5), (files["b"], -1.0)]
    merged = qimg.load(tiny_qwen, device="cpu", dtype="float32", loras=wanted)
    branch = qimg.load(tiny_qwen, device="cpu", dtype="float32", loras=wanted, lora_mode="branch")
    plain = qimg.load(tiny_qwen, device="cpu", dtype="float32")
    assert not _wrapped(merged.transformer) and _wrapped(branch.transformer)
    assert [a.merged for a in merged.adapters.attached.values()] == [True, True]
    for name in TARGETS:  # W + 0.5 * (2/4) * up_a @ down_a - 1.0 * (2/2) * up_b @ down_b, summed in fp32
        (da, ua), (db, ub) = files["a_tensors"][name], files["b_tensors"][name]
        want = plain.transformer.get_submodule(name).weight + 0.5 * 0.5 * ua @ da - ub @ db
        torch.testing.assert_close(merged.transformer.get_submodule(name).weight, want, rtol=1e-6, atol=1e-6)
    # Same numbers in another order (x @ (W + dW) vs x @ W + x @ dW): fp32 rounding only.
    torch.testing.assert_close(_forward(merged.transformer), _forward(branch.transformer), rtol=1e-5, atol=1e-5)
    image = merged.generate("a fox", **OPTIONS)[0]
    assert [(lo["scale"], lo["merged"]) for lo in image.info["qimg"]["loras"]] == [(0.5, True), (-1.0, True)]


def test_a_merged_lora_stays_until_the_model_reloads(tiny_qwen, files, one_thread):
    pipe = qimg.load(tiny_qwen, device="cpu", dtype="float32", loras=[(files["a"], 1.0)])
    before = _forward(pipe.transformer)
    assert pipe.apply_loras([(files["a"], 1.0)]) == []  # the same set: nothing to do
    with pytest.raises(qimg.QimgError, match="merged into the weights"):
        pipe.set_lora_scale("a", 0.5)
    with pytest.raises(qimg.QimgError, match="merged into the weights"):
        pipe.apply_loras([(files["b"], 1.0)])  # refused whole: nothing changed
    with pytest.raises(qimg.QimgError, match="merged into the weights"):
        pipe.unload_lora("a")
    assert torch.equal(_forward(pipe.transformer), before) and list(pipe.adapters.attached) == ["a"]
    pipe.load_lora(files["b"], scale=0.3)  # later LoRAs are side branches on top, and come off exactly
    assert not torch.equal(_forward(pipe.transformer), before)
    pipe.unload_lora("b")
    assert torch.equal(_forward(pipe.transformer), before)


def test_fp8_weights_are_quantised_from_the_merged_bf16_weights(tiny_qwen, files, one_thread):
    """The delta goes into the weights before FP8 quantisation: the stored e4m3 values are those of W + dW, never
    dW added to e4m3 values (which rounds most of a LoRA away)."""
    merged = qimg.load(tiny_qwen, device="cpu", dtype="float32", fp8="weights", loras=[(files["a"], 1.0)])
    plain = qimg.load(tiny_qwen, device="cpu", dtype="float32", loras=[(files["a"], 1.0)])
    for name in ("transformer_blocks.0.attn.to_q", "transformer_blocks.1.img_mlp.net.2"):
        fp8 = merged.transformer.get_submodule(name)
        assert isinstance(fp8, FP8Linear)
        values, scale = quantize_rowwise(plain.transformer.get_submodule(name).weight.detach())
        assert torch.equal(fp8.weight_fp8, values) and torch.equal(fp8.weight_scale, scale.reshape(1, -1))


def test_merging_into_streamed_blocks_gives_the_resident_image(tiny_qwen, files, one_thread):
    wanted = [(files["a"], 0.8)]
    resident = qimg.load(tiny_qwen, device="cpu", loras=wanted)
    expected = np.asarray(resident.generate("a fox", **OPTIONS)[0])
    # The layer plan a GPU would get, with the CPU standing in for the device (as tests/test_lora.py does).
    plan = MemoryPlan("layer", None, "cuda", False, {"transformer": (0, 1)},
                      {"text": {"text_encoder", "vae"}, "denoise": {"transformer", "vae"}, "vae": {"vae"}})
    _, deltas = read_for_merge(wanted, "merge", QWEN_IMAGE, tiny_qwen / "transformer")
    transformer, off = memory.load_denoiser(QWEN_IMAGE, tiny_qwen / "transformer", CPU, torch.float32, plan,
                                            merge=deltas)
    residency = Residency({"transformer": off}, plan.phases)
    prompts = QwenPromptEncoder(resident.ref, QWEN_IMAGE, CPU, torch.float32, plan=plan, residency=residency)
    streamed = dataclasses.replace(resident, transformer=transformer, plan=plan, needs=None, residency=residency,
                                   transformer_offload=off, prompts=prompts)
    for _ in range(2):
        assert np.array_equal(np.asarray(streamed.generate("a fox", **OPTIONS)[0]), expected)


def test_the_cli_merges_a_fixed_set_and_branches_when_lines_change_it(tiny_qwen, files, tmp_path, one_thread):
    runner = CliRunner()
    base = ["--model", str(tiny_qwen), "--device", "cpu", "--steps", "1", "--width", "32", "--height", "32"]
    one = runner.invoke(app, ["generate", "a fox", "-o", str(tmp_path / "one.png"), *base, "--seed", "1",
                              "--lora", f"{files['a']}:0.5", "-v"])
    assert one.exit_code == 0, one.output
    assert "merged into the weights" in one.stderr
    assert qimg.read_params(tmp_path / "one.png")["loras"][0]["merged"] is True
    branch = runner.invoke(app, ["generate", "a fox", "-o", str(tmp_path / "branch.png"), *base, "--seed", "1",
                                 "--lora", f"{files['a']}:0.5", "--lora-mode", "branch", "-v"])
    assert branch.exit_code == 0 and "side branch" in branch.stderr, branch.output
    # fp32 on both paths; uint8 values within rounding distance of .5 may land one level apart.
    diff = np.abs(np.asarray(qimg.open_image(tmp_path / "one.png")).astype(int)
                  - np.asarray(qimg.open_image(tmp_path / "branch.png")).astype(int))
    assert diff.max() <= 1

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(f'{{"prompt": "a fox", "lora": ["{files["a"]}"]}}\n{{"prompt": "an owl", "lora": []}}\n',
                       encoding="utf-8")
    refused = runner.invoke(app, ["generate", "--prompts", str(prompts), "-o", str(tmp_path / "out"), *base,
                                  "--lora-mode", "merge"])
    assert refused.exit_code == 2 and "needs the same LoRAs on every line" in refused.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*.png"))
    mixed = runner.invoke(app, ["generate", "--prompts", str(prompts), "-o", str(tmp_path / "out"), *base, "-v"])
    assert mixed.exit_code == 0, mixed.output
    assert qimg.read_params(tmp_path / "out" / "0000-a-fox.png")["loras"][0]["merged"] is False
    same = tmp_path / "same.txt"
    same.write_text("a fox\nan owl\n", encoding="utf-8")
    fixed = runner.invoke(app, ["generate", "--prompts", str(same), "-o", str(tmp_path / "fixed"), *base,
                                "--lora", str(files["b"])])
    assert fixed.exit_code == 0, fixed.output
    assert all(qimg.read_params(p)["loras"][0]["merged"] for p in (tmp_path / "fixed").glob("*.png"))


@pytest.mark.parity
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["auto", "branch"])
def test_whole_image_with_a_kohya_lora_matches_diffusers(tiny_qwen_pipe_and_dir, files, mode, one_thread):
    """The generate image with a kohya LoRA (alpha applied) equals diffusers' pipeline after load_lora_weights on
    the same file (its kohya conversion bakes the alpha in), merged as qimg's default does and as a side branch."""
    ref, folder = tiny_qwen_pipe_and_dir
    ours = qimg.load(folder, device="cpu", dtype="float32", loras=[(files["a"], 0.7)], lora_mode=mode)
    assert [a.merged for a in ours.adapters.attached.values()] == [mode == "auto"]
    call = dict(prompt="a lighthouse at dusk", negative_prompt="blurry", true_cfg_scale=4.0, num_inference_steps=2,
                width=64, height=48)
    ref.load_lora_weights(str(files["a"]), adapter_name="kohya")
    ref.set_adapters(["kohya"], [0.7])
    try:
        with torch.no_grad():
            want = ref(**call, generator=torch.Generator("cpu").manual_seed(5), output_type="np").images[0]
    finally:
        ref.delete_adapters("kohya")
    image = np.asarray(ours.generate("a lighthouse at dusk", negative="blurry", cfg=4.0, steps=2, width=64,
                                     height=48, seed=5)[0]).astype(np.int16)
    # fp32 on both sides; the merged weights round (W + dW) once where the branch rounds x @ dW: uint8 values
    # within rounding distance of .5 may land one level apart.
    assert np.abs(image - np.round(want * 255).astype(np.int16)).max() <= 1
    plain = np.asarray(qimg.load(folder, device="cpu", dtype="float32").generate(
        "a lighthouse at dusk", negative="blurry", cfg=4.0, steps=2, width=64, height=48, seed=5)[0])
    assert np.abs(plain.astype(np.int16) - image).max() > 8  # the LoRA visibly changes the image


def test_runs_from_saved_prompt_embeddings_take_loras_too(tiny_qwen, files, tmp_path, one_thread):
    runner = CliRunner()
    embeds = tmp_path / "fox.safetensors"
    made = runner.invoke(app, ["encode-prompt", "a fox", "-o", str(embeds), "--model", str(tiny_qwen), "--device",
                               "cpu"])
    assert made.exit_code == 0, made.output
    base = ["generate", "--prompt-embeds", str(embeds), "--model", str(tiny_qwen), "--device", "cpu", "--steps", "1",
            "--width", "32", "--height", "32", "--seed", "4"]
    plain = runner.invoke(app, [*base, "-o", str(tmp_path / "plain.png")])
    styled = runner.invoke(app, [*base, "-o", str(tmp_path / "styled.png"), "--lora", f"{files['b']}:0.9"])
    assert plain.exit_code == 0 and styled.exit_code == 0, styled.output
    record = qimg.read_params(tmp_path / "styled.png")["loras"][0]
    assert (record["scale"], record["ranks"], record["alphas"], record["unmatched"]) == (0.9, [2], [2.0], 0)
    assert not np.array_equal(np.asarray(qimg.open_image(tmp_path / "plain.png")),
                              np.asarray(qimg.open_image(tmp_path / "styled.png")))
