"""Prompt-file batches: plan every output of a prompt file (read by qimg/prompt_files.py) before any model loads
(name, seed, already done or not), then run the plan with atomic PNGs, a manifest line per image, and interrupts
that finish nothing half-way.

Torch-free on purpose: the whole file is checked in milliseconds, so a typo on line 900 costs no GPU time.

    lines = qimg.read_prompts("prompts.jsonl")
    plan = qimg.plan_batch(qimg.resolve_model("Qwen-Image"), lines, "out/", seed=100)
    result = qimg.run_batch(plan, lambda: qimg.load(plan.model_ref))
"""

from __future__ import annotations

import hashlib
import re
import string
import threading
import time
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from qimg.errors import InputError, OutputError, QimgError
from qimg.jobs import check_loras
from qimg.png import check_output_path, read_params, save_png
from qimg.prompt_files import PromptFileError, PromptLine
from qimg.request import GenerateRequest, make_request
from qimg.runtime.planner import RequestShape
from qimg.safety import append_manifest, catch_signals, deferred_signals, folder_lock, remove_stale_temporaries

# {name} is the line's own name when it has one, else "{index:04d}-{slug}": so the default names lines that
# carry a name after it, and every other line after its position and prompt.
DEFAULT_NAME_TEMPLATE = "{name}.png"
TEMPLATE_FIELDS = ("index", "line", "name", "slug", "seed", "steps", "cfg", "width", "height")
SLUG_LENGTH = 40
MANIFEST_NAME = "manifest.jsonl"
# What decides the pixels, so what an existing output must match to be skipped. Not the qimg version, the
# device or the timing: an upgrade would otherwise re-render every asset set a cron job keeps, for numerical
# noise rather than a different picture (--overwrite re-renders on purpose). The dtype counts only when asked
# for explicitly (plan_batch(dtype=...)), since the default depends on the machine that runs the batch.
COMPARED_KEYS = ("prompt", "negative", "seed", "steps", "cfg", "width", "height", "max_sequence_length", "strength",
                 "preset", "model")


# --- planning ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchItem:
    """One planned output: what to generate, where, and whether it must run."""

    index: int  # 0-based position among the prompts (not the file line)
    line: int
    name: str
    path: Path
    request: GenerateRequest
    action: str  # "new", "replace" (parameters differ), "overwrite" (--overwrite) or "skip" (already done)
    reason: str = ""  # for people: why replaced or skipped
    notes: tuple[str, ...] = ()  # make_request's notes (snapped sizes)
    loras: tuple[tuple[str, float], ...] | None = None  # (absolute path, scale) this image is made with


@dataclass(frozen=True)
class BatchPlan:
    """Every output of a prompt file, decided before anything runs."""

    source: str
    folder: Path
    model_ref: Any  # the qimg.ModelRef the batch was planned for
    items: tuple[BatchItem, ...]

    @property
    def todo(self) -> list[BatchItem]:
        return [item for item in self.items if item.action != "skip"]

    @property
    def skipped(self) -> list[BatchItem]:
        return [item for item in self.items if item.action == "skip"]

    @property
    def manifest(self) -> Path:
        return self.folder / MANIFEST_NAME

    @property
    def shape(self) -> RequestShape:
        """The memory shape to load for: the largest image left to make, with CFG if any line uses it (a
        larger image re-plans when it comes)."""
        requests = [item.request for item in self.todo] or [item.request for item in self.items]
        if not requests:
            return RequestShape()
        return RequestShape(width=max(r.width for r in requests), height=max(r.height for r in requests),
                            cfg=any(r.cfg_enabled for r in requests))


def prompt_seed(prompt: str, occurrence: int = 0) -> int:
    """The seed of a line that has none and no --seed base: the first 32 bits of SHA-256 of the prompt (UTF-8),
    plus one for each earlier line with the same prompt. Stable across reruns and across edits elsewhere in
    the file, and repeated prompts still give different pictures."""
    digest = hashlib.sha256(prompt.encode("utf-8")).digest()
    return (int.from_bytes(digest[:4], "big") + occurrence) % 2**32


