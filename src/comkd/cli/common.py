"""What every command shares: the typer app and its --version, the config a command runs with,
logging, and the one-line errors with their exit codes."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from ..config import ConfigError, RunConfig, load_config
from ..config_rules import check_batches_split, run_stages, torchrun_world_size

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Distil a large CLIP teacher into a small, fast student with ComKD-CLIP.",
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from .. import __version__

        typer.echo(f"comkd {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool | None,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = None,
) -> None:
    """Distil a large CLIP teacher into a small, fast student with ComKD-CLIP."""


def _old_name(given, old, both: str, note: str):
    """An option given under its old name (``old``: ``--out`` of a folder command, ``--seeds``,
    ``--methods``), taken with the yellow ``note``; both spellings given is the usage error ``both``."""
    if not old:
        return given
    if given:
        _usage_error(both)
    typer.secho(f"note: {note}", fg="yellow", err=True)
    return old


def _note_method_spelling(given: list[str] | str | None) -> None:
    """Echo the table's spelling of a method named another way (``COMKD``, ``no_ifalign``)."""
    from ..methods import canonical_method

    for name in [given] if isinstance(given, str) else given or []:
        try:
            canon = canonical_method(name)
        except ValueError:
            continue  # refused later, with the list of names
        if canon != name:
            typer.secho(f"note: method {name!r} is read as {canon!r}", fg="yellow", err=True)


def _set_threads(threads: int | None) -> None:
    """``--threads N``: torch's intra-op threads for this command (checked first: N >= 1)."""
    if threads is None:
        return
    if threads < 1:
        _usage_error(f"--threads: must be a positive number of threads, got {threads}")
    import torch

    torch.set_num_threads(int(threads))


def _check_seeds(seeds: list[int] | None) -> None:
    """Every ``--seed`` in numpy's range, before any work."""
    from ..config_rules import check_seed

    for s in seeds or []:
        try:
            check_seed(s, "--seed")
        except ConfigError as e:
            _usage_error(str(e))


def _cfg(
    config: str | None,
    sets: list[str] | None,
    overrides: dict,
    out: Path | None,
    stages: tuple[str, ...] = (),
) -> RunConfig:
    """The config a command runs with; ``out`` (``--out-dir``) is checked first: a folder it can
    write. ``stages``: the stages the command trains (``("run",)``: those of a whole run), whose
    global batches must split over torchrun's processes, checked here before any heavy import."""
    _check_out(out, folder=True)
    try:
        cfg = load_config(config, overrides, sets)
        check_batches_split(cfg, run_stages(cfg) if stages == ("run",) else stages, torchrun_world_size())
    except ConfigError as e:
        _usage_error(str(e))
    if out is not None:
        cfg.output_dir = str(out)
    if _QUIET:
        cfg.progress = False
    _check_input_paths(cfg)
    return cfg


#: roots that name shards, patterns or remote data rather than one local path (read by their loaders)
_NOT_A_LOCAL_PATH = ("{", "*", "?", "::", "://", "pipe:")


def _check_input_paths(cfg: RunConfig) -> None:
    """The local files and folders a config names exist: checked before any import of the model
    stack, weights or data, so a mistyped path costs a second, not a download or a stage."""
    extra = cfg.distill.extra_teachers
    for key, value in (
        ("data.root", cfg.data.root),
        ("data.split_file", cfg.data.split_file),
        ("data.classes_file", getattr(cfg.data, "classes_file", None)),
        ("full.shots", cfg.full.shots),
        ("full.test", cfg.full.test),
        ("teacher.prompts", cfg.teacher.prompts),
        *((f"distill.extra_teachers[{i}].prompts", t.prompts) for i, t in enumerate(extra)),
    ):
        if not value or any(m in str(value) for m in _NOT_A_LOCAL_PATH):
            continue
        if key == "data.split_file" and cfg.data.root and not os.path.isabs(value):
            continue  # read from the dataset's folder under data.root: its loader names the path tried
        if not os.path.exists(os.path.expanduser(str(value))):
            _usage_error(f"{key} {value}: no such file or folder")


