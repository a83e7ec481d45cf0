"""Building a teacher cache (``cache_format``): u_t for K augmented views of every training image.

View k of item i is drawn with ``derive_view_seed(seed, k, i)``, exactly the view an ``ImageDataset``
with ``view_seed=seed`` yields in epoch k, so the cache's ``seed`` must be the distillation run's
(``cache_read.CachedTeacherOutputs.open`` checks it).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ..data.dataset import derive_view_seed
from ..fileio import atomic_path
from ..models import PreprocessSpec
from ..models.backbones import spec_json
from ..models.identity import teacher_digests
from .cache_format import (
    CACHE_FORMAT,
    STORAGE_DTYPES,
    CacheInfo,
    dataset_fingerprint,
    encode_header,
    encode_rows,
    numpy_dtype,
    spec_of_transform,
    tail_digest,
    text_features_key,
    train_transform_of,
    view_checksums,
)
from .tasks import adapt_images
from .utils import amp_context, barrier, comm_device, gather_batch, is_main, progress_bar, rank, world_size

if TYPE_CHECKING:
    from ..models import Teacher

log = logging.getLogger(__name__)


class _Views(Dataset):
    """View ``k`` of every item: ``(get_view(i, derive_view_seed(seed, k, i)), i)``."""

    def __init__(self, dataset: Any, seed: int, k: int):
        self.dataset, self.seed, self.k = dataset, int(seed), int(k)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.dataset.get_view(i, derive_view_seed(self.seed, self.k, i)), i


def _view_loader(
    dataset: Any, seed: int, k: int, batch_size: int, num_workers: int, device: torch.device
) -> DataLoader:
    """View ``k``'s batches of ``(images, [labels,] item indices)`` that this rank runs the teacher
    on: of a map-style dataset, batches ``rank, rank + W, ...`` of the one-process order (the same
    batches, so the same rows); of a stream, the items of this rank's shards in shard order, view k
    of item i drawn as ``get_view`` would (``replay_stream``)."""
    pin = device.type == "cuda"
    if dataset.streaming:
        stream = dataset.replay_stream(seed, k, rank(), world_size())
        return DataLoader(stream, batch_size=batch_size, num_workers=num_workers, pin_memory=pin)
    n = len(dataset)
    batches = [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]
    return DataLoader(
        _Views(dataset, seed, k),
        batch_sampler=batches[rank() :: world_size()],
        num_workers=num_workers,
        pin_memory=pin,
    )


def _checked_transform(
    dataset: Any,
    views: int,
    seed: int,
    batch_size: int,
    dtype: torch.dtype,
    student_spec: PreprocessSpec | None,
) -> tuple[Any, PreprocessSpec]:
    """Check a build request; return the dataset's train transform and the ``PreprocessSpec`` of
    its tensors. Raises ``ValueError`` for bad sizes, an unknown dtype or a ``student_spec`` the
    transform disagrees with; warns when ``seed`` is not the dataset's ``view_seed``."""
    if views < 1 or batch_size < 1:
        raise ValueError(
            f"teacher cache: views and batch_size must be >= 1, got views={views}, batch_size={batch_size}"
        )
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"teacher cache: dtype must be one of {list(STORAGE_DTYPES)}, got {dtype}")
    transform = train_transform_of(dataset)
    tf_spec = spec_of_transform(transform)
    if student_spec is not None and spec_json(student_spec) != spec_json(tf_spec):
        raise ValueError(
            f"teacher cache: student_spec {spec_json(student_spec)} disagrees with the dataset's train transform "
            f"{spec_json(tf_spec)}; the dataset must use the student's preprocessing"
        )
    view_seed = dataset.view_seed
    if view_seed is not None and int(view_seed) != int(seed):
        log.warning(
            "teacher cache: seed %d differs from the dataset's view_seed %d; the cache is for runs with seed %d",
            seed,
            view_seed,
            seed,
        )
    return transform, tf_spec


