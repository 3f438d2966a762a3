"""Prompt files: one prompt a line (.txt), JSON Lines (.jsonl) or CSV (.csv), each line with optional overrides
(negative, seed, size, steps, cfg, name, preset, lora), read and checked whole before anything runs. Torch-free."""

from __future__ import annotations

import csv
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from qimg.errors import QimgError, UsageError
from qimg.jobs import lora_list

FORMATS = ("txt", "jsonl", "csv")
_EXTENSIONS = {".txt": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}
# Per-line keys and the type each must have; a line may leave any of them out except the prompt.
LINE_FIELDS: dict[str, type] = {
    "prompt": str, "negative": str, "seed": int, "width": int, "height": int, "steps": int, "cfg": float, "name": str,
    "preset": str,
}  # fmt: skip


class PromptFileError(UsageError):
    """A prompt file, one of its lines, or the name template cannot be used as given (exit 2: nothing ran)."""


@dataclass(frozen=True)
class PromptLine:
    """One prompt of a prompt file with its per-line overrides (None: use the command's option or default)."""

    line: int  # 1-based line number in the file, for messages
    prompt: str
    negative: str | None = None
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    cfg: float | None = None
    name: str | None = None
    preset: str | None = None  # a name in qimg.PRESETS: its steps, CFG and schedule for this line
    loras: tuple[tuple[str, float], ...] | None = None  # the line's own LoRAs (None: the command's)


# --- reading -------------------------------------------------------------------------------------------------


def read_prompts(path: str | Path, fmt: str = "auto", *, stdin: TextIO | None = None) -> list[PromptLine]:
    """Parse a prompt file ("-": standard input). fmt "auto" goes by the extension (.txt, .jsonl/.ndjson,
    .csv); standard input and other extensions are sniffed: JSON Lines if the first prompt line starts with
    "{", else plain text (CSV is never guessed: a prompt with a comma would look like one)."""
    if fmt != "auto" and fmt not in FORMATS:
        raise PromptFileError(f"unknown prompt file format {fmt!r}", hint=f"use one of auto, {', '.join(FORMATS)}")
    if str(path) == "-":
        source, text = "<stdin>", (stdin or sys.stdin).read().removeprefix("\ufeff")
    else:
        source = str(path)
        p = Path(path).expanduser()
        if not p.is_file():
            what = "is a folder" if p.is_dir() else "does not exist"
            raise PromptFileError(f"prompt file {p} {what}", hint="give a .txt, .jsonl or .csv file, or - for stdin")
        try:
            text = p.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise PromptFileError(f"{source} is not UTF-8 text (byte {e.start})", hint="save it as UTF-8") from e
        except OSError as e:
            raise PromptFileError(f"prompt file {source} cannot be read ({e.strerror})") from e
    if fmt == "auto":
        fmt = _EXTENSIONS.get(Path(source).suffix.lower(), "") if source != "<stdin>" else ""
        fmt = fmt or _sniff(text)
    lines = parse_prompts(text, fmt, source)
    if not lines:
        raise PromptFileError(f"{source} holds no prompts", hint="one prompt a line; # starts a comment")
    return lines


def _sniff(text: str) -> str:
    for raw in io.StringIO(text):
        s = raw.strip()
        if s and not s.startswith("#"):
            return "jsonl" if s.startswith("{") else "txt"
    return "txt"


