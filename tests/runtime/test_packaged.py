"""Compiled blocks saved as AOTInductor packages (runtime/packaged.py) compute what the eager blocks compute, are
reused across prompt lengths and by a new process without the compiler, and leave to torch.compile what they
cannot bake in."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
import torch

from qimg.nets.flux import FluxTransformer, flux_ids, flux_rope
from qimg.nets.qwen_mmdit import QwenMMDiT, TextPadding, qwen_rope
from qimg.runtime import package_key, packaged
from qimg.runtime.lora import attach_lora, set_lora_strength
from qimg.runtime.package_key import Unpackageable, structure
from qimg.runtime.packaged import PackagedForward, _Variant, package_blocks
from qimg.specs import FluxParams, QwenMMDiTParams
from tests.fixtures import randomize_

REPO = Path(__file__).resolve().parents[2]
QWEN = QwenMMDiTParams(num_layers=2, head_dim=8, num_heads=4, txt_dim=32, axes_dims_rope=(2, 2, 4))
FLUX = FluxParams(num_layers=1, num_single_layers=2, attention_head_dim=8, num_attention_heads=4,
                  joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(2, 2, 4))


def _qwen_inputs(lt: int, batch: int = 1, mask: TextPadding | None = None) -> tuple:
    gen = torch.Generator().manual_seed(lt * 10 + batch)
    img, txt = torch.randn(batch, 36, 64, generator=gen), torch.randn(batch, lt, 32, generator=gen)
    return img, txt, torch.full((batch,), 0.4), qwen_rope([(1, 6, 6)], lt, QWEN.axes_dims_rope), mask


def _block_inputs(lt: int) -> tuple:
    gen = torch.Generator().manual_seed(lt)
    x, c, temb = torch.randn(1, 36, 32, generator=gen), torch.randn(1, lt, 32, generator=gen), torch.randn(1, 32)
    return x, c, temb, qwen_rope([(1, 6, 6)], lt, QWEN.axes_dims_rope), None


def _key_of(forward: PackagedForward, args: tuple) -> tuple[str, list[torch.Tensor]]:
    """The key a call makes, and its flattened tensors (after the weights)."""
    bound = forward.signature.bind(*args)
    bound.apply_defaults()
    layout, tensors = package_key.flatten(bound.arguments, torch.device("cpu"))
    block = forward.block
    weights = [t for _, t in package_key.named_tensors(block)]
    return forward._key(package_key.module_ids(block), weights, layout, tensors, torch.device("cpu")), tensors


def _falls_back_with(forward: PackagedForward, args: tuple, warning: str) -> None:
    """The call warns (once) and computes what the block's own forward computes (the fallback, patched eager)."""
    want = forward.forward(*args)
    with pytest.warns(UserWarning, match=warning):
        got = forward(*args)
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


def _packages(home: Path) -> list[Path]:
    return sorted((home / "compile" / "aoti").glob("*/*.pt2"))


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# -- what a package accepts and what it refuses to bake in (no compiling) ---------------------------------------------


def test_a_variant_accepts_only_the_shapes_it_was_traced_for(tmp_path: Path) -> None:
    static = _Variant([[1, 36, 32], [4, 0]], {}, "", tmp_path / "a.pt2")
    assert static.accepts([torch.empty(1, 36, 32), torch.empty(4, 0)])
    assert not static.accepts([torch.empty(1, 37, 32), torch.empty(4, 0)])
    assert not static.accepts([torch.empty(1, 36, 32)])  # another count of inputs
    assert not static.is_dynamic()
    # symbols bind from bare dims, expressions are checked against them, ranges hold
    dynamic = _Variant([[1, "s0", 32], [1, "s1", 32], ["s1 + s0", 4, 2]], {"s0": [2, None], "s1": [2, 100]}, "",
                       tmp_path / "b.pt2")
    assert dynamic.is_dynamic()
    assert dynamic.accepts([torch.empty(1, 36, 32), torch.empty(1, 7, 32), torch.empty(43, 4, 2)])
    assert not dynamic.accepts([torch.empty(1, 36, 32), torch.empty(1, 7, 32), torch.empty(44, 4, 2)])
    assert not dynamic.accepts([torch.empty(1, 36, 32), torch.empty(1, 101, 32), torch.empty(137, 4, 2)])
    assert not dynamic.accepts([torch.empty(1, 1, 32), torch.empty(1, 7, 32), torch.empty(8, 4, 2)])  # s0 >= 2
    unreadable = _Variant([["s0", 3], ["Unknown(s0)", 3]], {}, "", tmp_path / "c.pt2")
    assert not unreadable.accepts([torch.empty(2, 3), torch.empty(2, 3)])  # never run a package on a guess


