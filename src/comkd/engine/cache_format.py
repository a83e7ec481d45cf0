"""The teacher-cache file format: layout, header, storage dtypes, and the fingerprints of what a
cache depends on.

File layout (little-endian)::

    b"COMKDTC1" | uint64 header length H | H bytes of JSON header (space-padded, so the data
    starts at a multiple of 64) | u_t  [K, n_items, d]  (dtype from the header, C order)
                                | W    [N, d]  float32 (the teacher's text features for the
                                  dataset's ``full_classnames``)
                                | S    [K, n_items]  uint32: each u_t row's checksum
                                | 32 bytes: SHA-256 of W's and S's bytes

Integrity: S holds ``row_checksums`` of every stored row, a position-weighted sum of the row's
16-bit words modulo 2^32 (odd weights, so any change to one word, a flipped bit or a zeroed row
changes it); a reader checks W and S against the digest when it opens the file and every row it
reads against S (``cache_read``), so corrupted features or W are refused in one line, never
trained on.

The header (written by ``cache_build.build_teacher_cache``) holds the teacher's identity (model,
weights and prompt digests, key, logit scale, preprocessing; ``models.identity.teacher_digests``),
the files the teacher was built from (``models.identity.teacher_sources``), the dataset
fingerprint (name, item count, SHA-256 of the image paths, or for WebDataset shards of the
``<shard>#<key>`` sample keys in row order; labels are never read), the transform fingerprint,
the seed, K, the dtype, d, and the key and class names of W. Everything a distillation run needs
from the teacher (u_t, W, s_t) is in the file, so a run with a cache never has to load the teacher.
A crafted or damaged header is one ``ValueError`` line naming the file and field (``check_header``).
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..data.contract import TrainingDataset
from ..data.records import virtual_reader
from ..fileio import check_value, parse_json, short
from ..models import PreprocessSpec
from ..models.backbones import MAX_IMAGE_SIZE
from ..models.identity import teacher_key

if TYPE_CHECKING:
    from ..models import Teacher

CACHE_FORMAT = "comkd-teacher-cache/2"  # /2: row checksums and a digest (/1 had none)
#: the format tag hashed into W's key (``text_features_key``); part of the header, so it stays
TEXT_FORMAT = "comkd-text-features/1"
MAGIC = b"COMKDTC1"
_PREAMBLE = len(MAGIC) + 8  # the magic and the uint64 header length
_ALIGN = 64
#: the storage dtypes a cache may hold u_t in, by their header name
STORAGE_DTYPES = {torch.float16: "float16", torch.float32: "float32", torch.bfloat16: "bfloat16"}
# on-disk element type of each storage dtype (bfloat16 is stored as raw 16-bit words)
_NP_DTYPES: dict[str, Any] = {"float16": np.float16, "float32": np.float32, "bfloat16": np.uint16}


class StaleCacheError(ValueError):
    """A cache that does not fit the current teacher, data, transform or seed; the message names
    every stale field with the cached and the current value."""


# -- storage dtype codec -----------------------------------------------------------------------
def numpy_dtype(name: str) -> np.dtype:
    """The on-disk element type of storage dtype ``name`` (``float16``, ``bfloat16``, ``float32``)."""
    return np.dtype(_NP_DTYPES[name])


def encode_rows(u: torch.Tensor) -> np.ndarray:
    """u_t rows ``[B, d]`` (CPU, already in their storage dtype) as the array written to disk."""
    return u.view(torch.uint16).numpy() if u.dtype == torch.bfloat16 else u.numpy()


def decode_rows(rows: np.ndarray, name: str) -> torch.Tensor:
    """Stored rows (a writable, contiguous array) as a tensor of storage dtype ``name``,
    sharing their memory."""
    t = torch.from_numpy(rows)
    return t.view(torch.bfloat16) if name == "bfloat16" else t


# -- fingerprints of what a cache depends on -----------------------------------------------------
def text_features_key(teacher: Teacher, classnames: Sequence[str]) -> str:
    """SHA-256 of (teacher key, class names): the identity of the prompted W
    (``Teacher.class_text_features``) a cache embeds."""
    payload = {
        "format": TEXT_FORMAT,
        "teacher": teacher_key(teacher),
        "classnames": list(classnames),
        "templates": None,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def dataset_fingerprint(dataset: TrainingDataset) -> dict[str, Any]:
    """Name, item count and SHA-256 of the ordered image paths (labels are never read); for virtual
    images (``data.records.virtual_reader``, e.g. the embedded digits) the rendering size too."""
    paths = dataset.item_ids  # files: their paths; streamed shards: "<shard name>#<sample key>"
    fp: dict[str, Any] = {
        "name": dataset.name,
        "items": len(paths),
        "paths_sha256": hashlib.sha256("\n".join(paths).encode()).hexdigest(),
    }
    if any(virtual_reader(p) is not None for p in paths):  # rendered images: their size is content too
        fp["digits_size"] = int(dataset.digits_size)
    return fp


def train_transform_of(dataset: TrainingDataset):
    """The dataset's seedable train transform (the one a cache's views are drawn with)."""
    t = dataset.train_transform or dataset.transform
    if t is None or not getattr(t, "train", False) or not hasattr(t, "fingerprint"):
        raise ValueError(
            f"teacher cache: dataset {dataset.name or dataset!r} has no seedable train transform "
            "(build it with train_transform=build_transform(..., train=True))"
        )
    return t


def spec_of_transform(transform: Any) -> PreprocessSpec:
    """The ``PreprocessSpec`` that describes the tensors a ``build_transform`` transform produces."""
    return PreprocessSpec(
        image_size=int(transform.image_size),
        mean=tuple(float(x) for x in transform.mean),
        std=tuple(float(x) for x in transform.std),
        interpolation=transform.interpolation,
    )


# -- header --------------------------------------------------------------------------------------
@dataclass
class CacheInfo:
    """The header of a teacher cache file and where its data starts (see the module docstring)."""

    header: dict[str, Any]
    data_offset: int

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(K, n_items, d)`` of u_t."""
        return (int(self.header["views"]), int(self.header["dataset"]["items"]), int(self.header["dim"]))

    @property
    def dtype(self) -> str:
        return str(self.header["dtype"])

    @property
    def text_offset(self) -> int:
        """Where W starts (after u_t)."""
        k, n, d = self.shape
        return self.data_offset + k * n * d * numpy_dtype(self.dtype).itemsize

    @property
    def text_shape(self) -> tuple[int, int]:
        """``(N, d)`` of W."""
        return (len(self.header["text_features"]["classnames"]), int(self.header["dim"]))

    @property
    def checksum_offset(self) -> int:
        """Where S ``[K, n_items]`` uint32 starts (after W)."""
        return self.text_offset + self.text_shape[0] * self.text_shape[1] * 4

    @property
    def digest_offset(self) -> int:
        """Where the 32-byte SHA-256 of W and S starts (the file's last bytes)."""
        k, n, _ = self.shape
        return self.checksum_offset + k * n * 4

    @property
    def file_size(self) -> int:
        return self.digest_offset + DIGEST_BYTES


