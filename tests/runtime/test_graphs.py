"""--cuda-graphs (qimg.runtime.graphs): which calls are captured, replayed, kept and forgotten (on the CPU, with
CUDA's graph API replaced by one that records a call and runs it again), the pipeline's wiring (the sampler calls
the graphs; a LoRA change forgets them), the option's checks, and on a GPU the replays against plain calls."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import qimg
from qimg.cli.main import app
from qimg.runtime.graphs import CudaGraphs

CUDA = torch.cuda.is_available()


class FakeGraph:
    """Stands in for torch.cuda.CUDAGraph: what the function under capture registers as its body runs again at
    every replay, on the tensors it saw at capture (as a real graph reads their memory)."""

    capturing: FakeGraph | None = None

    def __init__(self) -> None:
        self.body = None

    def replay(self) -> None:
        self.body()


@contextlib.contextmanager
def fake_capture(graph: FakeGraph) -> Iterator[None]:
    FakeGraph.capturing = graph
    try:
        yield
    finally:
        FakeGraph.capturing = None


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", fake_capture)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)


@dataclass(frozen=True)
class Padding:  # a hashable non-tensor argument, as TextPadding is
    n: int


@dataclass
class Unhashable:  # the same, but mutable: no hash
    n: int


class Model:
    """x * t + pad.n, counting the calls it really runs; under a fake capture it registers its body."""

    def __init__(self) -> None:
        self.runs = 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor, pad: Padding, *, scale: int = 1) -> torch.Tensor:
        self.runs += 1
        out = (x * t + pad.n) * scale
        graph = FakeGraph.capturing
        if graph is not None:
            graph.body = lambda: out.copy_((x * t + pad.n) * scale)
        return out


def _graphs(model: Model, keep: int = 2) -> CudaGraphs:
    graphs = CudaGraphs(model, keep=keep)
    graphs.device_type = "cpu"
    return graphs


def test_the_first_call_warms_up_the_second_captures_and_later_ones_replay(fake_cuda) -> None:
    model = Model()
    graphs = _graphs(model)
    for step in range(5):
        x, t = torch.full((2, 3), float(step)), torch.tensor([0.5 + step])
        got = graphs(x, t, Padding(1), scale=2)
        assert torch.equal(got, (x * t + 1) * 2), step
    assert model.runs == 2 and graphs.replays == 4  # warm-up and capture ran the model; four replays did not
    got = graphs(torch.ones(2, 3), torch.tensor([1.0]), Padding(1), scale=2)
    got.fill_(-1)  # a replay's result is the caller's own: the next replay does not write into it
    assert torch.equal(graphs(torch.ones(2, 3), torch.tensor([1.0]), Padding(1), scale=2), torch.full((2, 3), 4.0))
    assert torch.equal(got, torch.full((2, 3), -1.0))


def test_each_signature_has_its_own_graph_and_the_least_recent_goes_first(fake_cuda) -> None:
    model = Model()
    graphs = _graphs(model, keep=2)
    calls = [(torch.ones(1, 3), Padding(0)), (torch.ones(2, 3), Padding(0)), (torch.ones(1, 3), Padding(5))]
    for x, pad in calls:  # three signatures: the shape, then the non-tensor argument, differ
        for _ in range(3):
            assert torch.equal(graphs(x, torch.tensor([2.0]), pad), x * 2 + pad.n)
    assert model.runs == 6 and len(graphs.graphs) == 2  # the first signature's graph made room
    graphs(*calls[0][:1], torch.tensor([2.0]), calls[0][1])
    assert model.runs == 7  # warmed up again


def test_calls_it_cannot_graph_run_as_they_are(fake_cuda) -> None:
    model = Model()
    graphs = CudaGraphs(model)  # device type cuda: these CPU tensors are not graphed
    for _ in range(3):
        graphs(torch.ones(2), torch.tensor([1.0]), Padding(0))
    assert model.runs == 3 and graphs.replays == 0
    cpu = _graphs(model)
    for _ in range(3):  # an unhashable argument
        cpu(torch.ones(2), torch.tensor([1.0]), Unhashable(0))  # type: ignore[arg-type]
    assert model.runs == 6 and not cpu.graphs


def test_a_capture_that_fails_is_reported_once_and_that_call_runs_plain(fake_cuda) -> None:
    class Refuses(Model):
        def __call__(self, *args, **kwargs) -> torch.Tensor:
            if FakeGraph.capturing is not None:
                raise RuntimeError("operation not permitted when stream is capturing")
            return super().__call__(*args, **kwargs)

    model = Refuses()
    graphs = _graphs(model)
    x, t = torch.ones(2), torch.tensor([3.0])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):  # warm-up, the refused capture, then plain
            assert torch.equal(graphs(x, t, Padding(0)), x * 3)
    assert [str(w.message).startswith("--cuda-graphs: this call could not be captured") for w in caught] == [True]
    assert model.runs == 3 and graphs.replays == 0


def test_clear_forgets_the_graphs(fake_cuda) -> None:
    model = Model()
    graphs = _graphs(model)
    for _ in range(3):
        graphs(torch.ones(2), torch.tensor([1.0]), Padding(0))
    graphs.clear()
    assert not graphs.graphs and not graphs.warm
    graphs(torch.ones(2), torch.tensor([1.0]), Padding(0))
    assert model.runs == 3  # warmed up again


def test_graphs_recorded_in_another_context_are_forgotten(fake_cuda) -> None:
    model = Model()
    graphs = _graphs(model)
    graphs.within(1)
    for _ in range(3):
        graphs(torch.ones(2), torch.tensor([1.0]), Padding(0))
    assert model.runs == 2 and len(graphs.graphs) == 1
    graphs.within(1)  # the same tensors: the graph stays
    graphs(torch.ones(2), torch.tensor([1.0]), Padding(0))
    assert model.runs == 2 and graphs.replays == 3
    graphs.within(2)  # a table reallocated: what the graph reads is gone
    assert not graphs.graphs and not graphs.warm
    graphs(torch.ones(2), torch.tensor([1.0]), Padding(0))
    assert model.runs == 3


class Recorder:
    """A pipeline's denoiser_graphs stand-in: passes calls to the denoiser, counts them and the clears."""

    def __init__(self, fn) -> None:
        self.fn, self.calls, self.clears = fn, 0, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)

    def clear(self) -> None:
        self.clears += 1

    def within(self, context) -> None:  # the modulation table's version: the same for every run here
        assert context == 1


