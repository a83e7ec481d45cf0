"""Plain records shared by every dataset reader: one labelled image and the splits of a dataset."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

DEFAULT_TEMPLATE = "a photo of a {}."


@dataclass(frozen=True)
class Datum:
    """One image: an absolute file path (or a virtual path such as ``digits://123``), its label and
    the class name of that label."""

    path: str
    label: int
    classname: str


@dataclass
class DatasetSplits:
    """All splits of one dataset.

    ``classnames[i]`` is the name of label ``i``. ``pretrain`` is only filled for datasets that
    carry data for stage-0 contrastive pre-training (the embedded digits, split image folders).
    ``class_indices``, when set, maps each label to its index in a parent label space (for
    ImageNet-A/-R: the ImageNet-1k index of each of the 200 classes), so a caller holding text
    features for the parent classes can slice them. ``skipped`` lists ``(path, reason)`` for
    inputs dropped while reading (only with ``skip_bad=True``, e.g. empty class folders).
    """

    name: str
    classnames: list[str]
    train: list[Datum]
    val: list[Datum]
    test: list[Datum]
    pretrain: list[Datum] = field(default_factory=list)
    templates: list[str] = field(default_factory=lambda: [DEFAULT_TEMPLATE])
    class_indices: list[int] | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)
    #: further named pools beside the four splits (WebDataset ``data.pools``, e.g. a student's
    #: pre-training pool), usable wherever a split name is
    pools: dict[str, list[Datum]] = field(default_factory=dict)
    #: how a split's (or pool's) items are read, as its loader says: ``"shards"`` (samples streamed
    #: from WebDataset shards) or ``"files"`` (an image file each), the reader of any name not listed
    readers: dict[str, str] = field(default_factory=dict)

    def reader(self, split: str) -> str:
        """``"shards"`` or ``"files"``: how ``split``'s items are read."""
        return self.readers.get(split, "files")

    @property
    def split_names(self) -> tuple[str, ...]:
        """The four split names, then the extra pools'."""
        return (*SPLIT_NAMES, *self.pools)

    def split(self, name: str) -> list[Datum]:
        """Return the split called ``name`` (``pretrain``, ``train``, ``val``, ``test`` or a pool)."""
        from .errors import DataError

        if name in self.pools:
            return self.pools[name]
        if name not in SPLIT_NAMES:
            raise DataError(
                f"unknown split {name!r} for dataset {self.name!r}; valid: {', '.join(self.split_names)}"
            )
        return getattr(self, name)


SPLIT_NAMES = ("pretrain", "train", "val", "test")


#: readers of virtual image paths (images that are not files, e.g. ``digits://<index>``), which
#: ``ImageDataset`` resolves: ``scheme -> reader(path, size) -> RGB PIL image``; a dataset module adds its own
VIRTUAL_IMAGES: dict[str, Callable[[str, int], Any]] = {}


def virtual_reader(path: str) -> Callable[[str, int], Any] | None:
    """The reader of a virtual path, or None for a file path."""
    return next((reader for scheme, reader in VIRTUAL_IMAGES.items() if path.startswith(scheme)), None)
