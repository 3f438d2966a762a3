"""The qimg command line: one Typer app, its global options, and THE place where exceptions become
messages and exit codes (0 ok, 1 qimg error, 2 usage, 130 interrupted).

Commands raise; they never print errors or pick exit codes themselves. Every command is registered
through `guarded`, so its exceptions are mapped here, inside Typer's run loop: outside it, Typer would
already have turned Ctrl-C into a silent exit and other exceptions into its own tracebacks.
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer
from typer.core import TyperGroup

import qimg
from qimg.cli.commands import bench, download, edit, encode_prompt, generate, lora, models, train, vae
from qimg.cli.commands import info as info_command
from qimg.cli.output import Output

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C
DEBUG_ENV = "QIMG_DEBUG"

F = TypeVar("F", bound=Callable[..., Any])

ROOT_EXAMPLES = """\
Examples:

\b
  qimg download qwen-image
  qimg generate "a lighthouse at dusk, oil painting" -o lighthouse.png --model qwen-image
  QIMG_MODEL=qwen-image qimg generate --prompts prompts.txt -o out/ --seed 100
  qimg edit "make the sky purple" -i street.png -o purple.png --model qwen-image-edit-2511
  qimg info lighthouse.png
  qimg generate --help
"""

class QimgGroup(TyperGroup):
    """Typer's command group, with usage errors shown as qimg shows every error: the problem on the first line
    (not Click's usage banner), then a hint, exit code 2."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except Exception as exc:
            kind = type(exc).__name__
            if kind == "Abort":  # Ctrl-C while Click itself was parsing or prompting
                sys.exit(report(KeyboardInterrupt()))
            if kind == "NoArgsIsHelpError" or not hasattr(exc, "format_message"):
                if hasattr(exc, "show"):  # Click's own display (the help for a bare command)
                    exc.show()
                    sys.exit(getattr(exc, "exit_code", 2))
                raise
            ctx = getattr(exc, "ctx", None)
            Output().error(exc.format_message(), f"see: {ctx.command_path if ctx else 'qimg'} --help")
            sys.exit(getattr(exc, "exit_code", 2))
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    name="qimg",
    cls=QimgGroup,
    epilog=ROOT_EXAMPLES,
    no_args_is_help=True,
    # Plain click-style help: compact, keeps the examples' indentation, and is what docs/cli.md holds
    # verbatim; rich panels would wrap inside boxes. Usage errors then read "Error: ...", like ours.
    rich_markup_mode=None,
    # Our own mapping below decides what an exception looks like; Typer's pretty tracebacks would
    # bypass it for errors raised outside a command (e.g. in an option callback).
    pretty_exceptions_enable=False,
)


def debug_from_env() -> bool:
    """QIMG_DEBUG=1 (any value but empty or 0) asks for tracebacks without touching the command line."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def report(exc: BaseException, *, debug: bool = False) -> int:
    """Print `exc` for people and return the exit code; the only function that maps exceptions."""
    out = Output()
    if debug:
        out.traceback("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    if isinstance(exc, KeyboardInterrupt):
        out.always("interrupted")
        return EXIT_INTERRUPTED
    if isinstance(exc, qimg.QimgError):
        out.error(exc.message, exc.hint)
        return exc.exit_code
    if _is_cuda_oom(exc):
        out.error("the GPU ran out of memory", OOM_HINT)
        return EXIT_ERROR
    detail = str(exc)
    out.error(
        f"internal error: {type(exc).__name__}" + (f": {detail}" if detail else ""),
        None if debug else "rerun with --debug for the traceback and report it",
    )
    return EXIT_ERROR


OOM_HINT = ("large images: --tiled-vae; less weight memory: --fp8 weights; or a smaller --width/--height; "
            "other programs on the GPU count too (nvidia-smi)")


def _is_cuda_oom(exc: BaseException) -> bool:
    """torch.cuda.OutOfMemoryError, recognised without importing torch (the CLI never does)."""
    return any(c.__name__ == "OutOfMemoryError" and c.__module__.startswith("torch") for c in type(exc).__mro__)


def _debug_requested(kwargs: dict[str, Any]) -> bool:
    """--debug on the command, --debug before it (root options), or QIMG_DEBUG."""
    if kwargs.get("debug") or debug_from_env():
        return True
    # Typer passes the click context (not an instance of the typer.Context annotation), so duck-type it.
    ctx = kwargs.get("ctx")
    find_root = getattr(ctx, "find_root", None)
    return bool(find_root and find_root().params.get("debug"))


def guarded(command: F) -> F:
    """Wrap a command so that its exceptions go through `report` (Typer still reads the signature)."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise  # Typer's own exits and usage errors keep their codes (usage errors: 2)
        except (KeyboardInterrupt, Exception) as exc:
            raise typer.Exit(report(exc, debug=_debug_requested(kwargs))) from None

    return run  # type: ignore[return-value]


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"qimg {qimg.__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_show_version, is_eager=True, help="Print the version and exit."),
    ] = False,
    debug: Annotated[
        bool,
        typer.Option("--debug", envvar=DEBUG_ENV, help="Print the full traceback when something fails."),
    ] = False,
) -> None:
    """Generate images with the Qwen-Image family on qimg's own PyTorch engine."""


