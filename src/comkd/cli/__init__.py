"""The ``comkd`` command line (typer). Every command takes ``--config`` (a YAML file or preset
name) and ``--set section.key=value``; named flags override both.

``options`` builds every command's options (a config key's flag from its field, the shared ones
once); ``common`` holds the app and what every command shares;
``train`` and ``deploy`` register the commands (in the order ``comkd --help`` lists them)."""

from __future__ import annotations

import sys

from . import deploy, train  # noqa: F401  (registers the commands on ``app``)
from .common import (
    app,
    print_json,
    read_json,
    run_command,
    setup_logging,
    shape_errors,
)
from .options import QuietOpt, VerboseOpt

__all__ = [
    "QuietOpt",
    "VerboseOpt",
    "app",
    "main",
    "print_json",
    "read_json",
    "run_command",
    "setup_logging",
    "shape_errors",
]


def main() -> None:
    """The ``comkd`` command (console script, ``python -m comkd``, ``torchrun -m comkd.cli``):
    typer's app, ended by ``engine.utils.exit_process`` with its exit code."""
    from ..engine.utils import exit_process

    try:
        app(sys.argv[1:])
    except SystemExit as e:
        exit_process(e.code)
    exit_process(0)
