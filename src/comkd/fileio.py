"""Atomic file writes: write to a temp file next to the target, then rename over it, so a kill
never leaves half a file and a reader sees the old file or the new one.

The one temp-name scheme is ``.<name>.tmp<pid>`` (hidden, per process); stray temps of a killed
run are found with the glob ``.<name>.tmp*``. Nothing here imports torch, so any module can use it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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