DIGEST_BYTES = 32


def row_checksums(rows: np.ndarray) -> np.ndarray:
    """``[..., d]`` stored rows -> ``[...]`` uint32: sum_j (2j + 1) * w_j mod 2^32 over the row's
    16-bit words w_j. A change of one word by δ (0 < |δ| < 2^16) moves the sum by an odd multiple
    of δ, never a multiple of 2^32, so every single-word corruption is caught."""
    rows = np.ascontiguousarray(rows)
    words = rows.view(np.uint16).reshape(*rows.shape[:-1], -1).astype(np.uint64)
    weights = 2 * np.arange(words.shape[-1], dtype=np.uint64) + 1
    return ((words * weights).sum(axis=-1) % (1 << 32)).astype(np.uint32)


def view_checksums(view: np.ndarray, chunk: int = 16384) -> np.ndarray:
    """``row_checksums`` of a whole view ``[n_items, d]`` (a memory map is fine), ``chunk`` rows at a
    time so the widened words never take more than ``chunk x d x 8`` bytes."""
    return np.concatenate(
        [row_checksums(np.asarray(view[i : i + chunk])) for i in range(0, view.shape[0], chunk)]
        or [np.zeros(0, np.uint32)]
    )


def tail_digest(w_bytes: bytes, checksum_bytes: bytes) -> bytes:
    """The SHA-256 the file ends with: of W's bytes, then S's."""
    h = hashlib.sha256(w_bytes)
    h.update(checksum_bytes)
    return h.digest()


def encode_header(header: dict[str, Any]) -> tuple[bytes, int]:
    """The bytes before the data (magic, length, padded JSON) and the data offset (a multiple of 64)."""
    body = json.dumps(header, indent=1, sort_keys=True).encode()
    total = math.ceil((_PREAMBLE + len(body)) / _ALIGN) * _ALIGN
    body += b" " * (total - _PREAMBLE - len(body))
    return MAGIC + struct.pack("<Q", len(body)) + body, total


