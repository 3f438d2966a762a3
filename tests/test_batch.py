"""qimg.batch and qimg.safety without a model: parsing prompt files, planning (names, seeds, what is done), the
manifest, and signals; run_batch with a stand-in pipeline."""

from __future__ import annotations

import io
import json
import os
import signal
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from PIL import Image

import qimg
from qimg.batch import plan_batch, prompt_seed, run_batch, slugify
from qimg.errors import OutputError
from qimg.prompt_files import PromptFileError, parse_prompts, read_prompts
from qimg.safety import append_manifest, catch_signals, deferred_signals, folder_lock
from qimg.specs import SPECS

REF = SimpleNamespace(spec=SPECS["qwen-image"], name="m")
SMALL = {"steps": 2, "width": 32, "height": 32}


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --- reading -------------------------------------------------------------------------------------------------


def test_txt_skips_comments_and_blank_lines_and_keeps_line_numbers(tmp_path: Path) -> None:
    path = _write(tmp_path, "p.txt", "# header\n\n  a red fox  \r\n# more\na blue bird\n")
    lines = read_prompts(path)
    assert [(pl.line, pl.prompt) for pl in lines] == [(3, "a red fox"), (5, "a blue bird")]


def test_jsonl_fields_and_types(tmp_path: Path) -> None:
    path = _write(tmp_path, "p.jsonl", '{"prompt": "a", "seed": 3, "cfg": 2, "name": "x", "negative": null}\n\n'
                                       '{"prompt": "b", "width": 64, "height": 48, "steps": 4}\n')
    a, b = read_prompts(path)
    assert (a.line, a.seed, a.cfg, a.name, a.negative) == (1, 3, 2.0, "x", None)
    assert isinstance(a.cfg, float)
    assert (b.line, b.width, b.height, b.steps) == (3, 64, 48, 4)


def test_csv_header_quoted_cells_and_empty_cells(tmp_path: Path) -> None:
    text = 'Prompt, seed,cfg\n"a fox, in snow",7,\n"two\nlines",,3.5\n\nplain,,\n'
    a, b, c = read_prompts(_write(tmp_path, "p.csv", text))
    assert (a.line, a.prompt, a.seed, a.cfg) == (2, "a fox, in snow", 7, None)
    assert (b.line, b.prompt, b.cfg) == (3, "two\nlines", 3.5)  # a row is reported at the line it starts on
    assert (c.line, c.prompt) == (6, "plain")


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("p.jsonl", '{"prompt": "a"}\n{"prompt": "b", "sed": 1}\n', "p.jsonl:2: unknown key 'sed'"),
        ("p.jsonl", '{"prompt": "a"}\n{"prompt": "b",\n', "p.jsonl:2: not valid JSON"),
        ("p.jsonl", '["a"]\n', "p.jsonl:1: expected a JSON object"),
        ("p.jsonl", '{"seed": 1}\n', "p.jsonl:1: no prompt"),
        ("p.jsonl", '{"prompt": "a", "seed": "7"}\n', "p.jsonl:1: seed must be an integer"),
        ("p.jsonl", '{"prompt": "a", "steps": 2.5}\n', "p.jsonl:1: steps must be an integer"),
        ("p.jsonl", '{"prompt": "a", "width": true}\n', "p.jsonl:1: width must be an integer"),
        ("p.jsonl", '{"prompt": 5}\n', "p.jsonl:1: prompt must be a string"),
        ("p.csv", "prompt,seed\na,x\n", "p.csv:2: seed must be an integer (got 'x')"),
        ("p.csv", "prompt,colour\na,red\n", "p.csv:1: unknown column 'colour'"),
        ("p.csv", "seed\n1\n", "p.csv:1: no prompt column"),
        ("p.csv", "prompt\na,b\n", "p.csv:2: 2 cells"),
        ("p.txt", "# only comments\n\n", "p.txt holds no prompts"),
    ],
)
def test_bad_files_name_file_and_line(tmp_path: Path, name: str, text: str, message: str) -> None:
    with pytest.raises(PromptFileError) as info:
        read_prompts(_write(tmp_path, name, text))
    assert str(info.value).startswith(f"{tmp_path}{os.sep}{message}"), str(info.value)
    assert info.value.exit_code == 2


