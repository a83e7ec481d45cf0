"""Every option of the command line, defined once: a config field carries its flag's name and help
(``config_io.flag``), and ``command`` builds a command's options from the keys it names (as
Hugging Face's ``HfArgumentParser`` does from dataclass fields) and ``SHARED``."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import typer

from ..config import RunConfig
from ..config_io import nest
from .common import _cfg, _old_name, _set_threads, _setup_logging

CACHE_DTYPES = ("float16", "bfloat16", "float32")

ConfigOpt = Annotated[str | None, typer.Option("--config", "-c", help="YAML config file or preset name.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override any key: section.key=value.")]
StudentFileArg = Annotated[Path, typer.Argument(help="student.safetensors from distill, or hf-hub:ORG/NAME.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Errors only: no warnings, no progress bars.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Also log each step's information.")]

#: the options that are no config key, by parameter name: (annotation, default); a command takes
#: those it names (``-q``/``-v``: every command)
SHARED: dict[str, tuple[Any, Any]] = {
    "config": (ConfigOpt, None),
    "sets": (SetOpt, None),
    "out": (
        Annotated[
            Path | None, typer.Option("--out-dir", help="Folder to write the run into (default: output_dir).")
        ],
        None,
    ),
    # ``--out`` names a file elsewhere (predict, export, ...); here it is --out-dir's old name
    "old_out": (
        Annotated[Path | None, typer.Option("--out", hidden=True, help="Old name of --out-dir.")],
        None,
    ),
    "resume": (
        Annotated[bool, typer.Option("--resume", help="Continue a killed run from its checkpoint.")],
        False,
    ),
    "overwrite": (
        Annotated[
            bool,
            typer.Option(
                "--overwrite", help="Replace the results of a finished run in --out-dir (else refused)."
            ),
        ],
        False,
    ),
    "threads": (
        Annotated[
            int | None,
            typer.Option(
                help="CPU threads for torch (default: torch's, one per core); on a busy machine fewer run "
                "faster (two 2-thread jobs on 2 cores ran the demo ~10x slower)."
            ),
        ],
        None,
    ),
    "quiet": (QuietOpt, False),
    "verbose": (VerboseOpt, False),
}
RUN_OPTIONS = ("config", "sets", "out", "old_out", "resume", "overwrite", "threads")


@dataclass
class Call:
    """What a ``command`` receives besides its own options: its config (None: it builds none), the
    config-field flags given (dotted key -> value or, repeated, values) and the shared options."""

    cfg: RunConfig | None
    flags: dict[str, Any]
    lists: dict[str, list]
    out: Path | None = None
    resume: bool = False
    overwrite: bool = False
    config: str | None = None
    threads: int | None = None


def _field(key: str) -> tuple[dataclasses.Field, Any]:
    """The config field of a dotted key (``distill.optim.lr``) and its type."""
    cls: Any = RunConfig
    *sections, leaf = key.split(".")
    for name in sections:
        cls = typing.get_type_hints(cls)[name]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    return fields[leaf], typing.get_type_hints(cls)[leaf]


def _scalar(tp: Any) -> type:
    """The command-line type of a config field's type: ``X | None`` -> X; a ``Literal`` -> str (its
    values are checked with the config's, in one place)."""
    if get_origin(tp) in (typing.Union, type(int | None)):
        args = [a for a in get_args(tp) if a is not type(None)]
        tp = args[0] if len(args) == 1 else tp
    return str if get_origin(tp) is Literal else tp


def _flag_params(key: str, repeated: bool) -> list[inspect.Parameter]:
    """The option(s) of config key ``key``: its field's flag (``--teacher`` for ``teacher.model``),
    with the field's help and the key; repeated: a list, and the field's old plural, hidden."""
    f, tp = _field(key)
    if "help" not in f.metadata:
        raise AssertionError(f"config field {key} carries no flag (config_io.flag)")
    name = (f.metadata.get("flag") or f.name).replace("_", "-")
    tp = _scalar(tp)
    help = f"{f.metadata['help']} ({key})" + ("; repeat the flag." if repeated else ".")
    kind = list[tp] if repeated else tp  # type: ignore[valid-type]
    out = [_param(name, Annotated[kind | None, typer.Option(f"--{name}", help=help)])]
    if repeated and (old := f.metadata.get("old")):
        hidden = typer.Option(f"--{old}", hidden=True, help=f"Old name of --{name}.")
        out.append(_param(old, Annotated[kind | None, hidden]))
    return out


def _param(name: str, annotation: Any, default: Any = None) -> inspect.Parameter:
    return inspect.Parameter(
        name.replace("-", "_"), inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation
    )


def command(
    *keys: str,
    repeated: tuple[str, ...] = (),
    options: tuple[str, ...] = RUN_OPTIONS,
    stages: tuple[str, ...] = (),
    default_config: str | None = None,
    build: bool = True,
):
    """Decorate a command ``fn(call: Call, **its own options)``: it also takes the flags of the
    config ``keys`` (each from its field), the ``repeated`` keys as lists, the ``options`` of
    ``SHARED`` and ``-q``/``-v``. Before ``fn`` runs: threads, logging, ``--out-dir`` (or its old
    ``--out``) and, with ``build``, the config (``--config`` or ``default_config`` < flags <
    ``--set``; ``stages``: those whose batches must split over torchrun's processes)."""
    shared = (*options, "quiet", "verbose")

    def deco(fn):
        hints = typing.get_type_hints(fn, include_extras=True)
        own = [
            p.replace(annotation=hints[p.name], kind=inspect.Parameter.KEYWORD_ONLY)
            for p in list(inspect.signature(fn).parameters.values())[1:]
        ]
        made = {key: _flag_params(key, False) for key in keys}
        lists = {key: _flag_params(key, True) for key in repeated}
        front = [_param(n, *SHARED[n]) for n in options if n != "threads"]
        back = [_param(n, *SHARED[n]) for n in shared if n in ("threads", "quiet", "verbose")]
        params = front + own + [p for ps in (*made.values(), *lists.values()) for p in ps] + back

        @functools.wraps(fn)
        def wrapper(**kw: Any) -> Any:
            got = {n: kw.pop(n) for n in shared}
            _set_threads(got.get("threads"))
            _setup_logging(got["verbose"], got["quiet"])
            out = _old_name(
                got.get("out"),
                got.get("old_out"),
                "give the folder once: --out-dir (--out is its old name here)",
                "--out is now --out-dir for commands that write a folder",
            )
            flags = {key: v for key, (p, *_) in made.items() if (v := kw.pop(p.name)) is not None}
            many = {}
            for key, (p, *old) in lists.items():
                given, was = kw.pop(p.name), kw.pop(old[0].name) if old else None
                name = f"--{p.name.replace('_', '-')}"
                note = f"{name}s is now {name} (repeat the flag), as in the other commands"
                many[key] = _old_name(given, was, f"give {name} once: {name}s is its old name", note) or []
            config = got.get("config") or default_config
            cfg = _cfg(config, got.get("sets"), nest(flags), out, stages=stages) if build else None
            rest = {k: got[k] for k in ("resume", "overwrite", "config", "threads") if k in got}
            return fn(Call(cfg, flags, many, out, **rest), **kw)

        wrapper.__signature__ = inspect.Signature(params)  # what typer reads
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        return wrapper

    return deco
