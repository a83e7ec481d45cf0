"""``ImageDataset``: a torch Dataset over a list of ``Datum`` with validated files and replayable views."""

from __future__ import annotations

import io
import logging
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from PIL import Image, ImageFile
from torch.utils.data import Dataset

from .builtin import DEFAULT_SIZE  # importing it registers the digits:// reader
from .contract import SplitMetadata
from .errors import DataError
from .records import Datum, virtual_reader

log = logging.getLogger(__name__)

_MASK63 = (1 << 63) - 1
_TRUNCATED_LOCK = threading.Lock()


def derive_view_seed(base_seed: int, epoch: int, index: int) -> int:
    """Seed of the augmented view of item ``index`` in ``epoch`` (stable across runs and platforms)."""
    x = (int(base_seed) * 1_000_003 + int(epoch)) & _MASK63
    return (x * 2_654_435_761 + int(index) * 40_503 + 97) & _MASK63


def decode_image(source: str | bytes, where: str | None = None) -> Image.Image:
    """Open and fully decode an image, a file path or its encoded bytes, as RGB; truncated or
    unreadable images raise ``DataError`` naming ``where`` (default: the path).

    Truncated images are always errors: if some other code set PIL's global
    ``ImageFile.LOAD_TRUNCATED_IMAGES``, it is switched off (under a lock) for this load.
    """

    def run() -> Image.Image:
        with Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source) as im:
            im.load()
            return im.convert("RGB")

    what = where or f"image {source}"
    try:
        if not ImageFile.LOAD_TRUNCATED_IMAGES:
            return run()
        with _TRUNCATED_LOCK:
            prev, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
            try:
                return run()
            finally:
                ImageFile.LOAD_TRUNCATED_IMAGES = prev
    except FileNotFoundError:
        raise DataError(f"image file not found: {source}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot decode {what}: {type(exc).__name__}: {exc}") from exc


def load_image_file(path: str) -> Image.Image:
    """Open and fully decode an image file as RGB (``decode_image``)."""
    return decode_image(path)


def seeded_view(transform: Callable[..., Any], image: Image.Image, seed: int) -> torch.Tensor:
    """``transform(image)`` drawn with a ``torch.Generator`` seeded with ``seed``: a replayable view."""
    return transform(image, generator=torch.Generator().manual_seed(int(seed) & _MASK63))


def check_labels_in_range(data: Sequence[Datum], n: int, unlabelled: bool, where: str, name: str) -> None:
    """Every label is a class index ``0..n-1`` (or -1, no label, in an unlabelled dataset); else a
    ``DataError`` naming the item."""
    for d in data:
        if unlabelled and d.label == -1:  # no label at all (comkd.data.unlabelled, unlabelled shards)
            continue
        if not isinstance(d.label, int) or not 0 <= d.label < n:
            raise DataError(
                f"label {d.label!r} of {d.path}{where} is outside the class list of {name or 'the dataset'} "
                f"({n} classes, valid labels 0..{n - 1})"
            )