def test_missing_and_non_utf8_files(tmp_path: Path) -> None:
    with pytest.raises(PromptFileError, match="does not exist"):
        read_prompts(tmp_path / "none.txt")
    (tmp_path / "latin.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(PromptFileError, match="not UTF-8"):
        read_prompts(tmp_path / "latin.txt")


def test_stdin_is_sniffed_and_format_can_be_forced(tmp_path: Path) -> None:
    assert read_prompts("-", stdin=io.StringIO('# c\n{"prompt": "a", "seed": 1}\n'))[0].seed == 1
    assert read_prompts("-", stdin=io.StringIO("{not json but text\n"), fmt="txt")[0].prompt == "{not json but text"
    assert read_prompts("-", stdin=io.StringIO("\ufeffa fox, in snow\n"))[0].prompt == "a fox, in snow"
    assert read_prompts("-", stdin=io.StringIO("prompt,seed\na,4\n"), fmt="csv")[0].seed == 4
    unknown_extension = _write(tmp_path, "prompts.list", '{"prompt": "x"}\n')
    assert read_prompts(unknown_extension)[0].prompt == "x"


# --- planning ------------------------------------------------------------------------------------------------


def test_default_names_seeds_and_defaults(tmp_path: Path) -> None:
    lines = parse_prompts('{"prompt": "A Red Fox, in snow!"}\n{"prompt": "cat", "name": "cover.png", "seed": 9}\n'
                          '{"prompt": "A Red Fox, in snow!", "steps": 3}\n', "jsonl")
    plan = plan_batch(REF, lines, tmp_path / "out", defaults=SMALL)
    assert [i.name for i in plan.items] == ["0000-a-red-fox-in-snow.png", "cover.png", "0002-a-red-fox-in-snow.png"]
    fox, cat, fox2 = (i.request for i in plan.items)
    assert (fox.seed, cat.seed, fox2.seed) == (prompt_seed("A Red Fox, in snow!"), 9, fox.seed + 1)
    assert (fox.steps, fox2.steps, fox.width) == (2, 3, 32)  # per-line values win over the command's
    assert all(i.action == "new" for i in plan.items) and not (tmp_path / "out").exists()  # planning writes nothing


def test_seed_base_and_template_fields(tmp_path: Path) -> None:
    lines = parse_prompts("a\nb\nc\n", "txt")
    plan = plan_batch(REF, lines, tmp_path, seed=100, name_template="{index:03d}-{seed}-{line}-{steps}.png",
                      defaults=SMALL)
    assert [i.name for i in plan.items] == ["000-100-1-2.png", "001-101-2-2.png", "002-102-3-2.png"]


def test_prompt_seed_is_stable_and_slugs_keep_any_script() -> None:
    assert prompt_seed("a red fox") == prompt_seed("a red fox") != prompt_seed("a red fox", 1)
    assert slugify("一只红色的狐狸 in the snow") == "一只红色的狐狸-in-the-snow"
    assert slugify("!!!") == "prompt"
    long = slugify("word " * 30)
    assert len(long) <= 40 and not long.endswith("-")


@pytest.mark.parametrize(
    ("text", "template", "message"),
    [
        ("a\na\n", "{slug}.png", "<prompts>:2: output name a.png is also the name of line 1"),
        ('{"prompt": "a", "name": "X"}\n{"prompt": "b", "name": "x"}\n', "{name}.png", "is also the name of line 1"),
        ('{"prompt": "a", "name": "../up"}\n', "{name}.png", "<prompts>:1: output name '../up.png' contains a path"),
        ("a\n", "{index}.jpg", "does not end in .png"),
        ("a\n", "{nme}.png", "--name-template '{nme}.png': unknown field {nme}"),
        ("a\n", "{slug.upper}.png", "unknown field {slug.upper}"),
        ('{"prompt": "a", "steps": 0}\n', "{name}.png", '<prompts>:1: "steps" must be between 1 and 1000'),
        ('{"prompt": "a", "width": 99999}\n', "{name}.png", "<prompts>:1: width 99999 is out of range"),
    ],
)
def test_plan_errors_are_exit_2_and_name_the_line(tmp_path: Path, text: str, template: str, message: str) -> None:
    fmt = "jsonl" if text.startswith("{") else "txt"
    with pytest.raises(PromptFileError) as info:
        plan_batch(REF, parse_prompts(text, fmt), tmp_path, name_template=template, defaults=SMALL)
    assert message in str(info.value)
    assert info.value.exit_code == 2


def test_bad_command_options_fail_as_for_one_image(tmp_path: Path) -> None:
    with pytest.raises(qimg.QimgError) as info:
        plan_batch(REF, parse_prompts("a\n", "txt"), tmp_path, defaults={"steps": 0})
    assert not isinstance(info.value, PromptFileError) and "--steps" in str(info.value)


def test_output_folder_parent_must_exist(tmp_path: Path) -> None:
    with pytest.raises(qimg.QimgError, match="does not exist"):
        plan_batch(REF, parse_prompts("a\n", "txt"), tmp_path / "no" / "out", defaults=SMALL)


# --- running -------------------------------------------------------------------------------------------------


class StandIn:
    """A pipeline that draws a flat image and records what it was asked; `fail` prompts raise NumericsError."""

    def __init__(self, fail: tuple[str, ...] = (), on_generate: Any = None) -> None:
        self.requests: list[qimg.GenerateRequest] = []
        self.fail, self.on_generate = fail, on_generate

    def generate(self, *, request: qimg.GenerateRequest, progress: Any = None) -> list[Any]:
        from qimg.errors import NumericsError

        self.requests.append(request)
        if self.on_generate:
            self.on_generate(len(self.requests))
        if request.prompt in self.fail:
            raise NumericsError("the sampler produced NaN or infinite values", hint="use float32")
        image = Image.new("RGB", (request.width, request.height), (request.seed % 256, 0, 0))
        image.info["qimg"] = {**request.as_dict(), "model": "m", "qimg_version": qimg.__version__}
        return [image]


def _plan(folder: Path, text: str = "a\nb\nc\n", **kw: Any) -> qimg.BatchPlan:
    return plan_batch(REF, parse_prompts(text, "txt"), folder, **{"defaults": SMALL, **kw})


def test_run_writes_skips_and_replaces(tmp_path: Path) -> None:
    out = tmp_path / "out"
    pipe = StandIn()
    result = run_batch(_plan(out), pipe)
    assert [i.name for i in result.written] == ["0000-a.png", "0001-b.png", "0002-c.png"]
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["path"] for r in records] == ["0000-a.png", "0001-b.png", "0002-c.png"]
    assert {"prompt", "seed", "steps", "model", "qimg_version", "seconds", "line"} <= set(records[0])
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}

    loads: list[int] = []
    again = run_batch(_plan(out), lambda: loads.append(1) or pipe)
    assert sorted(i.name for i in again.skipped) == sorted(mtimes)
    assert loads == [] and again.written == []  # nothing to do: the model is never loaded
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")} == mtimes

    changed = _plan(out, defaults={**SMALL, "steps": 3})
    assert {i.action for i in changed.items} == {"replace"} and changed.items[0].reason == "steps differ"
    assert _plan(out, overwrite=True).items[0].action == "overwrite"
    run_batch(_plan(out, "a\nb\nc\nd\n"), pipe)  # an appended line: only it runs
    assert [r.prompt for r in pipe.requests[3:]] == ["d"]
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 4


