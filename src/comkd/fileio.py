"""Atomic file writes, and JSON read from files a user hands us (checked as data, never trusted).

Writes go to a temp file next to the target, then are renamed over it, so a kill never leaves half
a file and a reader sees the old file or the new one. The one temp-name scheme is
``.<name>.tmp<pid>`` (hidden, per process); stray temps of a killed run are found with the glob
``.<name>.tmp*``. Nothing here imports torch, so any module can use it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_UMASK = os.umask(0o022)  # read once, at import (os.umask sets it while it reads it: set it back)
os.umask(_UMASK)


def temp_path(path: str | Path) -> Path:
    """The temp file that ``atomic_path`` writes before renaming it to ``path``."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


@contextmanager
def atomic_path(path: str | Path, *, fsync: bool = False) -> Iterator[Path]:
    """Yield a temp path for the caller to write; on success it replaces ``path`` (after an fsync
    with ``fsync=True``), on any error it is removed and ``path`` is left as it was.

    >>> with atomic_path("out/model.safetensors") as tmp:  # doctest: +SKIP
    ...     save_file(tensors, str(tmp))
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        # as readable as any file the user's umask makes (some writers, safetensors among them,
        # create theirs owner-only)
        os.chmod(tmp, 0o666 & ~_UMASK)
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed write leaves neither a partial file nor a stray temp
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


# -- JSON from files a user hands us ------------------------------------------------------------
#: deepest nesting a recorded JSON value may have (the deepest comkd writes is 3)
MAX_JSON_DEPTH = 16


def short(value: Any, n: int = 60) -> str:
    """``repr(value)`` cut to ``n`` characters, for a one-line message about a value from a file."""
    try:
        text = repr(value)
    except RecursionError:  # a value nested deeper than repr goes
        text = f"<a deeply nested {type(value).__name__}>"
    return text if len(text) <= n else text[: n - 3] + "..."


def json_depth(value: Any) -> int:
    """How deeply ``value`` (parsed JSON) nests lists and objects: 0 for a scalar (no recursion)."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):  # a scalar is no deeper than the container it sits in
            deepest = max(deepest, d + 1)
            stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


def parse_json(
    text: str | bytes,
    where: str,
    *,
    max_chars: int,
    max_depth: int = MAX_JSON_DEPTH,
    error: type[Exception] = ValueError,
) -> Any:
    """``text`` (JSON recorded in a file) parsed, or ``error`` with one line naming ``where`` when
    it is longer than ``max_chars``, not valid JSON, or nested deeper than ``max_depth`` (checked
    after parsing; ``[[[...]]]`` deep enough to exhaust the parser's recursion is caught too)."""
    if len(text) > max_chars:
        raise error(f"{where} is {len(text)} characters long, more than the {max_chars} it may hold")
    try:
        value = json.loads(text)
    except RecursionError:
        raise error(f"{where} is nested deeper than {max_depth} levels") from None
    except UnicodeDecodeError:
        raise error(f"{where} is not valid JSON (not UTF-8 text)") from None
    except ValueError as e:
        msg = e.msg if isinstance(e, json.JSONDecodeError) else str(e).splitlines()[0][:100]
        raise error(f"{where} is not valid JSON ({msg})") from None
    if json_depth(value) > max_depth:
        raise error(f"{where} is nested deeper than {max_depth} levels")
    return value


_KINDS = {
    "int": ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "float": (
        "a finite number",
        lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
    ),
    "str": ("a string", lambda v: isinstance(v, str)),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "None": ("null", lambda v: v is None),
    "dict": ("a JSON object", lambda v: isinstance(v, dict)),
    "list": ("a JSON list", lambda v: isinstance(v, list)),
}


def check_value(
    value: Any,
    annotation: str,
    where: str,
    *,
    lo: int | None = None,
    hi: int | None = None,
    max_chars: int = 4096,
    error: type[Exception] = ValueError,
) -> Any:
    """``value`` when it fits ``annotation`` (a dataclass field's type as written: ``int``,
    ``str | None``, ...; a number within ``lo``..``hi``, a string of at most ``max_chars``), else
    ``error`` with one line naming ``where``, what it must be and what it is."""
    kinds = [k.strip() for k in annotation.split("|")]
    if unknown := [k for k in kinds if k not in _KINDS]:
        raise TypeError(f"check_value: no check for type {unknown[0]!r} ({where})")
    kind = next((k for k in kinds if _KINDS[k][1](value)), None)
    if kind in ("int", "float"):
        ok = (lo is None or value >= lo) and (hi is None or value <= hi)
    else:
        ok = kind is not None and not (kind == "str" and len(value) > max_chars)
    if ok:
        return value
    span = f" in {'' if lo is None else lo}..{'' if hi is None else hi}" if (lo, hi) != (None, None) else ""
    shown = [k for k in kinds if k != "None"] or kinds  # "null" goes unsaid beside another type
    want = " or ".join(
        _KINDS[k][0]
        + (span if k in ("int", "float") else "")
        + (f" of at most {max_chars} characters" if k == kind == "str" else "")
        for k in shown
    )
    got = f"{len(value)} characters" if kind == "str" else short(value)
    raise error(f"{where} must be {want}, got {got}")


def folder_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be (or become) a folder to write into, naming the file in the way (it is
    a file, or one of its parents is); None when it can. Nothing is created."""
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists() or p.is_symlink():
            return None if p.is_dir() else f"{p} is a file, not a folder"
    return None


def file_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be written as a file: it is a folder, or a parent is a file; else None."""
    path = Path(path)
    return f"{path} is a folder, not a file" if path.is_dir() else folder_problem(path.parent)
