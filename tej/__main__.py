"""``python -m tej``: the command-line interface."""

from tej.launcher import main

main()