def slugify(text: str, limit: int = SLUG_LENGTH) -> str:
    """Lower-case words joined by "-", at most `limit` characters, cut at a word boundary; letters of any
    script are kept (Qwen-Image prompts are often Chinese), everything else becomes a separator."""
    slug = re.sub(r"[\W_]+", "-", unicodedata.normalize("NFKC", text).casefold()).strip("-")
    if len(slug) > limit:
        cut = slug[:limit]
        slug = cut.rsplit("-", 1)[0] if "-" in cut else cut
    return slug or "prompt"


def check_name_template(template: str) -> None:
    """Reject unknown fields (and attribute or index access) before any line is read."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise PromptFileError(f"--name-template {template!r}: {e}") from None
    for _, field_name, _, _ in parsed:
        if field_name is not None and field_name not in TEMPLATE_FIELDS:
            raise PromptFileError(f"--name-template {template!r}: unknown field {{{field_name}}}",
                                  hint="fields: " + ", ".join("{" + f + "}" for f in TEMPLATE_FIELDS))


def _check_name(name: str, where: str, template: str) -> None:
    problem = None
    if not name.lower().endswith(".png") or name.lower() == ".png":
        problem = "does not end in .png"
    elif any(c in "/\\" or unicodedata.category(c) == "Cc" for c in name):
        problem = "contains a path separator or a control character"
    elif name.startswith("."):
        problem = "starts with a dot"  # hidden, and the namespace of qimg's temporary files
    elif len(name.encode("utf-8")) > 255:
        problem = "is longer than 255 bytes"
    if problem:
        raise PromptFileError(f"{where}: output name {name!r} {problem}",
                              hint=f"check the line's name and --name-template {template!r}")


def _stored_params(path: Path) -> dict[str, Any] | None:
    try:
        return read_params(path) or None
    except QimgError:
        return None


def plan_batch(
    model_ref: Any,
    lines: list[PromptLine],
    folder: str | Path,
    *,
    source: str = "<prompts>",
    name_template: str = DEFAULT_NAME_TEMPLATE,
    seed: int | None = None,
    overwrite: bool = False,
    defaults: dict[str, Any] | None = None,
    dtype: str | None = None,
    loras: Sequence[tuple[str | Path, float]] = (),
) -> BatchPlan:
    """Validate every line against the model's spec and decide each output (see COMPARED_KEYS for "done").

    model_ref: a qimg.ModelRef (its spec validates, its name is recorded and compared). seed: the base (line i
    gets seed + i); without it and without a per-line seed, prompt_seed. defaults: the command's negative,
    steps, cfg, width, height, used where a line leaves them out. Raises PromptFileError (exit 2) naming the
    file and line; the command's own options are checked first and fail as they would for one image.
    """
    spec = model_ref.spec
    defaults = {k: v for k, v in (defaults or {}).items() if v is not None}
    check_name_template(name_template)
    make_request(spec, "check", seed=seed, **defaults)  # a bad --steps is the option's fault, not line 1's
    out = _check_folder(Path(folder).expanduser())
    wanted_extra = {"model": model_ref.name, **({"dtype": dtype} if dtype else {})}
    keys = COMPARED_KEYS + (("dtype",) if dtype else ())
    # A single-file transformer is other weights: another image. Compared by the file's path as recorded (None:
    # the folder's own weights, as in images made without one).
    transformer = getattr(model_ref, "transformer", None)
    wanted_extra["transformer"] = None if transformer is None else str(transformer)
    keys += ("transformer",)
    items: list[BatchItem] = []
    taken: dict[str, int] = {}
    seen: dict[str, int] = {}
    for index, pl in enumerate(lines):
        where = f"{source}:{pl.line}"
        occurrence = seen.get(pl.prompt, 0)
        seen[pl.prompt] = occurrence + 1
        line_seed = pl.seed if pl.seed is not None else (
            seed + index if seed is not None else prompt_seed(pl.prompt, occurrence))
        options = {k: getattr(pl, k) for k in ("negative", "steps", "cfg", "width", "height", "preset")}
        # A line's preset is more specific than the command's --steps/--cfg: it brings its own unless the line
        # gives them too.
        base = {k: v for k, v in defaults.items() if pl.preset is None or k not in ("steps", "cfg")}
        options = {**base, **{k: v for k, v in options.items() if v is not None}}
        try:
            request, notes = make_request(spec, pl.prompt, seed=line_seed, **options)
        except InputError as e:
            raise PromptFileError(f"{where}: {_line_fields(e.message)}", hint=e.hint) from None
        try:
            item_loras = tuple(check_loras(pl.loras if pl.loras is not None else loras))
        except QimgError as e:
            raise PromptFileError(f"{where}: {e.message}", hint=e.hint) from None
        slug = slugify(pl.prompt)
        own = re.sub(r"\.png$", "", pl.name, flags=re.IGNORECASE) if pl.name else None
        fields = {"index": index, "line": pl.line, "slug": slug, "name": own or f"{index:04d}-{slug}",
                  "seed": request.seed, "steps": request.steps, "cfg": request.cfg, "width": request.width,
                  "height": request.height}
        try:
            name = name_template.format_map(fields)
        except (ValueError, TypeError) as e:
            raise PromptFileError(f"--name-template {name_template!r} fails on {where}: {e}") from None
        _check_name(name, where, name_template)
        folded = name.casefold()  # macOS and Windows folders do not tell "A.png" from "a.png"
        if folded in taken:
            raise PromptFileError(f"{where}: output name {name} is also the name of line {taken[folded]}",
                                  hint="give the lines different names, or put {index} in --name-template")
        taken[folded] = pl.line
        path = out / name
        if path.is_dir():
            raise PromptFileError(f"{where}: {path} is a folder")
        action, reason = "new", ""
        if path.exists():
            stored = _stored_params(path)
            wanted = {**request.as_dict(), **wanted_extra}
            differ = [k for k in keys if stored is not None and stored.get(k) != wanted.get(k)]
            if stored is not None and _stored_loras(stored) != list(item_loras):
                differ.append("loras")
            if overwrite:
                action, reason = "overwrite", "--overwrite"
            elif stored is None:
                action, reason = "replace", "it carries no qimg parameters"
            elif differ:
                action, reason = "replace", f"{', '.join(differ)} differ"
            else:
                action, reason = "skip", "unchanged"
        items.append(BatchItem(index, pl.line, name, path, request, action, reason, tuple(notes), item_loras))
    plan = BatchPlan(source, out, model_ref, tuple(items))
    if plan.todo:  # a real probe now, rather than the same failure on every line later
        check_output_path((out if out.is_dir() else out.parent) / "qimg-write-probe.png", overwrite=True)
    return plan


def _stored_loras(stored: dict[str, Any]) -> list[tuple[str, float]]:
    """The (path, scale) pairs an image was made with, as qimg recorded them (none: [])."""
    items = stored.get("loras")
    if not isinstance(items, list):
        return []
    return [(str(i.get("path")), float(i.get("scale", 1.0))) for i in items if isinstance(i, dict)]


def _line_fields(message: str) -> str:
    """A request error in a prompt file's words: the line's "steps" key, not the --steps option."""
    return re.sub(r"--([a-z][a-z-]*)", lambda m: '"' + m.group(1).replace("-", "_") + '"', message)


def _check_folder(folder: Path) -> Path:
    """The output folder may be missing (run_batch creates it) but its parent must exist: a typo in a cron
    line should fail, not grow a tree of folders somewhere."""
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder} is not a folder", hint="with --prompts, -o names the output folder")
    parent = folder if folder.exists() else folder.parent
    if not parent.is_dir():
        raise OutputError(f"output folder {parent} does not exist", hint=f"create it first: mkdir -p {parent}")
    return folder


# --- running -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchEvent:
    """What happened to one item; as_dict() is the --json line."""

    kind: str  # "skipped", "start", "written" or "failed"
    item: BatchItem
    position: int  # 1-based among all items, for "[3/10]" displays
    total: int
    params: dict[str, Any] = field(default_factory=dict)  # written: everything stored in the PNG
    error: QimgError | None = None
    seconds: float | None = None
    notes: tuple[str, ...] = ()  # start: what people should know first (a LoRA whose keys partly matched)

    def as_dict(self) -> dict[str, Any]:
        head = {"event": self.kind, "path": str(self.item.path), "index": self.item.index, "line": self.item.line}
        if self.kind == "written":
            return {**head, **self.params, "seconds": self.seconds}
        if self.kind == "failed" and self.error is not None:
            return {**head, "error": self.error.message, "hint": self.error.hint}
        return {**head, "action": self.item.action, "reason": self.item.reason}


@dataclass
class BatchResult:
    """What a batch run did."""

    written: list[BatchItem] = field(default_factory=list)
    skipped: list[BatchItem] = field(default_factory=list)
    failed: list[tuple[BatchItem, QimgError]] = field(default_factory=list)


Progress = Callable[[int, int], None]


class Shard(Protocol):
    """A batch shared by several processes (qimg.runtime.distributed.BatchShard under torchrun)."""

    @property
    def leader(self) -> bool: ...
    def barrier(self) -> None: ...
    def next_item(self, count: int) -> int | None: ...
    def stop(self) -> None: ...


def run_batch(
    plan: BatchPlan,
    pipeline: Any,
    *,
    steps: Callable[[BatchItem], AbstractContextManager[Progress]] | None = None,
    on_event: Callable[[BatchEvent], None] | None = None,
    fail_fast: bool = False,
    shard: Shard | None = None,
) -> BatchResult:
    """Run a plan: skip what is done, generate the rest in order, write each PNG atomically and then its
    manifest line, on a second thread while the next image generates. pipeline: a loaded pipeline, or a function
    that loads one, called only when something is left to generate (so a finished batch never loads the model).
    steps(item) gives a context manager that yields a per-step progress callback. on_event is called from either
    thread, one call at a time; its "skipped", "written" and "failed" events come in item order, "start" events
    may come before the previous item's "written". A QimgError on one item (e.g. NaN output) is reported as a
    "failed" event and the batch goes on unless fail_fast. SIGINT and SIGTERM raise KeyboardInterrupt, never
    between a PNG and its manifest line; the folder is locked against a second batch writing into it.

    With a shard, this is one of several processes running the same plan: the leader locks and cleans the
    folder and reports the skipped items; then every process takes the next unclaimed item until none is left,
    so each runs exactly once, on whichever process is free first. Every process must have planned before it
    gets here (the shard's barrier orders the first write after every plan)."""
    result = BatchResult()
    emitting = threading.Lock()

    def emit(event: BatchEvent) -> None:
        if on_event is not None:
            with emitting:
                on_event(event)

    total = len(plan.items)
    leader = shard is None or shard.leader
    lock = folder_lock(plan.folder, create=bool(plan.todo)) if leader else nullcontext()
    with catch_signals(), lock:
        if leader:
            remove_stale_temporaries(plan.folder, [item.name for item in plan.todo])
        if shard is not None:
            shard.barrier()
        pipe = None
        writer = _Writer()

        def in_order(event: BatchEvent) -> None:  # after the write in flight reports, as a one-thread run would
            writer.wait()
            emit(event)

        try:
            for position, item in _positions(plan, shard):
                if item.action == "skip":
                    result.skipped.append(item)
                    in_order(BatchEvent("skipped", item, position, total))
                    continue
                if pipe is None:
                    pipe = pipeline() if callable(pipeline) else pipeline
                try:
                    emit(BatchEvent("start", item, position, total, notes=_apply_loras(pipe, item)))
                    started = time.perf_counter()
                    image = _generate_one(item, pipe, steps)
                except QimgError as e:
                    result.failed.append((item, e))
                    in_order(BatchEvent("failed", item, position, total, error=e))
                    if fail_fast:
                        break
                    continue
                # The hand-off is one piece: an interrupt inside it could lose track of the write it starts.
                with deferred_signals():
                    writer.submit(partial(_write_one, plan, item, image, started, position, result, emit))
                # A failed write stops a --fail-fast run here, one image later than a failed generation would (the
                # image generated meanwhile is still written).
                if fail_fast and writer.failed:
                    break
        finally:
            writer.close()
        if fail_fast and result.failed and shard is not None:
            shard.stop()
    return result


class _Writer:
    """Writes each finished image (its PNG, then its manifest line) on one thread while the main thread generates
    the next: encoding a 1024x1024 PNG took 0.2-0.25 s on an H200 host (bench/results/first_image_*_h200.json),
    a fifth of a Lightning image. One write at a time, in order. The PNG and its line are still both written or
    neither: an interrupt arriving meanwhile reaches the main thread, which waits for the write to end before the
    interrupt goes on (signals are only ever handled there)."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future[bool] | None = None
        self.failed = False  # a write that has ended returned False

    def submit(self, write: Callable[[], bool]) -> None:
        """Start `write` (which returns whether it wrote) once the write in flight has ended."""
        self.wait()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="qimg-write")
        self._pending = self._pool.submit(write)

    def wait(self) -> None:
        """Until the write in flight (if any) has ended; what it raised is raised here. An interrupt meanwhile is
        raised once the write has ended."""
        pending, self._pending = self._pending, None
        interrupt: KeyboardInterrupt | None = None
        while pending is not None and not pending.done():
            try:
                futures_wait([pending])
            except KeyboardInterrupt as e:
                interrupt = e
        if interrupt is not None:
            raise interrupt
        if pending is not None and pending.result() is False:
            self.failed = True

    def close(self) -> None:
        """wait(), then let the thread go."""
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=False)
                self._pool = None


def _write_one(plan: BatchPlan, item: BatchItem, image: Any, started: float, position: int, result: BatchResult,
               emit: Callable[[BatchEvent], None]) -> bool:
    """The PNG, then its manifest line; a QimgError (a full disk, say) fails the item, as a generation error does.
    Returns whether it was written."""
    params = dict(image.info.get("qimg", {}))
    try:
        save_png(image, item.path, params, overwrite=item.action != "new")
    except QimgError as e:
        result.failed.append((item, e))
        emit(BatchEvent("failed", item, position, len(plan.items), error=e))
        return False
    seconds = round(time.perf_counter() - started, 3)
    record = {"path": item.name, "index": item.index, "line": item.line, "source": plan.source, **params,
              "seconds": seconds, "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    append_manifest(plan.manifest, record)
    result.written.append(item)
    emit(BatchEvent("written", item, position, len(plan.items), {**params, "seconds": seconds}, seconds=seconds))
    return True


def _positions(plan: BatchPlan, shard: Shard | None) -> Iterator[tuple[int, BatchItem]]:
    """(1-based position, item) in the order this process handles them: all, in order, without a shard; with
    one, the skipped items on the leader only, then the items to run as this process claims them."""
    numbered = list(enumerate(plan.items, 1))
    if shard is None:
        yield from numbered
        return
    if shard.leader:
        yield from ((position, item) for position, item in numbered if item.action == "skip")
    todo = [(position, item) for position, item in numbered if item.action != "skip"]
    while (index := shard.next_item(len(todo))) is not None:
        yield todo[index]


def _apply_loras(pipe: Any, item: BatchItem) -> tuple[str, ...]:
    """Attach the item's LoRAs (the pipeline keeps the ones already there); notes for partly matched files."""
    if item.loras is None or not hasattr(pipe, "apply_loras"):
        return ()
    return tuple(f"{f.path.name}: {len(f.unmatched)} key(s) matched no module of the model and were ignored"
                 for f in pipe.apply_loras(item.loras) if f.unmatched)


def _generate_one(item: BatchItem, pipe: Any, steps: Callable[..., Any] | None) -> Any:
    with steps(item) if steps is not None else _no_steps() as progress:
        if hasattr(pipe, "on_stage"):  # a progress display that names the stages around the denoising steps
            pipe.on_stage = getattr(progress, "stage", None)
        images = pipe.generate(request=item.request, progress=progress)
    return images[0]


@contextmanager
def _no_steps() -> Iterator[None]:
    yield None
