"""Prompts longer than the text encoder reads: the cut is counted and recorded in the image parameters and the
embeddings' meta, never silent; edit models read the whole prompt."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

import qimg
from qimg.loading.components import load_tokenizer
from qimg.nets.text_encoders import QWEN_IMAGE_EDIT_PLUS, QWEN_IMAGE_T2I, dropped_prompt_tokens, prompt_tokens

LONG = " ".join(["a red fox"] * 400)  # 1200 tokens: past both 512 and 1024
OPTIONS = dict(steps=1, seed=3, width=32, height=32, cfg=1.0)


@pytest.fixture(scope="module")
def pipe(tiny_qwen: Path, one_thread):
    return qimg.load(tiny_qwen, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def long_tokens(tiny_qwen: Path) -> int:
    """The long prompt's token count as the tokenizer sees it on its own."""
    n = len(load_tokenizer(tiny_qwen / "tokenizer")(LONG).input_ids)
    assert n > 1024
    return n


def test_prompt_tokens_count_the_prompt_inside_the_template(tiny_qwen: Path, long_tokens: int):
    tokenizer = load_tokenizer(tiny_qwen / "tokenizer")
    assert prompt_tokens(tokenizer, LONG, QWEN_IMAGE_T2I) == long_tokens
    assert prompt_tokens(tokenizer, "a fox", QWEN_IMAGE_T2I) == 2
    assert dropped_prompt_tokens(tokenizer, LONG, QWEN_IMAGE_T2I, 512) == long_tokens - 512
    assert dropped_prompt_tokens(tokenizer, LONG, QWEN_IMAGE_T2I, 1024) == long_tokens - 1024
    assert dropped_prompt_tokens(tokenizer, "a fox", QWEN_IMAGE_T2I, 2) == 0
    assert dropped_prompt_tokens(tokenizer, "a fox", QWEN_IMAGE_T2I, 1) == 1


def test_a_long_prompt_records_the_dropped_tokens(pipe, long_tokens: int):
    params = pipe.generate(LONG, **OPTIONS)[0].info["qimg"]
    assert params["prompt_tokens_dropped"] == long_tokens - 512
    assert "negative_tokens_dropped" not in params  # CFG off: no negative is encoded


def test_a_short_prompt_records_none(pipe):
    params = pipe.generate("a red fox", **OPTIONS)[0].info["qimg"]
    assert "prompt_tokens_dropped" not in params and "negative_tokens_dropped" not in params


def test_max_sequence_length_1024_drops_fewer(pipe, long_tokens: int):
    params = pipe.generate(LONG, max_sequence_length=1024, **OPTIONS)[0].info["qimg"]
    assert params["prompt_tokens_dropped"] == long_tokens - 1024
    assert params["max_sequence_length"] == 1024


def test_a_long_negative_prompt_is_counted_too(pipe, long_tokens: int):
    params = pipe.generate("a red fox", **{**OPTIONS, "cfg": 4.0}, negative=LONG)[0].info["qimg"]
    assert params["negative_tokens_dropped"] == long_tokens - 512
    assert "prompt_tokens_dropped" not in params


def test_embeddings_record_the_cut_and_generate_from_them_records_it(pipe, tiny_qwen: Path, long_tokens: int,
                                                                       tmp_path: Path):
    data = qimg.encode_prompt(str(tiny_qwen), LONG, negative="blurry", device="cpu", dtype="float32")
    assert data.meta["dropped_tokens"] == {"prompt": long_tokens - 512}
    assert data.cond.embeds.shape[1] == 512
    short = qimg.encode_prompt(str(tiny_qwen), "a red fox", device="cpu", dtype="float32")
    assert "dropped_tokens" not in short.meta
    path = qimg.save_embeddings(tmp_path / "long.safetensors", data)
    params = pipe.generate(embeddings=qimg.load_embeddings(path), **OPTIONS)[0].info["qimg"]
    assert params["prompt_tokens_dropped"] == long_tokens - 512


def test_edit_models_read_the_whole_prompt(tiny_edit_model, long_tokens: int):
    _, folder = tiny_edit_model("edit-2509")
    picture = Image.new("RGB", (32, 32), (200, 40, 40))
    data = qimg.encode_prompt(str(folder), LONG, images=[picture], device="cpu", dtype="float32")
    assert "dropped_tokens" not in data.meta
    tokenizer = load_tokenizer(folder / "tokenizer")
    assert data.cond.embeds.shape[1] > prompt_tokens(tokenizer, LONG, QWEN_IMAGE_EDIT_PLUS) == long_tokens
