"""LoRA at inference on the tiny Qwen-Image: parity with diffusers' load_lora_weights (PEFT dialect, alpha from
the header), hand math for stacked adapters, exact scale 0 and unload, composition with FP8 weights and with
offloaded / streamed blocks, and the CLI's --lora."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

import qimg
from qimg.cli.main import app
from qimg.families.qwen import QWEN_IMAGE
from qimg.nets.qwen_mmdit import qwen_rope
from qimg.pipelines import memory
from qimg.pipelines.prompts import QwenPromptEncoder
from qimg.runtime.offload import Residency
from qimg.runtime.planner import MemoryPlan

CPU = torch.device("cpu")
TARGETS = ("transformer_blocks.0.attn.to_q", "transformer_blocks.1.img_mlp.net.2",
           "transformer_blocks.1.attn.to_add_out")
OPTIONS = dict(steps=2, seed=3, width=32, height=32, negative="blurry", cfg=4.0)


def _lora_tensors(pipe, rank: int, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in TARGETS:
        lin = pipe.transformer.get_submodule(name)
        # Large enough that the LoRA visibly changes the image of a random tiny model.
        out[name] = (torch.randn(rank, lin.in_features, generator=gen) * 0.3,
                     torch.randn(lin.out_features, rank, generator=gen) * 0.3)
    return out


def _write_peft(path: Path, tensors, alpha: float, rank: int) -> Path:
    """The diffusers/PEFT dialect as diffusers writes it: transformer. prefix, lora_A/B, alpha in the header."""
    from diffusers import QwenImagePipeline

    layers = {}
    for name, (down, up) in tensors.items():
        layers[f"{name}.lora_A.weight"], layers[f"{name}.lora_B.weight"] = down, up
    meta = {"r": rank, "lora_alpha": alpha, "target_modules": sorted({n.rsplit(".", 1)[-1] for n in tensors})}
    QwenImagePipeline.save_lora_weights(path.parent, transformer_lora_layers=layers, weight_name=path.name,
                                        transformer_lora_adapter_metadata=meta)
    return path


def _write_kohya(path: Path, tensors, alpha: float) -> Path:
    state = {}
    for name, (down, up) in tensors.items():
        key = "lora_unet_" + name.replace(".", "_")
        state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"] = down, up
        state[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(state, str(path))
    return path


@pytest.fixture(scope="module")
def pipe(tiny_qwen):
    return qimg.load(tiny_qwen, device="cpu", dtype="float32")


def _forward(model) -> torch.Tensor:
    p = model.params
    gen = torch.Generator().manual_seed(1)
    x, txt = torch.randn(1, 12, p.in_channels, generator=gen), torch.randn(1, 5, p.txt_dim, generator=gen)
    rope = qwen_rope([(1, 3, 4)], 5, p.axes_dims_rope, p.rope_theta)
    with torch.inference_mode():
        return model(x, txt, torch.tensor([0.6]), rope)


@pytest.mark.parity
def test_peft_file_matches_diffusers_load_lora_weights(pipe, tiny_qwen_pipe_and_dir, tmp_path, one_thread):
    ref, _ = tiny_qwen_pipe_and_dir
    tensors = _lora_tensors(pipe, rank=4, seed=0)
    path = _write_peft(tmp_path / "peft.safetensors", tensors, alpha=8.0, rank=4)
    base = _forward(pipe.transformer)
    lora = pipe.load_lora(path, scale=0.7)
    try:
        assert lora.dialect == "diffusers" and set(lora.modules) == set(TARGETS)
        assert all(m.alpha == 8.0 and m.rank == 4 for m in lora.modules.values())
        ours = _forward(pipe.transformer)
        ref.load_lora_weights(str(path), adapter_name="parity")
        ref.set_adapters(["parity"], [0.7])
        try:
            want = _forward_diffusers(ref.transformer, pipe.transformer.params)
        finally:
            ref.delete_adapters("parity")
    finally:
        pipe.unload_lora(lora.path.stem)
    assert not torch.allclose(ours, base, atol=1e-3)  # the LoRA does something
    # Same weights and the same branch arithmetic in fp32: summation-order rounding only.
    assert torch.allclose(ours, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(_forward(pipe.transformer), base)  # unloading restores the base exactly


def _forward_diffusers(transformer, p) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    x, txt = torch.randn(1, 12, p.in_channels, generator=gen), torch.randn(1, 5, p.txt_dim, generator=gen)
    with torch.no_grad():
        return transformer(hidden_states=x, encoder_hidden_states=txt, encoder_hidden_states_mask=torch.ones(1, 5),
                           timestep=torch.tensor([0.6]), img_shapes=[[(1, 3, 4)]], return_dict=False)[0]


def test_stacked_loras_add_their_deltas_and_scale_zero_is_exact(pipe, tmp_path, one_thread):
    a, b = _lora_tensors(pipe, 4, 1), _lora_tensors(pipe, 2, 2)
    pa = _write_kohya(tmp_path / "a.safetensors", a, alpha=2.0)
    pb = _write_peft(tmp_path / "b.safetensors", b, alpha=2.0, rank=2)
    base_image = np.asarray(pipe.generate("a fox", **OPTIONS)[0])
    base = _forward(pipe.transformer)
    weights = {n: pipe.transformer.get_submodule(n).weight.detach().clone() for n in TARGETS}
    pipe.load_lora(pa, scale=0.5)
    pipe.load_lora(pb, scale=-1.0)
    try:
        got = _forward(pipe.transformer)
        for name in TARGETS:  # the same net with the deltas merged by hand: dW = s * alpha/r * up @ down
            delta = 0.5 * (2.0 / 4) * a[name][1] @ a[name][0] - 1.0 * (2.0 / 2) * b[name][1] @ b[name][0]
            pipe.transformer.get_submodule(name).base.weight.data += delta
        pipe.set_lora_scale("a", 0.0)
        pipe.set_lora_scale("b", 0.0)
        merged = _forward(pipe.transformer)
        for name in TARGETS:
            pipe.transformer.get_submodule(name).base.weight.data.copy_(weights[name])
        assert torch.allclose(got, merged, rtol=1e-4, atol=1e-5)
        assert torch.equal(_forward(pipe.transformer), base)  # both at scale 0: exactly the base
        pipe.set_lora_scale("a", 0.5)
        image = pipe.generate("a fox", **OPTIONS)[0]
        assert [lo["name"] for lo in image.info["qimg"]["loras"]] == ["a", "b"]
        assert not np.array_equal(np.asarray(image), base_image)
    finally:
        pipe.unload_lora("a")
        pipe.unload_lora("b")
    assert np.array_equal(np.asarray(pipe.generate("a fox", **OPTIONS)[0]), base_image)
    assert all(type(pipe.transformer.get_submodule(n)).__name__ == "Linear" for n in TARGETS)


def test_a_lora_composes_with_fp8_weights(tiny_qwen, tmp_path, one_thread):
    fp8 = qimg.load(tiny_qwen, device="cpu", fp8="weights")
    path = _write_kohya(tmp_path / "k.safetensors", _lora_tensors(fp8, 4, 3), alpha=4.0)
    base = _forward(fp8.transformer)
    plain = qimg.load(tiny_qwen, device="cpu")
    plain_base = _forward(plain.transformer)
    fp8.load_lora(path)
    plain.load_lora(path)
    with_lora, plain_lora = _forward(fp8.transformer), _forward(plain.transformer)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())

    # The branch runs in the compute dtype beside the FP8 base (never folded into FP8 weights), so FP8 adds no more
    # error with the LoRA than without it: the relative gap to the unquantised model stays the FP8 rounding's.
    assert rel(with_lora, plain_lora) <= 2 * rel(base, plain_base) + 1e-3
    assert rel(with_lora, base) > 10 * rel(base, plain_base)  # and the LoRA's effect is far above that rounding


def test_a_lora_on_streamed_blocks_gives_the_resident_image(tiny_qwen, tmp_path, one_thread):
    resident = qimg.load(tiny_qwen, device="cpu")
    path = _write_kohya(tmp_path / "k.safetensors", _lora_tensors(resident, 4, 4), alpha=4.0)
    resident.load_lora(path, scale=0.8)
    expected = np.asarray(resident.generate("a fox", **OPTIONS)[0])
    # The layer plan a GPU would get, with the CPU standing in for the device (as tests/test_memory.py does).
    plan = MemoryPlan("layer", None, "cuda", False, {"transformer": (0, 1)},
                      {"text": {"text_encoder", "vae"}, "denoise": {"transformer", "vae"}, "vae": {"vae"}})
    transformer, off = memory.load_denoiser(QWEN_IMAGE, tiny_qwen / "transformer", CPU, torch.float32, plan)
    residency = Residency({"transformer": off}, plan.phases)
    prompts = QwenPromptEncoder(resident.ref, QWEN_IMAGE, CPU, torch.float32, plan=plan, residency=residency)
    streamed = dataclasses.replace(resident, transformer=transformer, plan=plan, needs=None, residency=residency,
                                   transformer_offload=off, prompts=prompts, adapters=None)
    streamed.load_lora(path, scale=0.8)
    for _ in range(2):
        assert np.array_equal(np.asarray(streamed.generate("a fox", **OPTIONS)[0]), expected)


def test_cli_lora_end_to_end(tiny_qwen, tmp_path, one_thread):
    pipe = qimg.load(tiny_qwen, device="cpu")
    path = _write_kohya(tmp_path / "style.safetensors", _lora_tensors(pipe, 4, 5), alpha=4.0)
    base = ["generate", "a fox", "--model", str(tiny_qwen), "--device", "cpu", "--steps", "1", "--width", "32",
            "--height", "32", "--seed", "1"]
    runner = CliRunner()
    plain = runner.invoke(app, [*base, "-o", str(tmp_path / "plain.png")])
    styled = runner.invoke(app, [*base, "-o", str(tmp_path / "styled.png"), "--lora", f"{path}:0.5", "-v"])
    assert plain.exit_code == 0 and styled.exit_code == 0, styled.output
    assert "lora: " in styled.stderr and "kohya" in styled.stderr
    params = qimg.read_params(tmp_path / "styled.png")
    assert params["loras"][0]["scale"] == 0.5 and params["loras"][0]["path"] == str(path.resolve())
    assert qimg.replay(tmp_path / "styled.png")["loras"] == [(str(path.resolve()), 0.5)]
    from PIL import Image

    assert not np.array_equal(np.asarray(Image.open(tmp_path / "plain.png")),
                              np.asarray(Image.open(tmp_path / "styled.png")))
    save_file({"lora_unet_nothing_here.lora_down.weight": torch.zeros(2, 2),
               "lora_unet_nothing_here.lora_up.weight": torch.zeros(2, 2)}, str(tmp_path / "none.safetensors"))
    bad = runner.invoke(app, [*base, "-o", str(tmp_path / "bad.png"), "--lora", str(tmp_path / "none.safetensors")])
    assert bad.exit_code == 1 and bad.stderr.splitlines()[-2].startswith("error: ") and "matches" in bad.stderr
    assert not (tmp_path / "bad.png").exists()
    missing = runner.invoke(app, [*base, "-o", str(tmp_path / "m.png"), "--lora", str(tmp_path / "nope.safetensors")])
    assert missing.exit_code == 1 and "does not exist" in missing.stderr


def test_prompt_file_lines_choose_their_own_loras(tiny_qwen, tmp_path, one_thread):
    pipe = qimg.load(tiny_qwen, device="cpu")
    style = _write_kohya(tmp_path / "style.safetensors", _lora_tensors(pipe, 4, 6), alpha=4.0)
    (tmp_path / "p.jsonl").write_text(
        '{"prompt": "a fox", "name": "plain", "lora": []}\n'
        f'{{"prompt": "a fox", "name": "half", "lora": ["{style}:0.5"]}}\n'
        f'{{"prompt": "a fox", "name": "full", "lora": [{{"path": "{style}", "scale": 1.0}}]}}\n'
        '{"prompt": "a fox", "name": "default"}\n')
    base = ["generate", "--prompts", str(tmp_path / "p.jsonl"), "--model", str(tiny_qwen), "--device", "cpu",
            "--steps", "1", "--width", "32", "--height", "32", "--seed", "1", "-o", str(tmp_path / "out")]
    runner = CliRunner()
    result = runner.invoke(app, [*base, "--lora", f"{style}:-1"])
    assert result.exit_code == 0, result.output
    scales = {n: [lo["scale"] for lo in qimg.read_params(tmp_path / "out" / f"{n}.png").get("loras", [])]
              for n in ("plain", "half", "full", "default")}
    assert scales == {"plain": [], "half": [0.5], "full": [1.0], "default": [-1.0]}
    pixels = {n: np.asarray(Image.open(tmp_path / "out" / f"{n}.png")) for n in scales}
    assert len({p.tobytes() for p in pixels.values()}) == 4  # each scale its own image
    # Unchanged LoRAs skip on a rerun; a changed --lora regenerates only the lines that use it.
    again = runner.invoke(app, [*base, "--lora", f"{style}:-0.5"])
    assert again.exit_code == 0 and "1 to generate, 3 already done" in again.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "lora": [{"path": 3}]}\n')
    refused = runner.invoke(app, [*base[:2], str(bad), *base[3:]])
    assert refused.exit_code == 2 and "bad.jsonl:1: each lora is" in refused.stderr


def test_a_lora_by_hub_name_runs_from_the_cache_and_records_its_snapshot_path(tiny_qwen, tmp_path, one_thread):
    """--lora OWNER/REPO/FILE finds the file in the Hugging Face cache layout (a snapshot link to a blob); the PNG
    records the readable snapshot path, so a batch rerun finds the LoRA unchanged."""
    import os

    pipe = qimg.load(tiny_qwen, device="cpu")
    repo = Path(os.environ["HF_HUB_CACHE"]) / "models--someone--styles"
    (repo / "blobs").mkdir(parents=True)
    blob = _write_kohya(repo / "blobs" / "0123abcd", _lora_tensors(pipe, 4, 9), alpha=4.0)
    snapshot = repo / "snapshots" / "c0ffee"
    snapshot.mkdir(parents=True)
    (snapshot / "ink.safetensors").symlink_to(blob)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("c0ffee", encoding="utf-8")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a fox\n", encoding="utf-8")
    args = ["generate", "--prompts", str(prompts), "-o", str(tmp_path / "out"), "--model", str(tiny_qwen), "--device",
            "cpu", "--steps", "1", "--width", "32", "--height", "32", "--lora", "someone/styles/ink.safetensors:0.5"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    stored = qimg.read_params(tmp_path / "out" / "0000-a-fox.png")["loras"][0]
    assert stored["path"] == str(snapshot.resolve() / "ink.safetensors") and stored["scale"] == 0.5
    again = CliRunner().invoke(app, [*args, "--json"])
    assert '"reason": "unchanged"' in again.stdout, again.output
