"""The dataset contract: what the engine (the training loop, the teacher cache, the stages and the
evaluation) reads off a dataset, written once. ``ImageDataset`` (files in memory order) and
``WdsImageDataset`` (streamed shards) both satisfy it; ``tests/test_data.py`` checks every member
on both, so a new dataset class knows what to provide."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

from .records import DEFAULT_TEMPLATE, Datum


@runtime_checkable
class TrainingDataset(Protocol):
    """One split, ready for ``engine.loop.fit``, the teacher cache and evaluation.

    Items are ``(image, label, index)``: ``index`` is the item's position in the split (a teacher
    cache keys its rows by it), ``label`` indexes ``classnames`` (-1 when ``unlabelled``).
    """

    name: str  # the registered dataset name (fingerprints, messages)
    classnames: list[str]  # the split's classes, in label order (after base/novel subsampling)
    full_classnames: list[str]  # every class of the dataset, base and novel: the rows of W
    class_indices: list[int]  # classnames[i] is full_classnames[class_indices[i]]
    templates: list[str]  # the dataset's caption templates ("a photo of a {}.")
    unlabelled: bool  # labels are withheld (distillation pools)
    transform: Callable[..., Any] | None  # the evaluation transform (PIL -> tensor)
    train_transform: Callable[..., Any] | None  # the augmentation, seeded per view
    view_seed: int | None  # base seed of the augmented views (None: the global RNG)
    view_period: int | None  # views repeat every this many epochs (a teacher cache of K views)
    digits_size: int  # the embedded digits' upsampled size (0 elsewhere): part of the fingerprint
    epoch: int  # the epoch whose views are drawn
    parent_class_indices: list[int] | None  # each class's label in a parent label space (ImageNet-A/-R)
    streaming: bool  # True: the split streams itself (``StreamingDataset``); False: items by index
    skipped: list[tuple[str, str]]  # (item, reason) of every item dropped as missing or unreadable

    @property
    def item_ids(self) -> list[str]:
        """A stable name of every item, in order (a file's path; a shard sample's "<shard>#<key>"):
        what a teacher cache fingerprints and self-training relabels."""
        ...

    def __len__(self) -> int: ...

    @property
    def labels(self) -> Sequence[int]: ...

    @property
    def num_classes(self) -> int: ...

    def set_epoch(self, epoch: int) -> None: ...


class StreamingDataset(TrainingDataset, Protocol):
    """A split that streams itself (``streaming = True``): the loop asks it for a training stream
    per rank instead of sampling indices, and a teacher cache replays one view of it."""

    def training_stream(self, rank: int, world: int, seed: int, workers: int = 0) -> StreamingDataset: ...

    def replay_stream(self, seed: int, view: int, rank: int = 0, world: int = 1) -> StreamingDataset: ...


class SplitMetadata:
    """What every dataset class holds besides its items ``data``, set once by ``_init_metadata``
    (the members of ``TrainingDataset`` that are not about single items): both ``ImageDataset`` and
    ``WdsImageDataset`` inherit it."""

    data: list[Datum]
    skipped: list[tuple[str, str]]

    def _init_metadata(
        self,
        classnames: Sequence[str],
        transform: Callable[..., Any] | None = None,
        *,
        unlabelled: bool = False,
        train_transform: Callable[..., Any] | None = None,
        view_seed: int | None = None,
        name: str = "",
        templates: Sequence[str] = (DEFAULT_TEMPLATE,),
        class_indices: Sequence[int] | None = None,
        full_classnames: Sequence[str] | None = None,
        parent_class_indices: Sequence[int] | None = None,
        digits_size: int = 0,
    ) -> None:
        self.name = name
        self.classnames = list(classnames)
        self.transform = transform
        self.train_transform = train_transform
        self.unlabelled = bool(unlabelled)
        self.view_seed = view_seed
        self.view_period: int | None = None
        self.epoch = 0
        self.templates = list(templates)
        self.class_indices = list(range(len(self.classnames)) if class_indices is None else class_indices)
        self.full_classnames = list(full_classnames) if full_classnames is not None else list(self.classnames)
        self.parent_class_indices = list(parent_class_indices) if parent_class_indices is not None else None
        self.digits_size = int(digits_size)
        self.skipped = []

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def __len__(self) -> int:
        return len(self.data)

    @property
    def labels(self) -> list[int]:
        """The true labels of all items (available even when ``unlabelled``; callers decide)."""
        return [d.label for d in self.data]

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch used to derive per-item view seeds (only matters when ``view_seed`` is set)."""
        self.epoch = int(epoch)
