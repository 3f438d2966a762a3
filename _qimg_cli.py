"""The `qimg` console script. It lives outside the qimg package so that Ctrl-C while Python is still importing
qimg (the first few tenths of a second) ends quietly with exit 130, as Ctrl-C does everywhere else."""

import sys


def main() -> None:
    try:
        from qimg.cli.main import main as run
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        raise SystemExit(130) from None
    run()
