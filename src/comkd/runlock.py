"""One writer per run folder.

A run holds ``OUT/.comkd.lock`` while it writes ``OUT`` (``run_lock``): the file is created with
``O_CREAT | O_EXCL`` and holds the holder's pid, host and start time as JSON; it is removed when the
run ends, however it ends short of a kill. A second run into the same folder is refused with a
one-line ``RunLockError`` naming the folder and the holder. A lock left by a killed run (a pid that
no longer exists on this host) is named in a warning and taken over; anything at the lock's path
that is not a regular file (a folder, a link, a FIFO) is refused in one line naming it, and left
alone. The lock is re-entrant within a process (a protocol holding ``OUT`` may run a stage that
locks it again; stages in sub-folders take their own); only the main process of a torchrun job
(``RANK`` 0) locks, as only it writes. A fresh run over a finished run's results is refused unless
overwriting was asked for (``check_fresh``, ``locked_run``). Nothing here imports torch.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import socket
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)

LOCK_NAME = ".comkd.lock"
_UNREADABLE_GRACE_S = 2.0  # a lock file may be empty for an instant between its creation and write


class RunLockError(ValueError):
    """Another process writes the run folder (or its lock cannot be taken)."""


class FinishedRunError(RunLockError):
    """A fresh run would overwrite a finished run's results."""


# (pid, folder's real path) -> overwrite allowed: the locks this process holds (an entry inherited
# through fork names the parent's pid, so it is never taken for the child's)
_HELD: dict[tuple[int, str], bool] = {}


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0") or 0) == 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except PermissionError:  # another user's live process
        return True
    except (ProcessLookupError, OverflowError, ValueError):
        return False
    return True


_MAX_LOCK_BYTES = 64 * 1024  # a holder record is ~150 bytes: anything far larger is not one


def _not_a_lock_file(path: Path) -> str | None:
    """What ``path`` is when something other than a regular file sits there (a folder, a link, a
    FIFO, ...), else None (a regular file or nothing)."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return None
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    return None if stat.S_ISREG(mode) else "a special file (FIFO, socket or device)"


def _read_holder(path: Path) -> dict[str, Any] | None:
    """The lock file's JSON, or None when it is absent, empty, not a regular file or not a holder
    record."""
    if _not_a_lock_file(path):
        return None  # never open a FIFO or follow a link planted at the lock's path
    try:
        with open(path, "rb") as f:
            info = json.loads(f.read(_MAX_LOCK_BYTES).decode())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    is_holder = isinstance(info, dict) and isinstance(info.get("pid"), int) and info.get("host")
    return info if is_holder else None


def _describe(info: dict[str, Any]) -> str:
    return f"pid {info['pid']} on {info['host']}, started {info.get('started', '?')}"


def _take_over(path: Path, seen: dict[str, Any] | None, why: str) -> None:
    """Remove the stale lock file ``path`` (whose content was ``seen``) so it can be created again.
    It is first renamed away (one taker wins); if what was moved is not the stale lock (another
    run took over in between), it is put back and the folder is reported as held."""
    aside = path.with_name(f"{LOCK_NAME}.stale.{os.getpid()}")
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return  # someone else removed it: just try to create it again
    moved = _read_holder(aside)
    if moved != seen:
        with suppress(OSError):
            os.link(aside, path)  # back where it was, unless a lock exists there again
        aside.unlink(missing_ok=True)
        holder = _describe(moved) if moved else "another process"
        raise RunLockError(f"{path.parent}: another comkd run is writing here ({holder})")
    aside.unlink(missing_ok=True)
    log.warning("%s: %s; taking it over", path, why)


def _acquire(folder: Path) -> str:
    """Create ``folder/.comkd.lock`` for this process; returns its token."""
    path = folder / LOCK_NAME
    token = uuid.uuid4().hex
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "token": token,
    }
    first_unreadable: float | None = None
    for _ in range(100):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pass
        except OSError as e:
            raise RunLockError(f"{folder}: cannot create the run lock {path} ({e.strerror or e})") from None
        else:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(info) + "\n")
                f.flush()
                os.fsync(f.fileno())
            return token
        if odd := _not_a_lock_file(path):  # not left by a run: never moved or deleted here
            raise RunLockError(
                f"{path}: the run lock's path is {odd}, not a lock file; remove it or choose another --out-dir"
            )
        holder = _read_holder(path)
        if holder is None:
            if path.exists():
                now = time.monotonic()
                first_unreadable = first_unreadable or now
                if now - first_unreadable < _UNREADABLE_GRACE_S:
                    time.sleep(0.05)  # its writer may be between creating and writing it
                else:
                    _take_over(path, None, "an unreadable run lock (no holder recorded)")
        elif holder["host"] == info["host"] and not _pid_alive(holder["pid"]):
            _take_over(
                path, holder, f"a stale run lock of a process that no longer exists ({_describe(holder)})"
            )
        else:
            raise RunLockError(
                f"{folder}: another comkd run is writing here ({_describe(holder)}); wait for it to end or "
                f"choose another --out-dir (if no such run exists, delete {path})"
            )
    raise RunLockError(f"{folder}: could not take the run lock {path}; other runs keep taking it")


@contextmanager
def run_lock(folder: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Hold the lock of run folder ``folder`` (created when missing, and removed again if it is
    still empty at the end) until the block ends; re-entrant, rank 0 only (the module docstring).
    ``overwrite``: fresh runs may replace finished results in this folder and below while it is
    held (``check_fresh``). ``RunLockError`` names the folder and the holder."""
    folder = Path(folder)
    if not _is_main_process():
        yield folder
        return
    key = (os.getpid(), os.path.realpath(folder))
    if key in _HELD:  # re-entered
        was = _HELD[key]
        _HELD[key] = was or overwrite
        try:
            yield folder
        finally:
            _HELD[key] = was
        return
    created = []  # the folders made here, deepest first: removed again if the run left them empty
    p = folder.absolute()
    while not p.exists():
        created.append(p)
        p = p.parent
    folder.mkdir(parents=True, exist_ok=True)
    token = None
    try:
        token = _acquire(folder)
        _HELD[key] = overwrite
        yield folder
    finally:
        if token is not None:
            del _HELD[key]
            holder = _read_holder(folder / LOCK_NAME)
            if holder is not None and holder.get("token") == token:
                (folder / LOCK_NAME).unlink(missing_ok=True)
            else:
                log.warning("%s: the run lock is no longer this run's; left as it is", folder / LOCK_NAME)
        for d in created:  # a run refused before writing anything leaves no folder behind
            try:
                d.rmdir()
            except OSError:
                break