class ImageDataset(SplitMetadata, Dataset):
    """Images and labels for training or evaluation.

    ``__getitem__(i)`` returns ``(image, label, i)``: ``image`` is ``transform(pil_image)`` (a tensor
    ``[3, S, S]`` for the transforms of ``build_transform``) or the PIL image when ``transform`` is
    None; ``label`` is an int, or -1 when ``unlabelled=True`` (labels withheld, as in distillation).

    At construction every label is checked against ``classnames`` and every file for existence.
    Decoding is checked when an image is loaded. With ``skip_bad=True`` missing and undecodable
    files are dropped at construction instead (every image is decoded once up front) and listed in
    ``skipped`` as ``(path, reason)``.

    Reproducible views: with ``view_seed`` set, ``__getitem__`` returns
    ``get_view(i, derive_view_seed(view_seed, epoch, i))`` (call ``set_epoch`` each epoch), so a
    teacher-output cache can replay any view later.
    """

    streaming = False  # items by index (the loop samples them; TrainingDataset)

    def __init__(
        self,
        data: Sequence[Datum],
        classnames: Sequence[str],
        transform: Callable[..., Any] | None = None,
        *,
        skip_bad: bool = False,
        source: str = "",
        **meta: Any,
    ) -> None:
        self._init_metadata(classnames, transform, **{"digits_size": DEFAULT_SIZE, **meta})
        where = f" ({source})" if source else ""
        check_labels_in_range(data, len(self.classnames), self.unlabelled, where, self.name)
        kept = self._check_files(list(data), skip_bad, where)
        if skip_bad:
            kept = self._check_decodable(kept)
            if self.skipped:
                log.warning(
                    "%s: skipped %d of %d items (missing or unreadable), %d remain",
                    self.name or "dataset",
                    len(self.skipped),
                    len(data),
                    len(kept),
                )
        self.data: list[Datum] = kept

    def _check_files(self, data: list[Datum], skip_bad: bool, where: str) -> list[Datum]:
        missing = [d for d in data if virtual_reader(d.path) is None and not os.path.isfile(d.path)]
        if not missing:
            return data
        if not skip_bad:
            shown = ", ".join(d.path for d in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise DataError(
                f"{len(missing)} listed image file(s) do not exist{where}: {shown}{more} "
                "(pass skip_bad=True to drop them and report them in dataset.skipped)"
            )
        bad = {d.path for d in missing}
        self.skipped.extend((p, "file does not exist") for p in sorted(bad))
        return [d for d in data if d.path not in bad]

    def _check_decodable(self, data: list[Datum]) -> list[Datum]:
        def check(d: Datum) -> str | None:
            try:
                self._load(d.path)
            except DataError as exc:
                return str(exc)
            return None

        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            reasons = list(pool.map(check, data))
        self.skipped.extend((d.path, r) for d, r in zip(data, reasons, strict=True) if r is not None)
        return [d for d, r in zip(data, reasons, strict=True) if r is None]

    # -- loading -----------------------------------------------------------------------------
    def _load(self, path: str) -> Image.Image:
        reader = virtual_reader(path)  # a virtual image (e.g. the embedded digits), rendered at digits_size
        return load_image_file(path) if reader is None else reader(path, self.digits_size)

    def load_image(self, index: int) -> Image.Image:
        """The decoded RGB PIL image of item ``index`` (raises ``DataError`` naming the file)."""
        return self._load(self.data[index].path)

    @property
    def item_ids(self) -> list[str]:
        """Each item's path (a file, or a virtual image such as ``digits://<index>``)."""
        return [d.path for d in self.data]

    def get_view(self, index: int, seed: int) -> torch.Tensor:
        """The train-augmented view of item ``index`` drawn with a generator seeded with ``seed``."""
        t = self.train_transform or self.transform
        if t is None or not getattr(t, "train", False):
            raise DataError(
                f"get_view needs a seedable train transform (from build_transform(..., train=True)); "
                f"{self.name or 'this dataset'} has transform={self.transform!r}, train_transform={self.train_transform!r}"
            )
        return seeded_view(t, self.load_image(index), seed)

    def __getitem__(self, index: int) -> tuple[Any, int, int]:
        d = self.data[index]
        if self.view_seed is not None:
            epoch = self.epoch % self.view_period if self.view_period else self.epoch
            image: Any = self.get_view(index, derive_view_seed(self.view_seed, epoch, index))
        else:
            image = self.load_image(index)
            if self.transform is not None:
                image = self.transform(image)
        return image, (-1 if self.unlabelled else d.label), index

    def __repr__(self) -> str:
        return (
            f"ImageDataset(name={self.name!r}, items={len(self)}, classes={self.num_classes}, "
            f"unlabelled={self.unlabelled}, skipped={len(self.skipped)})"
        )
