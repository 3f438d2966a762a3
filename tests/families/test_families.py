"""The family seam: qimg.load dispatches on the spec's family; runtime/ and the generic pipeline code name no
family; a family's record is all the generic machinery reads."""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import pytest
import torch

import qimg
from qimg import families
from qimg.families.qwen import QWEN_IMAGE
from qimg.pipelines import memory
from qimg.pipelines.base import Pipeline
from qimg.pipelines.family import BlockLists
from qimg.runtime.fp8 import FP8Linear
from qimg.runtime.planner import MemoryPlan

QIMG = Path(qimg.__file__).parent
# Files that must stay family-free: the engine's runtime features and the shared pipeline machinery.
GENERIC = sorted((QIMG / "runtime").glob("*.py")) + [QIMG / "pipelines" / n for n in ("base.py", "family.py",
                                                                                      "memory.py", "common.py")]


def _code_words(path: Path) -> set[str]:
    """Names, attributes, imported modules and string constants of a module: its code, not its prose
    (docstrings and comments may name families as examples)."""
    words: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # a docstring
        if isinstance(node, ast.Name):
            words.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.arg)):
            words.add(node.name if not isinstance(node, ast.arg) else node.arg)
        elif isinstance(node, ast.Attribute):
            words.add(node.attr)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            words.update(a.name for a in node.names)
            words.add(getattr(node, "module", None) or "")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            words.add(node.value)
    # A docstring's Constant is reached through its Expr too; drop those found only there.
    docs = {n.value.value for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
    return words - docs


@pytest.mark.parametrize("path", GENERIC, ids=lambda p: p.relative_to(QIMG.parent).as_posix())
def test_generic_code_names_no_family(path: Path):
    named = sorted(w for w in _code_words(path) if re.search(r"qwen|flux|transformer_blocks", w, re.IGNORECASE))
    assert not named, f"{path.name} names a family in its code: {named}"


def test_load_returns_the_family_pipeline_with_its_record_and_options(tiny_qwen: Path, one_thread):
    options = qimg.RuntimeOptions(device="cpu", dtype="float32")
    pipe = qimg.load(tiny_qwen, options)
    assert isinstance(pipe, Pipeline) and isinstance(pipe, QWEN_IMAGE.pipeline)
    assert pipe.family is families.get("qwen-image") is QWEN_IMAGE
    assert pipe.options is options  # kept as given: the one carrier of the runtime options


def test_an_unknown_family_is_a_one_line_error(tiny_qwen: Path):
    ref = qimg.resolve_model(str(tiny_qwen))
    ref = dataclasses.replace(ref, spec=dataclasses.replace(ref.spec, family="sd15"))
    with pytest.raises(qimg.QimgError, match="model family 'sd15' is not supported"):
        qimg.load(ref, device="cpu")


def test_block_lists_index_several_lists_in_run_order():
    lists = BlockLists(("double_blocks", "single_blocks"))
    model = torch.nn.Module()
    model.double_blocks = torch.nn.ModuleList(torch.nn.Linear(1, 1) for _ in range(2))
    model.single_blocks = torch.nn.ModuleList(torch.nn.Linear(1, 1) for _ in range(3))
    assert lists.key("single_blocks.1.weight") == (1, 1) and lists.key("norm_out.weight") is None
    assert lists.prefix("double_blocks.1.bias") == "double_blocks.1"
    assert lists.index(model, "single_blocks.1") == 3
    assert lists.modules(model) == [*model.double_blocks, *model.single_blocks]


def test_block_transforms_run_in_order_after_fp8_on_every_block(tiny_qwen: Path, one_thread):
    """load_denoiser: FP8 first, then the caller's transforms, then placement, once per block (under a plan that
    streams, when the denoiser first comes to the device: streamed blocks, packed, then the resident ones)."""
    seen: list[tuple[str, str]] = []

    def record(prefix: str, block: torch.nn.Module) -> None:
        seen.append((prefix, type(block.attn.to_q).__name__))

    plan = MemoryPlan("layer", None, "cuda", False, {"transformer": (1,)}, {})
    model, off = memory.load_denoiser(QWEN_IMAGE, tiny_qwen / "transformer", torch.device("cpu"), torch.float32,
                                      plan, fp8="weights", transforms=[record])
    n = len(model.transformer_blocks)
    assert seen == [] and off is not None  # nothing is read before the denoiser first comes to the device
    off.to_device()
    order = [1] + [i for i in range(n) if i != 1]
    assert seen == [(f"transformer_blocks.{i}", FP8Linear.__name__) for i in order]
    assert off.streamed == [1] and len(off.block_copies) == n
