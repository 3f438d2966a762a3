"""The stderr renderer on its own: quiet mode, one-line messages, the step bar fed by cb(i, n)."""

from __future__ import annotations

import io

from rich.console import Console

from qimg.cli.output import Output


def _console(terminal: bool) -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, force_terminal=terminal, width=40, color_system=None), buf


def test_messages_stay_on_one_line_and_markup_is_literal() -> None:
    console, buf = _console(terminal=False)
    out = Output(console=console)
    long = "x" * 100 + " [bold]not markup[/bold]"
    out.error(long, "do this")
    out.warn("snapped")
    assert buf.getvalue().splitlines() == [f"error: {long}", "hint: do this", "warning: snapped"]


def test_quiet_keeps_only_errors() -> None:
    console, buf = _console(terminal=True)
    out = Output(quiet=True, console=console)
    out.info("a")
    out.note("b")
    out.warn("c")
    with out.status("loading"), out.steps("denoising") as cb:
        cb(1, 2)
        cb(2, 2)
    out.error("bad")
    assert buf.getvalue() == "error: bad\n"


def test_step_bar_on_a_terminal() -> None:
    console, buf = _console(terminal=True)
    out = Output(console=console)
    assert out.live
    with out.steps("denoising") as cb:
        for i in range(1, 4):
            cb(i, 3)
    assert "3/3" in buf.getvalue()


def test_no_live_widgets_in_a_pipe() -> None:
    console, buf = _console(terminal=False)
    out = Output(console=console)
    assert not out.live
    with out.status("loading"), out.steps("denoising") as cb:
        cb(1, 1)
    assert buf.getvalue() == ""