def test_the_sampler_calls_the_graphs_and_a_lora_change_forgets_them(tiny_qwen, tmp_path, one_thread) -> None:
    from safetensors.torch import save_file

    pipe = qimg.load(tiny_qwen, device="cpu", dtype="float32")
    options = dict(steps=2, seed=3, width=32, height=32, negative="blurry", cfg=4.0)
    plain = np.asarray(pipe.generate("a fox", **options)[0])
    recorder = Recorder(pipe.transformer)
    pipe.denoiser_graphs = recorder  # type: ignore[assignment]
    assert np.array_equal(np.asarray(pipe.generate("a fox", **options)[0]), plain)
    assert recorder.calls == 2  # one batch-of-two call a step
    lin = pipe.transformer.get_submodule("transformer_blocks.0.attn.to_q")
    gen = torch.Generator().manual_seed(0)
    key = "lora_unet_transformer_blocks_0_attn_to_q"
    path = tmp_path / "a.safetensors"
    save_file({f"{key}.lora_down.weight": torch.randn(2, lin.in_features, generator=gen),
               f"{key}.lora_up.weight": torch.randn(lin.out_features, 2, generator=gen),
               f"{key}.alpha": torch.tensor(2.0)}, str(path))
    pipe.apply_loras([(path, 1.0)])
    assert recorder.clears == 1
    pipe.apply_loras([(path, 1.0)])  # the same set: the graphs stay
    assert recorder.clears == 1
    pipe.set_lora_scale("a", 0.0)
    pipe.unload_lora("a")
    pipe.load_lora(path)
    pipe.apply_loras([])
    assert recorder.clears == 5