def parse_prompts(text: str, fmt: str, source: str = "<prompts>") -> list[PromptLine]:
    """Parse prompt-file text in a known format; errors name source:line."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # standard input decoded with surrogateescape: bytes that are not UTF-8
        number = len(io.StringIO(text[: e.start] + "x", newline=None).readlines())
        raise PromptFileError(f"{source}:{number}: not UTF-8 text", hint="save it as UTF-8") from None
    if fmt == "csv":
        return _parse_csv(text, source)
    lines = []
    # StringIO splits on \n, \r\n and \r only, so line numbers match what editors show (str.splitlines
    # would also split on form feeds and U+2028).
    for number, raw in enumerate(io.StringIO(text, newline=None), 1):
        s = raw.strip()
        if not s or s.startswith("#"):  # JSON lines never start with "#", so comments are safe there too
            continue
        if fmt == "txt":
            lines.append(PromptLine(number, s))
            continue
        try:
            obj = json.loads(s)
        except json.JSONDecodeError as e:
            raise PromptFileError(f"{source}:{number}: not valid JSON ({e.msg}, column {e.colno})") from None
        except (ValueError, RecursionError) as e:  # a number past Python's 4300-digit limit; nesting past recursion
            what = "nests too deeply" if isinstance(e, RecursionError) else "holds a number too long to read"
            raise PromptFileError(f"{source}:{number}: the JSON {what}",
                                  hint='a line is one flat object, e.g. {"prompt": "a red fox", "seed": 7}') from None
        if not isinstance(obj, dict):
            raise PromptFileError(f"{source}:{number}: expected a JSON object like {{\"prompt\": \"a red fox\"}}")
        lines.append(_make_line(obj, source, number, from_text=False))
    return lines


def _parse_csv(text: str, source: str) -> list[PromptLine]:
    reader = csv.reader(io.StringIO(text, newline=""), skipinitialspace=True)
    header: list[str] | None = None
    lines, start = [], 1
    try:
        for row in reader:
            number, start = start, reader.line_num + 1  # a quoted cell may span lines: report where the row begins
            if not any(cell.strip() for cell in row):
                continue
            if header is None:
                header = [cell.strip().lower() for cell in row]
                unknown = [c for c in header if c not in LINE_FIELDS]
                if unknown or len(set(header)) != len(header) or "prompt" not in header:
                    what = f"unknown column {unknown[0]!r}" if unknown else (
                        "no prompt column" if "prompt" not in header else "a column appears twice")
                    raise PromptFileError(f"{source}:{number}: {what} in the header",
                                          hint=f"columns: {', '.join(LINE_FIELDS)}")
                continue
            if len(row) > len(header):
                raise PromptFileError(f"{source}:{number}: {len(row)} cells, but the header names {len(header)}",
                                      hint="quote cells that contain commas")
            values = {key: cell for key, cell in zip(header, row, strict=False) if cell.strip()}  # short rows: unset
            lines.append(_make_line(values, source, number, from_text=True))
    except csv.Error as e:
        raise PromptFileError(f"{source}:{reader.line_num}: not valid CSV ({e})") from None
    return lines


def _make_line(values: dict[str, Any], source: str, number: int, *, from_text: bool) -> PromptLine:
    """Check one line's keys and types; CSV cells arrive as text and are converted here."""
    where = f"{source}:{number}"
    values = dict(values)
    loras = _line_loras(values.pop("lora", None), where, from_text)
    unknown = sorted(set(values) - set(LINE_FIELDS))
    if unknown:
        raise PromptFileError(f"{where}: unknown key {unknown[0]!r}", hint=f"keys: {', '.join(LINE_FIELDS)}, lora")
    checked: dict[str, Any] = {}
    for key, value in values.items():
        if value is None:
            continue  # JSON null: as if the key were absent
        kind = LINE_FIELDS[key]
        if from_text and kind is not str:
            try:
                value = kind(value.strip())
            except ValueError:
                raise PromptFileError(f"{where}: {key} must be {_article(kind)} (got {value!r})") from None
        elif kind is float and isinstance(value, int) and not isinstance(value, bool):
            try:
                value = float(value)
            except OverflowError:  # an integer of hundreds of digits
                raise PromptFileError(f"{where}: {key} is too large", hint=f'e.g. "{key}": 4.0') from None
        if not isinstance(value, kind) or isinstance(value, bool):
            raise PromptFileError(f"{where}: {key} must be {_article(kind)} (got {json.dumps(value)})")
        if isinstance(value, str) and not from_text:
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:  # JSON's "\ud800": half a surrogate pair, not a character
                raise PromptFileError(f"{where}: {key} holds a lone surrogate escape ({value[e.start]!r})",
                                      hint="write the character itself, or both halves of its \\u pair") from None
        checked[key] = value
    if "prompt" not in checked:
        raise PromptFileError(f"{where}: no prompt", hint='every line needs one, e.g. {"prompt": "a red fox"}')
    return PromptLine(number, **checked, loras=loras)


def _line_loras(value: Any, where: str, from_text: bool) -> tuple[tuple[str, float], ...] | None:
    """A line's "lora" value; in CSV a cell of "PATH[:SCALE]" entries separated by ";" (empty: the command's)."""
    if value is None or (from_text and not value.strip()):
        return None
    if from_text:
        value = [part for part in value.split(";") if part.strip()]
    try:
        return tuple(lora_list(value))
    except (ValueError, QimgError) as e:
        raise PromptFileError(f"{where}: {e}", hint='e.g. "lora": ["style.safetensors:0.8"]') from None


def _article(kind: type) -> str:
    return {int: "an integer", float: "a number", str: "a string"}[kind]
