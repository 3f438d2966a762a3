"""The memory glue on the tiny model: byte counts from the headers match what loads, offloaded and streamed
pipelines give the resident image, the text encoder is freed or kept as asked, and the CLI's memory flags."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import qimg
from qimg.cli.main import app
from qimg.families.qwen import QWEN_IMAGE, qwen_needs
from qimg.pipelines import memory
from qimg.pipelines.prompts import QwenPromptEncoder, text_encoder_layers
from qimg.runtime.host_copies import HOST, module_tensors
from qimg.runtime.offload import Offloaded, Residency
from qimg.runtime.planner import MemoryPlan, RequestShape

CPU = torch.device("cpu")
OPTIONS = dict(steps=2, seed=3, width=64, height=48, negative="blurry", cfg=4.0)
PHASES = {"text": {"text_encoder", "vae"}, "denoise": {"transformer", "vae"}, "vae": {"vae"}}


def _bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module_tensors(module))


@pytest.mark.parametrize("fp8", [None, "weights"])
def test_header_byte_counts_match_the_loaded_components(tiny_qwen: Path, fp8, one_thread):
    pipe = qimg.load(tiny_qwen, device="cpu", fp8=fp8)
    needs = qwen_needs(tiny_qwen, torch.float32, fp8, "t2i", RequestShape())
    assert needs.transformer.weights == _bytes(pipe.transformer)
    assert len(needs.transformer.blocks) == len(pipe.transformer.transformer_blocks)
    assert needs.transformer.blocks[0] == _bytes(pipe.transformer.transformer_blocks[0])
    te = pipe.prompts.model  # loaded as the pipeline keeps it: no LM head, no vision tower for text to image
    # The RoPE frequency table is a non-persistent buffer: built by the model, absent from the checkpoint.
    assert 0 <= _bytes(te) - needs.text_encoder.weights <= 4096
    assert needs.text_encoder.blocks[0] == _bytes(text_encoder_layers(te)[0])
    assert needs.vae.weights == _bytes(pipe.vae)


def test_text_encoder_fp8_covers_the_language_model_linears_only(tiny_qwen: Path, one_thread):
    te = qimg.load(tiny_qwen, device="cpu", fp8="weights").prompts.model
    swapped = [n for n, m in te.named_modules() if type(m).__name__ == "FP8Linear"]
    assert swapped and all(".layers." in n and "visual" not in n for n in swapped)
    assert type(te.lm_head).__name__ == "Identity" and te.model.visual is None


def _offloaded(tiny_qwen: Path, fp8: str | None, streamed_t: tuple, streamed_te: tuple) -> qimg.QwenImagePipeline:
    """The pipeline as a layer plan builds it on a GPU, here with the CPU standing in for the device (the
    planner never offloads on a CPU, so the plan is given)."""
    pipe = qimg.load(tiny_qwen, device="cpu", fp8=fp8)
    plan = MemoryPlan("layer", None, "cuda", False, {"transformer": streamed_t, "text_encoder": streamed_te},
                      {k: set(v) for k, v in PHASES.items()})
    transformer, off = memory.load_denoiser(QWEN_IMAGE, tiny_qwen / "transformer", CPU, torch.float32, plan, fp8=fp8)
    residency = Residency({"transformer": off}, plan.phases)
    prompts = QwenPromptEncoder(pipe.ref, QWEN_IMAGE, CPU, torch.float32, fp8=fp8, plan=plan, residency=residency)
    return dataclasses.replace(pipe, transformer=transformer, plan=plan, needs=None, residency=residency,
                               transformer_offload=off, prompts=prompts)


@pytest.mark.parametrize("fp8", [None, "weights"])
@pytest.mark.parametrize("streamed", [((), ()), ((0, 1), (0, 1)), ((1,), ())])
def test_offloaded_and_streamed_pipelines_give_the_resident_image(tiny_qwen: Path, fp8, streamed, one_thread):
    expected = np.asarray(qimg.load(tiny_qwen, device="cpu", fp8=fp8).generate("a fox", **OPTIONS)[0])
    pipe = _offloaded(tiny_qwen, fp8, *streamed)
    for _ in range(2):
        assert np.array_equal(np.asarray(pipe.generate("a fox", **OPTIONS)[0]), expected)
    te = pipe.residency.components["text_encoder"]
    assert isinstance(te, Offloaded) and te.streamed == list(streamed[1])
    assert pipe.residency.phase == "vae" and not pipe.transformer_offload.on_device  # dropped for the decode


def test_text_encoder_is_freed_after_encoding_when_not_kept(tiny_qwen: Path, one_thread):
    pipe = _offloaded(tiny_qwen, None, (0,), ())
    pipe.keep_text_encoder = False
    first = np.asarray(pipe.generate("a fox", **OPTIONS)[0])
    assert not pipe.prompts.loaded and "text_encoder" not in pipe.residency.components
    assert np.array_equal(np.asarray(pipe.generate("a fox", **OPTIONS)[0]), first)  # loads again when needed


def test_cpu_runs_plan_everything_resident(tiny_qwen: Path):
    pipe = qimg.load(tiny_qwen, device="cpu")
    assert pipe.plan.mode == "none" and pipe.residency is None and pipe.plan.budget is None


def test_memory_flags_on_a_cpu_are_one_line_errors(tiny_qwen: Path, tmp_path: Path):
    runner = CliRunner()
    base = ["generate", "a fox", "--model", str(tiny_qwen), "--device", "cpu", "--steps", "1", "--width", "64",
            "--height", "48"]
    for flags in (["--offload", "layer"], ["--vram-budget", "8"], ["--text-encoder-device", "cuda"]):
        result = runner.invoke(app, [*base, "-o", str(tmp_path / "x.png"), *flags])
        assert result.exit_code == 1, (flags, result.output)
        assert "GPU memory" in result.output or "CUDA" in result.output
        assert not (tmp_path / "x.png").exists()


def test_verbose_prints_the_memory_plan(tiny_qwen: Path, tmp_path: Path, one_thread):
    result = CliRunner().invoke(app, ["generate", "a fox", "--model", str(tiny_qwen), "--device", "cpu", "--steps",
                                      "1", "--width", "64", "--height", "48", "-o", str(tmp_path / "a.png"), "-v"])
    assert result.exit_code == 0, result.output
    # A CPU run has no GPU plan to show (no budget, no GPU peak): one line about host memory instead.
    assert "a CPU run keeps every component in host memory" in result.output
    assert "expected peak" not in result.output
    assert "runs as qwen-image, chosen by model_index.json QwenImagePipeline" in result.output


def test_out_of_memory_names_flags_that_fit(tiny_qwen: Path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index=None: (6 * 1024**3, 24 * 1024**3))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(memory, "cuda_index", lambda device: 0)
    ref = qimg.resolve_model(str(tiny_qwen))
    error = memory.out_of_memory(QWEN_IMAGE, ref, torch.device("cuda"), torch.bfloat16, None)
    assert isinstance(error, qimg.QimgError) and error.exit_code == 1
    assert "6.0 GiB free" in error.message
    assert "--offload model" in error.hint and "--fp8 weights" in error.hint and "--vram-budget 6" in error.hint


def test_a_request_too_large_for_the_plan_is_a_one_line_error(tiny_qwen: Path, one_thread):
    pipe = qimg.load(tiny_qwen, device="cpu")
    needs = qwen_needs(tiny_qwen, torch.float32, None, "t2i", RequestShape())
    pipe = dataclasses.replace(pipe, plan=MemoryPlan("layer", 64 * 1024, "cuda", False), needs=needs)
    with pytest.raises(qimg.QimgError, match=r"64x48: --offload none needs about .* GiB, more than a 0\.0 GiB budget"):
        pipe.generate("a fox", **OPTIONS)


def test_a_plan_that_streams_holds_only_the_streamed_host_copies(tiny_qwen: Path, one_thread):
    """Issue 15's host memory: the denoiser reads nothing before the prompts are encoded, the text encoder's
    resident layers and the denoiser's never take host memory, and the host copies alive at once peak under the
    old sum (every block of both, packed at load; the tiny model's vocabulary makes the encoder's rest most of
    it, where the full model's is an eighth)."""
    needs = qwen_needs(tiny_qwen, torch.float32, "weights", "t2i", RequestShape())
    before_all = needs.transformer.weights + needs.text_encoder.weights  # what loading packed before
    start = HOST.now
    pipe = _offloaded(tiny_qwen, "weights", (1,), (0,))
    pipe.keep_text_encoder = False
    off = pipe.transformer_offload
    assert off.block_copies == [None] * len(off.blocks) and HOST.now - start == off.rest.nbytes
    HOST.reset()
    pipe.generate("a fox", **OPTIONS)
    assert [i for i, c in enumerate(off.block_copies) if c is not None] == [1]
    assert HOST.now - start == off.host_bytes  # the text encoder's copies went with it
    te_layer, te_rest = needs.text_encoder.blocks[0], needs.text_encoder.rest
    # The text phase: the denoiser's rest and the encoder's rest and one streamed layer; then the denoiser's rest
    # and its one streamed block (256-byte alignment per tensor aside).
    bound = off.rest.nbytes + max(te_rest + te_layer + 64 * 1024, off.block_copies[1].nbytes)
    assert HOST.peak - start <= bound < before_all
