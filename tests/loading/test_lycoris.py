"""LyCORIS LoKr and LoHa files: written in the exact key layouts their trainers use, read, applied as a side branch,
and checked against the math done by hand (delta W built densely from the stored factors and added to the weight).

There is no oracle to compare with: diffusers cannot load LyCORIS files for Qwen-Image (its lora_state_dict raises
on lokr_*/hada_* keys, checked below), and ComfyUI is no test dependency. The hand math follows LyCORIS's own
modules (lycoris/modules/lokr.py, loha.py) and ComfyUI's comfy/weight_adapter/lokr.py, loha.py.

Tolerances (_close): every comparison is fp32 against the same numbers summed in another order (fp64 by hand, or
the merged weight). Rounding is of order 1e-7 of the terms summed, so an entry near zero after cancellation can be
off by that much of the largest entry: rtol 1e-5 plus atol 1e-5 x the largest entry leaves a wide margin and still
catches a wrong scale, a transposed or swapped factor or a wrong Kronecker layout, which are errors of order 1.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from qimg.errors import CheckpointError, InputError, QimgError
from qimg.loading.lora import LoHaModule, LoKrModule, LoRAFile, LoRAModule, read_lora
from qimg.pipelines.family import BlockLists
from qimg.pipelines.loras import LoRAs
from qimg.runtime.lora import Kronecker, attach_lora
from tests.fixtures import randomize_
from tests.runtime.test_offload import _forward, _model

LINEARS = {
    "transformer_blocks.0.attn.to_q": (32, 32),
    "transformer_blocks.0.img_mlp.net.0.proj": (128, 32),
    "transformer_blocks.0.img_mlp.net.2": (32, 128),
    "transformer_blocks.1.img_mod.1": (192, 32),
}
# (out, in) -> (a, b, c, d): W1 (a, b), W2 (c, d), a*c = out, b*d = in; as LyCORIS factorises (W1 the smaller)
FACTORS = {(32, 32): (4, 4, 8, 8), (128, 32): (8, 4, 16, 8), (32, 128): (4, 8, 8, 16), (192, 32): (12, 4, 16, 8)}
STEMS = {  # layout -> the module part of a key, as each writer spells it
    "lycoris": lambda m: "lycoris_" + m.replace(".", "_"),  # the LyCORIS library (SimpleTuner)
    "kohya": lambda m: "lora_unet_" + m.replace(".", "_"),  # sd-scripts / musubi with a LyCORIS network module
    "comfy": lambda m: "diffusion_model." + m,  # ai-toolkit, ComfyUI
    "bare": lambda m: m,  # bare module names, which ComfyUI's Qwen-Image key map accepts
}
DIALECT = {"lycoris": "lycoris", "kohya": "kohya", "comfy": "comfy", "bare": "lycoris"}


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal up to fp32 rounding of the summed terms (see the module docstring)."""
    want = want.double()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _lokr(shape: tuple[int, int], w1: str, w2: str, rank: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A LoKr's tensors by role; each W "whole" or a "pair" of the given rank."""
    a, b, c, d = FACTORS[shape]
    out = {}
    for n, (rows, cols), form in ((1, (a, b), w1), (2, (c, d), w2)):
        if form == "whole":
            out[f"lokr_w{n}"] = torch.randn(rows, cols, generator=gen)
        else:
            out[f"lokr_w{n}_a"] = torch.randn(rows, rank, generator=gen)
            out[f"lokr_w{n}_b"] = torch.randn(rank, cols, generator=gen)
    return out


def _loha(shape: tuple[int, int], rank: int, gen: torch.Generator, dtype=torch.float32) -> dict[str, torch.Tensor]:
    o, i = shape
    return {"hada_w1_a": torch.randn(o, rank, generator=gen).to(dtype), "hada_w1_b": torch.randn(rank, i,
            generator=gen).to(dtype), "hada_w2_a": torch.randn(o, rank, generator=gen).to(dtype),
            "hada_w2_b": torch.randn(rank, i, generator=gen).to(dtype)}


def _write(path, layout: str, adapters: dict[str, dict[str, torch.Tensor]], alpha: float | None = None, extra=None):
    state = {f"{STEMS[layout](m)}.{role}": t for m, roles in adapters.items() for role, t in roles.items()}
    if alpha is not None:
        state.update({f"{STEMS[layout](m)}.alpha": torch.tensor(alpha) for m in adapters})
    state.update(extra or {})
    save_file(state, str(path))
    return path


def _hand(t: dict[str, torch.Tensor], alpha: float | None) -> torch.Tensor:
    """delta W in fp64, straight from the stored tensors, by LyCORIS's definitions."""
    t = {k: v.double() for k, v in t.items()}
    if "hada_w1_a" in t:
        rank = t["hada_w1_b"].shape[0]
        scale = alpha / rank if alpha else 1.0
        return scale * (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
    rank = t["lokr_w1_a"].shape[1] if "lokr_w1_a" in t else t["lokr_w2_a"].shape[1] if "lokr_w2_a" in t else None
    scale = alpha / rank if rank is not None and alpha else 1.0
    return scale * torch.kron(w1, w2)


def _runtime(a: LoRAModule | LoKrModule):
    """What qimg.pipelines.loras hands attach_lora for a read adapter."""
    return Kronecker(a.w1, a.w2, a.scale) if isinstance(a, LoKrModule) else (a.down, a.up, a.scale)


def _one_line(e: QimgError) -> None:
    assert "\n" not in str(e) and "\n" not in (e.hint or ""), (str(e), e.hint)
    assert e.hint and e.exit_code == 1


def test_diffusers_cannot_load_lycoris_for_qwen_image(tmp_path):
    """Why these tests have no oracle: diffusers 0.42 has no LyCORIS path for Qwen-Image. With `.alpha` keys its
    kohya converter raises on the lokr_*/hada_* keys; without them the keys pass through and nothing applies them
    (it only warns that no LoRA keys were found)."""
    diffusers = pytest.importorskip("diffusers")
    from tests.fixtures import TINY_MMDIT

    adapters = {"transformer_blocks.0.attn.to_q": _lokr((32, 32), "whole", "whole", 2, _gen(0))}
    with pytest.raises(ValueError, match="should be empty"):
        diffusers.QwenImagePipeline.lora_state_dict(str(_write(tmp_path / "a.safetensors", "lycoris", adapters, 1.0)))
    state = diffusers.QwenImagePipeline.lora_state_dict(str(_write(tmp_path / "n.safetensors", "lycoris", adapters)))
    transformer = diffusers.QwenImageTransformer2DModel(**TINY_MMDIT)
    diffusers.QwenImagePipeline.load_lora_into_transformer(state, transformer=transformer, adapter_name="x")
    assert not getattr(transformer, "peft_config", None)  # no adapter was made


# --- reading: every form, every layout, against the hand math ----------------------------------------------------


@pytest.mark.parametrize("w1, w2", [("whole", "pair"), ("pair", "pair"), ("whole", "whole"), ("pair", "whole")])
@pytest.mark.parametrize("layout", ["lycoris", "comfy"])
def test_lokr_reads_and_applies_as_the_dense_kron(tmp_path, layout, w1, w2):
    gen = _gen(1)
    adapters = {m: _lokr(s, w1, w2, rank=2, gen=gen) for m, s in LINEARS.items()}
    f = read_lora(_write(tmp_path / "k.safetensors", layout, adapters, alpha=3.0), LINEARS)
    assert f.dialect == DIALECT[layout] and f.unmatched == () and f.modules.keys() == LINEARS.keys()
    for m, (o, i) in LINEARS.items():
        got = f.modules[m]
        assert isinstance(got, LoKrModule) and got.dense_delta().shape == (o, i)
        factored = "pair" in (w1, w2)
        assert (got.rank, got.alpha, got.scale) == ((2, 3.0, 1.5) if factored else (None, None, 1.0))
        want = _hand(adapters[m], 3.0)
        _close(got.dense_delta(), want)
        # Applied as the branch on a linear: the same as the hand delta merged into the weight.
        model = nn.Sequential(randomize_(nn.Linear(i, o), 1).requires_grad_(False))
        weight, bias = model[0].weight.clone(), model[0].bias.clone()
        attach_lora(model, "k", {"0": _runtime(got)}, strength=0.7)
        x = torch.randn(2, 5, i, generator=gen)
        with torch.inference_mode():
            _close(model(x), F.linear(x, weight + 0.7 * want.float(), bias))


@pytest.mark.parametrize("layout", ["lycoris", "kohya", "bare"])
def test_loha_reads_as_its_exact_low_rank_pair(tmp_path, layout):
    gen = _gen(2)
    adapters = {m: _loha(s, rank=3, gen=gen) for m, s in LINEARS.items()}
    f = read_lora(_write(tmp_path / "h.safetensors", layout, adapters, alpha=1.5), LINEARS)
    assert f.dialect == DIALECT[layout] and f.unmatched == ()
    for m, (o, i) in LINEARS.items():
        got = f.modules[m]
        assert isinstance(got, LoHaModule) and isinstance(got, LoRAModule)
        assert got.down.shape == (9, i) and got.up.shape == (o, 9)  # rank r1*r2
        assert (got.ranks, got.loha_alpha, got.file_rank) == ((3, 3), 1.5, 3)
        assert got.scale == pytest.approx(1.5 / 3, rel=1e-15)  # LyCORIS's alpha / r1
        _close(got.dense_delta(), _hand(adapters[m], 1.5))


def test_loha_pair_of_bf16_factors_is_exact():
    """Products of bf16 factors are exact in fp32, so the pair holds the LoHa as stored: fp64 agrees to 1e-12."""
    t = _loha((32, 128), rank=4, gen=_gen(3), dtype=torch.bfloat16)
    from qimg.loading.adapters import loha_pair

    down, up = loha_pair(*(t[r] for r in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")))
    assert down.dtype == up.dtype == torch.float32
    torch.testing.assert_close(up.double() @ down.double(), _hand(t, None), rtol=1e-12, atol=1e-12)


def test_alpha_rules_follow_lycoris(tmp_path):
    """No alpha, or 0, means scale 1 (alpha = rank); both Ws whole ignore alpha (LyCORIS forces scale 1)."""
    gen = _gen(4)
    m = "transformer_blocks.0.attn.to_q"
    cases = [({m: _lokr((32, 32), "whole", "pair", 4, gen)}, None, 1.0), ({m: _lokr((32, 32), "whole", "pair", 4, gen)},
             0.0, 1.0), ({m: _lokr((32, 32), "whole", "whole", 4, gen)}, 8.0, 1.0),
             ({m: _loha((32, 32), 4, gen)}, None, 1.0), ({m: _loha((32, 32), 4, gen)}, 2.0, 0.5)]
    for n, (adapters, alpha, scale) in enumerate(cases):
        got = read_lora(_write(tmp_path / f"{n}.safetensors", "lycoris", adapters, alpha=alpha), LINEARS).modules[m]
        assert got.scale == pytest.approx(scale, rel=1e-15), (n, got)


def test_a_file_may_mix_kinds_and_summaries_say_so(tmp_path):
    gen = _gen(5)
    names = list(LINEARS)
    adapters = {names[0]: _lokr(LINEARS[names[0]], "whole", "whole", 2, gen),
                names[1]: _lokr(LINEARS[names[1]], "whole", "pair", 2, gen),
                names[2]: _loha(LINEARS[names[2]], 2, gen)}
    lora = {f"lycoris_{names[3].replace('.', '_')}.lora_down.weight": torch.randn(2, 32, generator=gen),
            f"lycoris_{names[3].replace('.', '_')}.lora_up.weight": torch.randn(192, 2, generator=gen)}
    f = read_lora(_write(tmp_path / "mix.safetensors", "lycoris", adapters, alpha=1.0, extra=lora), LINEARS)
    assert [m.kind for m in f.modules.values()] == ["LoKr", "LoKr", "LoHa", "LoRA"]
    assert f.summary() == "lycoris LoRA: 4 modules (1 LoRA, 1 LoHa, 2 LoKr), rank 2/full, alpha 1/2, 0 unmatched keys"
    info = f.describe()
    assert info["kinds"] == {"LoRA": 1, "LoHa": 1, "LoKr": 2} and info["ranks"] == [2]
    assert info["alphas"] == [1.0, 2.0]  # the LoRA has no alpha key: alpha = rank
    stored = sum(t.numel() for roles in [*adapters.values(), lora] for t in roles.values())
    assert info["parameters"] == stored  # as the file stores them, not the LoHa's rank-4 pair
    full = read_lora(_write(tmp_path / "full.safetensors", "comfy", {names[0]: adapters[names[0]]}), LINEARS)
    assert full.summary() == "comfy LoRA: 1 modules (1 LoKr), rank full, alpha -, 0 unmatched keys"


def test_dense_delta_is_what_the_branch_adds_for_every_kind(tmp_path):
    gen = _gen(6)
    m, (o, i) = "transformer_blocks.0.img_mlp.net.0.proj", (128, 32)
    down, up = torch.randn(3, i, generator=gen), torch.randn(o, 3, generator=gen)
    reads = [LoRAModule(down, up, alpha=1.5)]
    for k, adapters in enumerate(({m: _loha((o, i), 2, gen)}, {m: _lokr((o, i), "pair", "pair", 2, gen)})):
        path = _write(tmp_path / f"{k}.safetensors", "lycoris", adapters, alpha=1.5)
        reads.append(read_lora(path, LINEARS).modules[m])
    x = torch.randn(4, i, generator=gen, dtype=torch.float64)
    for a in reads:
        model = nn.Sequential(nn.Linear(i, o, dtype=torch.float64).requires_grad_(False))
        attach_lora(model, "a", {"0": _runtime(a)})
        with torch.inference_mode():
            branch = model(x) - model[0].base(x)  # fp64 throughout: the branch's own rounding is ~1e-16
            runtime_delta = model[0].adapters[0].dense_delta()
        assert a.dense_delta().dtype == runtime_delta.dtype == torch.float32
        _close(x @ a.dense_delta().double().T, branch)
        torch.testing.assert_close(runtime_delta, a.dense_delta(), rtol=1e-6, atol=1e-6)


# --- on a tiny Qwen-Image denoiser, through the pipeline's LoRA manager ------------------------------------------


@pytest.mark.parametrize("layout", ["lycoris", "comfy"])
def test_a_lycoris_file_on_a_tiny_denoiser_equals_its_merged_weights(tmp_path, layout):
    """qimg.pipelines.loras.LoRAs (what Pipeline.load_lora drives) on the tiny test denoiser, dim 32 like the tiny
    Qwen-Image of tests/test_lora.py: LoKr and LoHa side branches give the net with the hand deltas merged."""
    gen = _gen(10)
    targets = {"transformer_blocks.0.attn.to_q": _lokr((32, 32), "whole", "pair", 2, gen),
               "transformer_blocks.1.img_mlp.net.2": _lokr((32, 128), "pair", "pair", 2, gen),
               "transformer_blocks.1.attn.to_add_out": _loha((32, 32), 2, gen),
               "transformer_blocks.3.img_mod.1": _loha((192, 32), 2, gen)}
    targets = {m: {r: 0.2 * t for r, t in roles.items()} for m, roles in targets.items()}  # a visible, sane change
    path = _write(tmp_path / f"{layout}.safetensors", layout, targets, alpha=1.0)
    model = _model()
    base = _forward(model)
    loras = LoRAs(model, BlockLists(("transformer_blocks",)), "qwen-image", torch.float32, offload=None)
    lora = loras.load(path, strength=0.7)
    assert lora.dialect == DIALECT[layout] and "(2 LoHa, 2 LoKr)" in lora.summary()
    assert isinstance(model.get_submodule("transformer_blocks.0.attn.to_q").adapters[0].w1, torch.Tensor)
    got = _forward(model)
    merged = _model()  # the same weights (same seed), the hand deltas merged in
    with torch.no_grad():
        for m, roles in targets.items():
            merged.get_submodule(m).weight += 0.7 * _hand(roles, 1.0).float()
    assert not torch.allclose(got, base, atol=1e-3)
    _close(got, _forward(merged))
    loras.unload(layout)
    assert torch.equal(_forward(model), base) and all(type(model.get_submodule(m)) is nn.Linear for m in targets)


# --- bad files ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["lycoris_transformer_blocks_0_attn_to_q.hada_t1",
                                 "diffusion_model.transformer_blocks.0.attn.to_q.lokr_t2"])
def test_tucker_cores_are_refused_in_one_line(tmp_path, key):
    m = "transformer_blocks.0.attn.to_q"
    path = _write(tmp_path / "t.safetensors", "lycoris", {m: _loha((32, 32), 2, _gen(11))},
                  extra={key: torch.randn(2, 2, 3, 3)})
    with pytest.raises(InputError, match="is a LyCORIS Tucker \\(conv\\) file") as e:
        read_lora(path, LINEARS)
    assert key in str(e.value) and "conv" in e.value.hint
    _one_line(e.value)


@pytest.mark.parametrize("roles, what", [
    ({"lokr_w1": (4, 4), "lokr_w2": (8, 4)}, r"lokr_w1 \(4, 4\) and lokr_w2 \(8, 4\); its linear is \(32, 32\), so W1 "
                                             r"\(a, b\) and W2 \(c, d\) must have a\*c = 32 and b\*d = 32 \(here W1 "
                                             r"\(4, 4\) and W2 \(8, 4\)\)"),
    ({"lokr_w1": (4, 4), "lokr_w2_a": (8, 2), "lokr_w2_b": (3, 8)}, r"lokr_w2_a \(8, 2\) and lokr_w2_b \(3, 8\)"),
    ({"lokr_w1": (4, 4, 1, 1), "lokr_w2": (8, 8)}, r"lokr_w1 \(4, 4, 1, 1\)"),
    ({"hada_w1_a": (32, 2), "hada_w1_b": (2, 32), "hada_w2_a": (16, 2), "hada_w2_b": (2, 32)},
     r"the LoHa for .* hada_w2_a \(16, 2\) .* so hada_w1_a must be \(32, r1\)"),
])
def test_shapes_that_do_not_fit_are_refused_from_the_header(tmp_path, roles, what, monkeypatch):
    m = "transformer_blocks.0.attn.to_q"
    path = _write(tmp_path / "s.safetensors", "lycoris", {m: {r: torch.zeros(s) for r, s in roles.items()}})
    monkeypatch.setattr("qimg.loading.lora._tensor", lambda *a: pytest.fail("read a tensor before the shape check"))
    with pytest.raises(CheckpointError, match=what) as e:
        read_lora(path, LINEARS)
    assert str(e.value).startswith(f"{path}: the ") and m in str(e.value)
    _one_line(e.value)


def test_incomplete_sets_are_unmatched_like_half_a_pair(tmp_path):
    gen = _gen(12)
    names = list(LINEARS)
    whole = {names[0]: _lokr(LINEARS[names[0]], "whole", "pair", 2, gen)}
    lokr, loha = _lokr(LINEARS[names[2]], "pair", "whole", 2, gen), _loha(LINEARS[names[3]], 2, gen)
    halves = {names[1]: {"lokr_w1": torch.randn(8, 4)},  # no W2
              names[2]: {k: v for k, v in lokr.items() if k != "lokr_w1_b"},  # half of W1's pair
              names[3]: {k: v for k, v in loha.items() if k != "hada_w2_b"}}
    path = _write(tmp_path / "h.safetensors", "lycoris", {**whole, **halves}, alpha=1.0)
    f = read_lora(path, LINEARS)
    assert list(f.modules) == [names[0]]
    n_half = sum(len(roles) + 1 for roles in halves.values())  # their keys and their alphas
    assert len(f.unmatched) == n_half and all("lycoris_transformer_blocks_0_attn_to_q" not in k for k in f.unmatched)


@pytest.mark.parametrize("extra, what", [
    ({"lokr_w1_a": (4, 2), "lokr_w1_b": (2, 4)}, "stores one factor twice"),  # W1 whole and as a pair
    ({"lora_down.weight": (2, 32), "lora_up.weight": (32, 2)}, "holds LoRA and LoKr tensors for"),
    ({"hada_w1_a": (32, 2)}, "holds LoHa and LoKr tensors for"),
])
def test_one_module_stored_two_ways_is_refused(tmp_path, extra, what):
    m = "transformer_blocks.0.attn.to_q"
    roles = {**_lokr((32, 32), "whole", "whole", 2, _gen(13)), **{r: torch.zeros(s) for r, s in extra.items()}}
    with pytest.raises(CheckpointError, match=what) as e:
        read_lora(_write(tmp_path / "two.safetensors", "lycoris", {m: roles}), LINEARS)
    _one_line(e.value)


def test_lycoris_keys_of_no_module_name_the_dialect(tmp_path):
    loha = _loha((32, 32), 2, _gen(14))
    path = _write(tmp_path / "n.safetensors", "lycoris", {"transformer_blocks.9.attn.to_q": loha})  # no block 9
    with pytest.raises(InputError, match=r"no key of this LoRA matches .*\(4 keys; dialect lycoris\)") as e:
        read_lora(path, LINEARS)
    _one_line(e.value)
    ok = _write(tmp_path / "ok.safetensors", "lycoris", {"transformer_blocks.0.attn.to_q": loha})
    assert isinstance(read_lora(ok, LINEARS), LoRAFile)