def _gather_rows(
    rows: torch.Tensor | None, idx: torch.Tensor | None, batch_size: int, d: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Every rank's batch of rows ``[b, d]`` and item indices ``[b]`` (None: none left), padded to
    ``batch_size`` and gathered on every rank; returns the real rows and indices of all ranks, or
    ``(empty, None)`` when no rank had a batch. Rows travel as float32 (exact for the storage dtypes)."""
    dev = comm_device()
    pad_rows = torch.zeros(batch_size, d, dtype=torch.float32, device=dev)
    pad_idx = torch.full((batch_size,), -1, dtype=torch.int64, device=dev)
    if rows is not None:
        pad_rows[: len(rows)] = rows.float()
        pad_idx[: len(idx)] = idx.to(dev)
    ids = gather_batch(pad_idx)
    keep = ids >= 0
    if not bool(keep.any()):
        return pad_rows[:0], None
    return gather_batch(pad_rows)[keep], ids[keep]


def _write_file(
    path: Path, header: dict[str, Any], w: torch.Tensor, fill: Callable[[np.memmap | None], None]
) -> int:
    """Write a cache file atomically (a kill leaves no half cache) in ``cache_format``'s layout, u_t
    filled in place by ``fill`` on the memory map. Returns the file size in bytes. Under torchrun
    only rank 0 writes; the other ranks call ``fill(None)`` (they compute rows, rank 0 stores them)."""
    head, offset = encode_header(header)
    info = CacheInfo(header, offset)
    if is_main():
        with atomic_path(path, fsync=True) as tmp:
            with open(tmp, "wb") as f:
                f.write(head)
                f.truncate(info.file_size)
            mm = np.memmap(tmp, dtype=numpy_dtype(info.dtype), mode="r+", offset=offset, shape=info.shape)
            fill(mm)
            mm.flush()
            sum_bytes = np.stack([view_checksums(mm[v]) for v in range(len(mm))]).tobytes()  # S [K, n_items]
            del mm
            w_bytes = w.numpy().tobytes()  # float32 (build_teacher_cache)
            with open(tmp, "r+b") as f:
                f.seek(info.text_offset)
                f.write(w_bytes)
                f.write(sum_bytes)
                f.write(tail_digest(w_bytes, sum_bytes))
    else:
        fill(None)
    barrier()  # the other ranks wait until rank 0 has renamed the finished file
    return info.file_size


def build_teacher_cache(
    teacher: Teacher,
    dataset: Any,
    path: str | Path,
    *,
    views: int,
    seed: int,
    batch_size: int,
    device: str | torch.device,
    student_spec: PreprocessSpec | None = None,
    dtype: torch.dtype = torch.float16,
    num_workers: int = 0,
    amp: str = "auto",
    progress: bool = True,
    sources: dict[str, str | None] | None = None,
) -> Path:
    """Store the teacher's L2-normalised image features u_t for ``views`` augmented views of every
    item of ``dataset`` (an ``ImageDataset`` with the *student's* train transform).

    Args:
        teacher: the frozen, prompted teacher (its image tower runs here, once per view).
        dataset: the distillation dataset; view k of item i is ``get_view(i, derive_view_seed(seed, k, i))``.
        path: the cache file to write (atomically: a temp file renamed at the end).
        views: K, the number of views (epoch e of a distillation run reads view ``e % K``; use
            K = epochs for the exact online behaviour).
        seed: the distillation run's seed (= the dataset's ``view_seed`` during distillation).
        batch_size, device: the teacher's batch size and device.
        student_spec: the student's ``PreprocessSpec``: what the dataset's tensors are normalised
            for. Default: read from the dataset's train transform (it must agree with it). Images
            are re-expressed for the teacher with ``tasks.adapt_images``, as online distillation does.
        dtype: storage dtype of u_t (float16, bfloat16 or float32).
        num_workers, progress: DataLoader workers (decoding, augmenting); a tqdm progress bar.
        amp: autocast for the teacher, as in ``fit`` (``auto``: on CUDA only).
        sources: ``models.identity.teacher_sources(...)`` of the files the teacher was built from,
            recorded so a run that never loads the teacher can refuse a cache built from other files.

    Returns the path written (with W ``[N, d]`` for ``dataset.full_classnames`` and s_t in it).
    """
    t0 = time.perf_counter()
    transform, tf_spec = _checked_transform(dataset, views, seed, batch_size, dtype, student_spec)
    path, device = Path(path), torch.device(device)
    dtype_name = STORAGE_DTYPES[dtype]
    was_training = teacher.training
    teacher.eval()
    classnames = list(dataset.full_classnames)
    n, d = len(dataset), int(teacher.embed_dim)
    header = {  # cache_format's docstring, "The header"; checked by cache_format.check_header
        "format": CACHE_FORMAT,
        "teacher": {**teacher_digests(teacher), "logit_scale": float(teacher.logit_scale), "embed_dim": d},
        "teacher_files": sources,
        "dataset": dataset_fingerprint(dataset),
        "transform": transform.fingerprint,
        "student_spec": spec_json(tf_spec),
        "seed": int(seed),
        "views": int(views),
        "dtype": dtype_name,
        "dim": d,
        "text_features": {"key": text_features_key(teacher, classnames), "classnames": classnames},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "torch": torch.__version__,
    }
    w = teacher.class_text_features(classnames).detach().float().cpu().contiguous()
    autocast, _ = amp_context(device, amp)
    rounds = math.ceil(math.ceil(n / world_size()) / batch_size)  # teacher batches per view and rank
    bar = progress_bar(int(views) * rounds, "teacher cache", progress and is_main())

    def fill(features: np.memmap | None) -> None:
        """Write u_t of every view into ``features`` ``[K, n_items, d]`` (None off rank 0). Under
        torchrun each rank runs the teacher on its own batches (``_view_loader``), and one all-gather
        per round sends every rank's rows and indices to rank 0, until no rank has a batch left."""
        for k in range(int(views)):
            batches = iter(_view_loader(dataset, seed, k, batch_size, num_workers, device))
            while True:
                batch = next(batches, None)
                rows = idx = None
                if batch is not None:
                    images, idx = batch[0].to(device, non_blocking=True), batch[-1]
                    with torch.no_grad(), autocast:
                        u = teacher.encode_image(adapt_images(images, tf_spec, teacher.preprocess))
                    rows = F.normalize(u.float(), dim=-1).to(dtype)
                if world_size() > 1:  # every rank's batch of this round (a rank with none left sends none)
                    rows, idx = _gather_rows(rows, idx, batch_size, d)
                if idx is None:  # no batch left (on any rank)
                    break
                if features is not None:
                    features[k, idx.cpu().numpy()] = encode_rows(rows.to(dtype).cpu())
                if bar is not None:
                    bar.update(1)

    try:
        total = _write_file(path, header, w, fill)
    finally:
        if bar is not None:
            bar.close()
        teacher.train(was_training)
    log.info(
        "teacher cache: %d views x %d items x %d (%s) -> %s (%.1f MB) in %.1f s on %d process(es)",
        views,
        n,
        d,
        dtype_name,
        path,
        total / 2**20,
        time.perf_counter() - t0,
        world_size(),
    )
    return path
