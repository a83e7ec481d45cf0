"""The index of WebDataset shards, read without decoding an image: shard paths from a brace
pattern, each shard's sample keys and labels from its tar headers and ``.cls`` members (kept per
file size and mtime, in the process and in ``index_dir()`` for later processes), virtual
``wds://<shard>#<key>`` item paths, and named pools of sample ordinals."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass

from ..fileio import atomic_write_text, parse_json
from .errors import DataError

log = logging.getLogger(__name__)

WDS_SCHEME = "wds://"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
LABEL_EXT = "cls"


def item_path(shard: str, key: str) -> str:
    """The virtual path of sample ``key`` of ``shard``: ``wds://<shard>#<key>``."""
    return f"{WDS_SCHEME}{shard}#{key}"


def is_wds_path(path: str) -> bool:
    return path.startswith(WDS_SCHEME)


def parse_item_path(path: str) -> tuple[str, str]:
    """``(shard, key)`` of a ``wds://`` path."""
    shard, _, key = path[len(WDS_SCHEME) :].rpartition("#")
    return shard, key


def expand_shards(spec: str) -> list[str]:
    """Absolute paths of the shards of a brace pattern (``a-{000..004}.tar``; ``::`` joins several).
    A shard that does not exist is a ``DataError`` naming it."""
    from braceexpand import braceexpand

    if not spec or not str(spec).strip():
        raise DataError("dataset 'wds' needs root= (shard files, e.g. 'DIR/name-{000000..000004}.tar')")
    out: list[str] = []
    for part in str(spec).split("::"):
        for p in braceexpand(os.path.expanduser(part.strip())):
            path = os.path.abspath(p)
            if not os.path.isfile(path):
                raise DataError(f"shard not found: {path} (from root {spec!r})")
            if path in out:
                raise DataError(f"shard {path} is listed twice in root {spec!r}")
            out.append(path)
    if not out:
        raise DataError(f"root {spec!r} names no shard files")
    return out


@dataclass(frozen=True)
class ShardIndex:
    """The samples of one shard in tar order: their keys and labels (-1: no ``.cls`` member)."""

    path: str
    keys: tuple[str, ...]
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.keys)


def _split_name(name: str) -> tuple[str, str]:
    folder, base = os.path.split(name)
    stem, dot, ext = base.partition(".")
    return (os.path.join(folder, stem) if folder else stem), (ext.lower() if dot else "")


def _scan(path: str, size: int) -> ShardIndex:
    keys: list[str] = []
    members: dict[str, dict[str, tarfile.TarInfo]] = {}
    try:
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                if m.offset_data + m.size > size:
                    raise DataError(
                        f"shard {path} is truncated: member {m.name} ends at byte {m.offset_data + m.size}, "
                        f"the file has {size}"
                    )
                key, ext = _split_name(m.name)
                if key not in members:
                    keys.append(key)
                    members[key] = {}
                elif ext in members[key] or (keys[-1] != key):
                    raise DataError(f"shard {path}: key {key!r} appears more than once (member {m.name})")
                members[key][ext] = m
            # tarfile stops quietly at a header cut short: a whole tar ends with two zero blocks
            end = tf.offset
            tf.fileobj.seek(end)
            tail = tf.fileobj.read(1024)
            if len(tail) < 1024 or tail.strip(b"\0"):
                last = f"after member {m.name}" if keys else "before its first member"
                raise DataError(
                    f"shard {path} is truncated: it ends {last} without the tar end-of-archive marker"
                )
            labels: list[int] = []
            for key in keys:
                ms = members[key]
                if not any(e in ms for e in IMAGE_EXTS):
                    raise DataError(
                        f"shard {path}: sample {key!r} has no image ({'/'.join(IMAGE_EXTS)}); "
                        f"members: {', '.join(sorted(ms)) or 'none'}"
                    )
                if LABEL_EXT not in ms:
                    labels.append(-1)
                    continue
                raw = tf.extractfile(ms[LABEL_EXT]).read()  # type: ignore[union-attr]
                try:
                    labels.append(int(raw.decode("ascii").strip()))
                except (UnicodeDecodeError, ValueError):
                    raise DataError(
                        f"shard {path}: sample {key!r} has label {raw[:20]!r} in {key}.{LABEL_EXT}; "
                        "expected an integer class index"
                    ) from None
    except tarfile.TarError as exc:
        raise DataError(f"shard {path} is truncated or not a tar file: {exc}") from None
    except EOFError:
        raise DataError(f"shard {path} is truncated (unexpected end of file)") from None
    return ShardIndex(path, tuple(keys), tuple(labels))


