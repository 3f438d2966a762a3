"""qimg generate --prompts: the prompt-file half of generate. A thin layer over qimg.read_prompts, plan_batch and
run_batch: it renders their events as lines for people (stderr) and, with --json, one object per image (stdout)."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from enum import Enum
from pathlib import Path
from typing import Any

import typer

import qimg
from qimg.cli.output import Output, params_token_warnings, show_loaded


class PromptsFormat(str, Enum):
    """How --prompts is read; auto: by extension, else sniffed (JSON Lines if the first line starts with {)."""

    auto = "auto"
    txt = "txt"
    jsonl = "jsonl"
    csv = "csv"


def run_prompt_file(
    out: Output,
    *,
    prompts: Path,
    prompts_format: PromptsFormat,
    folder: Path,
    model: str,
    name_template: str,
    seed: int | None,
    defaults: dict[str, Any],
    overwrite: bool,
    fail_fast: bool,
    json_out: bool,
    runtime: qimg.RuntimeOptions,
    loras: list[tuple[str, float]] | None = None,
    verbose: bool = False,
    transformer: Path | None = None,
) -> None:
    """Check the whole file and plan every output, load the model once (only if something is left to do), run."""
    if folder.suffix.lower() == ".png":
        raise qimg.UsageError(f"with --prompts, -o names a folder (got {folder})", hint="e.g. -o out/")
    lines = qimg.read_prompts(prompts, prompts_format.value)
    ref = qimg.resolve_model(model)
    if transformer is not None:
        ref = qimg.with_transformer(ref, transformer)
    if ref.spec.task != "t2i":
        raise qimg.UsageError(f"{model} is an edit model", hint="prompt files run with text-to-image models")
    source = "<stdin>" if str(prompts) == "-" else str(prompts)
    plan = qimg.plan_batch(
        ref, lines, folder, source=source, name_template=name_template, seed=seed, overwrite=overwrite,
        defaults=defaults, dtype=runtime.dtype, loras=loras or (),
    )
    # Under torchrun every process planned the same file; they then share the work (qimg/runtime/distributed.py).
    world = qimg.world_from_env() if "WORLD_SIZE" in os.environ else None
    if world is not None and source == "<stdin>":
        raise qimg.UsageError("under torchrun, --prompts must name a file (only one process would read stdin)",
                              hint="save the prompts to a file first")
    if world is None:
        failed = run_plan(out, plan, ref, runtime, loras, fail_fast, json_out, verbose, None)
        if failed is not None:
            raise failed
        return
    runtime = dataclasses.replace(runtime, device=qimg.local_device(world, runtime.device))
    shard = qimg.BatchShard(world)
    # Rank 0 speaks for the job (the plan, its own images, the totals); the others show only errors and their
    # --json lines, so N progress bars do not fight over one terminal.
    failed = run_plan(out if world.leader else Output(quiet=True), plan, ref, runtime, loras, fail_fast, json_out,
                      verbose, shard)
    shard.close()  # every rank got here through the totals: they leave together (see leave_world)
    if failed is not None:
        raise failed


def run_plan(out: Output, plan: qimg.BatchPlan, ref: qimg.ModelRef, runtime: qimg.RuntimeOptions,
             loras: list[tuple[str, float]] | None, fail_fast: bool, json_out: bool, verbose: bool,
             shard: Any = None) -> qimg.QimgError | None:
    """Say what the plan holds, load (only if something is left to do), run, and report; with a shard, as one
    of several processes sharing the plan (the totals are the job's). Returns the error to end with when images
    failed (exit 1), for the caller to raise once the processes have parted."""
    source = plan.source
    for item in plan.items:
        for note in item.notes:
            out.warn(f"{source}:{item.line}: {note}")
    hinted: dict[str, None] = {}  # one hint per LoRA file, not one per line
    for item in plan.items:
        hinted.update(dict.fromkeys(qimg.preset_hints(item.loras, item.request)))
    for hint in hinted:
        out.warn(hint)
    # One LoRA set for every line to run: it goes in with the weights (merged under --lora-mode auto). Lines that
    # change LoRAs need them switchable: side branches, attached line by line.
    sets = {item.loras for item in plan.todo}
    at_load = list(next(iter(sets))) if len(sets) == 1 else []
    if len(sets) > 1 and runtime.lora_mode == "merge":
        raise qimg.UsageError("--lora-mode merge needs the same LoRAs on every line, and these lines change them",
                              hint="use --lora-mode auto or branch, or run one batch per LoRA set")
    count = f"{len(plan.items)} prompt{'s' if len(plan.items) != 1 else ''}"
    out.info(f"{count} from {source}: {len(plan.todo)} to generate, {len(plan.skipped)} already done")
    started = time.perf_counter()


    def load() -> Any:
        load_started = time.perf_counter()
        with out.status(f"loading {ref.name}"):
            pipe = qimg.load(ref, runtime, shape=plan.shape, loras=at_load)
        out.info(f"loaded {ref.name} on {pipe.device} ({pipe.dtype}) in {time.perf_counter() - load_started:.1f} s")
        show_loaded(out, pipe, verbose)
        return pipe

    def steps(item: qimg.BatchItem) -> Any:
        return out.steps(f"[{item.index + 1}/{len(plan.items)}] {item.name}")

    def on_event(event: qimg.BatchEvent) -> None:
        item, tag = event.item, f"[{event.position}/{event.total}]"
        for note in event.notes:
            out.warn(f"{source}:{item.line}: {note}")
        if event.kind == "skipped":
            out.info(f"{tag} skipped {item.path} (seed {item.request.seed}, {item.reason})")
        elif event.kind == "start" and item.action != "new":
            out.info(f"{tag} regenerating {item.path} ({item.reason})")
        elif event.kind == "written":
            out.info(f"{tag} wrote {item.path} (seed {item.request.seed}, {_seconds(event.seconds)})")
            for warning in params_token_warnings(event.params):
                out.warn(f"{source}:{item.line}: {warning}")
        elif event.kind == "failed" and event.error is not None:
            out.error(f"{source}:{item.line}: {event.error.message}", event.error.hint)
        if json_out and event.kind != "start":
            typer.echo(json.dumps(event.as_dict(), ensure_ascii=False))  # echo flushes: consumers see it now

    result = qimg.run_batch(plan, load, steps=steps, on_event=on_event, fail_fast=fail_fast, shard=shard)
    done = {"written": len(result.written), "skipped": len(result.skipped), "failed": len(result.failed)}
    if shard is not None:
        done = shard.totals(done)
    counts = f"{done['written']} written, {done['skipped']} skipped, {done['failed']} failed"
    manifest = f"; manifest {plan.manifest}" if done["written"] else ""
    out.info(f"done: {counts} in {time.perf_counter() - started:.1f} s{manifest}")
    if result.failed or (done["failed"] and (shard is None or shard.leader)):
        stopped = len(plan.todo) - done["written"] - done["failed"]
        return qimg.QimgError(
            f"{done['failed']} of {len(plan.items)} images failed"
            + (f"; stopped with {stopped} not run (--fail-fast)" if stopped else ""),
            hint="rerun the same command to retry: finished images are skipped",
        )
    return None


def _seconds(seconds: float | None) -> str:
    """A duration for people: tenths above a second, milliseconds below (a fast image is not "0.0 s")."""
    if seconds is None:
        return "-"
    return f"{seconds:.1f} s" if seconds >= 1 else f"{seconds * 1000:.0f} ms"