def test_a_file_without_qimg_parameters_is_replaced(tmp_path: Path) -> None:
    (tmp_path / "0000-a.png").write_bytes(b"not a png")
    plan = _plan(tmp_path, "a\n")
    assert (plan.items[0].action, plan.items[0].reason) == ("replace", "it carries no qimg parameters")
    run_batch(plan, StandIn())
    assert qimg.read_params(tmp_path / "0000-a.png")["prompt"] == "a"


def test_failures_are_reported_and_the_batch_goes_on(tmp_path: Path) -> None:
    events: list[qimg.BatchEvent] = []
    result = run_batch(_plan(tmp_path), StandIn(fail=("b",)), on_event=events.append)
    assert [i.name for i in result.written] == ["0000-a.png", "0002-c.png"]
    assert [(i.name, e.message) for i, e in result.failed] == [
        ("0001-b.png", "the sampler produced NaN or infinite values")
    ]
    failed = [e.as_dict() for e in events if e.kind == "failed"]
    assert failed == [{"event": "failed", "path": str(tmp_path / "0001-b.png"), "index": 1, "line": 2,
                       "error": "the sampler produced NaN or infinite values", "hint": "use float32"}]
    assert not (tmp_path / "0001-b.png").exists()
    stopped = run_batch(_plan(tmp_path / "ff"), StandIn(fail=("a",)), fail_fast=True)
    assert len(stopped.failed) == 1 and stopped.written == []  # b and c never ran


