"""What the CLI shows people: one rich console on stderr, quiet mode, a model-loading spinner and a step bar.

Everything goes to stderr so that stdout stays free for machine-readable output (and for `--version`).
Live widgets (spinner, bar) appear only on a terminal: in a pipe or a CI log they would be noise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from qimg import PROMPT_TOKEN_LIMIT

StepCallback = Callable[[int, int], None]


class RateColumn(ProgressColumn):
    """Steps per second, or seconds per step when slower than one a second (the usual case on CPU)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        if not speed:
            return Text("-- it/s", style="progress.data.speed")
        text = f"{speed:.2f} it/s" if speed >= 1 else f"{1 / speed:.2f} s/it"
        return Text(text, style="progress.data.speed")


class Output:
    """The stderr side of one command run; `quiet` silences everything except errors."""

    def __init__(self, quiet: bool = False, console: Console | None = None) -> None:
        self.quiet = quiet
        # highlight off: rich would colour numbers and paths inside our plain sentences at random.
        self.console = console or Console(stderr=True, highlight=False)

    @property
    def live(self) -> bool:
        """Whether spinners and progress bars should be drawn."""
        return not self.quiet and self.console.is_terminal

    def _line(self, prefix: str, style: str, message: str) -> None:
        text = Text.assemble((prefix, style), " ", message) if prefix else Text(message)
        # soft_wrap: a message must stay one line (greppable, and tests count lines) whatever the width.
        self.console.print(text, soft_wrap=True)

    def info(self, message: str) -> None:
        """A plain progress line (not shown with --quiet)."""
        if not self.quiet:
            self._line("", "", message)

    def note(self, message: str) -> None:
        """Something the user should know but did not ask about (not shown with --quiet)."""
        if not self.quiet:
            self._line("note:", "cyan", message)

    def warn(self, message: str) -> None:
        """A changed or doubtful input, e.g. a snapped width (not shown with --quiet)."""
        if not self.quiet:
            self._line("warning:", "bold yellow", message)

    def always(self, message: str) -> None:
        """A bare line shown even with --quiet (e.g. "interrupted")."""
        self._line("", "", message)

    def error(self, message: str, hint: str | None = None) -> None:
        """One error line and an optional hint line; shown even with --quiet."""
        self._line("error:", "bold red", message)
        if hint:
            self._line("hint:", "bold", hint)

    def traceback(self, text: str) -> None:
        """A formatted traceback, printed verbatim so that it can be pasted into a bug report."""
        self.console.print(Text(text.rstrip("\n")), soft_wrap=True)

    @contextmanager
    def status(self, message: str) -> Iterator[None]:
        """A spinner while something slow without steps runs (loading a model)."""
        if not self.live:
            yield
            return
        with self.console.status(message):
            yield

    @contextmanager
    def steps(self, description: str, *, eta: bool = False) -> Iterator[StepBar]:
        """A progress bar fed by the sampler callback cb(i, n), i = steps done so far (1..n); cb.stage(name)
        names the stage of the run the bar stands in (the prompt, the input image, decoding); cb.info(text)
        shows a few words after the rate (training: the loss and GPU memory). eta: also the time left."""
        if not self.live:
            yield StepBar(_ignore_steps, lambda name: None)
            return
        progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            *([TimeRemainingColumn()] if eta else []),
            RateColumn(),
            TextColumn("{task.fields[info]}"),
            console=self.console,
            transient=False,
        )
        task = progress.add_task(description, total=None, info="")

        def update(i: int, n: int) -> None:
            progress.update(task, completed=min(i, n), total=n)

        def stage(name: str) -> None:
            words = STAGES.get(name)
            progress.update(task, description=description if words is None else f"{description}: {words}")

        with progress:
            yield StepBar(update, stage, lambda text: progress.update(task, info=text))


# What the bar says while a run is not denoising (it would otherwise read "0/?" or sit full without a word).
STAGES = {"prompt": "encoding the prompt", "encode": "encoding the input image", "decode": "decoding"}


class StepBar:
    """The sampler's step callback cb(i, n), plus cb.stage(name) for the stages around the denoising steps."""

    def __init__(self, update: StepCallback, stage: Callable[[str], None],
                 info: Callable[[str], None] = lambda text: None) -> None:
        self._update, self.stage, self.info = update, stage, info

    def __call__(self, i: int, n: int) -> None:
        self._update(i, n)


def _ignore_steps(i: int, n: int) -> None:
    """The callback when no bar is drawn; the pipeline always gets a callable."""


