"""Offload mechanics on the CPU: packed host copies, block streaming (prefetch order, wrap-around, restart after
an interrupted forward), component residency per phase. The CUDA side (streams, pinned memory) runs in
bench/offload_parity.py on the GPU."""

from __future__ import annotations

import copy
import gc
from collections.abc import Callable

import pytest
import torch
from torch import nn

from qimg.families.qwen import mmdit_fp8_layers as qwen_mmdit_fp8_layers
from qimg.nets.qwen_mmdit import QwenMMDiT, qwen_rope
from qimg.runtime.fp8 import apply_fp8
from qimg.runtime.host_copies import HOST, FileBlock, module_tensors
from qimg.runtime.offload import Offloaded, Residency, prepare_blocks
from qimg.specs import QwenMMDiTParams
from tests.fixtures import randomize_

TINY = QwenMMDiTParams(num_layers=4, head_dim=16, num_heads=2, txt_dim=32, axes_dims_rope=(4, 6, 6))
CPU = torch.device("cpu")


def _model(fp8: str | None = None) -> QwenMMDiT:
    model = randomize_(QwenMMDiT(TINY), 5).eval().requires_grad_(False)
    if fp8 is not None:
        apply_fp8(model, qwen_mmdit_fp8_layers, compute=fp8 == "compute")
    return model


def _inputs():
    gen = torch.Generator().manual_seed(1)
    x, txt = torch.randn(2, 12, 64, generator=gen), torch.randn(2, 5, 32, generator=gen)
    rope = qwen_rope([(1, 3, 4)], 5, TINY.axes_dims_rope, TINY.rope_theta)
    return x, txt, torch.tensor([0.7, 0.7]), rope


def _forward(model: QwenMMDiT) -> torch.Tensor:
    x, txt, t, rope = _inputs()
    with torch.inference_mode():
        return model(x, txt, t, rope)


@pytest.mark.parametrize("fp8", [None, "weights", "compute"])
@pytest.mark.parametrize("streamed", [[0, 1, 2, 3], [0, 1, 3], [1, 3], [2]])
def test_streamed_blocks_give_exactly_the_resident_output(fp8, streamed):
    model = _model(fp8)
    expected = _forward(model)
    off = Offloaded(model, CPU, model.transformer_blocks)
    off.stream(streamed)
    off.to_device()
    for _ in range(3):  # later forwards start from the prefetch that wrapped around from the one before
        assert torch.equal(_forward(model), expected)
    off.off_device()
    assert not off.on_device and torch.equal(_forward(model), expected)  # runs from host memory as well


@pytest.mark.parametrize("streamed", [[0, 1, 2, 3], [1, 3]])
def test_off_device_frees_every_device_buffer(streamed):
    """Nothing may keep a flat buffer or a streaming slot alive once the component leaves the device: the next
    phase's component is planned into that room."""
    import gc

    model = _model()
    off = Offloaded(model, CPU, model.transformer_blocks)
    off.stream(streamed)
    off.to_device()
    _forward(model)
    buffers = {t.untyped_storage().data_ptr() for t in (*off._flats, *off._slots)}
    assert len(buffers) == 3  # the flat buffer and two slots
    off.off_device()
    gc.collect()

    def points_into_a_buffer(o: object) -> bool:
        try:
            return isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() in buffers
        except RuntimeError:  # tensors without storage (fake tensors other tests' compiles leave behind)
            return False

    alive = [o for o in gc.get_objects() if points_into_a_buffer(o)]
    assert alive == []  # no tensor (a parameter, a cached view) still points into a device buffer


def test_prefetch_runs_ahead_by_the_slots_and_wraps_into_the_next_forward():
    model = _model()
    off = Offloaded(model, CPU, model.transformer_blocks, slots=2)
    off.log.enabled = True
    off.stream([0, 1, 2, 3])
    off.to_device()
    _forward(model)
    assert off.log.events == [
        ("copy", 0, 0), ("copy", 1, 1),  # primed when the component comes on the device
        ("run", 0, 0), ("copy", 2, 0),  # a slot is refilled as soon as its block has run
        ("run", 1, 1), ("copy", 3, 1),
        ("run", 2, 0), ("copy", 0, 0),  # wrap-around: the next forward's first blocks
        ("run", 3, 1), ("copy", 1, 1),
    ]