class _Scaled(torch.nn.Module):
    """A linear times a plain tensor attribute that no `packaged_inputs` declares."""

    def __init__(self) -> None:
        super().__init__()
        self.linear, self.gain = torch.nn.Linear(32, 32), torch.tensor(2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * self.gain


def test_a_tensor_the_graph_would_bake_in_is_refused_and_the_block_runs_compiled(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    model = randomize_(QwenMMDiT(QWEN), 1).eval()
    block = model.transformer_blocks[0]
    structure(block)  # a plain block: nothing refused
    block.attn.to_q = _Scaled()  # its gain: a value the graph reads, which a package would bake in
    with pytest.raises(Unpackageable, match="tensor attribute"):
        structure(block)

    monkeypatch.setenv("QIMG_HOME", str(tmp_path))
    monkeypatch.setattr(packaged, "_build", lambda *a, **k: pytest.fail("a refused block was packaged"))
    compiled = []
    monkeypatch.setattr(PackagedForward, "_fallback", lambda self, *a, **k: compiled.append(1) or self.forward(*a))
    args = _block_inputs(7)
    with torch.inference_mode():
        want = block(*args)
        package_blocks([block])
        got = block(*args)
    assert compiled == [1] and all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


def test_a_package_traces_the_pytorch_forms_of_the_fused_call_sites(monkeypatch: pytest.MonkeyPatch,
                                                                      tmp_path: Path) -> None:
    """Whatever kernels the process runs at the fused call sites, the package is traced through their PyTorch
    forms (a package must call no op back through Python), the key does not depend on them, and they are back
    once the package is built."""
    from qimg.nets import layers
    from qimg.runtime import fp8

    monkeypatch.setenv("QIMG_HOME", str(tmp_path))
    fused_norm_rope = lambda *a: layers._norm_rope_torch(*a)  # noqa: E731 - stand-ins for the CUDA kernels
    fused_gelu = lambda *a: layers._linear_gelu_torch(*a)  # noqa: E731
    seen = []
    export = torch.export.export

    def spy(*args: object, **kwargs: object) -> object:
        seen.append((layers._norm_rope_impl, layers._linear_gelu_impl, fp8._fused))
        return export(*args, **kwargs)

    monkeypatch.setattr(torch.export, "export", spy)
    model = randomize_(QwenMMDiT(QWEN), 5).eval()
    args = _qwen_inputs(7)
    with torch.inference_mode():
        want = model(*args)
        package_blocks(model.transformer_blocks)
        key = _key_of(model.transformer_blocks[0].forward, _block_inputs(7))[0]
        previous = (layers.set_norm_rope_impl(fused_norm_rope), layers.set_linear_gelu_impl(fused_gelu), fp8._fused)
        fp8.set_fused_kernels(object())
        try:
            fused = (layers._norm_rope_impl, layers._linear_gelu_impl, fp8._fused)
            assert _key_of(model.transformer_blocks[0].forward, _block_inputs(7))[0] == key
            got = model(*args)
            assert (layers._norm_rope_impl, layers._linear_gelu_impl, fp8._fused) == fused  # back after the build
        finally:
            layers.set_norm_rope_impl(previous[0])
            layers.set_linear_gelu_impl(previous[1])
            fp8.set_fused_kernels(previous[2])
    assert seen == [(layers._norm_rope_torch, layers._linear_gelu_torch, None)]  # one build, in the PyTorch forms
    assert _diff(got, want) < 1e-5


def test_a_failed_build_is_remembered_and_later_processes_go_straight_to_torch_compile(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("QIMG_HOME", str(tmp_path))
    builds = []

    def failing(*args: object, **kwargs: object) -> None:
        builds.append(1)
        raise RuntimeError("no C++ compiler\nmore lines")

    monkeypatch.setattr(packaged, "_build", failing)
    monkeypatch.setattr(PackagedForward, "_fallback", lambda self, *a, **k: self.forward(*a))
    model = randomize_(QwenMMDiT(QWEN), 2).eval()
    args = _qwen_inputs(7)
    with torch.inference_mode():
        want = model(*args)
        package_blocks(model.transformer_blocks)
        with pytest.warns(UserWarning, match=r"could not package the compiled QwenBlock \(RuntimeError: no C\+\+ "
                                             r"compiler\); using torch.compile for it"):
            assert torch.equal(model(*args), want)
        assert builds == [1]  # the second block, same key: no second try in this process
        (failure,) = (tmp_path / "compile" / "aoti").glob("*/failed.txt")
        assert failure.read_text() == "RuntimeError: no C++ compiler\n"

        monkeypatch.setattr(packaged, "_FAILED", set())  # as a new process starts
        fresh = randomize_(QwenMMDiT(QWEN), 2).eval()
        package_blocks(fresh.transformer_blocks)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert torch.equal(fresh(*args), want)
    assert builds == [1]


def test_running_out_of_memory_while_building_is_not_remembered(monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    monkeypatch.setenv("QIMG_HOME", str(tmp_path))

    def out_of_memory(*args: object, **kwargs: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(packaged, "_build", out_of_memory)
    monkeypatch.setattr(PackagedForward, "_fallback", lambda self, *a, **k: self.forward(*a))
    block = randomize_(QwenMMDiT(QWEN), 3).eval().transformer_blocks[0]
    with torch.inference_mode():
        package_blocks([block])
        with pytest.warns(UserWarning, match="OutOfMemoryError"):
            block(*_block_inputs(7))
    assert not list(tmp_path.rglob("failed.txt"))  # a later process tries again


def test_a_saved_package_that_does_not_load_is_left_to_torch_compile(monkeypatch: pytest.MonkeyPatch,
                                                                       tmp_path: Path) -> None:
    block = randomize_(QwenMMDiT(QWEN), 3).eval().transformer_blocks[0]
    args = _block_inputs(7)
    forward = PackagedForward(block, tmp_path, {})
    key, tensors = _key_of(forward, args)
    folder = tmp_path / key
    folder.mkdir()
    (folder / "a.pt2").write_bytes(b"not a zip archive")  # a damaged file, listed by a whole JSON
    (folder / "a.json").write_text(json.dumps({"dims": [list(t.shape) for t in tensors], "ranges": {},
                                               "out_spec": ""}))
    monkeypatch.setattr(packaged, "_build", lambda *a, **k: pytest.fail("a saved package was rebuilt"))
    monkeypatch.setattr(PackagedForward, "_fallback", lambda self, *a, **k: self.forward(*a))
    with torch.inference_mode():
        _falls_back_with(forward, args, "could not package the compiled QwenBlock")
    assert (folder / "failed.txt").is_file()


def test_a_package_that_refuses_a_call_leaves_it_to_torch_compile_in_this_process_only(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    block = randomize_(QwenMMDiT(QWEN), 3).eval().transformer_blocks[0]
    args = _block_inputs(7)
    forward = PackagedForward(block, tmp_path, {})
    key, tensors = _key_of(forward, args)

    class Refusing:
        def run(self, inputs: list[torch.Tensor]) -> None:
            raise RuntimeError("AOTInductor: an input size check failed")

    variant = _Variant([list(t.shape) for t in tensors], {}, "", tmp_path / "a.pt2", runner=Refusing())
    forward.shared[key] = [variant]
    monkeypatch.setattr(PackagedForward, "_fallback", lambda self, *a, **k: self.forward(*a))
    with torch.inference_mode():
        _falls_back_with(forward, args, "an input size check failed")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            forward(*args)  # the key is left to torch.compile for the rest of the process, quietly
    assert not (tmp_path / key / "failed.txt").exists()  # a later process may still use the package


def test_the_key_names_the_attention_kernel_and_the_arguments(monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    from qimg.nets import layers

    block = randomize_(QwenMMDiT(QWEN), 3).eval().transformer_blocks[0]
    forward = PackagedForward(block, tmp_path, {})

    def key(lt: int, mask: TextPadding | None = None) -> str:
        return _key_of(forward, _qwen_inputs(lt, 1 if mask is None else 2, mask))[0]

    plain = key(7)
    assert key(9) == plain  # a prompt length is a shape, not a key
    assert key(9, TextPadding((9, 5))) == key(11, TextPadding((11, 4))) != plain  # lengths travel as shapes
    monkeypatch.setattr(layers, "_attention_impl", lambda q, k, v, mask=None: layers.sdpa(q, k, v, mask))
    assert key(7) != plain


# -- packages built and run (inductor compiles C++: tens of seconds each on 2 cores) ----------------------------------


@pytest.mark.slow
def test_qwen_packages_equal_eager_over_prompt_lengths_padding_and_edits(monkeypatch: pytest.MonkeyPatch,
                                                                        tmp_path: Path) -> None:
    monkeypatch.setenv("QIMG_HOME", str(tmp_path))
    model = randomize_(QwenMMDiT(QWEN), 4).eval()
    edit = randomize_(QwenMMDiT(QwenMMDiTParams(**{**QWEN.__dict__, "zero_cond_t": True})), 5).eval()
    cases = [(model, _qwen_inputs(7), {}), (model, _qwen_inputs(9), {}), (model, _qwen_inputs(12), {}),
             (model, _qwen_inputs(9, 2, TextPadding((9, 5))), {}),
             (model, _qwen_inputs(11, 2, TextPadding((4, 11))), {}),
             (edit, _qwen_inputs(7), {"n_target": 20})]  # 20 target tokens, 16 reference tokens after them
    with torch.inference_mode():
        want = [m(*a, **kw) for m, a, kw in cases]
        package_blocks([*model.transformer_blocks, *edit.transformer_blocks])
        built = []
        for (m, a, kw), w in zip(cases, want, strict=True):
            assert _diff(m(*a, **kw), w) < 1e-5
            built.append(len(_packages(tmp_path)))
    # 7: a static package; 9: a second shape, one dynamic package; 12: served by it; TextPadding batches: a new
    # key (static, then dynamic for the second pair of lengths); the edit model's block: a new key
    assert built == [1, 2, 2, 3, 4, 5]


@pytest.mark.slow
def test_a_runtime_lora_is_packaged_and_a_new_strength_needs_no_new_package(monkeypatch: pytest.MonkeyPatch,
                                                                          tmp_path: Path) -> None:
    monkeypatch.setenv("QIMG_HOME", str(tmp_path))
    model = randomize_(QwenMMDiT(QWEN), 8).eval()
    gen = torch.Generator().manual_seed(9)
    attach_lora(model, "style", {f"transformer_blocks.{i}.attn.to_q": (torch.randn(2, 32, generator=gen),
                                                                       torch.randn(32, 2, generator=gen), 0.5)
                                 for i in range(QWEN.num_layers)}, strength=0.8)
    eager = copy.deepcopy(model)
    args = _qwen_inputs(7)
    with torch.inference_mode():
        package_blocks(model.transformer_blocks)
        for strength in (0.8, -1.5):  # the strength travels as an input: the same package
            for m in (model, eager):
                set_lora_strength(m, "style", strength)
            assert _diff(model(*args), eager(*args)) < 1e-5
        assert len(_packages(tmp_path)) == 1
        set_lora_strength(model, "style", 0.0)  # off: the branch leaves the graph, a structure of its own
        set_lora_strength(eager, "style", 0.0)
        assert _diff(model(*args), eager(*args)) < 1e-5
    assert len(_packages(tmp_path)) == 2


@pytest.mark.slow
def test_flux_packages_equal_eager(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("QIMG_HOME", str(tmp_path))
    model = randomize_(FluxTransformer(FLUX), 6).eval()
    gen = torch.Generator().manual_seed(0)
    x, txt = torch.randn(1, 36, 64, generator=gen), torch.randn(1, 7, 32, generator=gen)
    args = (x, txt, torch.tensor([0.3]), torch.tensor([3.5]), torch.randn(1, 16, generator=gen),
            flux_rope(flux_ids(7, [(0, 6, 6)]), FLUX.axes_dims_rope))
    with torch.inference_mode():
        want = model(*args)
        assert package_blocks([*model.transformer_blocks, *model.single_transformer_blocks]) == 3
        assert _diff(model(*args), want) < 1e-5
    assert [p.parent.name.split("-")[0] for p in _packages(tmp_path)] == ["DoubleBlock", "SingleBlock"]


_NEW_PROCESS = """
import json, sys, time
import torch
from qimg.nets.qwen_mmdit import QwenMMDiT
from qimg.runtime.packaged import package_blocks
from tests.fixtures import randomize_
from tests.runtime.test_packaged import QWEN, _qwen_inputs
model = randomize_(QwenMMDiT(QWEN), 4).eval()
with torch.inference_mode():
    package_blocks(model.transformer_blocks)
    started = time.perf_counter()
    out = model(*_qwen_inputs(7))
print(json.dumps({"out": out.flatten()[:64].tolist(), "s": time.perf_counter() - started,
                  "compiler": [m for m in ("torch._dynamo", "torch._inductor") if m in sys.modules]}))
"""


@pytest.mark.slow
def test_a_new_process_runs_the_saved_package_without_the_compiler(tmp_path: Path) -> None:
    env = {**os.environ, "QIMG_HOME": str(tmp_path), "PYTHONPATH": str(REPO)}

    def run() -> dict:
        done = subprocess.run([sys.executable, "-c", _NEW_PROCESS], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    first = run()
    (package,) = _packages(tmp_path)
    assert first["compiler"]  # the first process built the package
    second = run()
    assert _packages(tmp_path) == [package]  # nothing rebuilt
    assert second["compiler"] == []  # loaded by torch's C++ loader: neither dynamo nor inductor imported
    assert second["out"] == first["out"]
    model = randomize_(QwenMMDiT(QWEN), 4).eval()
    with torch.inference_mode():
        eager = model(*_qwen_inputs(7)).flatten()[:64]
    assert _diff(torch.tensor(second["out"]), eager) < 1e-5


_GPU_PROCESS = """
import json, sys
import torch
from qimg.families.qwen import mmdit_fp8_layers
from qimg.nets.qwen_mmdit import QwenMMDiT
from qimg.runtime import kernels
from qimg.runtime.attention import use_attention
from qimg.runtime.fp8 import apply_fp8
from qimg.runtime.packaged import package_blocks
from tests.fixtures import randomize_
from tests.runtime.test_packaged import QWEN, _qwen_inputs
compute = sys.argv[1] == "compute"
model = randomize_(QwenMMDiT(QWEN), 7).eval().to("cuda", torch.bfloat16)
apply_fp8(model, mmdit_fp8_layers, compute=compute)
use_attention("auto", "cuda")
fused = kernels.use_fused_kernels("cuda")
args = [a.to("cuda") if isinstance(a, torch.Tensor) else a for a in _qwen_inputs(7)]
args[0], args[1] = args[0].bfloat16(), args[1].bfloat16()  # the latents and the prompt; t and RoPE as they are
with torch.inference_mode():
    eager = model(*args).float()
    package_blocks(model.transformer_blocks)
    out = model(*args).float()
print(json.dumps({"rel": float((out - eager).norm() / eager.norm()), "fused": fused, "out": out.flatten()[:64].tolist(),
                  "compiler": [m for m in ("torch._dynamo", "torch._inductor") if m in sys.modules]}))
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fp8", ["compute", "weights"])
def test_packages_on_the_gpu_with_the_fused_kernels_and_fp8(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                            fp8: str) -> None:
    """On CUDA the process runs the fused Triton kernels, which the package traces in their PyTorch forms, and
    FP8 linears: the package computes what the eager blocks compute, and a new process loads it without the
    compiler."""
    if fp8 == "compute" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 compute needs FP8 tensor cores")
    env = {**os.environ, "QIMG_HOME": str(tmp_path), "PYTHONPATH": str(REPO)}
    monkeypatch.setattr(packaged, "_LOADER", {})  # the probe, here (its verdict in tmp_path): the children read it
    works = packaged.loader_works(torch.device("cuda"), tmp_path / "compile" / "aoti")

    def run() -> dict:
        done = subprocess.run([sys.executable, "-c", _GPU_PROCESS, fp8], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "could not package" not in done.stderr, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    first = run()
    assert first["fused"] and first["rel"] < 2e-2  # bf16 (and e4m3) kernels fused in another order
    if not works:  # the blocks ran through torch.compile instead, checked above against eager
        (record,) = (tmp_path / "compile" / "aoti").glob("loader-*.json")
        pytest.skip(f"torch's package loader fails on this GPU: {json.loads(record.read_text())['reason']}")
    second = run()
    assert second["compiler"] == [] and second["out"] == first["out"] and len(_packages(tmp_path)) == 1


@pytest.mark.slow
def test_the_loader_probe_builds_and_runs_a_package_in_a_child_process(monkeypatch: pytest.MonkeyPatch,
                                                                         tmp_path: Path) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert packaged._probe(torch.device("cpu")) is None
    assert list(tmp_path.iterdir()) == []  # its work folder is gone


def test_a_crashing_probe_is_reported_remembered_and_not_run_again(monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    """A loader that crashes kills its process: the probe's child dies instead, the device is marked, and later
    processes read the verdict instead of probing again."""
    monkeypatch.setattr(packaged, "_PROBE", "import os; os.abort()")
    monkeypatch.setattr(packaged, "_LOADER", {})
    device = torch.device("cpu")
    with pytest.warns(UserWarning, match=r"loader fails on cpu:\w+ with torch .* \(the probe exited with -6"):
        assert not packaged.loader_works(device, tmp_path)
    (record,) = tmp_path.glob("loader-*.json")
    assert json.loads(record.read_text())["works"] is False
    monkeypatch.setattr(packaged, "_LOADER", {})  # a later process
    monkeypatch.setattr(packaged, "_probe", lambda *a: pytest.fail("probed again"))
    assert not packaged.loader_works(device, tmp_path)


def test_where_the_loader_fails_the_blocks_are_compiled_as_without_packages(monkeypatch: pytest.MonkeyPatch,
                                                                            tmp_path: Path) -> None:
    monkeypatch.setenv("QIMG_HOME", str(tmp_path))
    asked = []
    monkeypatch.setattr(packaged, "packages_work", lambda device: asked.append(device) and False)
    compiled = []
    monkeypatch.setattr(packaged, "compile_blocks", lambda blocks: compiled.extend(blocks) or len(blocks))
    model = randomize_(QwenMMDiT(QWEN), 3).eval()
    assert package_blocks(model.transformer_blocks) == 2
    assert compiled == list(model.transformer_blocks) and asked == [torch.device("cpu")]
    assert not any(isinstance(b.__dict__.get("forward"), PackagedForward) for b in model.transformer_blocks)