def holds_lock(folder: str | os.PathLike) -> bool:
    """Whether this process holds ``folder``'s lock."""
    return (os.getpid(), os.path.realpath(folder)) in _HELD


def check_fresh(folder: str | os.PathLike, results: tuple[str, ...], *, resume: bool = False) -> None:
    """Refuse a fresh run into ``folder`` when it holds any of the finished-run files ``results``
    (``FinishedRunError`` naming the folder and the file), unless ``resume`` or overwriting is
    allowed there (``run_lock(..., overwrite=True)`` held on it or a folder above)."""
    folder = Path(folder)
    key = os.path.realpath(folder)
    allowed = any(
        ok and pid == os.getpid() and (key == k or key.startswith(k + os.sep))
        for (pid, k), ok in _HELD.items()
    )
    if resume or not _is_main_process() or allowed:
        return
    for name in results:
        if (folder / name).exists():
            raise FinishedRunError(
                f"{folder} holds a finished run ({name}); rerun with --resume to continue it, "
                "--overwrite to replace it, or choose another --out-dir"
            )


F = TypeVar("F", bound=Callable[..., Any])


def locked_run(results: tuple[str, ...] = ()) -> Callable[[F], F]:
    """Decorate a runner ``fn(cfg, out_dir, ..., resume=False, ...)`` (the run folder is its second
    parameter, whatever its name): it runs holding ``out_dir``'s lock, and a fresh run into a folder with any of the finished-run files
    ``results`` is refused (``check_fresh``). The decorated runner also takes ``overwrite: bool``
    (keyword, default False): replace a finished run's results in ``out_dir`` and below."""

    def deco(fn: F) -> F:
        sig = inspect.signature(fn)
        folder_arg = list(sig.parameters)[1]  # the run folder: the second parameter

        @functools.wraps(fn)
        def wrapper(*args: Any, overwrite: bool = False, **kwargs: Any) -> Any:
            bound = sig.bind(*args, **kwargs)
            out_dir = bound.arguments[folder_arg]
            with run_lock(out_dir, overwrite=overwrite):
                check_fresh(out_dir, results, resume=bool(bound.arguments.get("resume", False)))
                return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return deco