def _check_out(out: Path | None, folder: bool = False) -> None:
    """``--out`` naming a folder or, with ``folder``, ``--out-dir`` naming a file (either: a path
    under a file) is refused before any work starts."""
    from ..fileio import file_problem, folder_problem

    problem = (folder_problem if folder else file_problem)(out) if out is not None else None
    if problem:
        _usage_error(f"{'--out-dir' if folder else '--out'} {out}: {problem}")


def _usage_error(msg: str) -> NoReturn:
    typer.secho(f"config error: {msg}", fg="red", err=True)
    raise typer.Exit(2)


_QUIET = False


def _setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    global _QUIET
    _QUIET = quiet
    level = logging.ERROR if quiet else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("comkd").setLevel(logging.INFO)
    logging.getLogger().handlers[0].setLevel(level)
    for noisy in ("root", "open_clip", "timm"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def _run(fn):
    """Run a command body; expected user errors become one red line and exit code 1, and so does
    a full or read-only disk (named as such)."""
    from ..data import DataError
    from ..engine.checkpoint import DiskFullError
    from ..engine.loop import NonFiniteLossError
    from ..engine.utils import NotSharedError, shutdown_distributed
    from ..models import ModelError

    expected = (ConfigError, DataError, DiskFullError, ModelError, NonFiniteLossError, NotSharedError)
    try:
        result = fn()
        # under torchrun: meet the other ranks and leave the group, so no rank reads what rank 0
        # is still writing (report.md) and none exits while a peer still talks to it
        shutdown_distributed()
        return result
    except Exception as e:  # noqa: BLE001 - expected and disk errors become a line; the rest re-raise
        msg = str(e) if isinstance(e, (*expected, FileNotFoundError, ValueError)) else _disk_error(e)
        if msg is None:
            raise
        typer.secho(f"error: {msg}", fg="red", err=True)
        raise typer.Exit(1) from None


def _disk_error(e: BaseException) -> str | None:
    """'disk full' / 'read-only' for an exception from writing a file (torch and safetensors raise
    their own types with the OS message inside), else None."""
    import errno

    code = e.errno if isinstance(e, OSError) else None
    text = str(e)
    where = f" while writing {e.filename}" if isinstance(e, OSError) and e.filename else ""
    short_write = "inline_container.cc" in text and "unexpected pos" in text  # torch.save on a full disk
    if code == errno.ENOSPC or "No space left on device" in text or short_write:
        return f"disk full{where}; free some space and rerun (with --resume where the command has it)"
    if code == errno.EROFS or "Read-only file system" in text:
        return (
            f"cannot write{where or ' the output'}: read-only file system; choose another --out-dir or --out"
        )
    if code in (errno.EACCES, errno.EPERM):
        return f"permission denied: {e.filename}" if e.filename else f"permission denied ({text})"
    return None


def _write_results(path: Path, res) -> None:
    """Write ``results.json``; if the disk refuses, print the results first so they are not lost."""
    from ..engine.utils import write_json

    try:
        write_json(path, res)
    except Exception as e:
        if _disk_error(e) is not None:
            _print_json(res)
        raise


def read_json(path: Path, what: str):
    """A user-given JSON file, or a one-line error naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise ValueError(f"{path}: JSON nested too deeply to read") from None


def shape_errors(path_desc: str, fn):
    """Run ``fn``; a file of the wrong shape (KeyError, TypeError, ...) becomes a ValueError naming it."""
    import yaml

    try:
        return fn()
    except (KeyError, TypeError, AttributeError, IndexError, yaml.YAMLError) as e:
        raise ValueError(
            f"{path_desc}: not the expected content ({type(e).__name__}: {str(e)[:200]})"
        ) from None


def _print_json(obj) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


def _print_run(fn, *args, **kwargs) -> None:
    """Run ``fn(*args, **kwargs)`` as a command body (``_run``) and print its result as JSON."""
    _print_json(_run(lambda: fn(*args, **kwargs)))


# public names, for tools built on this command line (experiments/): the same functions
run_command = _run
setup_logging = _setup_logging
print_json = _print_json
