"""`python -m comkd`: the `comkd` command."""

from .cli import main

main()
