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


def main() -> None:  # pragma: no cover
    app(sys.argv[1:])