def test_an_odd_streamed_count_keeps_the_slot_order_across_forwards():
    model = _model()
    off = Offloaded(model, CPU, model.transformer_blocks, slots=2)
    off.log.enabled = True
    off.stream([0, 2, 3])
    off.to_device()
    for _ in range(2):
        _forward(model)
    runs = [(block, slot) for what, block, slot in off.log.events if what == "run"]
    copies = [(block, slot) for what, block, slot in off.log.events if what == "copy"]
    assert runs == [(0, 0), (2, 1), (3, 0), (0, 1), (2, 0), (3, 1)]
    assert copies[: len(runs)] == runs  # each block runs from the slot its copy went into, in copy order


def test_a_forward_interrupted_part_way_restarts_the_stream():
    model = _model()
    expected = _forward(model)
    off = Offloaded(model, CPU, model.transformer_blocks)
    off.stream([0, 1, 2, 3])
    off.to_device()

    def boom(module, args):
        raise KeyboardInterrupt

    handle = model.transformer_blocks[2].register_forward_pre_hook(boom)
    with pytest.raises(KeyboardInterrupt):
        _forward(model)
    handle.remove()
    assert torch.equal(_forward(model), expected)


def test_changing_the_streamed_set_on_the_device_keeps_the_output():
    model = _model("weights")
    expected = _forward(model)
    off = Offloaded(model, CPU, model.transformer_blocks)
    off.to_device()
    assert torch.equal(_forward(model), expected)
    off.stream([0, 3])
    assert off.on_device and torch.equal(_forward(model), expected)
    off.stream([])
    assert torch.equal(_forward(model), expected)


def test_residency_holds_only_the_components_of_each_phase():
    first, second = _model(), _model()
    comps = {"transformer": Offloaded(first, CPU), "text_encoder": Offloaded(second, CPU)}
    residency = Residency(comps, {"text": {"text_encoder", "vae"}, "denoise": {"transformer", "vae"}})
    residency.enter("text")
    assert comps["text_encoder"].on_device and not comps["transformer"].on_device
    residency.enter("denoise")
    assert comps["transformer"].on_device and not comps["text_encoder"].on_device
    residency.drop("transformer")
    assert "transformer" not in residency.components and not comps["transformer"].on_device


def test_prepare_blocks_runs_per_block_and_packs_what_is_not_kept():
    model = _model()
    seen = []

    def prepare(prefix: str, block: nn.Module) -> None:
        seen.append(prefix)
        apply_fp8(block, lambda name, lin: qwen_mmdit_fp8_layers(f"transformer_blocks.{prefix}{name}", lin),
                  compute=False)

    copies = prepare_blocks(model.transformer_blocks, CPU, prepare, keep=lambda i: i < 2)
    assert seen == ["0.", "1.", "2.", "3."] and sorted(copies) == [2, 3]
    assert all(b.attn.to_q.extra_repr().endswith("fp8=weights") for b in model.transformer_blocks)
    packed = {t.data_ptr() for t in module_tensors(model.transformer_blocks[2])}
    host = copies[2].host
    assert all(host.data_ptr() <= p < host.data_ptr() + copies[2].nbytes for p in packed)


