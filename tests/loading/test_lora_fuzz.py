"""Fuzzing the LoRA reader: any set of keys, shapes, dtypes and headers either reads or raises a one-line QimgError."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from qimg.errors import QimgError
from qimg.loading.keymaps import LORA_SUFFIXES
from qimg.loading.lora import LoKrModule, LoRAFile, read_lora

LINEARS = {
    "transformer_blocks.0.attn.to_q": (8, 8),
    "transformer_blocks.0.attn.to_out.0": (8, 8),
    "transformer_blocks.0.img_mlp.net.2": (8, 16),
    "transformer_blocks.1.img_mod.1": (24, 8),
}
PREFIXES = ["", "transformer.", "diffusion_model.", "lora_unet_", "lora_transformer_", "base_model.model.",
            "lora_te1_", "text_encoder.", "lycoris_", "junk/"]
MODULES = [*LINEARS, *(m.replace(".", "_") for m in LINEARS), "transformer_blocks.7.attn.to_q",
           "double_blocks.0.img_attn.qkv", "single_transformer_blocks.0.proj_mlp", "img_in", "", "."]
SUFFIXES = [s for s, _, _ in LORA_SUFFIXES] + [".lokr_t2", ".hada_t1", ".dora_scale", ".weight", ".bias",
                                               ".lora_B.bias", ".diff", "", "."]  # LORA_SUFFIXES holds LyCORIS's
SHAPES = [(), (1,), (2,), (2, 8), (8, 2), (2, 16), (24, 2), (0, 8), (8, 0), (3, 8), (8, 3), (2, 8, 1, 1), (1, 1)]
FLOATS = [torch.float32, torch.float16, torch.bfloat16]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int8, torch.uint8,
          torch.bool, torch.float8_e4m3fn]
VALUES = [1.0, 0.0, -2.0, 16.0, float("nan"), float("inf")]
CONFIGS = [
    {"transformer.r": 2, "transformer.lora_alpha": 4},
    {"r": 2, "lora_alpha": 1, "use_rslora": True},
    {"transformer.lora_alpha": 8, "transformer.alpha_pattern": {"to_q": 2, "^transformer_blocks.1.img_mod.1": 3}},
    {"transformer.alpha_pattern": {"(": 1}},
    {"transformer.alpha_pattern": ["to_q"]},
    {"transformer.lora_alpha": "x"},
    {"transformer.lora_alpha": None},
    {"transformer.use_dora": True},
    {"text_encoder.r": 4},
    [1, 2],
    "not json",
]

names = st.one_of(
    st.builds(lambda p, m, s: p + m + s, st.sampled_from(PREFIXES), st.sampled_from(MODULES),
              st.sampled_from(SUFFIXES)),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=24),
).filter(lambda k: k != "__metadata__")
tensors = st.tuples(st.sampled_from(SHAPES), st.sampled_from(DTYPES), st.sampled_from(VALUES))
headers = st.one_of(
    st.none(),
    st.fixed_dictionaries({"lora_adapter_metadata": st.one_of(st.sampled_from(CONFIGS).map(json.dumps),
                                                              st.text(max_size=40))}),
    st.fixed_dictionaries({"modelspec.architecture": st.sampled_from(["qwen-image/lora", "flux-1-dev/lora", ""])}),
)


PAIRS = [(".lora_A.weight", ".lora_B.weight"), (".lora_down.weight", ".lora_up.weight"),
         (".lora_A.default.weight", ".lora_B.default.weight"), (".lora.down.weight", ".lora.up.weight")]


@st.composite
def adapters(draw):
    """Whole (down, up, alpha) triples, so that reads get past key matching to shapes, dtypes and alphas."""
    prefix = draw(st.sampled_from(PREFIXES))
    module = draw(st.sampled_from([*LINEARS, "transformer_blocks.7.attn.to_q"]))
    name = prefix + (module.replace(".", "_") if prefix.endswith("_") else module)
    down, up = draw(st.sampled_from(PAIRS))
    out, inp = LINEARS.get(module, (8, 8))
    rank = draw(st.sampled_from([1, 2, 0]))
    dtype = draw(st.one_of(st.sampled_from(FLOATS), st.sampled_from(FLOATS), st.sampled_from(DTYPES)))
    up_shape = draw(st.sampled_from([(out, rank), (out, 3)]))
    state = {name + down: ((rank, inp), dtype, 1.0), name + up: (up_shape, dtype, 1.0)}
    if draw(st.booleans()):
        state[name + ".alpha"] = (draw(st.sampled_from([(), (), (1,), (2,)])), draw(st.sampled_from(DTYPES)),
                                  draw(st.sampled_from(VALUES)))
    return module, state


# LyCORIS adapters by role: LoHa, and LoKr with each W whole or a pair
LYCORIS = [("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"), ("lokr_w1", "lokr_w2"),
           ("lokr_w1", "lokr_w2_a", "lokr_w2_b"), ("lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b")]


@st.composite
def lycoris(draw):
    """Whole LoHa / LoKr sets, with shapes that fit or nearly fit, so that reads get past key matching."""
    prefix = draw(st.sampled_from(PREFIXES))
    module = draw(st.sampled_from([*LINEARS, "transformer_blocks.7.attn.to_q"]))
    name = prefix + (module.replace(".", "_") if prefix.endswith("_") else module)
    roles = draw(st.sampled_from(LYCORIS))
    out, inp = LINEARS.get(module, (8, 8))
    a, b = draw(st.sampled_from([(2, 2), (1, inp), (2, 4), (0, 2)]))
    c, d = out // max(a, 1), inp // max(b, 1)
    rank = draw(st.sampled_from([1, 2, 2, 0]))
    shapes = {"hada_w1_a": (out, rank), "hada_w1_b": (rank, inp), "hada_w2_a": (out, 1), "hada_w2_b": (1, inp),
              "lokr_w1": (a, b), "lokr_w2": (c, d), "lokr_w1_a": (a, rank), "lokr_w1_b": (rank, b),
              "lokr_w2_a": (c, rank), "lokr_w2_b": (rank, draw(st.sampled_from([d, d, d + 1])))}
    dtype = draw(st.one_of(st.sampled_from(FLOATS), st.sampled_from(FLOATS), st.sampled_from(DTYPES)))
    state = {f"{name}.{role}": (shapes[role], dtype, 1.0) for role in roles}
    if draw(st.booleans()):
        state[name + ".alpha"] = ((), draw(st.sampled_from(DTYPES)), draw(st.sampled_from(VALUES)))
    return module, state


@st.composite
def files(draw):
    state = draw(st.dictionaries(names, tensors, max_size=6))
    for _, extra in draw(st.lists(st.one_of(adapters(), lycoris()), min_size=1, max_size=4,
                                  unique_by=lambda a: a[0])):
        state.update(extra)
    return state


def _tensor(shape, dtype, value):
    if dtype.is_floating_point and dtype.itemsize >= 2:
        t = torch.randn(shape) if shape else torch.tensor(value)
        return t.to(dtype)
    return torch.ones(shape).to(dtype)


@settings(max_examples=100, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(state=files(), metadata=headers,
       cut=st.one_of(st.none(), st.none(), st.none(), st.integers(0, 400)))
def test_read_lora_reads_or_raises_a_one_line_qimg_error(state, metadata, cut):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.safetensors"
        save_file({k: _tensor(*v) for k, v in state.items()}, str(path), metadata=metadata)
        if cut is not None:  # a truncated file
            path.write_bytes(path.read_bytes()[:cut])
        try:
            result = read_lora(path, LINEARS)
        except QimgError as e:
            assert "\n" not in str(e) and "\r" not in str(e) and "\n" not in (e.hint or "")
            return
        assert isinstance(result, LoRAFile) and result.modules
        assert set(result.modules) <= set(LINEARS)
        assert len(result.unmatched) + 2 * len(result.modules) <= len(state)
        for name, module in result.modules.items():
            if isinstance(module, LoKrModule):
                assert tuple(module.dense_delta().shape) == LINEARS[name] and math.isfinite(module.scale)
                continue
            assert tuple(module.up.shape) == (LINEARS[name][0], module.rank)  # a LoRA, or a LoHa as its pair
            assert tuple(module.down.shape) == (module.rank, LINEARS[name][1])
            assert module.rank >= 1 and module.scale == module.alpha / module.rank
        result.summary()