MAX_SEQUENCE_LENGTH = 1024  # the most prompt tokens --max-sequence-length lets the text encoder keep


def dropped_token_warnings(dropped: dict[str, int], max_sequence_length: int, family: str | None = None
                           ) -> list[str]:
    """One warning per prompt whose last tokens the text encoder dropped; `dropped` maps "prompt" / "negative" to
    a count, as image parameters (prompt_tokens_dropped, negative_tokens_dropped) or embeddings meta record it;
    family: the model family, whose text encoder limit the hint names."""
    longest = PROMPT_TOKEN_LIMIT.get(family or "", MAX_SEQUENCE_LENGTH)
    more = f"; --max-sequence-length up to {longest} keeps more" if max_sequence_length < longest else ""
    return [
        f"the {what} is {n + max_sequence_length} tokens; the last {n} were dropped "
        f"(the model reads {max_sequence_length}{more})"
        for key, what in (("prompt", "prompt"), ("negative", "negative prompt"))
        if (n := int(dropped.get(key) or 0)) > 0
    ]


def params_token_warnings(params: dict[str, Any]) -> list[str]:
    """dropped_token_warnings for the parameters of a generated image (image.info["qimg"])."""
    dropped = {key: params.get(f"{key}_tokens_dropped", 0) for key in ("prompt", "negative")}
    return dropped_token_warnings(dropped, int(params.get("max_sequence_length") or 512), params.get("model_family"))


def process_seconds() -> float | None:
    """Seconds since this process started (Linux: /proc), so a time to first image counts the interpreter and the
    imports too; None where the system does not say."""
    import os
    from pathlib import Path

    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start time in clock ticks
    except (OSError, ValueError, IndexError):
        return None


def timings_line(params: dict[str, Any], load: float, write: float, total: float | None) -> str:
    """One line of where an image's time went: load, the pipeline's phases (image metadata "timings"), write."""
    phases = dict(params.get("timings") or {})
    parts = [f"load {load:.2f} s"] + [f"{name} {seconds:.2f} s" for name, seconds in phases.items()]
    steps = params.get("steps")
    if steps and "denoise" in phases:
        parts[1 + list(phases).index("denoise")] += f" ({phases['denoise'] / steps:.3f} s/step)"
    parts.append(f"write {write:.2f} s")
    return "time: " + ", ".join(parts) + ("" if total is None else f"; {total:.1f} s since the process started")


def show_plan(out: Output, pipe: Any) -> None:
    """--verbose: which spec runs the model (and which files chose it), then the memory plan of a loaded
    pipeline, a line per component and phase."""
    ref = getattr(pipe, "ref", None)
    if ref is not None and getattr(ref, "chosen_by", ""):
        out.info(f"model: {ref.path} runs as {ref.spec.name}, chosen by {ref.chosen_by}")
    if pipe.plan is None or pipe.needs is None:
        return
    if str(pipe.device).startswith("cpu"):  # a GPU plan's budget and peaks mean nothing for a CPU run
        needs = pipe.needs
        parts = [needs.transformer, needs.vae] + ([needs.text_encoder] if needs.text_encoder else [])
        total = sum(p.weights for p in parts) / 1024**3
        out.info(f"memory: a CPU run keeps every component in host memory ({total:.1f} GiB of weights)")
        return
    for line in pipe.plan.describe(pipe.needs):
        out.info(line)


def show_loaded(out: Output, pipe: Any, verbose: bool) -> None:
    """What loading decided: its notes, the memory plan (--verbose), and each LoRA loaded with the model."""
    for note in getattr(pipe, "notes", ()):
        out.info(note)
    if verbose:
        show_plan(out, pipe)
    adapters = getattr(pipe, "adapters", None)
    for attached in adapters.attached.values() if adapters is not None else ():
        show_lora(out, attached.file, verbose, "merged into the weights" if attached.merged else "side branch")


def show_lora(out: Output, lora: Any, verbose: bool, how: str = "side branch") -> None:
    """A LoRA just attached: its summary and how it applies with --verbose; keys that matched nothing always (a
    partial match)."""
    if verbose:
        out.info(f"lora: {lora.summary()}, {how}")
    if lora.unmatched:
        keys = ", ".join(lora.unmatched[:3]) + (", ..." if len(lora.unmatched) > 3 else "")
        out.warn(f"{lora.path.name}: {len(lora.unmatched)} key(s) matched no module of the model and were "
                 f"ignored ({keys})")