def test_cuda_graphs_on_the_cpu_is_refused_before_loading(tiny_qwen, tmp_path) -> None:
    result = CliRunner().invoke(app, ["generate", "a fox", "-o", str(tmp_path / "a.png"), "--model", str(tiny_qwen),
                                      "--device", "cpu", "--cuda-graphs"])
    assert result.exit_code == 1 and "--cuda-graphs needs a CUDA device" in result.output, result.output
    assert not (tmp_path / "a.png").exists()


def contiguous(model: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """The model called on contiguous copies of its tensor arguments, as CudaGraphs calls it."""
    def call(*args: object, **kwargs: object) -> torch.Tensor:
        return model(*(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args), **kwargs)
    return call


def tiny_gpu_mmdit(compiled: bool, prepare: Callable[[torch.nn.Module], object] | None = None) -> tuple:
    """A small random bf16 MMDiT on the GPU with the fused kernels (prepare(model) runs before any compile), a
    prompt and a shorter negative one (a padded CFG pair: TextPadding), and the generator that made them."""
    from qimg.embeddings import PromptEmbeds
    from qimg.nets.qwen_mmdit import QwenMMDiT
    from qimg.runtime.compile import compile_blocks
    from qimg.runtime.kernels import use_fused_kernels
    from qimg.specs import QwenMMDiTParams

    dev, dtype = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    with torch.device(dev):
        params = QwenMMDiTParams(num_layers=2, num_heads=4, head_dim=32, txt_dim=64, axes_dims_rope=(8, 12, 12))
        model = QwenMMDiT(params).to(dtype).eval()
    use_fused_kernels(dev)
    if prepare is not None:
        prepare(model)
    if compiled:
        compile_blocks(model.transformer_blocks)
    gen = torch.Generator(dev).manual_seed(1)
    cond = PromptEmbeds(torch.randn(1, 7, 64, device=dev, dtype=dtype, generator=gen))
    uncond = PromptEmbeds(torch.randn(1, 3, 64, device=dev, dtype=dtype, generator=gen))
    return model, cond, uncond, gen


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_replays_give_the_plain_calls_velocity_on_the_gpu(compiled: bool) -> None:
    from qimg.pipelines.qwen import qwen_velocity

    dev, dtype = torch.device("cuda"), torch.bfloat16
    model, cond, uncond, gen = tiny_gpu_mmdit(compiled)
    graphs = CudaGraphs(model)
    with torch.inference_mode():
        # The graph runs on contiguous copies of the CFG pair's expanded latent and timestep: given expanded views,
        # the input projection takes another kernel, and the bf16 rounding, amplified by CFG's scale of 4, moved
        # the velocity by a relative L2 of 0.0146 on an H200. The plain calls get contiguous inputs too, so the
        # two run the same kernels on the same values.
        plain = qwen_velocity(model, dtype, cond, uncond, 4.0, [(1, 8, 8)], forward=contiguous(model))
        replayed = qwen_velocity(model, dtype, cond, uncond, 4.0, [(1, 8, 8)], forward=graphs)
        xs = [torch.randn(1, 64, 64, device=dev, generator=gen) for _ in range(3)]
        sigmas = [torch.tensor(s, device=dev) for s in (1.0, 0.75, 0.5)]
        first = [replayed(x, s) for x, s in zip(xs, sigmas, strict=True)]  # warm-up, capture + replay, replay
        again = [replayed(x, s) for x, s in zip(xs, sigmas, strict=True)]  # replays only
        for step, (a, b, x, s) in enumerate(zip(first, again, xs, sigmas, strict=True)):
            assert torch.equal(a, b), step  # a replay computes exactly what the call it captured computes
            want = plain(x, s)
            # 1e-4: room for a library's choice of algorithm between calls, far below a wrong graph (a stale or
            # mixed-up input: order 1)
            assert ((a - want).float().norm() / want.float().norm()).item() < 1e-4, step
    assert graphs.replays == 5 and len(graphs.graphs) == 1