@pytest.mark.parametrize("on_device", [False, True])
def test_repack_after_a_block_changes_streams_the_new_weights(on_device):
    """A block whose weights change after packing (a merged LoRA, a swapped module) streams its new weights
    once repacked, whether the change happened in host memory or on the device."""
    model, changed = _model(), _model()
    to_q = randomize_(nn.Linear(TINY.dim, TINY.dim), 9).requires_grad_(False)
    with torch.no_grad():
        for i in (0, 2):  # 0 stays resident (its weights sit in the device buffer while on the device)
            changed.transformer_blocks[i].img_mlp.net[2].weight.mul_(1.5)
        changed.transformer_blocks[1].attn.to_q = to_q
    expected = _forward(changed)
    off = Offloaded(model, CPU, model.transformer_blocks, slots=2)
    off.stream([1, 2])
    if on_device:
        off.to_device()
    with torch.no_grad():
        for i in (0, 2):
            model.transformer_blocks[i].img_mlp.net[2].weight.mul_(1.5)
        model.transformer_blocks[1].attn.to_q = nn.Linear(TINY.dim, TINY.dim).requires_grad_(False)
        model.transformer_blocks[1].attn.to_q.load_state_dict(to_q.state_dict())
    off.repack([0, 1, 2])
    off.to_device()
    assert off.on_device and torch.equal(_forward(model), expected)
    off.off_device()
    off.to_device()  # the new host copies are the ones every later upload reads
    assert torch.equal(_forward(model), expected)


def _on_demand(source: QwenMMDiT, fp8: str | None = None) -> tuple[QwenMMDiT, dict[int, FileBlock], list[int]]:
    """A model whose blocks are still as built (meta), each a FileBlock that reads `source`'s block as a
    checkpoint would (a fresh tensor per read) and quantises it as loading does; reads counts them per block."""
    with torch.device("meta"):
        model = QwenMMDiT(TINY).eval().requires_grad_(False)
    model.load_state_dict({k: v for k, v in source.state_dict().items() if not k.startswith("transformer_blocks.")},
                          strict=False, assign=True)
    reads = [0] * TINY.num_layers

    def loader(i: int) -> Callable[[nn.Module], None]:
        def load(module: nn.Module) -> None:
            reads[i] += 1
            state = {k: v.clone() for k, v in source.transformer_blocks[i].state_dict().items()}
            module.load_state_dict(state, strict=True, assign=True)
            if fp8 is not None:
                apply_fp8(module, lambda name, lin: qwen_mmdit_fp8_layers(f"transformer_blocks.{i}.{name}", lin),
                          compute=False)

        return load

    files = {i: FileBlock(loader(i), copy.deepcopy(b)) for i, b in enumerate(model.transformer_blocks)}
    return model, files, reads


@pytest.mark.parametrize("fp8", [None, "weights"])
def test_resident_blocks_read_on_demand_own_no_host_copy(fp8):
    """Under a plan that streams, resident blocks come from the checkpoint to the device and leave it with
    nothing kept in host memory; streamed ones get their host copy at their first visit. The output is the
    resident model's, visit after visit, and tensor identity holds across the re-reads."""
    expected = _forward(_model(fp8))
    model, files, reads = _on_demand(_model(), fp8)
    before = HOST.now
    off = Offloaded(model, CPU, model.transformer_blocks, files=files)
    off.stream([1, 3])
    assert off.block_copies == [None] * 4 and sum(reads) == 0  # nothing read before the first visit
    assert HOST.now - before == off.rest.nbytes
    off.to_device()
    assert [c is not None for c in off.block_copies] == [False, True, False, True] and reads == [1, 1, 1, 1]
    assert HOST.now - before == off.host_bytes == off.rest.nbytes + sum(off.block_copies[i].nbytes for i in (1, 3))
    tensors = module_tensors(model.transformer_blocks[0])
    assert torch.equal(_forward(model), expected)
    off.off_device()
    assert all(t.numel() == 0 for t in tensors)  # dropped: no copy anywhere
    off.to_device()
    assert reads == [2, 1, 2, 1] and module_tensors(model.transformer_blocks[0]) == tensors
    assert torch.equal(_forward(model), expected)
    off.stream([3])  # block 1 becomes resident: its copy goes, the checkpoint gives it back
    assert off.block_copies[1] is None and torch.equal(_forward(model), expected)
    assert HOST.now - before == off.rest.nbytes + off.block_copies[3].nbytes
    off.hold([0])  # about to change (a LoRA): block 0 keeps a host copy from now on, and is never read again
    off.off_device()
    off.to_device()
    assert off.block_copies[0] is not None and reads[0] == 3 and 0 not in off.files
    assert torch.equal(_forward(model), expected)
    del off
    gc.collect()
