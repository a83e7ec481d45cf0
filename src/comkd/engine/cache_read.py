"""Reading a teacher cache during distillation: ``CachedTeacherOutputs``, a drop-in for
``tasks.TeacherOutputs`` that never runs the teacher (epoch e reads view ``e % K``).

Integrity (``cache_format``, "Integrity"): W and the row checksums are checked against the file's
digest when it is opened, every row read against its checksum, and the file's size before every
read of the memory map, so a corrupted cache, or one that shrinks under a running job, ends in one
``CorruptCacheError`` line naming the file (not a wrong student, not SIGBUS).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..data.contract import TrainingDataset
from ..models.backbones import spec_json
from ..models.identity import teacher_digests
from .cache_format import (
    DIGEST_BYTES,
    CacheInfo,
    StaleCacheError,
    dataset_fingerprint,
    decode_rows,
    numpy_dtype,
    read_cache_info,
    row_checksums,
    tail_digest,
    train_transform_of,
    view_checksums,
)

if TYPE_CHECKING:
    from ..models import PreprocessSpec, Teacher

log = logging.getLogger(__name__)


class CorruptCacheError(ValueError):
    """A cache whose bytes are not the ones written (a digest or row checksum that differs, or a
    file that shrank while a run read it); the message names the file and the part."""


def replay_cached_views(dataset: TrainingDataset, views: int) -> None:
    """Make ``dataset`` draw, in epoch e, the view of epoch ``e % views`` (what the cache holds)."""
    dataset.view_period = int(views)


def _diff(what: str, cached: Any, now: Any) -> list[str]:
    return [] if cached == now else [f"other {what}: cache has {cached!r}, now {now!r}"]


def _stale_teacher(
    header: dict[str, Any],
    path: Path,
    teacher: Teacher | None,
    teacher_key: str | None,
    sources: dict[str, str | None] | None,
) -> list[str]:
    """One message per teacher field of ``header`` that differs (``open`` says what is compared)."""
    stale: list[str] = []
    if teacher is not None:
        ident, ct = teacher_digests(teacher), header["teacher"]
        stale += _diff("teacher model", ct["model"], ident["model"])
        stale += _diff("teacher weights (sha256)", ct["weights_sha256"], ident["weights_sha256"])
        stale += _diff("teacher prompts (sha256)", ct["prompts_sha256"], ident["prompts_sha256"])
        stale += _diff("teacher preprocessing", ct["preprocess"], ident["preprocess"])
    elif teacher_key is not None:
        stale += _diff("teacher (key)", header["teacher"]["key"], teacher_key)
    else:
        log.info("teacher cache %s: teacher identity not checked (no teacher or teacher_key given)", path)
    if sources is not None:
        recorded = header.get("teacher_files")
        if recorded is None:
            stale.append("teacher files: the cache records none (built without `comkd cache-teacher`)")
        else:
            for field in sorted(sources):
                stale += _diff(f"{field} (file sha256, or the value)", recorded.get(field), sources[field])
    return stale


def _stale_data(header: dict[str, Any], dataset: Any, student_spec: PreprocessSpec | None) -> list[str]:
    """One message per data field of ``header`` that differs (``open`` says what is compared)."""
    stale: list[str] = []
    fp, cd = dataset_fingerprint(dataset), header["dataset"]
    for field in sorted(set(cd) | set(fp)):
        stale += _diff(f"data ({field})", cd.get(field), fp.get(field))
    stale += _diff("transform", header["transform"], train_transform_of(dataset).fingerprint)
    if student_spec is not None:
        stale += _diff("student preprocessing", header["student_spec"], spec_json(student_spec))
    view_seed = dataset.view_seed
    if view_seed is None:
        stale.append(
            "other seed: the dataset draws no replayable views (view_seed=None); distil with view_seed = "
            f"the cache's seed {header['seed']}"
        )
    else:
        stale += _diff(
            "seed (the run seed / dataset view_seed must equal the cache's seed)",
            header["seed"],
            int(view_seed),
        )
    return stale


class CachedTeacherOutputs:
    """u_t read from a cache (open it with ``open``), callable like ``tasks.TeacherOutputs``: ``(images
    [B,3,H,W], indices [B], epoch) -> u_t [B, d]`` (float32, on ``device``), the rows ``indices`` of view
    ``epoch % views``; with the rest distillation needs of the teacher: ``text_features`` (W ``[N, d]``
    for ``classnames``) and ``logit_scale`` (s_t)."""

    #: largest view (bytes) kept whole on an accelerator by default
    DEVICE_VIEW_BUDGET = 2 * 2**30

    def __init__(self, path: Path, info: CacheInfo, device: torch.device, preload_view: bool | None = None):
        self.path, self.info, self.device = path, info, device
        k, n, d = info.shape
        self.views, self.items, self.dim = k, n, d
        view_bytes = n * d * numpy_dtype(info.dtype).itemsize
        if preload_view is None:
            preload_view = device.type != "cpu" and view_bytes <= self.DEVICE_VIEW_BUDGET
        # On an accelerator the current epoch's view lives on the device, so a step indexes it with
        # the batch's (device) indices: no host round trip, no synchronisation per step.
        self.preload_view = bool(preload_view)
        self._view: tuple[int, torch.Tensor] | None = None
        # the file object keeps the mapped inode; its size is checked before every read of the map
        self._file = open(path, "rb")  # noqa: SIM115 - open for the object's lifetime
        self._features = np.memmap(
            self._file, dtype=numpy_dtype(info.dtype), mode="r", offset=info.data_offset, shape=(k, n, d)
        )
        self._file.seek(info.text_offset)
        want = info.file_size - info.text_offset  # bytes of W, S and the digest
        tail = self._file.read(want)
        w_len = int(np.prod(info.text_shape)) * 4
        w_bytes, sum_bytes = tail[:w_len], tail[w_len : len(tail) - DIGEST_BYTES]
        if len(tail) != want or tail_digest(w_bytes, sum_bytes) != tail[-DIGEST_BYTES:]:
            raise CorruptCacheError(
                f"teacher cache {path}: W or the row checksums do not match the file's digest; the file "
                "is corrupt: rebuild it with `comkd cache-teacher`"
            )
        self._sums = np.frombuffer(sum_bytes, dtype=np.uint32).reshape(k, n)
        w = np.frombuffer(w_bytes, dtype=np.float32).reshape(info.text_shape)
        self.text_features = torch.from_numpy(w.copy()).to(device)
        self.classnames: list[str] = list(info.header["text_features"]["classnames"])
        self.logit_scale = float(info.header["teacher"]["logit_scale"])
        self.teacher_key = str(info.header["teacher"]["key"])
        self.teacher_model = str(info.header["teacher"]["model"])
        self.seed = int(info.header["seed"])

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        dataset: Any,
        device: str | torch.device,
        teacher: Teacher | None = None,
        teacher_key: str | None = None,
        student_spec: PreprocessSpec | None = None,
        preload_view: bool | None = None,
        sources: dict[str, str | None] | None = None,
    ) -> CachedTeacherOutputs:
        """Open a cache for distillation on ``dataset`` (the run's ``ImageDataset``, whose
        ``view_seed`` is the run seed); a stale one raises ``StaleCacheError`` naming every stale
        field. Checked: the dataset (name, item count, image paths), its train transform's
        fingerprint, its ``view_seed`` against the cache's seed, ``student_spec`` if given, the
        teacher (its full identity when ``teacher`` is given; the key when only ``teacher_key`` is,
        as in a run that never loads the teacher; else nothing), and ``sources``
        (``models.identity.teacher_sources``) against the files the cache was built from.

        ``preload_view``: keep the current epoch's view ``[n_items, d]`` on ``device`` (default: on
        accelerators when it fits in ``DEVICE_VIEW_BUDGET``), else read rows from the memory map.
        Side effect: the dataset replays view ``e % views`` in epoch ``e`` (``replay_cached_views``).
        """
        path = Path(path)
        info = read_cache_info(path)
        stale = _stale_teacher(info.header, path, teacher, teacher_key, sources)
        stale += _stale_data(info.header, dataset, student_spec)
        if stale:
            raise StaleCacheError(
                f"teacher cache {path} is stale:\n  "
                + "\n  ".join(stale)
                + "\nrebuild it for this teacher, data, transform and seed (`comkd cache-teacher`)"
            )
        out = cls(path, info, torch.device(device), preload_view)
        replay_cached_views(dataset, out.views)
        return out

    def _rows(self, view: int, idx: np.ndarray | slice) -> torch.Tensor:
        size = os.fstat(self._file.fileno()).st_size
        if size < self.info.file_size:  # reading the map past the file's end would be SIGBUS
            raise CorruptCacheError(
                f"teacher cache {self.path} shrank from {self.info.file_size} to {size} bytes while this "
                "run read it; rebuild it and rerun with --resume"
            )
        # a slice of the read-only map is copied; fancy indexing already returns a copy
        arr = self._features[view, idx]
        rows = np.array(arr) if isinstance(idx, slice) else np.ascontiguousarray(arr)
        sums = view_checksums(rows) if isinstance(idx, slice) else row_checksums(rows)
        bad = np.flatnonzero(sums != self._sums[view, idx])
        if bad.size:
            item = int(np.arange(self.items)[idx][bad[0]])
            raise CorruptCacheError(
                f"teacher cache {self.path}: view {view}, item {item} does not match its checksum "
                f"({bad.size} of {rows.shape[0]} rows read); the file is corrupt: rebuild it with "
                "`comkd cache-teacher`"
            )
        return decode_rows(rows, self.info.dtype)

    def close(self) -> None:
        """Release the memory map and the file."""
        self._features = None  # type: ignore[assignment]
        self._file.close()

    def __call__(self, images: torch.Tensor | None, indices: torch.Tensor, epoch: int) -> torch.Tensor:
        """u_t ``[B, d]`` float32 on ``self.device`` for dataset items ``indices`` in ``epoch``."""
        view = int(epoch) % self.views
        if images is not None and len(indices) != images.shape[0]:
            raise ValueError(f"teacher cache: {len(indices)} indices for a batch of {images.shape[0]} images")
        if self.preload_view and torch.is_tensor(indices):
            if self._view is None or self._view[0] != view:
                self._view = (view, self._rows(view, slice(None)).to(self.device))
            return self._view[1][indices.to(self.device, non_blocking=True)].float()
        idx = np.asarray(indices.detach().cpu() if torch.is_tensor(indices) else indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.items):
            raise IndexError(
                f"teacher cache {self.path}: item index {int(idx.max())} outside 0..{self.items - 1}"
            )
        return self._rows(view, idx).to(self.device, non_blocking=True).float()

    def __repr__(self) -> str:
        return (
            f"CachedTeacherOutputs({self.path}, views={self.views}, items={self.items}, dim={self.dim}, "
            f"dtype={self.info.dtype}, teacher={self.teacher_model})"
        )
