"""python -m qimg: the same as the `qimg` console script."""

from qimg.cli.main import main

if __name__ == "__main__":
    main()
