"""Teacher-output caches: distil without running the teacher.

Two caches, both keyed on content so a stale one is never used silently:

* **Class text features W** (``[N, d]``): ``load_or_compute_text_features`` stores W in
  ``cache_dir/text_features-<key>.safetensors``; the key (``text_features_key``) hashes the
  teacher's model name, its preprocessing, a SHA-256 of every frozen weight, a SHA-256 of its
  prompt tensors, the class names and the templates. Hashing all weights costs about 1.5 s for
  ViT-L/14 (1.7 GB, measured by ``comkd bench``) and is done once per teacher and weight version.
* **Teacher image features u_t** for K augmented views of every training image:
  ``build_teacher_cache`` writes one memory-mapped file; ``CachedTeacherOutputs`` reads it
  during distillation as a drop-in for ``tasks.TeacherOutputs``.

View k of item i is the train transform drawn with ``derive_view_seed(seed, k, i)``, exactly the
view an ``ImageDataset`` with ``view_seed=seed`` yields in epoch k. So the cache's ``seed`` must
equal the distillation run's seed (``cfg.seed``, the dataset's ``view_seed``); ``open`` checks it.
Epoch e reads view ``e % K`` and ``open`` makes the dataset replay that same view (for e >= K).

File layout (little-endian)::

    b"COMKDTC1" | uint64 header length H | H bytes of JSON header (space-padded, so the data
    starts at a multiple of 64) | u_t  [K, n_items, d]  (dtype from the header, C order)
                                | W    [N, d]  float32 (the teacher's text features for the
                                  dataset's ``full_classnames``)

The header holds the teacher's identity (model, weights and prompt digests, key, logit scale,
preprocessing), the dataset fingerprint (name, item count, SHA-256 of the image paths, or for
WebDataset shards of the ``<shard>#<key>`` sample keys in row order; labels are never read), the transform fingerprint, the seed, K, the dtype and d. Everything a distillation
run needs from the teacher (u_t, W, s_t) is in the file, so a run with a cache never has to load
the teacher at all.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ..data.dataset import derive_view_seed
from ..data.records import virtual_reader
from ..digests import file_sha256
from ..fileio import atomic_path
from ..models import PreprocessSpec, Teacher
from ..models.identity import teacher_digests
from .tasks import adapt_images
from .utils import amp_context, show_progress

log = logging.getLogger(__name__)

CACHE_FORMAT = "comkd-teacher-cache/1"
TEXT_FORMAT = "comkd-text-features/1"
MAGIC = b"COMKDTC1"
_ALIGN = 64
# on-disk element type of each supported cache dtype (bfloat16 is stored as raw 16-bit words)
_NP_DTYPES: dict[str, Any] = {"float16": np.float16, "float32": np.float32, "bfloat16": np.uint16}
_TORCH_DTYPES = {torch.float16: "float16", torch.float32: "float32", torch.bfloat16: "bfloat16"}


class StaleCacheError(ValueError):
    """A cache that does not fit the current teacher, data, transform or seed; the message names
    every stale field with the cached and the current value."""


# -- digests ---------------------------------------------------------------------------------
def teacher_sources(pretrained: str | None, prompts: str | None) -> dict[str, str | None]:
    """What the teacher was built from, as the config names it: ``teacher.pretrained`` and
    ``teacher.prompts``, each the SHA-256 of the file for a local file, else the value itself
    (an open_clip tag, ``none``, None). A run with a cache never loads the teacher, so these are
    what it can compare."""
    from ..models.backbones import _is_local_file

    def ident(value: str | None, is_file: bool) -> str | None:
        if not value or not is_file:
            return value or None
        if not Path(value).is_file():
            raise FileNotFoundError(f"teacher file not found: {value}")
        return "sha256:" + file_sha256(value)

    return {
        "teacher.pretrained": ident(pretrained, _is_local_file(pretrained)),
        "teacher.prompts": ident(prompts, True),
    }


def teacher_key(teacher: Teacher) -> str:
    """SHA-256 identifying the teacher: model name, preprocessing, frozen weights and prompts."""
    return teacher_digests(teacher)["key"]


def text_features_key(
    teacher: Teacher, classnames: Sequence[str], templates: Sequence[str] | None = None
) -> str:
    """SHA-256 of (teacher key, class names, templates): the identity of one W.

    ``templates=None`` means the prompted W of ``Teacher.class_text_features``; a template list
    means the frozen, template-averaged features of ``Teacher.encode_templates``.
    """
    payload = {
        "format": TEXT_FORMAT,
        "teacher": teacher_key(teacher),
        "classnames": list(classnames),
        "templates": list(templates) if templates is not None else None,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _compute_text_features(
    teacher: Teacher, classnames: Sequence[str], templates: Sequence[str] | None
) -> torch.Tensor:
    if templates is None:
        return teacher.class_text_features(list(classnames))
    was_training = teacher.training
    teacher.eval()
    try:
        return teacher.encode_templates(list(classnames), list(templates))
    finally:
        teacher.train(was_training)


def load_or_compute_text_features(
    teacher: Teacher,
    classnames: Sequence[str],
    cache_dir: str | Path,
    templates: Sequence[str] | None = None,
) -> torch.Tensor:
    """W ``[N, d]`` (float32, on the teacher's device) from ``cache_dir/text_features-<key>.safetensors``
    when the key matches, else computed with the teacher and stored there (atomically).

    A file whose stored key or shape does not match (corrupt, hand-edited) is recomputed.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    key = text_features_key(teacher, classnames, templates)
    path = Path(cache_dir) / f"text_features-{key}.safetensors"
    device = next(teacher.parameters()).device
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            w = load_file(str(path))["text_features"]
            if meta.get("comkd.key") == key and tuple(w.shape) == (len(classnames), teacher.embed_dim):
                log.info("text features: reusing %s", path)
                return w.to(device=device, dtype=torch.float32)
            log.warning("text features: %s does not match its key or shape; recomputing", path)
        except Exception as e:  # noqa: BLE001 - any unreadable file is simply recomputed
            log.warning("text features: cannot read %s (%s); recomputing", path, e)
    w = _compute_text_features(teacher, classnames, templates).detach().float()
    meta = {
        "comkd.format": TEXT_FORMAT,
        "comkd.key": key,
        "comkd.teacher_model": teacher.model_name,
        "comkd.teacher_key": teacher_key(teacher),
        "comkd.classnames": json.dumps(list(classnames)),
        "comkd.templates": json.dumps(list(templates) if templates is not None else None),
    }
    with atomic_path(path) as tmp:
        save_file({"text_features": w.contiguous().cpu()}, str(tmp), metadata=meta)
    log.info("text features: stored %s", path)
    return w


# -- dataset and transform fingerprints --------------------------------------------------------
def dataset_fingerprint(dataset: Any) -> dict[str, Any]:
    """Name, item count and SHA-256 of the ordered image paths (labels are never read).

    For virtual images (``data.records.virtual_reader``, e.g. the embedded digits) the rendering size
    is included too.
    """
    ids = getattr(dataset, "item_ids", None)  # streamed shards: "<shard name>#<sample key>"
    paths = list(ids) if ids is not None else [d.path for d in dataset.data]
    fp: dict[str, Any] = {
        "name": getattr(dataset, "name", ""),
        "items": len(paths),
        "paths_sha256": hashlib.sha256("\n".join(paths).encode()).hexdigest(),
    }
    if any(virtual_reader(p) is not None for p in paths):  # rendered images: their size is content too
        fp["digits_size"] = int(getattr(dataset, "digits_size", 0))
    return fp


def _train_transform(dataset: Any):
    t = getattr(dataset, "train_transform", None) or getattr(dataset, "transform", None)
    if t is None or not getattr(t, "train", False) or not hasattr(t, "fingerprint"):
        raise ValueError(
            f"teacher cache: dataset {getattr(dataset, 'name', '') or dataset!r} has no seedable train transform "
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


def _spec_dict(spec: PreprocessSpec) -> dict[str, Any]:
    return {
        "image_size": int(spec.image_size),
        "mean": [round(float(x), 8) for x in spec.mean],
        "std": [round(float(x), 8) for x in spec.std],
        "interpolation": spec.interpolation,
    }


# -- file format -------------------------------------------------------------------------------
@dataclass
class CacheInfo:
    """The header of a teacher cache file (see the module docstring)."""

    header: dict[str, Any]
    data_offset: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return (int(self.header["views"]), int(self.header["dataset"]["items"]), int(self.header["dim"]))

    @property
    def dtype(self) -> str:
        return str(self.header["dtype"])

    @property
    def features_bytes(self) -> int:
        k, n, d = self.shape
        return k * n * d * np.dtype(_NP_DTYPES[self.dtype]).itemsize

    @property
    def text_offset(self) -> int:
        return self.data_offset + self.features_bytes

    @property
    def text_shape(self) -> tuple[int, int]:
        return (len(self.header["text_features"]["classnames"]), int(self.header["dim"]))


def _encode_header(header: dict[str, Any]) -> tuple[bytes, int]:
    body = json.dumps(header, indent=1, sort_keys=True).encode()
    start = len(MAGIC) + 8
    total = math.ceil((start + len(body)) / _ALIGN) * _ALIGN
    body += b" " * (total - start - len(body))
    return MAGIC + struct.pack("<Q", len(body)) + body, total


def read_cache_info(path: str | Path) -> CacheInfo:
    """Read and check a cache file's header (no feature data is loaded)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"teacher cache not found: {path} (build it with `comkd cache-teacher`)")
    with open(path, "rb") as f:
        magic = f.read(len(MAGIC))
        if magic != MAGIC:
            raise ValueError(f"{path} is not a comkd teacher cache (bad magic {magic!r})")
        (n,) = struct.unpack("<Q", f.read(8))
        try:
            header = json.loads(f.read(n).decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: unreadable teacher-cache header ({e})") from None
    if header.get("format") != CACHE_FORMAT:
        raise ValueError(f"{path}: cache format {header.get('format')!r}, this comkd reads {CACHE_FORMAT!r}")
    info = CacheInfo(header=header, data_offset=len(MAGIC) + 8 + n)
    want = info.text_offset + info.text_shape[0] * info.text_shape[1] * 4
    size = path.stat().st_size
    if size != want:
        raise ValueError(
            f"{path}: file has {size} bytes, its header describes {want}; the file is truncated or corrupt"
        )
    return info


# -- building ----------------------------------------------------------------------------------
class _Views(Dataset):
    """View ``k`` of every item: ``(get_view(i, derive_view_seed(seed, k, i)), i)``."""

    def __init__(self, dataset: Any, seed: int, k: int):
        self.dataset, self.seed, self.k = dataset, int(seed), int(k)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.dataset.get_view(i, derive_view_seed(self.seed, self.k, i)), i


class _StreamViews(torch.utils.data.IterableDataset):
    """The same for a streaming dataset (WebDataset shards): its ``replay_stream(seed, k)`` yields
    ``(view, label, i)`` in shard order, view k of item i drawn as ``get_view`` would."""

    def __init__(self, dataset: Any, seed: int, k: int):
        self.stream = dataset.replay_stream(seed, k)

    def __iter__(self):
        for image, _, i in self.stream:
            yield image, i


def _views(dataset: Any, seed: int, k: int) -> Dataset:
    return (
        _StreamViews(dataset, seed, k) if getattr(dataset, "streaming", False) else _Views(dataset, seed, k)
    )


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
    text_cache_dir: str | Path | None = None,
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
        batch_size: teacher batch size.
        device: where the teacher runs.
        student_spec: the student's ``PreprocessSpec``: what the dataset's tensors are normalised
            for. Default: read from the dataset's train transform (it must agree with it). Images
            are re-expressed for the teacher with ``tasks.adapt_images``, as online distillation does.
        dtype: storage dtype of u_t (float16, bfloat16 or float32).
        num_workers: DataLoader workers for decoding/augmenting.
        text_cache_dir: where W is cached by ``load_or_compute_text_features`` (default: no W file,
            W is only embedded in the cache).
        amp: autocast for the teacher, as in ``fit`` (``auto``: on CUDA only).
        progress: show a tqdm progress bar.
        sources: ``teacher_sources(...)`` of the files the teacher was built from, recorded so a
            run that never loads the teacher can refuse a cache built from other files.

    Returns the path written. The file also embeds W for ``dataset.full_classnames`` and the
    teacher's logit scale, so distillation from it needs no teacher.
    """
    if views < 1 or batch_size < 1:
        raise ValueError(
            f"teacher cache: views and batch_size must be >= 1, got views={views}, batch_size={batch_size}"
        )
    if dtype not in _TORCH_DTYPES:
        raise ValueError(f"teacher cache: dtype must be one of {list(_TORCH_DTYPES)}, got {dtype}")
    path = Path(path)
    device = torch.device(device)
    transform = _train_transform(dataset)
    tf_spec = spec_of_transform(transform)
    if student_spec is not None and _spec_dict(student_spec) != _spec_dict(tf_spec):
        raise ValueError(
            f"teacher cache: student_spec {_spec_dict(student_spec)} disagrees with the dataset's train transform "
            f"{_spec_dict(tf_spec)}; the dataset must use the student's preprocessing"
        )
    view_seed = getattr(dataset, "view_seed", None)
    if view_seed is not None and int(view_seed) != int(seed):
        log.warning(
            "teacher cache: seed %d differs from the dataset's view_seed %d; the cache is for runs with seed %d",
            seed,
            view_seed,
            seed,
        )
    dtype_name = _TORCH_DTYPES[dtype]
    np_dtype = _NP_DTYPES[dtype_name]
    was_training = teacher.training
    teacher.eval()
    ident = teacher_digests(teacher)
    classnames = list(getattr(dataset, "full_classnames", None) or dataset.classnames)
    if text_cache_dir is not None:
        w = load_or_compute_text_features(teacher, classnames, text_cache_dir)
    else:
        w = teacher.class_text_features(classnames)
    w = w.detach().float().cpu().contiguous()
    n, d = len(dataset), int(teacher.embed_dim)
    header = {
        "format": CACHE_FORMAT,
        "teacher": {
            **ident,
            "logit_scale": float(teacher.logit_scale),
            "embed_dim": d,
        },
        "teacher_files": sources,
        "dataset": dataset_fingerprint(dataset),
        "transform": transform.fingerprint,
        "student_spec": _spec_dict(tf_spec),
        "seed": int(seed),
        "views": int(views),
        "dtype": dtype_name,
        "dim": d,
        "text_features": {
            "key": text_features_key(teacher, classnames),
            "classnames": classnames,
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "torch": torch.__version__,
    }
    head, offset = _encode_header(header)
    feat_bytes = int(views) * n * d * np.dtype(np_dtype).itemsize
    total = offset + feat_bytes + w.numel() * 4
    autocast, _ = amp_context(device, amp)
    bar = None
    if show_progress(progress):
        from tqdm.auto import tqdm

        bar = tqdm(
            total=int(views) * math.ceil(n / batch_size),
            desc="teacher cache",
            dynamic_ncols=True,
            mininterval=0.5,
        )
    try:
        with atomic_path(path, fsync=True) as tmp:  # a kill leaves no half cache
            with open(tmp, "wb") as f:
                f.write(head)
                f.truncate(total)
            mm = np.memmap(tmp, dtype=np_dtype, mode="r+", offset=offset, shape=(int(views), n, d))
            for k in range(int(views)):
                loader = DataLoader(
                    _views(dataset, seed, k),
                    batch_size=batch_size,
                    shuffle=False,
                    num_workers=num_workers,
                    pin_memory=device.type == "cuda",
                )
                for images, idx in loader:
                    images = images.to(device, non_blocking=True)
                    with torch.no_grad(), autocast:
                        u = teacher.encode_image(adapt_images(images, tf_spec, teacher.preprocess))
                    u = F.normalize(u.float(), dim=-1).to(dtype).cpu()
                    rows = u.view(torch.uint16).numpy() if dtype == torch.bfloat16 else u.numpy()
                    mm[k, idx.numpy()] = rows
                    if bar is not None:
                        bar.update(1)
            mm.flush()
            del mm
            wm = np.memmap(tmp, dtype=np.float32, mode="r+", offset=offset + feat_bytes, shape=tuple(w.shape))
            wm[:] = w.numpy()
            wm.flush()
            del wm
    finally:
        if bar is not None:
            bar.close()
        teacher.train(was_training)
    log.info(
        "teacher cache: %d views x %d items x %d (%s) -> %s (%.1f MB)",
        views,
        n,
        d,
        dtype_name,
        path,
        total / 2**20,
    )
    return path


# -- reading -----------------------------------------------------------------------------------
def replay_cached_views(dataset: Any, views: int) -> None:
    """Make ``dataset`` (an ``ImageDataset``) draw, in epoch e, the view of epoch ``e % views``
    (what the cache holds)."""
    if not hasattr(dataset, "view_period"):
        raise TypeError(f"a teacher cache replays views of an ImageDataset, got {type(dataset).__name__}")
    dataset.view_period = int(views)


class CachedTeacherOutputs:
    """Teacher image features u_t read from a cache built by ``build_teacher_cache``.

    Callable like ``tasks.TeacherOutputs``: ``(images [B,3,H,W], indices [B], epoch) -> u_t [B, d]``
    (float32, on ``device``), the rows ``indices`` of view ``epoch % views``. Also carries what the
    distillation needs from the teacher besides u_t: ``text_features`` (W ``[N, d]`` for
    ``classnames``) and ``logit_scale`` (s_t). Open it with ``CachedTeacherOutputs.open``.
    """

    #: largest view (bytes) kept whole on an accelerator by default
    DEVICE_VIEW_BUDGET = 2 * 2**30

    def __init__(self, path: Path, info: CacheInfo, device: torch.device, preload_view: bool | None = None):
        self.path, self.info, self.device = path, info, device
        k, n, d = info.shape
        self.views, self.items, self.dim = k, n, d
        self._bf16 = info.dtype == "bfloat16"
        view_bytes = n * d * np.dtype(_NP_DTYPES[info.dtype]).itemsize
        if preload_view is None:
            preload_view = device.type != "cpu" and view_bytes <= self.DEVICE_VIEW_BUDGET
        # On an accelerator the current epoch's view lives on the device, so a step indexes it with
        # the batch's (device) indices: no host round trip, no synchronisation per step.
        self.preload_view = bool(preload_view)
        self._view: tuple[int, torch.Tensor] | None = None
        self._features = np.memmap(
            path, dtype=_NP_DTYPES[info.dtype], mode="r", offset=info.data_offset, shape=(k, n, d)
        )
        w = np.fromfile(path, dtype=np.float32, count=int(np.prod(info.text_shape)), offset=info.text_offset)
        self.text_features = torch.from_numpy(w.reshape(info.text_shape).copy()).to(device)
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
        ``view_seed`` is the run seed) after checking that it is not stale.

        Checked: the dataset (name, item count, image paths), its train transform's fingerprint,
        its ``view_seed`` against the cache's seed, ``student_spec`` if given, and the teacher —
        the full identity when ``teacher`` is given (model, preprocessing, weights, prompts), the
        key when only ``teacher_key`` is given (a run that never loads the teacher), nothing
        when neither is; ``sources`` (``teacher_sources``) against the files the cache was built
        from. Raises ``StaleCacheError`` naming every stale field.

        ``preload_view``: keep the current epoch's view ``[n_items, d]`` on ``device`` (default: on
        accelerators when it fits in ``DEVICE_VIEW_BUDGET``); otherwise rows are read from the
        memory-mapped file each step.

        Side effect: the dataset replays view ``e % views`` in epoch ``e`` (``replay_cached_views``).
        """
        path = Path(path)
        info = read_cache_info(path)
        h = info.header
        stale: list[str] = []

        def diff(what: str, cached: Any, now: Any) -> None:
            if cached != now:
                stale.append(f"other {what}: cache has {cached!r}, now {now!r}")

        if teacher is not None:
            ident = teacher_digests(teacher)
            ct = h["teacher"]
            diff("teacher model", ct["model"], ident["model"])
            diff("teacher weights (sha256)", ct["weights_sha256"], ident["weights_sha256"])
            diff("teacher prompts (sha256)", ct["prompts_sha256"], ident["prompts_sha256"])
            diff("teacher preprocessing", ct["preprocess"], ident["preprocess"])
        elif teacher_key is not None:
            diff("teacher (key)", h["teacher"]["key"], teacher_key)
        else:
            log.info("teacher cache %s: teacher identity not checked (no teacher or teacher_key given)", path)
        if sources is not None:
            recorded = h.get("teacher_files")
            if recorded is None:
                stale.append("teacher files: the cache records none (built without `comkd cache-teacher`)")
            else:
                for field in sorted(sources):
                    diff(f"{field} (file sha256, or the value)", recorded.get(field), sources[field])
        fp = dataset_fingerprint(dataset)
        cd = h["dataset"]
        for field in sorted(set(cd) | set(fp)):
            diff(f"data ({field})", cd.get(field), fp.get(field))
        transform = _train_transform(dataset)
        diff("transform", h["transform"], transform.fingerprint)
        if student_spec is not None:
            diff("student preprocessing", h["student_spec"], _spec_dict(student_spec))
        view_seed = getattr(dataset, "view_seed", None)
        if view_seed is None:
            stale.append(
                "other seed: the dataset draws no replayable views (view_seed=None); distil with view_seed = "
                f"the cache's seed {h['seed']}"
            )
        else:
            diff(
                "seed (the run seed / dataset view_seed must equal the cache's seed)",
                h["seed"],
                int(view_seed),
            )
        if stale:
            raise StaleCacheError(
                f"teacher cache {path} is stale:\n  "
                + "\n  ".join(stale)
                + "\nrebuild it for this teacher, data, transform and seed (`comkd cache-teacher`)"
            )
        out = cls(path, info, torch.device(device), preload_view)
        replay_cached_views(dataset, out.views)
        return out

    def view_of_epoch(self, epoch: int) -> int:
        return int(epoch) % self.views

    def _rows(self, view: int, idx: np.ndarray | slice) -> torch.Tensor:
        arr = self._features[view, idx]
        # a slice of the read-only map is copied; fancy indexing already returns a copy
        rows = torch.from_numpy(np.array(arr) if isinstance(idx, slice) else np.ascontiguousarray(arr))
        return rows.view(torch.bfloat16) if self._bf16 else rows

    def __call__(self, images: torch.Tensor | None, indices: torch.Tensor, epoch: int) -> torch.Tensor:
        """u_t ``[B, d]`` float32 on ``self.device`` for dataset items ``indices`` in ``epoch``."""
        view = self.view_of_epoch(epoch)
        if self.preload_view and torch.is_tensor(indices):
            if self._view is None or self._view[0] != view:
                self._view = (view, self._rows(view, slice(None)).to(self.device))
            if images is not None and indices.shape[0] != images.shape[0]:
                raise ValueError(
                    f"teacher cache: {indices.shape[0]} indices for a batch of {images.shape[0]} images"
                )
            return self._view[1][indices.to(self.device, non_blocking=True)].float()
        idx = np.asarray(indices.detach().cpu() if torch.is_tensor(indices) else indices, dtype=np.int64)
        if images is not None and idx.shape[0] != images.shape[0]:
            raise ValueError(f"teacher cache: {idx.shape[0]} indices for a batch of {images.shape[0]} images")
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
