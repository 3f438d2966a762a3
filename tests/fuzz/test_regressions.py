"""The inputs the parser fuzz tests (test_parsers.py) found, each shrunk to its smallest form, as plain tests: every
one crashed a reader with a non-qimg exception, or let through something that crashed later."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from safetensors.torch import save

from qimg.batch import prompt_seed
from qimg.embeddings import FORMAT, EmbeddingsFile, PromptEmbeds, load_embeddings, save_embeddings
from qimg.errors import CheckpointError, ConfigError, InputError
from qimg.loading.checkpoint import read_json, safetensors_files, tensor_headers
from qimg.png import read_params
from qimg.prompt_files import PromptFileError, parse_prompts, read_prompts

# --- prompt files ----------------------------------------------------------------------------------------------


def test_a_json_number_of_thousands_of_digits_is_a_prompt_file_error() -> None:
    # was ValueError: Exceeds the limit (4300 digits) for integer string conversion
    with pytest.raises(PromptFileError, match=r"^p\.jsonl:1: the JSON holds a number too long to read$"):
        parse_prompts('{"prompt": ' + "9" * 5000 + "}", "jsonl", "p.jsonl")


def test_json_nested_past_the_recursion_limit_is_a_prompt_file_error() -> None:
    # was RecursionError: maximum recursion depth exceeded while decoding a JSON array
    with pytest.raises(PromptFileError, match=r"^p\.jsonl:1: the JSON nests too deeply$"):
        parse_prompts("[" * 100_000, "jsonl", "p.jsonl")


def test_an_integer_cfg_too_large_for_a_float_is_a_prompt_file_error() -> None:
    # was OverflowError: int too large to convert to float
    with pytest.raises(PromptFileError, match=r"^p\.jsonl:1: cfg is too large$"):
        parse_prompts('{"prompt": "a", "cfg": 1' + "0" * 400 + "}", "jsonl", "p.jsonl")


def test_a_lone_surrogate_escape_is_a_prompt_file_error() -> None:
    # was accepted, and plan_batch then failed in prompt_seed with UnicodeEncodeError
    with pytest.raises(UnicodeEncodeError):
        prompt_seed("\ud800")
    with pytest.raises(PromptFileError, match=r"^p\.jsonl:1: prompt holds a lone surrogate escape \('\\ud800'\)$"):
        parse_prompts('{"prompt": "\\ud800"}', "jsonl", "p.jsonl")


def test_bytes_that_are_not_utf8_on_standard_input_are_a_prompt_file_error() -> None:
    # Standard input decoded with surrogateescape (a C locale) turns a stray byte into a lone surrogate, which was
    # accepted as part of a prompt and failed later in prompt_seed.
    with pytest.raises(PromptFileError, match=r"^<stdin>:2: not UTF-8 text$"):
        read_prompts("-", stdin=io.StringIO("a red fox\na blue\udcff bird\n"))


# --- PNG parameters ----------------------------------------------------------------------------------------------


def _png(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "image.png"
    path.write_bytes(data)
    return path


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_a_png_header_claiming_too_many_pixels_is_an_input_error(tmp_path: Path) -> None:
    # was PIL.Image.DecompressionBombError (1518 x 117890 pixels claimed)
    data = (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x05\xee\x00\x01\xcc\x82\x01\x00\x00\x00\x00\xdf\xe3\x90\x8d"
            b"\x00\x00\x00\x00IDAT5\xaf\x06\x1e\x00\x00\x00\x00IEND\xaeB`\x82")
    with pytest.raises(InputError, match="is not a readable image"):
        read_params(_png(tmp_path, data))


def test_a_broken_chunk_after_the_pixels_is_an_input_error(tmp_path: Path) -> None:
    # was SyntaxError: broken PNG file (an empty IDAT: PIL reads past it while looking for text after the pixels)
    data = (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x01\x03\x00\x00\x00%\xdbV\xca"
            b"\x00\x00\x00\x03PLTE\x00\x00\x00\xa7z=\xda\x00\x00\x00\x00IDATx\x9cc`\x00\x00\x00\x02\x00\x01H\xaf"
            b"\xa4q\x00\x00\x00\x00IEND\xaeB`\x82")
    with pytest.raises(InputError, match="is not a readable image"):
        read_params(_png(tmp_path, data))


def test_a_qimg_chunk_nested_past_the_recursion_limit_is_an_input_error(tmp_path: Path) -> None:
    # was RecursionError
    info = PngInfo()
    info.add_text("qimg", "[" * 100_000, zip=True)
    path = tmp_path / "image.png"
    Image.new("RGB", (1, 1)).save(path, pnginfo=info)
    with pytest.raises(InputError, match=r"damaged qimg parameter chunk \(JSON nested too deeply\)"):
        read_params(path)


# --- prompt embeddings -------------------------------------------------------------------------------------------

GOOD = {"prompt_embeds": torch.ones(1, 3, 4), "prompt_mask": torch.ones(1, 3, dtype=torch.long)}


def _embeddings(tmp_path: Path, tensors: dict[str, torch.Tensor], **meta: str) -> Path:
    path = tmp_path / "e.safetensors"
    path.write_bytes(save(tensors, metadata={"format": FORMAT, **meta}))
    return path


@pytest.mark.parametrize(
    ("tensors", "problem"),
    [
        # hypothesis' first find: empty (1, 0, 0) embeddings and (1, 0) masks were accepted
        ({"prompt_embeds": torch.zeros(1, 0, 0), "prompt_mask": torch.zeros(1, 0, dtype=torch.long)}, "prompt_embeds"),
        ({**GOOD, "prompt_embeds": torch.ones(3, 4)}, "prompt_embeds of shape \\(3, 4\\)"),
        ({**GOOD, "prompt_embeds": torch.ones(1, 3, 4, dtype=torch.long)}, "dtype torch.int64"),
        ({**GOOD, "prompt_mask": torch.ones(1, 2, dtype=torch.long)}, "prompt_mask of shape \\(1, 2\\)"),
        ({**GOOD, "prompt_mask": torch.ones(1, 3)}, "prompt_mask .* dtype torch.float32"),
        ({**GOOD, "prompt_mask": torch.tensor([[2, 1, 1]])}, "zeros and ones"),
        ({**GOOD, "prompt_pooled": torch.ones(5)}, "prompt_pooled of shape \\(5,\\)"),
        ({**GOOD, "negative_embeds": torch.ones(1, 2, 8), "negative_mask": torch.ones(1, 2, dtype=torch.long)},
         "prompt_embeds of width 4 but negative_embeds of width 8"),
    ],
)
def test_embeddings_of_the_wrong_shape_or_dtype_are_input_errors(
    tmp_path: Path, tensors: dict[str, torch.Tensor], problem: str
) -> None:
    # were accepted, and failed later inside the pipeline (or ran on nothing)
    with pytest.raises(InputError, match=problem):
        load_embeddings(_embeddings(tmp_path, tensors))


def test_bool_and_int32_masks_are_read_as_long(tmp_path: Path) -> None:
    for dtype in (torch.bool, torch.int32):
        data = load_embeddings(_embeddings(tmp_path, {**GOOD, "prompt_mask": torch.tensor([[1, 1, 0]]).to(dtype)}))
        assert data.cond.mask is not None and data.cond.mask.dtype == torch.long
        assert data.cond.mask.tolist() == [[1, 1, 0]]


def test_metadata_nested_past_the_recursion_limit_is_kept_as_text(tmp_path: Path) -> None:
    # was RecursionError
    assert load_embeddings(_embeddings(tmp_path, GOOD, colour="[" * 100_000)).meta["colour"] == "[" * 100_000


def test_text_metadata_that_looks_like_json_stays_text(tmp_path: Path) -> None:
    # A prompt "42" came back as the integer 42, a family "[1, 2]" as a list (which check_embeddings then used as
    # a dict key: TypeError), a negative "false" as False.
    meta = {"prompt": "42", "negative": None, "family": "[1, 2]", "template": "null", "max_sequence_length": 512}
    path = save_embeddings(tmp_path / "m.safetensors", EmbeddingsFile(PromptEmbeds(torch.ones(1, 3, 4)), None, meta))
    assert load_embeddings(path).meta == meta
    meta["negative"] = "false"
    path = save_embeddings(tmp_path / "n.safetensors", EmbeddingsFile(PromptEmbeds(torch.ones(1, 3, 4)), None, meta))
    assert load_embeddings(path).meta["negative"] == "false"


def test_mistyped_metadata_is_an_input_error(tmp_path: Path) -> None:
    # dropped_tokens "[1]" was returned as a list, and dropped_params failed on it with AttributeError
    with pytest.raises(InputError, match=r"damaged dropped_tokens entry"):
        load_embeddings(_embeddings(tmp_path, GOOD, dropped_tokens="[1]"))


def test_a_tensor_name_with_a_newline_gives_a_one_line_error(tmp_path: Path) -> None:
    # The safetensors reason quotes the tensor name: the message spanned two lines.
    header = json.dumps({"\n": {"dtype": "F32", "shape": [1], "data_offsets": [8, 0]}}).encode()
    path = tmp_path / "e.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(InputError) as info:
        load_embeddings(path)
    assert "\n" not in info.value.message and "tensor `\\n`" in info.value.message


# --- safetensors headers and shard indexes -----------------------------------------------------------------------


def test_a_tensor_name_with_a_carriage_return_gives_a_one_line_checkpoint_error(tmp_path: Path) -> None:
    # hypothesis' find: the safetensors reason quoted the name "\r", and the message spanned two lines
    path = tmp_path / "model.safetensors"
    path.write_bytes(b'=\x00\x00\x00\x00\x00\x00\x00{"\\r": {"dtype": "F32", "shape": [], "data_offsets": [8, 0]}}')
    with pytest.raises(CheckpointError) as info:
        tensor_headers([path])
    assert "\r" not in info.value.message and "tensor `\\r`" in info.value.message


def _index(tmp_path: Path, text: str) -> Path:
    folder = tmp_path / "transformer"
    folder.mkdir()
    (folder / "model.safetensors.index.json").write_text(text, encoding="utf-8")
    return folder


@pytest.mark.parametrize("text", ["null", "[]", "1" + "0" * 400, '"text"'])
def test_an_index_that_is_not_a_json_object_is_a_config_error(tmp_path: Path, text: str) -> None:
    # was AttributeError: 'NoneType' object has no attribute 'get' (hypothesis: the index "null")
    with pytest.raises(ConfigError, match=r"model\.safetensors\.index\.json holds a JSON \w+, not an object"):
        safetensors_files(_index(tmp_path, text), "model")


def test_a_config_nested_past_the_recursion_limit_is_a_config_error(tmp_path: Path) -> None:
    # was RecursionError
    path = tmp_path / "config.json"
    path.write_text("[" * 100_000)
    with pytest.raises(ConfigError, match=r"config\.json is not readable JSON \(nested too deeply\)"):
        read_json(path)


@pytest.mark.parametrize("name", [None, 7, ["a"], "../outside.safetensors", "/etc/hostname", "", "..", "a\nb"])
def test_a_shard_that_is_not_a_file_name_beside_the_index_is_a_config_error(tmp_path: Path, name: object) -> None:
    # None (hypothesis: {"weight_map": {"": null}}) was TypeError; "../outside.safetensors" was returned, a file
    # outside the model folder; "a\nb" gave a two-line message
    (tmp_path / "outside.safetensors").write_bytes(save({"w": torch.zeros(1)}))
    folder = _index(tmp_path, json.dumps({"weight_map": {"w": name}}))
    with pytest.raises(ConfigError, match="names a shard .*, not a file name in"):
        safetensors_files(folder, "model")


def test_a_shard_name_longer_than_the_filesystem_allows_is_a_config_error(tmp_path: Path) -> None:
    # was OSError: [Errno 36] File name too long (Path.is_file raises it rather than answering False)
    folder = _index(tmp_path, json.dumps({"weight_map": {"w": "1" + "0" * 400}}))
    with pytest.raises(ConfigError, match="names a shard qimg cannot look up"):
        safetensors_files(folder, "model")