#: the longest header read (class names and fingerprints: far below this), bounded before reading
MAX_HEADER_BYTES = 64 * 2**20

# the type of each header field a reader uses ("dict"/"list": checked further below), and ranges
_HEADER_TYPES = {
    "format": "str",
    "teacher": "dict",
    "teacher_files": "dict | None",
    "dataset": "dict",
    "transform": "str",
    "student_spec": "dict",
    "seed": "int",
    "views": "int",
    "dtype": "str",
    "dim": "int",
    "text_features": "dict",
}
_TEACHER_TYPES = {
    "model": "str",
    "weights_sha256": "str",
    "prompts_sha256": "str",
    "key": "str",
    "preprocess": "dict",
    "logit_scale": "float",
}
_RANGES = {
    "views": (1, 1 << 20),
    "dim": (1, 1 << 16),
    "items": (0, 1 << 40),
    "image_size": (1, MAX_IMAGE_SIZE),
}


def check_header(header: Any, path: Path) -> dict[str, Any]:
    """``header`` when every field a reader uses has its type and range, else a one-line
    ``ValueError`` naming ``path`` and the field (a crafted or damaged header is never indexed)."""
    where = f"{path}: teacher-cache header"
    if not isinstance(header, dict):
        raise ValueError(f"{where} must be a JSON object, got {type(header).__name__}")
    if header.get("format") != CACHE_FORMAT:
        raise ValueError(
            f"{path}: cache format {short(header.get('format'))}, this comkd reads {CACHE_FORMAT!r} "
            "(with checksums); rebuild it with `comkd cache-teacher`"
        )

    def need(obj: dict, key: str, kind: str, prefix: str) -> Any:
        if key not in obj:
            raise ValueError(f"{where} has no field {prefix}{key}")
        lo, hi = _RANGES.get(key, (None, None))
        return check_value(obj[key], kind, f"{where} field {prefix}{key}", lo=lo, hi=hi, max_chars=4096)

    for key, kind in _HEADER_TYPES.items():
        need(header, key, kind, "")
    if header["dtype"] not in _NP_DTYPES:
        raise ValueError(
            f"{where} field dtype must be one of {sorted(_NP_DTYPES)}, got {short(header['dtype'])}"
        )
    teacher = header["teacher"]
    for key, kind in _TEACHER_TYPES.items():
        need(teacher, key, kind, "teacher.")
    need(teacher["preprocess"], "image_size", "int", "teacher.preprocess.")
    need(header["dataset"], "items", "int", "dataset.")
    text = header["text_features"]
    need(text, "key", "str", "text_features.")
    names = need(text, "classnames", "list", "text_features.")
    bad = next((n for n in names if not isinstance(n, str)), None)
    if bad is not None:
        raise ValueError(f"{where} field text_features.classnames holds {short(bad)}, not a class name")
    for key, value in (header["teacher_files"] or {}).items():
        check_value(value, "str | None", f"{where} field teacher_files.{key}", max_chars=4096)
    return header


def read_cache_info(path: str | Path) -> CacheInfo:
    """Read and check a cache file's header (no feature data is loaded): its length is bounded by
    the file's size before it is read, and each field a reader uses is checked (``check_header``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"teacher cache not found: {path} (build it with `comkd cache-teacher`)")
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(len(MAGIC))
        if magic != MAGIC:
            raise ValueError(f"{path} is not a comkd teacher cache (bad magic {magic!r})")
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path}: teacher cache ends inside its header length; the file is truncated")
        (n,) = struct.unpack("<Q", raw)
        room = size - _PREAMBLE  # a header longer than the rest of the file is refused before reading
        if n > min(room, MAX_HEADER_BYTES):
            limit = (
                f"the {room} bytes the file holds after it" if n > room else f"the {MAX_HEADER_BYTES} allowed"
            )
            raise ValueError(
                f"{path}: teacher-cache header length {n} is more than {limit}; the file is truncated or corrupt"
            )
        header = parse_json(f.read(n), f"{path}: teacher-cache header", max_chars=MAX_HEADER_BYTES)
    info = CacheInfo(header=check_header(header, path), data_offset=_PREAMBLE + n)
    want = info.file_size
    if size != want:
        raise ValueError(
            f"{path}: file has {size} bytes, its header describes {want}; the file is truncated or corrupt"
        )
    return info