# Only commands that work are registered; each lives in its own module under qimg/cli/commands/.
app.command("generate", epilog=generate.EXAMPLES, no_args_is_help=True)(guarded(generate.generate))
app.command("edit", epilog=edit.EXAMPLES, no_args_is_help=True)(guarded(edit.edit))
app.command("encode-prompt", epilog=encode_prompt.EXAMPLES, no_args_is_help=True)(
    guarded(encode_prompt.encode_prompt)
)
app.add_typer(vae.build_app(guarded), name="vae")
app.add_typer(lora.build_app(guarded), name="lora")
app.command("train-lora", epilog=train.EXAMPLES, no_args_is_help=True)(guarded(train.train_lora))
app.command("download", epilog=download.EXAMPLES, no_args_is_help=True)(guarded(download.download))
app.command("bench", epilog=bench.EXAMPLES, no_args_is_help=True)(guarded(bench.bench))
app.command("models", epilog=models.EXAMPLES)(guarded(models.models))
app.command("info", epilog=info_command.EXAMPLES, no_args_is_help=True)(guarded(info_command.info))


def main() -> None:
    """Console-script entry point (`qimg`)."""
    try:
        # prog_name fixed so that `python -m qimg` shows and completes as `qimg`.
        app(prog_name="qimg")
        code: object = EXIT_OK
    except SystemExit as exc:  # how Typer ends every run
        code = exc.code
    except KeyboardInterrupt as exc:  # Ctrl-C outside a command body (Typer maps the rest to a bare 130)
        code = report(exc, debug=debug_from_env())
    except Exception as exc:  # raised outside a guarded command, e.g. in an option callback
        code = report(exc, debug=debug_from_env() or "--debug" in sys.argv[1:])
    leave(code)


def leave(code: object) -> None:
    """End the process with `code` (SystemExit's meaning: None 0, an int, or a message and 1), skipping the
    interpreter's teardown once the work is done: unloading torch, transformers and a loaded model's object graph
    takes over a second (1.3 s on a 2-core CPU after a tiny model's image) that a cron job pays for nothing.
    The atexit handlers still run (torch.compile's worker pool is told to shut down there, without waiting for
    it: _compile_workers_exit_alone) and the output is flushed;
    with another thread still working (a non-daemon thread: a hash, a save) the normal exit waits for it, and
    QIMG_SLOW_EXIT=1 asks for the normal exit always."""
    import atexit
    import threading

    if code is None:
        status = EXIT_OK
    elif isinstance(code, int):
        status = code
    else:
        print(code, file=sys.stderr)
        status = EXIT_ERROR
    main_thread = threading.main_thread()
    busy = any(t is not main_thread and not t.daemon and t.is_alive() for t in threading.enumerate())
    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)  # CPython's; else the normal exit
    if busy or run_exit_handlers is None or os.environ.get("QIMG_SLOW_EXIT") == "1":
        sys.exit(status)
    _compile_workers_exit_alone()
    run_exit_handlers()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (| head) or stream: nothing more can reach it
            pass
    os._exit(status)


def _compile_workers_exit_alone() -> None:
    """torch.compile's atexit handler tells its worker pool's process to shut down, then waits for it to exit:
    6.1 s at the end of an image on an H200 host (bench/stack_sampler.py), for a pool a warm compile cache never
    used. The pool is still told; it ends its workers and itself on its own, after this process is gone
    (it expects that: torch's side ignores the broken pipe back to us)."""
    async_compile = sys.modules.get("torch._inductor.async_compile")
    for pool in list(getattr(async_compile, "_pool_set", ())):
        process = getattr(pool, "process", None)
        if process is not None and callable(getattr(process, "wait", None)):
            process.wait = lambda timeout=None, process=process: process.returncode