def index_dir() -> str:
    """Where shard indexes are kept between processes: ``$COMKD_CACHE_DIR/shard-index``, else
    ``$XDG_CACHE_HOME/comkd/shard-index`` (``~/.cache`` by default). Not beside the shards: their
    folder may be read-only or shared by other users."""
    root = os.environ.get("COMKD_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "comkd"
    )
    return os.path.join(root, "shard-index")


def _index_file(path: str) -> str:
    return os.path.join(index_dir(), hashlib.sha256(path.encode()).hexdigest()[:32] + ".json")


def _read_index(path: str, size: int, mtime_ns: int) -> ShardIndex | None:
    """The stored index of ``path`` when one was written for this very file (same size and
    modification time), else None. A damaged or foreign index file is ignored (and rewritten)."""
    where = _index_file(path)
    try:
        with open(where, "rb") as f:
            rec = parse_json(f.read(), where, max_chars=1 << 30, max_depth=3)
        ok = (
            isinstance(rec, dict)
            and rec.get("format") == 1
            and (rec.get("path"), rec.get("size"), rec.get("mtime_ns")) == (path, size, mtime_ns)
            and isinstance(rec.get("keys"), list)
            and isinstance(rec.get("labels"), list)
            and len(rec["keys"]) == len(rec["labels"])
            and all(isinstance(k, str) for k in rec["keys"])
            and all(isinstance(v, int) and not isinstance(v, bool) for v in rec["labels"])
        )
    except (OSError, ValueError):
        return None
    if not ok:
        log.info("shard index %s is not for %s as it is now: rescanning the shard", where, path)
        return None
    return ShardIndex(path, tuple(rec["keys"]), tuple(rec["labels"]))


def _write_index(idx: ShardIndex, size: int, mtime_ns: int) -> None:
    """Keep ``idx`` for later processes (atomically; a folder that cannot be written is skipped)."""
    rec = {
        "format": 1,
        "path": idx.path,
        "size": size,
        "mtime_ns": mtime_ns,
        "keys": idx.keys,
        "labels": idx.labels,
    }
    try:
        atomic_write_text(_index_file(idx.path), json.dumps(rec, separators=(",", ":")))
    except OSError as e:
        log.info("shard index of %s not kept (%s)", idx.path, e)


@functools.lru_cache(maxsize=256)
def _indexed(path: str, size: int, mtime_ns: int) -> ShardIndex:
    idx = _read_index(path, size, mtime_ns)
    if idx is None:
        idx = _scan(path, size)
        _write_index(idx, size, mtime_ns)
    return idx


def scan_shard(path: str) -> ShardIndex:
    """The index of one shard, read from its tar headers and ``.cls`` members (no image is read).
    Kept per (path, size, modification time) for the life of the process, and on disk for later
    processes (``index_dir``): an ImageNet-sized set is scanned once, not in every process."""
    st = os.stat(path)
    return _indexed(path, st.st_size, st.st_mtime_ns)


def scan_shards(paths: Sequence[str]) -> list[ShardIndex]:
    """``scan_shard`` of every path; under torchrun the ranks first scan their share of the shards
    not yet indexed (shard ``j`` by rank ``j % W``) and keep them, then every rank reads them all."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        r, w = dist.get_rank(), dist.get_world_size()
        for p in paths[r::w]:
            scan_shard(p)
        dist.barrier()
    return [scan_shard(p) for p in paths]


def parse_pools(pools: Sequence[str], total: int, where: str) -> dict[str, tuple[int, int]]:
    """``["name=start:stop", ...]`` -> ``{name: (start, stop)}``: half-open ranges of sample ordinals
    over the shards in order; ranges must lie in ``0..total`` and must not overlap."""
    out: dict[str, tuple[int, int]] = {}
    for entry in pools:
        name, eq, rng = str(entry).partition("=")
        a, colon, b = rng.partition(":")
        try:
            if not (eq and colon and name.strip().isidentifier()):
                raise ValueError
            start, stop = int(a), int(b)
        except ValueError:
            raise DataError(f"data.pools entry {entry!r} of {where}: expected 'name=start:stop'") from None
        name = name.strip()
        if not 0 <= start < stop <= total:
            raise DataError(
                f"data.pools entry {entry!r} of {where}: the range must lie within 0..{total} (the shards hold "
                f"{total} samples) and not be empty"
            )
        if name in out:
            raise DataError(f"data.pools of {where} names pool {name!r} twice")
        for other, (s, e) in out.items():
            if start < e and s < stop:
                raise DataError(
                    f"data.pools of {where}: pool {name!r} ({start}:{stop}) overlaps {other!r} ({s}:{e})"
                )
        out[name] = (start, stop)
    return out
