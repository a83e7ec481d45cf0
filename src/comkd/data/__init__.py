"""Datasets for ComKD-CLIP: CoOp datasets, image folders, CSV files, WebDataset shards and the
embedded digits.

``load_splits`` gives every split and the class list; ``build_dataset`` one split (few-shot,
base/novel) ready for a DataLoader. ``DATASETS`` maps each registered name to its loader
``(root, *, split_file, skip_bad, **options)``; add your own with ``@register_dataset("name")``.
Every bad input raises ``DataError``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .builtin import DEFAULT_SIZE, load_digits_splits
from .contract import StreamingDataset, TrainingDataset
from .coop import (
    COOP_SPECS,
    load_coop_json,
    load_fgvc_aircraft,
    load_imagenet,
    load_imagenet_variant,
)
from .dataset import ImageDataset, derive_view_seed
from .errors import DataError
from .files import read_split_file
from .folder import load_csv, load_image_folder
from .records import DatasetSplits, Datum
from .splits import base_novel_split, few_shot, split_per_class, subsample_classes
from .transforms import CLIP_MEAN, CLIP_STD, build_transform, transform_fingerprint
from .unlabelled import collect_images, load_unlabelled_folder
from .wds import WdsImageDataset, load_wds

__all__ = [
    "READERS",
    "CLIP_MEAN",
    "CLIP_STD",
    "DATASETS",
    "DataError",
    "DatasetSplits",
    "Datum",
    "ImageDataset",
    "StreamingDataset",
    "TrainingDataset",
    "WdsImageDataset",
    "base_novel_split",
    "build_dataset",
    "build_transform",
    "collect_images",
    "derive_view_seed",
    "few_shot",
    "load_splits",
    "promptsrc_templates",
    "read_split_file",
    "register_dataset",
    "split_per_class",
    "subsample_classes",
    "transform_fingerprint",
]


def promptsrc_templates() -> list[str]:
    """PromptSRC's 60 text templates (``{}`` = class name), shipped in ``promptsrc_templates.txt``."""
    text = (Path(__file__).parent / "promptsrc_templates.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]


Loader = Callable[..., DatasetSplits]
DATASETS: dict[str, Loader] = {}


def register_dataset(name: str) -> Callable[[Loader], Loader]:
    """Decorator registering ``loader(root, *, split_file=None, skip_bad=False, **options) -> DatasetSplits``."""

    def deco(fn: Loader) -> Loader:
        if name in DATASETS:
            raise ValueError(f"dataset {name!r} is already registered")
        DATASETS[name] = fn
        return fn

    return deco


def _register_no_split_file(name: str, load: Loader) -> None:
    """Register ``load(root, **options)`` as dataset ``name``, refusing a split file; the loader's
    signature (read by ``loader_options``) is ``load``'s plus ``split_file`` and ``skip_bad``."""
    params = list(inspect.signature(load).parameters.values())
    takes_skip_bad = any(p.name == "skip_bad" for p in params)

    def loader(
        root: str | None = None, *, split_file: str | None = None, skip_bad: bool = False, **options: Any
    ) -> DatasetSplits:
        if split_file is not None:
            raise DataError(f"dataset {name!r} does not read a split file (got split_file={split_file!r})")
        if takes_skip_bad:
            options["skip_bad"] = skip_bad
        return load(root, **options)

    own = inspect.signature(loader).parameters
    rest = [p for p in params[1:] if p.name != "skip_bad"]
    sig = inspect.Signature([params[0].replace(name="root"), own["split_file"], own["skip_bad"], *rest])
    loader.__signature__ = sig  # type: ignore[attr-defined]
    register_dataset(name)(loader)


for _spec in COOP_SPECS.values():
    if _spec.split_file is not None:  # the CoOp datasets read from a split_zhou_*.json
        register_dataset(_spec.name)(functools.partial(load_coop_json, _spec))
_register_no_split_file("imagenet", load_imagenet)
_register_no_split_file("fgvc_aircraft", load_fgvc_aircraft)
for _name in ("imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r"):
    _register_no_split_file(_name, functools.partial(load_imagenet_variant, _name))
register_dataset("imagefolder")(load_image_folder)
_register_no_split_file("csv", load_csv)
_register_no_split_file("digits", load_digits_splits)
_register_no_split_file("unlabelled", load_unlabelled_folder)
_register_no_split_file("wds", load_wds)


def load_splits(name: str, root: str | None = None, **kw: Any) -> DatasetSplits:
    """Load every split of dataset ``name`` (a key of ``DATASETS``); ``kw`` go to its loader."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; valid names: {', '.join(sorted(DATASETS))}")
    try:
        return DATASETS[name](root, **kw)
    except TypeError as exc:
        if "unexpected keyword argument" in str(exc):
            raise DataError(f"dataset {name!r}: {exc}") from exc
        raise


#: reader name (``DatasetSplits.readers``; a loader names one per split, default "files") ->
#: the dataset class that reads such items, and the ``build_dataset`` options it takes beyond the
#: contract's. A new item source is a class satisfying ``TrainingDataset`` plus an entry here.
READERS: dict[str, tuple[type, tuple[str, ...]]] = {
    "files": (ImageDataset, ()),
    "shards": (WdsImageDataset, ("shuffle_buffer",)),
}


def build_dataset(
    name: str,
    root: str | None = None,
    split: str = "train",
    transform: Callable[..., Any] | None = None,
    *,
    split_file: str | None = None,
    num_shots: int | None = None,
    subsample: str = "all",
    seed: int = 1,
    skip_bad: bool = False,
    unlabelled: bool = False,
    train_transform: Callable[..., Any] | None = None,
    view_seed: int | None = None,
    digits_size: int = DEFAULT_SIZE,
    shuffle_buffer: int = 1000,
    **kw: Any,
) -> ImageDataset | WdsImageDataset:
    """One split of a registered dataset as an ``ImageDataset``.

    Steps, in CoOp's order: load all splits (``load_splits(name, root, split_file=..., **kw)``);
    take ``split``; if ``num_shots`` is set, sample that many items per class with ``seed`` for
    ``pretrain``/``train`` and ``min(num_shots, 4)`` for ``val`` (``test`` is never subsampled);
    then keep the ``subsample`` classes ("all", "base" or "novel"), relabelled from 0. The result
    carries ``full_classnames`` and ``class_indices`` (the original label of each class) so
    callers can slice teacher text features, and ``parent_class_indices`` for ImageNet-A/-R.
    An empty result raises ``DataError``; files are checked as described in ``ImageDataset``.
    """
    splits = load_splits(name, root, split_file=split_file, skip_bad=skip_bad, **kw)
    if split not in splits.split_names:
        raise DataError(
            f"unknown split {split!r} of dataset {name!r}; valid: {', '.join(splits.split_names)}"
        )
    data: list[Datum] = list(splits.split(split))
    if num_shots is not None and split != "test":
        shots = min(int(num_shots), 4) if split == "val" else int(num_shots)
        data = list(few_shot(data, shots, seed))
    data, classnames, idx = base_novel_split(data, splits.classnames, subsample)  # type: ignore[arg-type]
    if not data:
        raise DataError(
            f"split {split!r} of dataset {name!r} is empty (subsample={subsample!r}, num_shots={num_shots})"
        )
    if splits.reader(split) not in READERS:
        raise DataError(
            f"dataset {name!r}, split {split!r}: reader {splits.reader(split)!r} is not one of {', '.join(READERS)}"
        )
    cls, options = READERS[splits.reader(split)]
    kw_extra = {k: v for k, v in (("shuffle_buffer", shuffle_buffer),) if k in options}
    ds = cls(
        data,
        classnames,
        transform,
        unlabelled=unlabelled,
        skip_bad=skip_bad,
        train_transform=train_transform,
        view_seed=view_seed,
        name=name,
        templates=splits.templates,
        digits_size=digits_size,
        source=f"dataset {name!r}, split {split!r}",
        class_indices=idx,
        full_classnames=splits.classnames,
        parent_class_indices=[splits.class_indices[i] for i in idx]
        if splits.class_indices is not None
        else None,
        **kw_extra,
    )
    ds.skipped[:0] = splits.skipped
    return ds
