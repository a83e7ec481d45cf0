"""The dataset contract: what the engine (the training loop, the teacher cache, the stages and the
evaluation) reads off a dataset, written once. ``ImageDataset`` (files in memory order) and
``WdsImageDataset`` (streamed shards) both satisfy it; ``tests/test_data.py`` checks every member
on both, so a new dataset class knows what to provide."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable


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

    def __len__(self) -> int: ...

    @property
    def labels(self) -> Sequence[int]: ...

    @property
    def num_classes(self) -> int: ...

    def set_epoch(self, epoch: int) -> None: ...


class StreamingDataset(TrainingDataset, Protocol):
    """A split that streams itself (``streaming = True``): the loop asks it for a training stream
    per rank instead of sampling indices, and a teacher cache replays one view of it; ``item_ids``
    name its items stably ("<shard>#<key>") for the cache's fingerprint."""

    streaming: bool

    @property
    def item_ids(self) -> list[str]: ...

    def training_stream(self, rank: int, world: int, seed: int) -> StreamingDataset: ...

    def replay_stream(self, seed: int, view: int) -> StreamingDataset: ...