def test_sigterm_mid_batch_is_an_interrupt_with_nothing_half_done(tmp_path: Path) -> None:
    before = signal.getsignal(signal.SIGTERM)

    def kill_on_second(n: int) -> None:
        if n == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(KeyboardInterrupt):
        run_batch(_plan(tmp_path), StandIn(on_generate=kill_on_second))
    assert signal.getsignal(signal.SIGTERM) == before  # the handler lasts as long as the batch
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0000-a.png", "manifest.jsonl"]
    assert len((tmp_path / "manifest.jsonl").read_text().splitlines()) == 1


def test_each_image_is_written_while_the_next_one_generates(tmp_path: Path, monkeypatch) -> None:
    import qimg.batch

    next_started = threading.Event()
    overlapped: list[bool] = []
    save = qimg.batch.save_png

    def save_png(image, path, params, *, overwrite):
        overlapped.append(next_started.wait(10))  # False (after 10 s) if the batch waited for this write first
        return save(image, path, params, overwrite=overwrite)

    monkeypatch.setattr(qimg.batch, "save_png", save_png)
    result = run_batch(_plan(tmp_path), StandIn(on_generate=lambda n: n == 2 and next_started.set()))
    assert overlapped == [True, True, True]
    assert [i.name for i in result.written] == ["0000-a.png", "0001-b.png", "0002-c.png"]
    records = [json.loads(line)["path"] for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert records == ["0000-a.png", "0001-b.png", "0002-c.png"]


def test_an_interrupt_during_a_write_lets_it_finish_and_stops_the_batch(tmp_path: Path, monkeypatch) -> None:
    """The signal reaches the main thread while the writer thread writes: the PNG and its manifest line both land,
    and nothing after them."""
    import qimg.batch

    save = qimg.batch.save_png

    def save_png(image, path, params, *, overwrite):
        if path.name == "0000-a.png":
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.3)  # the main thread has the interrupt by now
        return save(image, path, params, overwrite=overwrite)

    monkeypatch.setattr(qimg.batch, "save_png", save_png)
    with pytest.raises(KeyboardInterrupt):
        run_batch(_plan(tmp_path), StandIn(on_generate=lambda n: time.sleep(0.5)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0000-a.png", "manifest.jsonl"]
    assert [json.loads(line)["path"] for line in (tmp_path / "manifest.jsonl").read_text().splitlines()] == [
        "0000-a.png"]


def test_a_failed_write_is_a_failed_item_and_stops_a_fail_fast_run(tmp_path: Path, monkeypatch) -> None:
    import qimg.batch

    save = qimg.batch.save_png

    def save_png(image, path, params, *, overwrite):
        if path.name == "0000-a.png":
            raise OutputError(f"cannot write {path} (No space left on device)")
        return save(image, path, params, overwrite=overwrite)

    monkeypatch.setattr(qimg.batch, "save_png", save_png)
    events: list[qimg.BatchEvent] = []
    pipe = StandIn()
    result = run_batch(_plan(tmp_path), pipe, fail_fast=True, on_event=events.append)
    assert [(i.name, e.message) for i, e in result.failed] == [
        ("0000-a.png", f"cannot write {tmp_path / '0000-a.png'} (No space left on device)")]
    # b was generated while a was being written, so it is written too; c never runs
    assert [r.prompt for r in pipe.requests] == ["a", "b"] and [i.name for i in result.written] == ["0001-b.png"]
    by_item = {name: [e.kind for e in events if e.item.name == name] for name in ("0000-a.png", "0001-b.png")}
    assert by_item == {"0000-a.png": ["start", "failed"], "0001-b.png": ["start", "written"]}
    # b's start and a's failed write may come in either order; what --json prints (not starts) stays in order
    assert [e.kind for e in events if e.kind != "start"] == ["failed", "written"] and len(events) == 4


def test_an_interrupt_inside_a_deferred_section_waits_for_its_end() -> None:
    done = []
    with catch_signals(), pytest.raises(KeyboardInterrupt):
        with deferred_signals():
            os.kill(os.getpid(), signal.SIGINT)
            done.append("section finished")
        done.append("not reached")
    assert done == ["section finished"]


def test_an_interrupt_that_native_code_turned_into_another_error_still_ends_as_an_interrupt() -> None:
    """safetensors' reader, interrupted, raises a ValueError about an UntypedStorage instead: still an interrupt."""

    def native_read() -> None:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
        except KeyboardInterrupt:
            raise ValueError("could not determine the shape of object type 'torch.storage.UntypedStorage'") from None

    with pytest.raises(KeyboardInterrupt, match="SIGTERM"), catch_signals():
        native_read()
    with pytest.raises(ValueError, match="plain"), catch_signals():  # no signal: errors stay what they are
        raise ValueError("plain")


def test_stale_temporaries_are_removed_and_the_folder_is_locked(tmp_path: Path) -> None:
    stale = tmp_path / ".0000-a.png.dead.tmp"
    stale.write_bytes(b"half")
    with folder_lock(tmp_path, create=False), pytest.raises(qimg.QimgError, match="another qimg batch"):
        run_batch(_plan(tmp_path, "a\n"), StandIn())
    run_batch(_plan(tmp_path, "a\n"), StandIn())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0000-a.png", "manifest.jsonl"]


def test_manifest_lines_are_whole(tmp_path: Path) -> None:
    path = tmp_path / "manifest.jsonl"
    path.write_bytes(b'{"path": "a.png"}\n{"path": "b.p')  # a writer killed mid-line
    append_manifest(path, {"path": "c.png", "prompt": "line\nbreak"})
    assert [json.loads(line)["path"] for line in path.read_text().splitlines()] == ["a.png", "c.png"]


def test_outputs_follow_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        run_batch(_plan(tmp_path, "a\n"), StandIn())
    finally:
        os.umask(old)
    assert (tmp_path / "0000-a.png").stat().st_mode & 0o777 == 0o644


# --- several processes (torchrun) sharing one plan: the logic, with threads as the processes -------------------


class ThreadShard:
    """qimg.runtime.distributed.BatchShard's contract over threads: one counter, one barrier, one stop flag."""

    def __init__(self, rank: int, size: int, shared: dict[str, Any]) -> None:
        self.rank, self.shared = rank, shared
        shared.setdefault("lock", threading.Lock())
        shared.setdefault("barrier", threading.Barrier(size))
        shared.setdefault("next", 0)

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        self.shared["barrier"].wait(10)

    def next_item(self, count: int) -> int | None:
        with self.shared["lock"]:
            if self.shared.get("stop"):
                return None
            index, self.shared["next"] = self.shared["next"], self.shared["next"] + 1
        return index if index < count else None

    def stop(self) -> None:
        self.shared["stop"] = True


def _run_sharded(out: Path, text: str, size: int, pipes: list[StandIn], **kw: Any) -> list[qimg.BatchResult]:
    shared: dict[str, Any] = {}
    plans = [_plan(out, text) for _ in range(size)]  # every process plans before any writes (the barrier)
    results: list[Any] = [None] * size

    def rank(r: int) -> None:
        results[r] = run_batch(plans[r], pipes[r], shard=ThreadShard(r, size, shared), **kw)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


def test_sharded_runs_write_each_item_once_as_one_process_would(tmp_path: Path) -> None:
    text = "".join(f"prompt {i}\n" for i in range(9))
    alone = run_batch(_plan(tmp_path / "alone", text), StandIn())
    pipes = [StandIn(on_generate=lambda n: time.sleep(0.01)) for _ in range(3)]
    results = _run_sharded(tmp_path / "out", text, 3, pipes)
    written = sorted(i.name for r in results for i in r.written)
    assert written == sorted(i.name for i in alone.written)  # each line exactly once, same names
    assert all(r.written for r in results)  # the work was shared
    for item in alone.written:
        assert (tmp_path / "out" / item.name).read_bytes() == (tmp_path / "alone" / item.name).read_bytes()
    records = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert sorted(r["path"] for r in records) == written  # one manifest, a whole line per image

    again = _run_sharded(tmp_path / "out", text + "prompt 9\n", 3, [StandIn() for _ in range(3)])
    assert [len(r.skipped) for r in again] == [9, 0, 0]  # the leader reports what is done, once
    assert sorted(i.name for r in again for i in r.written) == ["0009-prompt-9.png"]


def test_sharded_fail_fast_stops_every_process(tmp_path: Path) -> None:
    text = "".join(f"prompt {i}\n" for i in range(12))
    pipes = [StandIn(fail=("prompt 0",), on_generate=lambda n: time.sleep(0.02)) for _ in range(2)]
    results = _run_sharded(tmp_path / "out", text, 2, pipes, fail_fast=True)
    assert sum(len(r.failed) for r in results) == 1
    assert sum(len(r.written) for r in results) < 11  # the other process stopped claiming lines too
