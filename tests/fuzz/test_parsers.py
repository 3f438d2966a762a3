"""Fuzz the readers of user files (prompt files, PNG parameters, prompt embeddings, safetensors checkpoints and
their shard index): any input either parses into something usable or fails with one of qimg's own errors, in one
line naming the file; never another exception type, never a hang."""

from __future__ import annotations

import csv
import io
import json
import signal
import struct
import tempfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from safetensors.torch import save

from qimg.embeddings import FORMAT, EmbeddingsFile, PromptEmbeds, load_embeddings
from qimg.errors import QimgError
from qimg.loading.checkpoint import open_checkpoint, read_json, safetensors_files, tensor_headers
from qimg.png import read_params
from qimg.prompt_files import FORMATS, LINE_FIELDS, PromptLine, parse_prompts, read_prompts

TIME_LIMIT = 5.0  # seconds for one parse of a few hundred bytes: anything near it is a hang, not a slow machine


class Hang(BaseException):
    """Not an Exception, so that a parser's own `except Exception` cannot turn a hang into a clean error."""


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    def alarm(signum: int, frame: Any) -> None:
        raise Hang

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def parse_or_error(names: str, fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args), or the QimgError it raised (one line, naming `names`); any other exception fails the example."""
    try:
        with time_limit(TIME_LIMIT):
            return fn(*args)
    except QimgError as e:
        assert "\n" not in e.message and "\r" not in e.message, f"{type(e).__name__} is not one line: {e.message!r}"
        assert e.hint is None or "\n" not in e.hint, f"hint is not one line: {e.hint!r}"
        (e.message + (e.hint or "")).encode("utf-8")  # a lone surrogate would crash the terminal that prints it
        assert names in e.message, f"{type(e).__name__} does not name {names}: {e.message!r}"
        return e
    except Hang:
        raise AssertionError(f"{fn.__name__} gave no answer in {TIME_LIMIT} s") from None


@contextmanager
def scratch() -> Iterator[Path]:
    """A fresh folder per example (Hypothesis runs many examples in one test call)."""
    with tempfile.TemporaryDirectory(prefix="qimg-fuzz-") as folder:
        yield Path(folder)


# --- values shared by every format -----------------------------------------------------------------------------

DEEP = "[" * 100_000  # nesting deeper than any recursion limit
HUGE_INT = "9" * 5000  # past Python's int-from-string digit limit
BIG_INT = "1" + "0" * 400  # an integer no float can hold
# JSON texts that have broken readers: every grid test below puts each of them in every place a file has.
NASTY_JSON = [
    DEEP, '{"a":' * 50_000, HUGE_INT, BIG_INT, "-" + BIG_INT, "1e400", "-1e400", "2e-400", "NaN", "-Infinity",
    '"\\ud800"', '"a\\udfffb"', '"a\\u0000b"', '"a\\nb"', '"a\\rb"', '""', '"text"', "null", "true", "false",
    "[]", "{}", "[1, 2]", '{"a": 1}', "-0", "0.5", "1", str(2**64),
]
ODD_TEXT = ["\x00", "\ufeff", "\u2028", "\x1c", "\x0c", "\x85", "\r", '"', '""', "'", ",", "#", "{", "}", "",
            " 12 ", "0x10", "1_000", "a\nb", "\udcff"]
json_scalars = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
                | st.sampled_from([10**400, -(10**400), 2**63, 2**64, -(2**63) - 1]))
json_values = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
nasty_json = st.sampled_from(NASTY_JSON)
odd_text = st.sampled_from(ODD_TEXT)
# JSON text: mostly well-formed, often one of the nasty documents above, sometimes not JSON at all.
raw_json = st.one_of(json_values.map(json.dumps), nasty_json, nasty_json, st.text(max_size=20), odd_text)


def utf8(text: str) -> bytes:
    """Text as UTF-8, a lone surrogate as the bytes it would have been (which no UTF-8 reader accepts)."""
    return text.encode("utf-8", "surrogatepass")


# --- 1. prompt files -------------------------------------------------------------------------------------------

VALID = {"prompt": st.text(max_size=16), "negative": st.text(max_size=8), "seed": st.integers(0, 2**32 - 1),
         "width": st.integers(16, 2048), "height": st.integers(16, 2048), "steps": st.integers(1, 50),
         "cfg": st.floats(0, 20), "name": st.text(max_size=8),
         "preset": st.sampled_from(["lightning-8", "lightning-4", "distill"]) | st.text(max_size=8)}


@st.composite
def jsonl_line(draw: st.DrawFn) -> str:
    """A JSON object, mostly of valid fields, with a few odd pairs: nasty or mistyped values, unknown or repeated
    keys."""
    fields = draw(st.lists(st.sampled_from(list(LINE_FIELDS)), unique=True, max_size=4))
    pairs = [("prompt", json.dumps(draw(VALID["prompt"])))] if draw(st.integers(0, 5)) else []
    pairs += [(key, json.dumps(draw(VALID[key]))) for key in fields]
    for _ in range(draw(st.integers(0, 2))):
        key = draw(st.one_of(st.sampled_from(list(LINE_FIELDS)), st.text(max_size=6)))
        pairs.insert(draw(st.integers(0, len(pairs))), (key, draw(raw_json)))
    return "{" + ", ".join(f"{json.dumps(key)}: {value}" for key, value in pairs) + "}"


@st.composite
def csv_document(draw: st.DrawFn) -> str:
    header = draw(st.lists(st.sampled_from(list(LINE_FIELDS)) | st.text(max_size=6), min_size=1, max_size=5))
    if draw(st.booleans()) and "prompt" not in header:
        header.insert(0, "prompt")
    cells = st.one_of(st.text(max_size=12), st.integers().map(str), st.floats().map(str), nasty_json, odd_text)
    rows = draw(st.lists(st.lists(cells, max_size=len(header) + 1), max_size=5))
    out = io.StringIO()
    quoting = draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL, csv.QUOTE_NONNUMERIC, None]))
    if quoting is None:  # written by hand: stray quotes, no escaping
        out.write("\n".join(",".join(row) for row in [header, *rows]))
    else:
        csv.writer(out, quoting=quoting, lineterminator=draw(st.sampled_from(["\n", "\r\n", "\r"]))).writerows(
            [header, *rows])
    return out.getvalue()


@st.composite
def prompt_text(draw: st.DrawFn) -> tuple[str, str]:
    """(text, format) of a prompt file: mostly JSON Lines, CSV or plain lines in their own format, with odd lines
    mixed in, any line endings, and a BOM sometimes."""
    odd = st.one_of(st.text(max_size=30), nasty_json, raw_json, odd_text,
                    st.sampled_from(["# comment", "   ", "a red fox", "prompt,seed", "prompt,prompt"]))
    style = draw(st.sampled_from(["jsonl", "csv", "txt"]))
    line = st.one_of(jsonl_line(), jsonl_line(), jsonl_line(), odd) if style == "jsonl" else odd
    lines = draw(st.lists(line, max_size=6))
    text = "".join(s + draw(st.sampled_from(["\n", "\r\n", "\r", ""])) for s in lines)
    if style == "csv":
        text = draw(csv_document()) + text
    fmt = draw(st.sampled_from([style, style, *FORMATS]))
    return ("\ufeff" if draw(st.integers(0, 5)) == 0 else "") + text, fmt


def check_prompt_lines(lines: list[PromptLine]) -> None:
    assert isinstance(lines, list)
    for pl in lines:
        assert isinstance(pl, PromptLine) and isinstance(pl.prompt, str) and pl.line >= 1
        for key, kind in LINE_FIELDS.items():
            value = getattr(pl, key)
            assert value is None or (isinstance(value, kind) and not isinstance(value, bool)), (key, value)
            if isinstance(value, str):
                value.encode("utf-8")  # a lone surrogate (from a JSON "\ud800" escape) cannot become a file name


@given(document=prompt_text())
def test_parse_prompts_parses_or_raises_qimg_error(document: tuple[str, str]) -> None:
    text, fmt = document
    result = parse_or_error("fuzz.src", parse_prompts, text, fmt, "fuzz.src")
    if not isinstance(result, QimgError):
        check_prompt_lines(result)


@given(line=jsonl_line())
def test_parse_prompts_reads_any_json_line_or_raises_qimg_error(line: str) -> None:
    result = parse_or_error("fuzz.jsonl:1", parse_prompts, line, "jsonl", "fuzz.jsonl")
    if not isinstance(result, QimgError):
        check_prompt_lines(result)


ENCODINGS = ["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "latin-1", "cp1252"]


@given(document=prompt_text(), encoding=st.sampled_from(ENCODINGS), garbage=st.binary(max_size=6),
       at=st.floats(0, 1), suffix=st.sampled_from([".txt", ".jsonl", ".ndjson", ".csv", ".CSV", ".prompts", ""]),
       auto=st.booleans())
def test_read_prompts_reads_any_bytes_or_raises_qimg_error(
    document: tuple[str, str], encoding: str, garbage: bytes, at: float, suffix: str, auto: bool
) -> None:
    text, fmt = document
    fmt = "auto" if auto else fmt
    data = text.encode(encoding, errors="replace")
    cut = int(len(data) * at)
    data = data[:cut] + garbage + data[cut:]  # invalid UTF-8, NULs, stray BOMs, split multi-byte characters
    with scratch() as folder:
        path = folder / f"prompts{suffix}"
        path.write_bytes(data)
        result = parse_or_error(str(path), read_prompts, path, fmt)
    if not isinstance(result, QimgError):
        check_prompt_lines(result)
        assert result, "read_prompts returned no lines instead of an error"


# --- 2. PNG parameters -----------------------------------------------------------------------------------------


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAGIC = [PNG_SIGNATURE, b"GIF89a", b"BM", b"II*\x00", b"MM\x00*", b"\xff\xd8\xff", b"RIFF\x00\x00\x00\x00WEBP",
         b"\x00\x00\x01\x00", b"P6\n", b"8BPS", b"\x97JB2", b"qoif", b"icns"]
param_texts = st.one_of(
    st.fixed_dictionaries({"prompt": st.text(max_size=10), "seed": json_scalars, "steps": json_scalars},
                          optional={"model": json_values, "cfg": json_values}).map(json.dumps),
    raw_json,
)
chunk_keys = st.sampled_from(["qimg", "parameters", "prompt", "Comment"]) | st.text("abcXYZ ", min_size=1, max_size=8)


@st.composite
def png_bytes(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["pil", "pil", "pil", "header", "magic", "random"]))
    if kind == "random":
        return draw(st.binary(max_size=300))
    if kind == "magic":
        return draw(st.sampled_from(MAGIC)) + draw(st.binary(max_size=200))
    if kind == "header":  # a hand-made PNG: any size claimed, any bit depth and colour type, any IDAT
        width, height = draw(st.integers(0, 2**31)), draw(st.integers(0, 2**31))
        depth, colour = draw(st.sampled_from([1, 2, 4, 8, 16, 3])), draw(st.sampled_from([0, 2, 3, 4, 6, 5]))
        data = PNG_SIGNATURE + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0))
        if draw(st.booleans()):
            data += png_chunk(b"tEXt", b"qimg\x00" + draw(param_texts).encode("latin-1", "replace"))
        idat = draw(st.binary(max_size=40))
        data += png_chunk(b"IDAT", zlib.compress(idat) if draw(st.booleans()) else idat) + png_chunk(b"IEND", b"")
        return data
    mode = draw(st.sampled_from(["RGB", "L", "RGBA", "P", "1", "I;16"]))
    image = Image.new(mode, (draw(st.integers(1, 4)), draw(st.integers(1, 4))))
    info = PngInfo()
    for key, value, how in draw(st.lists(st.tuples(chunk_keys, param_texts, st.integers(0, 2)), max_size=3)):
        value = value.replace("\udcff", "\ufffd")  # PIL writes text as Latin-1 or UTF-8 only
        if how == 2:
            info.add_itxt(key, value, zip=True)
        else:
            info.add_text(key, value, zip=bool(how))
    out = io.BytesIO()
    image.save(out, "PNG", pnginfo=info)
    data = out.getvalue()
    if draw(st.booleans()):  # a text chunk after the pixels, where other writers may put theirs
        value = utf8(draw(param_texts))  # a lone surrogate: bytes that are not UTF-8
        late = draw(st.sampled_from([png_chunk(b"tEXt", b"qimg\x00" + value),
                                     png_chunk(b"zTXt", b"qimg\x00\x00" + zlib.compress(value)),
                                     png_chunk(b"iTXt", b"qimg\x00\x00\x00\x00\x00" + value),
                                     png_chunk(b"zTXt", b"qimg\x00\x00" + value)]))  # not compressed at all
        data = data[:-12] + late + data[-12:]
    return mutate(draw, data)


def mutate(draw: st.DrawFn, data: bytes) -> bytes:
    """Most often untouched; else truncated, overwritten in a few places, or followed by garbage."""
    how = draw(st.sampled_from(["keep", "keep", "truncate", "flip", "append"]))
    if how == "truncate":
        return data[: draw(st.integers(0, max(len(data) - 1, 0)))]
    if how == "flip" and data:
        out = bytearray(data)
        for _ in range(draw(st.integers(1, 4))):
            out[draw(st.integers(0, len(out) - 1))] = draw(st.integers(0, 255))
        return bytes(out)
    if how == "append":
        return data + draw(st.binary(min_size=1, max_size=40))
    return data


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # headers claiming huge sizes
@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")  # PIL's TIFF reader on random bytes after the magic
@given(data=png_bytes(), suffix=st.sampled_from([".png", ".jpg", ""]))
def test_read_params_reads_any_file_or_raises_qimg_error(data: bytes, suffix: str) -> None:
    with scratch() as folder:
        path = folder / f"image{suffix}"
        path.write_bytes(data)
        result = parse_or_error(str(path), read_params, path)
    if not isinstance(result, QimgError):
        assert isinstance(result, dict)


# --- 3. prompt embeddings --------------------------------------------------------------------------------------

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int8,
          torch.uint8, torch.bool]
EMBED_NAMES = [f"{prefix}_{part}" for prefix in ("prompt", "negative") for part in ("embeds", "mask", "pooled")]


@st.composite
def tensors(draw: st.DrawFn, shape: tuple[int, ...] | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    shape = shape if shape is not None else tuple(draw(st.lists(st.integers(0, 3), max_size=4)))
    dtype = dtype if dtype is not None else draw(st.sampled_from(DTYPES))
    fill = draw(st.sampled_from([0, 1, 1, 2, -1]))
    t = torch.full(shape, fill).to(dtype)
    if draw(st.booleans()) and t.numel():
        t.view(-1)[draw(st.integers(0, t.numel() - 1))] = 0  # a padding token, in masks
    return t


@st.composite
def embeddings_file(draw: st.DrawFn) -> bytes:
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=200))
    length, width = draw(st.integers(0, 3)), draw(st.integers(0, 3))
    proper = {"embeds": tensors((1, length, width), torch.float32), "mask": tensors((1, length), torch.long),
              "pooled": tensors((1, 2), torch.float32)}
    found: dict[str, torch.Tensor] = {}
    for name in EMBED_NAMES:
        choice = draw(st.sampled_from(["proper", "proper", "proper", "none", "random"]))
        if choice != "none":
            found[name] = draw(proper[name.split("_")[1]] if choice == "proper" else tensors())
    for name in draw(st.lists(st.text(min_size=1, max_size=8), max_size=2)):
        found[name] = draw(tensors())
    meta = draw(st.dictionaries(
        st.sampled_from(["family", "template", "prompt", "negative", "images", "max_sequence_length",
                         "dropped_tokens", "model"]) | st.text(max_size=6),
        raw_json.map(lambda v: v.replace("\udcff", "?")), max_size=4))  # safetensors writes metadata as UTF-8
    fmt = draw(st.sampled_from([FORMAT, FORMAT, FORMAT, "qimg.prompt-embeds/2", ""]))
    if fmt:
        meta["format"] = fmt
    return mutate(draw, save({k: v.contiguous() for k, v in found.items()}, metadata=meta))


def check_embeddings_file(data: EmbeddingsFile) -> None:
    """What the pipelines rely on: (1, L, D) floating embeddings, a (1, L) 0/1 mask or none, a (1, P) pooled
    vector or none, the same D (and P) for the negative, and text where text is expected in the metadata."""
    assert isinstance(data, EmbeddingsFile)
    width = pooled = None
    for part in (data.cond, data.uncond):
        if part is None:
            continue
        assert isinstance(part, PromptEmbeds)
        e = part.embeds
        assert e.dim() == 3 and e.shape[0] == 1 and e.shape[1] > 0 and e.shape[2] > 0, e.shape
        assert e.is_floating_point(), e.dtype
        assert width in (None, e.shape[2])
        width = e.shape[2]
        if part.mask is not None:
            m = part.mask
            assert m.shape == e.shape[:2] and not m.is_floating_point(), (m.shape, m.dtype)
            assert bool(((m == 0) | (m == 1)).all())
        if part.pooled is not None:
            p = part.pooled
            assert p.dim() == 2 and p.shape[0] == 1 and p.shape[1] > 0 and p.is_floating_point(), (p.shape, p.dtype)
            assert pooled in (None, p.shape[1])
            pooled = p.shape[1]
    assert data.cond is not None
    for key in ("family", "template", "prompt", "model"):
        assert key not in data.meta or isinstance(data.meta[key], str), (key, data.meta[key])
    assert data.meta.get("negative") is None or isinstance(data.meta["negative"], str)


@given(data=embeddings_file())
def test_load_embeddings_reads_any_file_or_raises_qimg_error(data: bytes) -> None:
    with scratch() as folder:
        path = folder / "embeds.safetensors"
        path.write_bytes(data)
        result = parse_or_error(str(path), load_embeddings, path)
    if not isinstance(result, QimgError):
        check_embeddings_file(result)


# --- 4. safetensors headers and shard indexes ------------------------------------------------------------------

ST_DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "C64",
             "U64", "F4", "X"]


@st.composite
def safetensors_bytes(draw: st.DrawFn) -> bytes:
    """An 8-byte little-endian header length, a header (tensor entries, metadata, or any JSON or bytes), data."""
    if draw(st.integers(0, 4)) == 0:
        return mutate(draw, save({"w": draw(tensors())}))
    entries: dict[str, Any] = {}
    for name in draw(st.lists(st.text(max_size=6), max_size=3)):
        begin = draw(st.integers(0, 16))
        entries[name] = draw(st.one_of(
            st.fixed_dictionaries({
                "dtype": st.sampled_from(ST_DTYPES) | json_scalars,
                "shape": st.lists(st.integers(0, 4) | st.sampled_from([-1, 2**40]), max_size=3) | json_values,
                "data_offsets": st.sampled_from([[begin, begin + draw(st.integers(0, 16))], [8, 0], [0, 2**64 - 1]])
                | json_values,
            }),
            json_values,
        ))
    if draw(st.booleans()):
        entries["__metadata__"] = draw(st.dictionaries(st.text(max_size=4), st.text(max_size=4) | json_values))
    header = draw(st.one_of(st.just(json.dumps(entries).encode()), raw_json.map(utf8), st.binary(max_size=40)))
    header += b" " * draw(st.integers(0, 7))
    size = draw(st.sampled_from([len(header)] * 4 + [0, 1, len(header) + 1, 2**63, 2**64 - 1, 100_000_001]))
    return struct.pack("<Q", size) + header + draw(st.binary(max_size=40))


@given(files=st.lists(safetensors_bytes(), min_size=1, max_size=3))
def test_checkpoint_headers_read_any_file_or_raise_qimg_error(files: list[bytes]) -> None:
    with scratch() as folder:
        paths = []
        for i, data in enumerate(files):
            paths.append(folder / f"model-{i:05d}.safetensors")
            paths[-1].write_bytes(data)
        opened = parse_or_error(str(folder), open_checkpoint, paths)
        headers = parse_or_error(str(folder), tensor_headers, paths)
    assert isinstance(opened, QimgError) == isinstance(headers, QimgError)
    if not isinstance(headers, QimgError):
        assert set(headers) == set(opened)
        for name, (dtype, shape) in headers.items():
            assert isinstance(name, str) and isinstance(dtype, str)
            assert all(isinstance(n, int) and n >= 0 for n in shape), (name, shape)


shard_names = st.one_of(
    st.sampled_from(["model-00001.safetensors", "model-00002.safetensors", "../outside.safetensors",
                     "/etc/hostname", "sub/model.safetensors", "", ".", "..", "model-00001.safetensors/",
                     "a\x00b", "~/model.safetensors"]),
    st.text(max_size=8), json_scalars, json_values,
)


@st.composite
def index_json(draw: st.DrawFn) -> bytes:
    how = draw(st.sampled_from(["map", "map", "map", "json", "bytes"]))
    if how == "bytes":
        return draw(st.binary(max_size=60))
    if how == "json":
        return utf8(draw(raw_json))
    weight_map = draw(st.one_of(st.dictionaries(st.text(max_size=6), shard_names, max_size=4), json_values))
    doc = {"metadata": draw(json_values), "weight_map": weight_map}
    return json.dumps(doc).encode()


@given(index=index_json(), shards=st.sets(st.sampled_from(["model-00001.safetensors", "model-00002.safetensors",
                                                           "sub/model.safetensors"])),
       single=st.booleans())
def test_safetensors_files_reads_any_index_or_raises_qimg_error(index: bytes, shards: set[str], single: bool) -> None:
    with scratch() as root:
        folder = root / "transformer"
        (folder / "sub").mkdir(parents=True)
        (root / "outside.safetensors").write_bytes(save({"w": torch.zeros(1)}))  # what "../" would reach
        for name in shards:
            (folder / name).write_bytes(save({name: torch.zeros(2)}))
        if single:
            (folder / "model.safetensors").write_bytes(save({"w": torch.zeros(1)}))
        (folder / "model.safetensors.index.json").write_bytes(index)
        files = parse_or_error(str(folder), safetensors_files, folder, "model")
        if isinstance(files, QimgError):
            return
        assert isinstance(files, list) and files
        for f in files:
            assert isinstance(f, Path) and f.is_file() and f.parent.resolve() == folder.resolve(), f
        parse_or_error(str(folder), tensor_headers, files)  # a shard may be any file: a clean error is fine


@given(data=st.one_of(raw_json.map(utf8), st.binary(max_size=60),
                      json_values.map(lambda v: json.dumps({"_class_name": "X", "nested": v}).encode())))
def test_read_json_reads_any_bytes_or_raises_qimg_error(data: bytes) -> None:
    with scratch() as folder:
        path = folder / "config.json"
        path.write_bytes(data)
        result = parse_or_error(str(path), read_json, path)
    if not isinstance(result, QimgError):
        assert isinstance(result, dict)


# --- every nasty value in every place: a fixed grid, so that every run tries what once broke a reader ----------


def run_grid(cases: list[tuple[str, Callable[[], Any]]]) -> None:
    """Run every case and report every failure at once, not only the first."""
    failed = []
    for label, case in cases:
        try:
            case()
        except Exception as e:  # a grid reports every failing cell
            failed.append(f"{label[:80]!r}: {type(e).__name__}: {str(e)[:160]!r}")
    assert not failed, f"{len(failed)} of {len(cases)} cases failed:\n" + "\n".join(failed)


def _parse_case(text: str, fmt: str) -> Callable[[], None]:
    def case() -> None:
        result = parse_or_error("grid.src", parse_prompts, text, fmt, "grid.src")
        if not isinstance(result, QimgError):
            check_prompt_lines(result)

    return case


def test_prompt_files_take_every_nasty_value_in_every_field() -> None:
    cases = []
    for value in NASTY_JSON:
        cases.append((f"jsonl line {value}", _parse_case(value, "jsonl")))
        cases.append((f"jsonl prompt {value}", _parse_case(f'{{"prompt": {value}}}', "jsonl")))
        for key in [*LINE_FIELDS, "colour"]:
            line = f'{{"prompt": "a", {json.dumps(key)}: {value}}}'
            cases.append((f"jsonl {key} {value}", _parse_case(line, "jsonl")))
            cases.append((f"csv {key} {value}", _parse_case(f"prompt,{key}\na,{value}\n", "csv")))
    for odd in ODD_TEXT:
        for fmt in FORMATS:
            cases.append((f"{fmt} {odd}", _parse_case(f"{odd}\n", fmt)))
            cases.append((f"{fmt} prompt with {odd}", _parse_case(f'{{"prompt": "a{odd}b"}}\n', fmt)))
        cases.append((f"csv cell {odd}", _parse_case(f"prompt,seed\n{odd},{odd}\n", "csv")))
    run_grid(cases)


def _png_with(value: str, where: str) -> bytes:
    """A 1x1 PNG whose qimg chunk holds `value`, before the pixels as PIL writes it or after them."""
    info = PngInfo()
    if where == "tEXt":
        info.add_text("qimg", value)  # iTXt when the value is not Latin-1
    elif where == "zTXt":
        info.add_text("qimg", value, zip=True)
    elif where == "iTXt":
        info.add_itxt("qimg", value, zip=True)
    out = io.BytesIO()
    Image.new("RGB", (1, 1)).save(out, "PNG", pnginfo=info)
    data = utf8(value)
    late = {"late tEXt": png_chunk(b"tEXt", b"qimg\x00" + data),
            "late zTXt": png_chunk(b"zTXt", b"qimg\x00\x00" + zlib.compress(data)),
            "late iTXt": png_chunk(b"iTXt", b"qimg\x00\x00\x00\x00\x00" + data)}.get(where, b"")
    return out.getvalue()[:-12] + late + out.getvalue()[-12:]


def test_read_params_takes_every_nasty_value_in_every_chunk() -> None:
    def case(data: bytes) -> Callable[[], None]:
        def run() -> None:
            with scratch() as folder:
                (folder / "grid.png").write_bytes(data)
                result = parse_or_error("grid.png", read_params, folder / "grid.png")
            assert isinstance(result, (dict, QimgError))

        return run

    cases = []
    for value in [*NASTY_JSON, *ODD_TEXT]:
        for where in ("tEXt", "zTXt", "iTXt", "late tEXt", "late zTXt", "late iTXt"):
            try:
                cases.append((f"{where} {value}", case(_png_with(value, where))))
            except (UnicodeEncodeError, ValueError):  # PIL will not write a lone surrogate; the late chunks do
                continue
    run_grid(cases)


def _embeddings_case(tensors_: dict[str, torch.Tensor], meta: dict[str, str]) -> Callable[[], None]:
    def run() -> None:
        with scratch() as folder:
            path = folder / "grid.safetensors"
            path.write_bytes(save(tensors_, metadata=meta))
            result = parse_or_error("grid.safetensors", load_embeddings, path)
        if not isinstance(result, QimgError):
            check_embeddings_file(result)

    return run


GOOD_EMBEDS = {"prompt_embeds": torch.ones(1, 3, 4), "prompt_mask": torch.ones(1, 3, dtype=torch.long),
               "negative_embeds": torch.ones(1, 2, 4), "negative_mask": torch.tensor([[1, 0]]),
               "prompt_pooled": torch.ones(1, 5)}
ODD_SHAPES = [(), (0,), (1,), (3,), (1, 3), (1, 2), (2, 3), (1, 0), (1, 3, 4), (1, 0, 4), (1, 3, 0), (2, 3, 4),
              (1, 3, 4, 1), (1, 5)]
ODD_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn, torch.int64,
              torch.int32, torch.int16, torch.uint8, torch.uint16, torch.bool, torch.complex64]


def test_load_embeddings_takes_every_odd_tensor_and_metadata_value() -> None:
    cases = []
    for name in EMBED_NAMES:
        for shape in ODD_SHAPES:
            for dtype in ODD_DTYPES:
                found = {**GOOD_EMBEDS, name: torch.ones(shape).to(dtype)}
                cases.append((f"{name} {shape} {dtype}", _embeddings_case(found, {"format": FORMAT})))
        without = {k: v for k, v in GOOD_EMBEDS.items() if k != name}
        cases.append((f"no {name}", _embeddings_case(without, {"format": FORMAT})))
    for mask in ([[2, 1, 1]], [[-1, 1, 1]], [[1, 1, 0]], [[0, 0, 0]]):
        found = {**GOOD_EMBEDS, "prompt_mask": torch.tensor(mask)}
        cases.append((f"mask {mask}", _embeddings_case(found, {"format": FORMAT})))
    for key in ("family", "template", "prompt", "negative", "images", "max_sequence_length", "dropped_tokens",
                "format", "colour"):
        for value in [*NASTY_JSON, *ODD_TEXT]:
            if "\udcff" not in value:  # safetensors writes metadata as UTF-8
                meta = {"format": FORMAT, key: value}
                cases.append((f"meta {key} {value}", _embeddings_case(GOOD_EMBEDS, meta)))
    run_grid(cases)


def _header_file(header: bytes, data: bytes = b"\0" * 16) -> bytes:
    return struct.pack("<Q", len(header)) + header + data


def test_checkpoint_readers_take_every_odd_header_and_index() -> None:
    def headers_case(data: bytes) -> Callable[[], None]:
        def run() -> None:
            with scratch() as folder:
                (folder / "grid.safetensors").write_bytes(data)
                result = parse_or_error("grid.safetensors", tensor_headers, [folder / "grid.safetensors"])
            assert isinstance(result, (dict, QimgError))

        return run

    def index_case(index: str) -> Callable[[], None]:
        def run() -> None:
            with scratch() as root:
                folder = root / "transformer"
                folder.mkdir()
                (root / "outside.safetensors").write_bytes(save({"w": torch.zeros(1)}))
                (folder / "model-00001.safetensors").write_bytes(save({"w": torch.zeros(1)}))
                (folder / "model.safetensors.index.json").write_text(index, encoding="utf-8", errors="surrogatepass")
                files = parse_or_error(str(folder), safetensors_files, folder, "model")
                if not isinstance(files, QimgError):
                    assert all(f.is_file() and f.parent.resolve() == folder.resolve() for f in files), files

        return run

    cases = []
    entries = [{"dtype": "F32", "shape": [1], "data_offsets": [8, 0]}, {"dtype": "F32", "shape": [-1], "data_offsets":
               [0, 4]}, {"dtype": "Q4", "shape": [1], "data_offsets": [0, 4]}, {"dtype": "F32", "shape": [2**40, 2**40],
               "data_offsets": [0, 4]}, {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, [], "x"]
    for name in ["w", "", "\n", "\r\n", "a\x00b", "\u2028", "\ud800", "__metadata__"]:
        for entry in entries:
            header = utf8(json.dumps({name: entry}, ensure_ascii=False))
            cases.append((f"header {name!r} {entry}", headers_case(_header_file(header))))
    for value in [*NASTY_JSON, *ODD_TEXT]:
        cases.append((f"header {value}", headers_case(_header_file(utf8(value)))))
        cases.append((f"index {value}", index_case(value)))
        cases.append((f"weight_map {value}", index_case(f'{{"weight_map": {value}}}')))
        cases.append((f"shard {value}", index_case(f'{{"weight_map": {{"w": {value}}}}}')))
        cases.append((f"shard name {value}", index_case(json.dumps({"weight_map": {"w": value}}))))
    for size in (0, 1, 7, 2**63, 2**64 - 1):
        cases.append((f"header length {size}", headers_case(struct.pack("<Q", size) + b"{}")))
    for name in ["../outside.safetensors", "/etc/hostname", "sub/model.safetensors", ".", "..", "", "~",
                 "model-00001.safetensors/", "a\\b.safetensors"]:
        cases.append((f"shard path {name}", index_case(json.dumps({"weight_map": {"w": name}}))))
    run_grid(cases)
