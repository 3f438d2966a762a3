"""The modulation table (qimg.runtime.modulation): forwards inside `use` equal plain ones (zero_cond_t edits
included) without running a modulation linear, outside it nothing changes, a timestep outside the run is
reported, the storage is reused, and the pipeline's runs take their modulation from it."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import qimg
from qimg.families.qwen import QWEN_IMAGE
from qimg.nets.qwen_mmdit import QwenMMDiT, qwen_rope
from qimg.pipelines.common import modulated
from qimg.runtime import modulation
from qimg.runtime.modulation import ModulationTable
from qimg.sampling import model_timesteps
from qimg.specs import QwenMMDiTParams
from tests.fixtures import randomize_

TINY = QwenMMDiTParams(num_layers=3, head_dim=8, num_heads=4, txt_dim=32, axes_dims_rope=(2, 2, 4))
SITES = QWEN_IMAGE.modulation
assert SITES is not None


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _inputs(n_img: int, batch: int = 1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    img = torch.randn(batch, n_img, 64, generator=gen)
    txt = torch.randn(batch, 5, TINY.txt_dim, generator=gen)
    return img, txt, qwen_rope([(1, 4, n_img // 4)], 5, TINY.axes_dims_rope, TINY.rope_theta)


class CountCalls:
    """Counts calls of the modulation linears (what the table saves)."""

    def __init__(self, model: QwenMMDiT) -> None:
        self.calls = 0
        for block in model.transformer_blocks:
            for site in (block.img_mod, block.txt_mod):
                site[1].register_forward_hook(self._hook)

    def _hook(self, *_: object) -> None:
        self.calls += 1


@pytest.mark.parametrize("zero_cond_t", [False, True], ids=["text-to-image", "zero_cond_t"])
def test_forwards_inside_a_run_equal_plain_ones_without_the_modulation_linears(zero_cond_t: bool) -> None:
    model = randomize_(QwenMMDiT(QwenMMDiTParams(**{**TINY.__dict__, "zero_cond_t": zero_cond_t})), 2).eval()
    counter = CountCalls(model)
    sigmas = torch.linspace(1.0, 0.0, 6)
    img, txt, rope = _inputs(16, batch=2)
    n_target = 12 if zero_cond_t else None  # an edit model: 4 reference tokens after the targets
    with torch.no_grad():
        want = [model(img, txt, model_timesteps(s, torch.float32).reshape(1).expand(2), rope, n_target=n_target)
                for s in sigmas[:-1]]
        table = ModulationTable(model, SITES)
        plain = counter.calls
        with table.use(sigmas[:-1], torch.float32) as on:
            filled = counter.calls
            got = [model(img, txt, model_timesteps(s, torch.float32).reshape(1).expand(2), rope, n_target=n_target)
                   for s in sigmas[:-1]]
        assert on and counter.calls == filled  # no modulation linear ran inside the run
        assert plain == 5 * 2 * TINY.num_layers and filled - plain == 2 * 2 * TINY.num_layers  # probe + fill
        assert len(table.keys) == 5 + zero_cond_t  # t = 0 for the reference tokens
        for step, (g, w) in enumerate(zip(got, want, strict=True)):
            # the same products, summed by a matrix product of more rows: fp32 rounding only
            assert _rel(g, w) < 1e-5, step
        # Outside the run the model computes as it did, bit for bit.
        again = model(img, txt, model_timesteps(sigmas[0], torch.float32).reshape(1).expand(2), rope,
                      n_target=n_target)
    assert torch.equal(again, want[0])
    assert set(model.state_dict()) == set(randomize_(QwenMMDiT(model.params), 2).state_dict())


def test_a_timestep_outside_the_run_is_reported_when_it_ends() -> None:
    model = randomize_(QwenMMDiT(TINY), 2).eval()
    table = ModulationTable(model, SITES)
    img, txt, rope = _inputs(8)
    with torch.no_grad(), pytest.raises(RuntimeError, match="1 rows ran at a timestep outside"):  # noqa: PT012
        with table.use(torch.tensor([1.0, 0.5]), torch.float32):
            model(img, txt, torch.tensor([0.25]), rope)
    with torch.no_grad(), table.use(torch.tensor([1.0, 0.5]), torch.float32):  # the count starts again
        model(img, txt, torch.tensor([0.5]), rope)


def test_the_storage_is_kept_while_the_step_count_is_and_replaced_with_a_new_version_when_not() -> None:
    model = randomize_(QwenMMDiT(TINY), 2).eval()
    table = ModulationTable(model, SITES)
    with torch.no_grad():
        with table.use(torch.linspace(1.0, 0.2, 4), torch.float32):
            values, version = table.values, table.version
        with table.use(torch.linspace(0.9, 0.1, 4), torch.float32):
            assert table.values is values and table.version == version  # filled in place: graphs stay valid
        img, txt, rope = _inputs(8)
        with table.use(torch.linspace(0.9, 0.1, 7), torch.float32):
            got = model(img, txt, torch.tensor([0.1]), rope)
        assert table.values is not values and table.version == version + 1
        want = model(img, txt, torch.tensor([0.1]), rope)
    assert _rel(got, want) < 1e-5


def test_runs_under_inference_mode_and_outside_it_share_the_table() -> None:
    model = randomize_(QwenMMDiT(TINY), 2).eval()
    table = ModulationTable(model, SITES)
    img, txt, rope = _inputs(8)
    sigmas = torch.linspace(1.0, 0.2, 4)
    with torch.no_grad():
        want = model(img, txt, model_timesteps(sigmas[1], torch.float32).reshape(1), rope)
    for mode in (torch.inference_mode, torch.no_grad, torch.inference_mode):  # filled in place each time
        with mode(), table.use(sigmas, torch.float32):
            got = model(img, txt, model_timesteps(sigmas[1], torch.float32).reshape(1), rope)
        assert _rel(got, want) < 1e-5 and table.version == 1


def test_a_table_too_large_for_its_memory_is_not_made(monkeypatch: pytest.MonkeyPatch) -> None:
    model = randomize_(QwenMMDiT(TINY), 2).eval()
    table = ModulationTable(model, SITES)
    monkeypatch.setattr(modulation, "MAX_BYTES", table.nbytes(torch.ones(3), torch.float32) - 1)
    with torch.no_grad(), table.use(torch.linspace(1.0, 0.2, 3), torch.float32) as on:
        assert not on and table.values is None


class Graphs:
    """The pipeline's CUDA graphs, recording what they are told (runtime/graphs.CudaGraphs.within)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.contexts = model, []

    def __call__(self, *args: object, **kwargs: object) -> torch.Tensor:
        return self.model(*args, **kwargs)

    def within(self, context: object) -> None:
        self.contexts.append(context)


