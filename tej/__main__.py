"""``python -m tej``: the command-line interface."""

from tej.cli import main

main()
