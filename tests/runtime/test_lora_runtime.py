"""LoRA as an unmerged side branch (qimg.runtime.lora): the hand math, stacking, strengths, exact removal, and the
composition with FP8 linears, block streaming (repack) and torch.compile, all on tiny CPU models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qimg.nets.qwen_mmdit import qwen_rope
from qimg.runtime.fp8 import FP8Linear, apply_fp8
from qimg.runtime.lora import (
    Kronecker,
    LoRALinear,
    attach_lora,
    blocks_of,
    detach_lora,
    lora_names,
    set_lora_strength,
)
from qimg.runtime.offload import Offloaded
from tests.fixtures import randomize_
from tests.runtime.test_offload import TINY, _inputs, _model

CPU = torch.device("cpu")
D = TINY.num_heads * TINY.head_dim


def _forward(model: nn.Module) -> torch.Tensor:
    x, txt, t, rope = _inputs()
    with torch.inference_mode():
        return model(x, txt, t, rope)


def _pair(rank: int, n_in: int, n_out: int, seed: int, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rank, n_in, generator=gen).to(dtype), torch.randn(n_out, rank, generator=gen).to(dtype)


def _linear(n_in: int = 8, n_out: int = 6, seed: int = 0) -> nn.Sequential:
    return nn.Sequential(randomize_(nn.Linear(n_in, n_out), seed).requires_grad_(False))


def _x(n_in: int = 8, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(3, 4, n_in, generator=torch.Generator().manual_seed(7)).to(dtype)


def _block_of(name: str) -> int | None:
    return int(name.split(".")[1]) if name.startswith("transformer_blocks.") else None


def test_the_branch_equals_the_merged_weight_by_hand():
    model = _linear()
    lin = model[0]
    down, up = _pair(3, 8, 6, seed=1)
    changed = attach_lora(model, "style", {"0": (down, up, 0.5)}, strength=0.8)
    assert changed == ["0"] and isinstance(model[0], LoRALinear) and model[0].base is lin
    assert model[0].names == ["style"] and lora_names(model) == ["style"]
    # Buffers, not parameters; copies in the base's dtype, not the caller's tensors.
    assert [n for n, _ in model.named_parameters()] == ["0.base.weight", "0.base.bias"]
    stored = dict(model[0].named_buffers())
    assert set(stored) == {"adapters.0.down", "adapters.0.up"}
    assert all(not t.requires_grad and t.dtype == torch.float32 for t in stored.values())
    assert stored["adapters.0.down"] is not down and torch.equal(stored["adapters.0.down"], down)
    merged = lin.weight + 0.8 * 0.5 * up @ down
    x = _x()
    with torch.inference_mode():
        torch.testing.assert_close(model(x), F.linear(x, merged, lin.bias), rtol=1e-5, atol=1e-5)


def test_two_adapters_stack_each_with_its_strength():
    model = _linear()
    lin = model[0]
    (d1, u1), (d2, u2) = _pair(2, 8, 6, seed=1), _pair(4, 8, 6, seed=2)
    attach_lora(model, "a", {"0": (d1, u1, 0.5)}, strength=1.5)
    attach_lora(model, "b", {"0": (d2, u2, 0.25)}, strength=-0.7)
    assert model[0].names == ["a", "b"] and model[0].base is lin
    merged = lin.weight + 1.5 * 0.5 * u1 @ d1 - 0.7 * 0.25 * u2 @ d2
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(model(x), F.linear(x, merged, lin.bias), rtol=1e-5, atol=1e-5)
        # Attach order is the summation order: exactly base + branch a + branch b.
        branch = [F.linear(F.linear(x, d), u) * f for d, u, f in ((d1, u1, 1.5 * 0.5), (d2, u2, -0.7 * 0.25))]
        assert torch.equal(model(x), lin(x) + branch[0] + branch[1])


def test_strength_zero_is_the_base_output_bit_for_bit():
    model = _linear()
    lin = model[0]
    x = _x()
    base = lin(x)
    down, up = _pair(2, 8, 6, seed=1)
    up[0, 0] = float("inf")  # 0 * inf would leak a NaN if the branch ran
    attach_lora(model, "broken", {"0": (down, up, 1.0)}, strength=0.0)
    assert torch.equal(model(x), base)
    attach_lora(model, "fine", {"0": _pair(2, 8, 6, seed=2) + (1.0,)})
    assert not torch.equal(model(x), base)
    set_lora_strength(model, "fine", 0.0)
    assert torch.equal(model(x), base)


def _kron(seed: int, shapes=((3, 2), (2, 4))) -> Kronecker:
    gen = torch.Generator().manual_seed(seed)
    return Kronecker(*(torch.randn(*s, generator=gen) for s in shapes), 0.5)


def test_a_kronecker_branch_equals_the_dense_kron_merged_by_hand():
    """LoKr: kron(W1, W2) @ x through W1 @ X @ W2^T, never the (a*c, b*d) matrix; stacked with a low-rank pair."""
    model = _linear()  # 8 -> 6: W1 (3, 2) and W2 (2, 4)
    lin = model[0]
    kron, (down, up) = _kron(1), _pair(2, 8, 6, seed=2)
    attach_lora(model, "k", {"0": kron}, strength=0.8)
    attach_lora(model, "l", {"0": (down, up, 0.25)})
    assert set(dict(model[0].named_buffers())) == {"adapters.0.w1", "adapters.0.w2", "adapters.1.down",
                                                   "adapters.1.up"}
    delta = model[0].adapters[0].dense_delta()
    assert delta.dtype == torch.float32 and torch.equal(delta, torch.kron(kron.w1, kron.w2) * 0.5)
    merged = lin.weight + 0.8 * delta + 0.25 * up @ down
    x = _x()
    with torch.inference_mode():
        torch.testing.assert_close(model(x), F.linear(x, merged, lin.bias), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(x) - lin(x), F.linear(x, 0.8 * delta + model[0].adapters[1].dense_delta()),
                                   rtol=1e-5, atol=1e-5)


def test_a_kronecker_adapter_at_strength_zero_is_the_base_and_detaches():
    model = _linear()
    lin = model[0]
    x = _x()
    base = lin(x)
    broken = _kron(3)
    broken.w2[0, 0] = float("inf")  # 0 * inf would leak a NaN if the branch ran
    attach_lora(model, "broken", {"0": broken}, strength=0.0)
    attach_lora(model, "fine", {"0": _kron(4)})
    assert not torch.equal(model(x), base)
    set_lora_strength(model, "fine", 0.0)
    assert torch.equal(model(x), base)
    detach_lora(model, "broken")
    detach_lora(model, "fine")
    assert model[0] is lin and torch.equal(model(x), base)


def test_kronecker_shapes_that_do_not_fit_are_refused_before_any_change():
    model = _linear()
    lin = model[0]
    w1, w2 = _kron(5)[:2]
    for bad, what in ((Kronecker(w1, w2[:, :2], 1.0), r"is \(6, 4\), needs \(6, 8\)"),
                      (Kronecker(w1[None], w2, 1.0), "2-D"),
                      (Kronecker(w1[:, :0], w2, 1.0), "non-empty"),
                      (Kronecker(w1, w2, float("nan")), "finite")):
        with pytest.raises(ValueError, match=what):
            attach_lora(model, "k", {"0": bad})
        assert model[0] is lin and lora_names(model) == []


def test_set_lora_strength_rescales_the_branch():
    model = _model()
    base = _forward(model)
    targets = {"transformer_blocks.0.attn.to_q": _pair(2, D, D, 1) + (0.5,),
               "transformer_blocks.2.img_mlp.net.2": _pair(2, 4 * D, D, 2) + (0.5,)}
    attach_lora(model, "a", targets)
    layer = model.get_submodule("transformer_blocks.0.attn.to_q")
    x = _x(D)
    with torch.inference_mode():
        one = layer(x) - layer.base(x)
        assert set_lora_strength(model, "a", 2.0) == 2
        torch.testing.assert_close(layer(x) - layer.base(x), 2 * one, rtol=1e-5, atol=1e-6)
    assert not torch.equal(_forward(model), base)
    assert set_lora_strength(model, "a", 0.0) == 2 and torch.equal(_forward(model), base)
    with pytest.raises(ValueError, match="no LoRA named 'b'"):
        set_lora_strength(model, "b", 1.0)


def test_detach_puts_back_the_original_module_objects_and_outputs():
    model = _model()
    base_out, keys = _forward(model), list(model.state_dict())
    names = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_out.0", "transformer_blocks.3.img_mod.1",
             "proj_out"]
    originals = {n: model.get_submodule(n) for n in names}
    dims = {n: (m.in_features, m.out_features) for n, m in originals.items()}
    a = {n: _pair(2, *dims[n], seed=i) + (0.5,) for i, n in enumerate(names)}
    b = {n: _pair(3, *dims[n], seed=10 + i) + (0.3,) for i, n in enumerate(names[1:])}
    assert attach_lora(model, "late", b) == names[1:]
    assert attach_lora(model, "early", a, strength=0.9) == names
    assert lora_names(model) == ["late", "early"]  # attach order, not module order
    assert all(model.get_submodule(n).base is originals[n] for n in names)
    both = _forward(model)
    assert not torch.equal(both, base_out)
    assert sorted(detach_lora(model, "late")) == sorted(names[1:])
    assert lora_names(model) == ["early"] and all(isinstance(model.get_submodule(n), LoRALinear) for n in names)
    assert sorted(detach_lora(model, "early")) == sorted(names)
    assert lora_names(model) == [] and all(model.get_submodule(n) is originals[n] for n in names)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert list(model.state_dict()) == keys and torch.equal(_forward(model), base_out)
    with pytest.raises(ValueError, match="no LoRA named 'early'"):
        detach_lora(model, "early")


@pytest.mark.parametrize("compute", [False, True])
def test_an_fp8_base_plus_the_branch(compute):
    model = nn.Sequential(randomize_(nn.Linear(16, 12), 3).to(torch.bfloat16).requires_grad_(False))
    apply_fp8(model, lambda name, lin: True, compute=compute)
    fp8 = model[0]
    assert isinstance(fp8, FP8Linear)
    x = _x(16, torch.bfloat16)
    with torch.inference_mode():
        base = fp8(x)
    down, up = _pair(4, 16, 12, seed=1)
    attach_lora(model, "a", {"0": (down, up, 0.25)}, strength=0.8)
    assert model[0].base is fp8 and {t.dtype for t in model[0].adapters.buffers()} == {torch.bfloat16}  # out_dtype
    d, u = down.to(torch.bfloat16), up.to(torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(model(x), base + F.linear(F.linear(x, d), u) * (0.8 * 0.25))
    # Stored in another dtype on request; the branch still runs in the activation's dtype.
    attach_lora(model, "b", {"0": (down, up, 0.5)}, strength=0.0, dtype=torch.float32)
    assert model[0].adapters[1].down.dtype == torch.float32
    set_lora_strength(model, "a", 0.0)
    set_lora_strength(model, "b", 1.0)
    with torch.inference_mode():
        assert torch.equal(model(x), base + F.linear(F.linear(x, d), u) * 0.5)
    detach_lora(model, "a")
    detach_lora(model, "b")
    assert model[0] is fp8


def test_an_fp8_model_takes_adapters_on_its_fp8_and_bf16_linears():
    model = _model("weights")
    base = _forward(model)
    targets = {"transformer_blocks.1.attn.to_k": _pair(2, D, D, 1) + (1.0,),  # FP8Linear
               "transformer_blocks.1.txt_mod.1": _pair(2, D, 6 * D, 2) + (1.0,)}  # kept in the compute dtype
    attach_lora(model, "a", targets)
    assert isinstance(model.get_submodule("transformer_blocks.1.attn.to_k").base, FP8Linear)
    out = _forward(model)
    assert torch.isfinite(out).all() and not torch.equal(out, base)
    detach_lora(model, "a")
    assert torch.equal(_forward(model), base)


def test_refusals_leave_the_model_unchanged():
    model = _model()
    good = _pair(2, D, D, 1) + (1.0,)
    attach_lora(model, "a", {"transformer_blocks.0.attn.to_q": good})
    before = {n: m for n, m in model.named_modules()}

    def refused(match: str, modules, name: str = "b") -> None:
        with pytest.raises(ValueError, match=match):
            attach_lora(model, name, modules)
        assert {n: m for n, m in model.named_modules()} == before and lora_names(model) == ["a"]

    refused("already attached", {"transformer_blocks.1.attn.to_q": good}, name="a")
    refused("no modules", {})
    ok = {"transformer_blocks.1.attn.to_q": good}  # checked first, but never wrapped when a later entry is refused
    refused("only linear layers", {**ok, "transformer_blocks.0.img_mod": good})
    refused("only linear layers", {**ok, "transformer_blocks.0.attn": good})
    refused("no module of that name", {**ok, "transformer_blocks.9.attn.to_q": good})
    refused("not its base", {**ok, "transformer_blocks.0.attn.to_q.base": good})
    refused(r"does not fit .*down \(2, 16\)", {**ok, "transformer_blocks.0.attn.to_k": _pair(2, 16, D, 1) + (1.0,)})
    refused(r"does not fit .*up \(16, 2\)", {**ok, "transformer_blocks.0.attn.to_k": _pair(2, D, 16, 1) + (1.0,)})
    down, up = _pair(2, D, D, 1)
    refused("does not fit", {**ok, "transformer_blocks.0.attn.to_k": (down, up[:, :1], 1.0)})  # rank 2 vs 1
    refused("2-D", {**ok, "transformer_blocks.0.attn.to_k": (down[..., None, None], up, 1.0)})
    refused("finite", {**ok, "transformer_blocks.0.attn.to_k": (down, up, float("nan"))})
    with pytest.raises(ValueError, match="already attached"):
        model.get_submodule("transformer_blocks.0.attn.to_q").add("a", down, up, 1.0, 1.0)
    with pytest.raises(ValueError, match="linear layer"):
        LoRALinear(nn.LayerNorm(4))


def test_blocks_of_lists_each_block_once_in_order():
    names = ["transformer_blocks.3.attn.to_q", "proj_out", "transformer_blocks.1.img_mlp.net.2",
             "transformer_blocks.3.attn.to_k"]
    assert blocks_of(names, _block_of) == [1, 3]
    assert blocks_of(["img_in"], _block_of) == []


@pytest.mark.parametrize("fp8", [None, "weights"])
def test_streamed_and_resident_blocks_with_a_lora_equal_the_model_not_offloaded(fp8):
    targets = {"transformer_blocks.0.attn.to_q": _pair(2, D, D, 1) + (0.5,),  # resident
               "transformer_blocks.1.attn.to_v": _pair(2, D, D, 2) + (0.5,),  # streamed
               "transformer_blocks.1.img_mlp.net.0.proj": _pair(3, D, 4 * D, 3) + (0.25,),
               "transformer_blocks.3.attn.add_k_proj": _pair(2, D, D, 4) + (1.0,),  # streamed
               "proj_out": _pair(2, D, 64, 5) + (1.0,)}  # outside the blocks: the rest
    reference = _model(fp8)
    attach_lora(reference, "a", targets, strength=0.8)
    expected = _forward(reference)

    model = _model(fp8)
    base = _forward(model)
    off = Offloaded(model, CPU, model.transformer_blocks, slots=2)
    off.stream([1, 2, 3])
    off.to_device()
    changed = attach_lora(model, "a", targets, strength=0.8)
    off.repack(blocks_of(changed, _block_of), rest=any(_block_of(n) is None for n in changed))
    assert off.on_device
    for i in (0, 1, 3):  # the adapter buffers are packed with their blocks
        packed = {id(t) for t in off.block_copies[i].tensors}
        assert all(id(t) in packed for m in model.transformer_blocks[i].modules() if isinstance(m, LoRALinear)
                   for t in m.buffers())
    assert all(id(t) in {id(u) for u in off.rest.tensors} for t in model.proj_out.buffers())
    for _ in range(2):
        assert torch.equal(_forward(model), expected)
    off.off_device()
    off.to_device()
    assert torch.equal(_forward(model), expected)
    # A strength change moves no tensor: no repack.
    set_lora_strength(model, "a", 0.3)
    set_lora_strength(reference, "a", 0.3)
    assert torch.equal(_forward(model), _forward(reference))
    # Detaching: the bases come back, the host copies drop the adapters once repacked.
    changed = detach_lora(model, "a")
    off.repack(blocks_of(changed, _block_of), rest=True)
    assert all(not isinstance(m, LoRALinear) for m in model.modules())
    assert torch.equal(_forward(model), base)


@pytest.fixture
def _dynamo_reset():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.usefixtures("_dynamo_reset")
def test_a_wrapped_block_compiles_with_fullgraph():
    block = _model().transformer_blocks[0]
    gen = torch.Generator().manual_seed(3)
    x, c, temb = torch.randn(2, 12, D, generator=gen), torch.randn(2, 5, D, generator=gen), torch.randn(2, D)
    rope = qwen_rope([(1, 3, 4)], 5, TINY.axes_dims_rope, TINY.rope_theta)
    args = (x, c, temb, rope, None)
    attach_lora(block, "a", {"attn.to_q": _pair(2, D, D, 1) + (0.5,), "img_mlp.net.2": _pair(2, 4 * D, D, 2) + (1.0,)})
    attach_lora(block, "b", {"attn.to_q": _pair(3, D, D, 3) + (0.25,)}, strength=0.0)
    attach_lora(block, "c", {"attn.to_q": _kron(4, ((4, 8), (8, 4))), "img_mlp.net.2": _kron(5, ((4, 16), (8, 8)))})
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    with torch.inference_mode():
        for strengths in ((1.0, 0.0), (0.6, 1.5), (0.0, 0.0)):  # a strength change re-specialises, never goes stale
            set_lora_strength(block, "a", strengths[0])
            set_lora_strength(block, "b", strengths[1])
            eager, fast = block(*args), compiled(*args)
            for e, f in zip(eager, fast, strict=True):
                torch.testing.assert_close(f, e, rtol=1e-6, atol=1e-6)
        detach_lora(block, "a")
        detach_lora(block, "b")
        detach_lora(block, "c")
        for e, f in zip(block(*args), compiled(*args), strict=True):  # module swaps are seen as well
            torch.testing.assert_close(f, e, rtol=1e-6, atol=1e-6)


@pytest.mark.usefixtures("_dynamo_reset")
def test_a_strength_change_reuses_the_compiled_graph():
    """The strength is a tensor the compiled graph reads: changing it (to any non-zero value) compiles nothing new,
    where a Python float would re-specialise the whole block (seconds on the full-size model)."""
    from torch._dynamo.testing import CompileCounter

    block = _model().transformer_blocks[0]
    gen = torch.Generator().manual_seed(4)
    args = (torch.randn(1, 12, D, generator=gen), torch.randn(1, 5, D, generator=gen), torch.randn(1, D),
            qwen_rope([(1, 3, 4)], 5, TINY.axes_dims_rope, TINY.rope_theta), None)
    attach_lora(block, "a", {"attn.to_q": _pair(2, D, D, 1) + (0.5,)})
    counter = CompileCounter()
    compiled = torch.compile(block, fullgraph=True, backend=counter)
    with torch.inference_mode():
        for strength in (1.0, 0.5, -0.7, 2.0):
            set_lora_strength(block, "a", strength)
            for e, f in zip(block(*args), compiled(*args), strict=True):
                torch.testing.assert_close(f, e, rtol=1e-6, atol=1e-6)
    assert counter.frame_count == 1
