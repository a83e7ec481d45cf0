"""The embedded default dataset "digits": scikit-learn's handwritten digits, no download needed.

``sklearn.datasets.load_digits()`` ships 1797 real 8x8 grey images (values 0..16) with labels 0-9.
They become RGB PIL images in memory: values scaled to 0..255, upsampled with bicubic
interpolation to ``size`` (default 32), grey copied to 3 channels. Items have virtual paths
``digits://<index>`` (index into ``load_digits()``), resolved by ``load_digit``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
from PIL import Image

from .errors import DataError
from .records import VIRTUAL_IMAGES, DatasetSplits, Datum
from .splits import split_per_class

SCHEME = "digits://"
DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DIGITS_TEMPLATE = "a photo of the digit {}."
DIGITS_FRACTIONS = (0.4, 0.3, 0.05, 0.25)
DEFAULT_SIZE = 32


@functools.lru_cache(maxsize=1)
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32), d.target.astype(np.int64)


@functools.lru_cache(maxsize=8)
def _digit_images(size: int) -> tuple[Image.Image, ...]:
    images, _ = _raw_digits()
    out = []
    for im in images:
        grey = Image.fromarray(np.clip(np.rint(im * (255.0 / 16.0)), 0, 255).astype(np.uint8), mode="L")
        if size != grey.width:
            grey = grey.resize((size, size), Image.Resampling.BICUBIC)
        out.append(grey.convert("RGB"))
    return tuple(out)


def load_digit(path: str, size: int = DEFAULT_SIZE) -> Image.Image:
    """Resolve ``digits://<index>`` to an RGB PIL image of ``size`` x ``size`` (a copy)."""
    key = path[len(SCHEME) :] if path.startswith(SCHEME) else ""
    if not key.isdigit():
        raise DataError(f"bad digits path {path!r}: expected 'digits://<index>'")
    images = _digit_images(int(size))
    idx = int(key)
    if idx >= len(images):
        raise DataError(f"digits path {path!r}: index out of range (0..{len(images) - 1})")
    return images[idx].copy()


VIRTUAL_IMAGES[SCHEME] = load_digit  # ImageDataset resolves digits:// paths through this


def load_digits_splits(
    root: str | None = None, *, fractions: Sequence[float] = DIGITS_FRACTIONS, split_seed: int = 0
) -> DatasetSplits:
    """All 1797 digits as ``DatasetSplits`` with disjoint per-class pretrain/train/val/test parts
    (the loader of dataset ``digits``; ``root`` is ignored: the digits are embedded)."""
    _, labels = _raw_digits()
    data = [Datum(f"{SCHEME}{i}", int(y), DIGIT_NAMES[int(y)]) for i, y in enumerate(labels)]
    parts = split_per_class(data, fractions, split_seed)
    # split_per_class shuffles within a class: each part back in index order
    parts = {k: sorted(v, key=lambda d: int(d.path[len(SCHEME) :])) for k, v in parts.items()}
    return DatasetSplits("digits", list(DIGIT_NAMES), **parts, templates=[DIGITS_TEMPLATE])