def test_a_pipeline_run_takes_its_modulation_from_the_table(tiny_qwen, one_thread) -> None:
    pipe = qimg.load(tiny_qwen, device="cpu", dtype="float32")
    assert pipe.modulation is not None
    counter = CountCalls(pipe.transformer)
    options = dict(steps=4, seed=3, width=32, height=32, negative="blurry", cfg=4.0)
    pipe.denoiser_graphs = Graphs(pipe.transformer)  # type: ignore[assignment]
    tabled = np.asarray(pipe.generate("a fox", **options)[0])
    n_sites = 2 * len(pipe.transformer.transformer_blocks)
    assert counter.calls == 2 * n_sites  # the probe and the fill, never a step
    assert pipe.denoiser_graphs.contexts == [1]  # the table's version: graphs over another one go
    table, pipe.modulation = pipe.modulation, None
    plain = np.asarray(pipe.generate("a fox", **options)[0])
    assert counter.calls == 2 * n_sites + 4 * n_sites  # one batch-of-two call a step
    assert np.abs(tabled.astype(int) - plain.astype(int)).max() <= 1  # fp32 rounding, then 8 bits
    pipe.modulation = table
    pipe.generate("a fox", **options)
    assert counter.calls == 7 * n_sites and pipe.denoiser_graphs.contexts == [1, 1]  # filled in place


def test_a_streamed_or_shared_denoiser_computes_its_modulation() -> None:
    used = []
    table = SimpleNamespace(use=lambda *a: used.append(a))
    base = dict(modulation=table, transformer_offload=None, placement_fixed=False, parallel=None)
    for change in ({"transformer_offload": object()}, {"placement_fixed": True}, {"parallel": object()},
                   {"modulation": None}):
        with modulated(SimpleNamespace(**{**base, **change}), torch.ones(3)):
            pass
    assert used == []


def test_compiled_blocks_trace_the_table_once_for_every_step_and_block() -> None:
    # dynamo's guards are what a table could break (a recompile per step or per block); the eager backend checks
    # them in a second instead of inductor's minutes of C++ on 2 cores
    torch._dynamo.reset()
    model = randomize_(QwenMMDiT(TINY), 2).eval()
    table = ModulationTable(model, SITES)
    for block in model.transformer_blocks:
        block.compile(backend="eager", fullgraph=True)
    sigmas = torch.linspace(1.0, 0.0, 5)
    img, txt, rope = _inputs(8)
    torch._dynamo.utils.counters.clear()
    with torch.no_grad():
        want = [model(img, txt, model_timesteps(s, torch.float32).reshape(1), rope) for s in sigmas[:-1]]
        with table.use(sigmas[:-1], torch.float32):
            got = [model(img, txt, model_timesteps(s, torch.float32).reshape(1), rope) for s in sigmas[:-1]]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2  # computed and looked up
    for g, w in zip(got, want, strict=True):
        assert _rel(g, w) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_tables_under_cuda_graphs_give_the_plain_velocity_on_the_gpu(compiled: bool) -> None:
    from qimg.pipelines.qwen import qwen_velocity
    from qimg.runtime.graphs import CudaGraphs
    from tests.runtime.test_graphs import contiguous, tiny_gpu_mmdit

    dev, dtype = torch.device("cuda"), torch.bfloat16
    tables: list[ModulationTable] = []
    model, cond, uncond, gen = tiny_gpu_mmdit(compiled, lambda m: tables.append(ModulationTable(m, SITES)))
    (table,) = tables
    graphs = CudaGraphs(model)
    sigmas = torch.tensor([1.0, 0.75, 0.5, 0.0], device=dev)
    xs = [torch.randn(1, 64, 64, device=dev, generator=gen) for _ in range(3)]
    with torch.inference_mode():
        plain = qwen_velocity(model, dtype, cond, uncond, 4.0, [(1, 8, 8)], forward=contiguous(model))
        want = [plain(x, s) for x, s in zip(xs, sigmas, strict=False)]
        replayed = qwen_velocity(model, dtype, cond, uncond, 4.0, [(1, 8, 8)], forward=graphs)
        for run in range(2):  # the second run refills the table in place: the graphs stay and replay
            with table.use(sigmas[:-1], dtype):
                graphs.within(table.version)
                got = [replayed(x, s) for x, s in zip(xs, sigmas, strict=False)]
            for step, (g, w) in enumerate(zip(got, want, strict=True)):
                # bf16 modulation from a matrix product of three rows instead of two: rounding, amplified by CFG's
                # scale of 4; 1e-2 is far below a wrong row or a stale table (order 1)
                assert _rel(g.float(), w.float()) < 1e-2, (run, step)
    assert graphs.replays == 5 and len(graphs.graphs) == 1  # run 1: warm-up, capture, replay; run 2: replays
