"""WebDataset shards: streamed image pools that outgrow a folder (open_clip's and timm's convention).

A shard is a plain tar file; a *sample* is the group of members sharing a key (the member path up
to the first dot of its file name): ``<key>.jpg`` (or .jpeg/.png/.webp) and, optionally,
``<key>.cls`` (the label index as ASCII digits, in the order of the class-names file). Shards are
given as one brace pattern, ``DIR/name-{000000..000004}.tar`` (several joined with ``::``).

``load_wds`` indexes the shards from their tar headers and ``.cls`` members (never the images;
``comkd.data.shards``): items are ``Datum``s with the virtual path ``wds://<shard>#<key>``, split
into named ``pools`` (ranges of sample ordinals over the shards in order, e.g.
``["pretrain=0:30000", "val=30000:32000"]``), per class by ``fractions`` like an image folder, or
all into ``train`` when unlabelled. ``WdsImageDataset`` streams one pool with ``webdataset``.

Splitting the stream, as open_clip does: ranks take whole shards (shard ``j`` of the epoch's
order goes to rank ``j % world``), then loader workers whole shards of those (the rank's ``j``-th
to worker ``j % workers``), so each rank opens only its own shards. Under several ranks a training
stream cycles through its rank's shards (reshuffled each pass) until the loop has the epoch's
batches: with shards of equal size and a shard count the ranks divide, every sample is seen once
per epoch; otherwise a rank with smaller shards sees some of its samples twice. Training streams
shuffle the shard order per epoch and the samples through a seeded buffer (``shuffle_buffer``);
the order depends only on (seed, epoch, rank, worker), so a resumed run replays it.

Bad input: a missing shard, a file that is not a tar, a truncated shard, a duplicate key, a
sample without an image or with a bad label are one-line ``DataError``s naming the shard and key.
An image that does not decode is an error when it is streamed, or, with ``skip_bad=True``, is found
up front (the pool is decoded once), dropped and counted in ``dataset.skipped``.
"""

from __future__ import annotations

import copy
import logging
import os
import random
import tarfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from .contract import SplitMetadata
from .dataset import check_labels_in_range, decode_image, derive_view_seed, seeded_view
from .errors import DataError
from .folder import FOLDER_FRACTIONS, find_class_file, load_image_folder
from .records import DEFAULT_TEMPLATE, DatasetSplits, Datum
from .shards import (
    IMAGE_EXTS,
    LABEL_EXT,
    expand_shards,
    is_wds_path,
    item_path,
    parse_item_path,
    parse_pools,
    scan_shards,
)
from .splits import split_per_class
from .unlabelled import read_names_file

log = logging.getLogger(__name__)


def load_wds(
    root: str,
    *,
    classes_file: str | None = None,
    pools: Sequence[str] | None = None,
    fractions: Sequence[float] | None = None,
    split_seed: int = 0,
    test_folder: str | None = None,
    templates: Sequence[str] = (DEFAULT_TEMPLATE,),
) -> DatasetSplits:
    """The index of the shards of ``root`` as ``DatasetSplits`` (see the module docstring).

    Class names: ``classes_file``, else a ``classes.tsv``/``classnames.txt`` in the shards' folder
    or its parent. ``fractions`` (pretrain/train/val/test) default to 0/0.6/0.1/0.3, seed ``split_seed``.
    ``test_folder``: an image folder of class sub-folders, read as the test split.
    """
    shards = expand_shards(root)
    folder = os.path.dirname(shards[0])
    cfile = classes_file or find_class_file(folder, os.path.dirname(folder))
    if cfile is None:
        raise DataError(
            f"dataset 'wds' ({root}) needs a class-names file: data.classes_file=FILE (one name a line, or a "
            "classes.tsv), or classes.tsv next to the shards"
        )
    classnames = read_names_file(cfile)
    items: list[Datum] = []
    seen: dict[str, str] = {}
    n = len(classnames)
    for shard, idx in zip(shards, scan_shards(shards), strict=True):
        for key, label in zip(idx.keys, idx.labels, strict=True):
            if key in seen:
                raise DataError(f"sample key {key!r} is in both {seen[key]} and {shard}; keys must be unique")
            seen[key] = shard
            if label != -1 and not 0 <= label < n:
                raise DataError(
                    f"shard {shard}: sample {key!r} has label {label}, outside the {n} classes of {cfile} "
                    f"(valid 0..{n - 1})"
                )
            items.append(Datum(item_path(shard, key), label, classnames[label] if label >= 0 else ""))
    where = f"dataset 'wds' ({root})"
    splits: dict[str, list[Datum]] = {"pretrain": [], "train": [], "val": [], "test": []}
    extra: dict[str, list[Datum]] = {}
    if pools:
        for pool, (a, b) in parse_pools(pools, len(items), where).items():
            (splits if pool in splits else extra)[pool] = items[a:b]
    elif all(d.label >= 0 for d in items):
        splits.update(split_per_class(items, tuple(fractions or FOLDER_FRACTIONS), split_seed))
    elif fractions is not None:
        raise DataError(f"{where}: data.fractions needs labels, but some samples have no .{LABEL_EXT} member")
    else:
        splits["train"] = items
    if test_folder is not None:
        if splits["test"]:
            raise DataError(
                f"{where}: data.test_folder and a 'test' pool both define the test split; keep one"
            )
        splits["test"] = load_image_folder(test_folder, classes_file=cfile, fractions=(0, 0, 0, 1)).test
    # every split and pool is streamed from the shards, but a test split read from data.test_folder
    readers = {k: "shards" for k in [*splits, *extra] if not (k == "test" and test_folder is not None)}
    return DatasetSplits("wds", classnames, templates=list(templates), pools=extra, readers=readers, **splits)


# -- streaming ---------------------------------------------------------------------------------
def iter_shard(shard: str) -> Iterator[tuple[str, bytes | None]]:
    """``(key, image bytes)`` of every sample of ``shard`` in tar order, streamed with ``webdataset``;
    a shard that breaks off mid-way is a ``DataError`` naming it."""
    import webdataset as wds

    def fail(exn: Exception) -> bool:
        raise DataError(f"cannot read shard {shard} (truncated or damaged): {exn}") from None

    stream = wds.WebDataset(
        shard, shardshuffle=False, nodesplitter=None, workersplitter=None, handler=fail, empty_check=False
    )
    try:
        for sample in stream:
            yield sample["__key__"], next((sample[ext] for ext in IMAGE_EXTS if ext in sample), None)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(f"cannot read shard {shard} (truncated or damaged): {exc}") from None


class WdsImageDataset(SplitMetadata, IterableDataset):
    """One pool of WebDataset samples, streamed: yields ``(image, label, i)`` like ``ImageDataset``.

    ``image`` is ``transform(pil_image)`` (or, with ``view_seed`` set, the train transform drawn with
    ``derive_view_seed(view_seed, epoch, i)``, the epoch taken modulo ``view_period`` when a teacher
    cache replays K views); ``label`` is -1 when ``unlabelled``; ``i`` indexes ``data`` (the pool's
    items in shard order; a teacher cache keys its rows by it, so replay is exact whatever the
    stream order). Iterating yields every item once, in shard order, unless the stream was
    made with ``training_stream`` (shuffled, split over ranks; see the module docstring). Loader
    workers always split the shards.
    """

    streaming = True

    def __init__(
        self,
        data: Sequence[Datum],
        classnames: Sequence[str],
        transform: Callable[..., Any] | None = None,
        *,
        skip_bad: bool = False,
        shuffle_buffer: int = 1000,
        source: str = "",
        **meta: Any,
    ) -> None:
        # meta: SplitMetadata's keywords; shard samples are never rendered images, nor ImageNet-A/-R
        self._init_metadata(classnames, transform, **{**meta, "digits_size": 0, "parent_class_indices": None})
        self.shuffle_buffer = int(shuffle_buffer)
        self._where = f" ({source})" if source else ""
        check_labels_in_range(data, len(self.classnames), self.unlabelled, self._where, self.name)
        self._train: tuple[int, int, int] | None = None  # (rank, world, seed) of a training stream
        self._share: tuple[int, int] = (0, 1)  # (rank, world) of a replay stream
        self._set_data(list(data))
        if skip_bad:
            self._drop_undecodable()

    def _set_data(self, data: list[Datum]) -> None:
        self.data = data
        #: shard -> {key: item index}, shards in order of first appearance
        self._by_shard: dict[str, dict[str, int]] = {}
        for i, d in enumerate(data):
            if not is_wds_path(d.path):
                raise DataError(f"item {d.path}{self._where} is not a wds:// sample")
            shard, key = parse_item_path(d.path)
            self._by_shard.setdefault(shard, {})[key] = i

    def _drop_undecodable(self) -> None:
        bad: set[int] = set()
        for shard, wanted in self._by_shard.items():
            for key, data in iter_shard(shard):
                if (i := wanted.get(key)) is None:
                    continue
                try:
                    if data is None:
                        raise DataError(f"sample {key!r} of shard {shard} has no image")
                    decode_image(data, f"sample {key!r} of shard {shard}")
                except DataError as exc:
                    bad.add(i)
                    self.skipped.append((self.data[i].path, str(exc)))
        if bad:
            log.warning(
                "%s: skipped %d of %d samples (undecodable), %d remain",
                self.name or "wds",
                len(bad),
                len(self.data),
                len(self.data) - len(bad),
            )
            self._set_data([d for i, d in enumerate(self.data) if i not in bad])

    # -- ImageDataset's interface ----------------------------------------------------------------
    @property
    def item_ids(self) -> list[str]:
        """``<shard file name>#<key>`` of every item: what a teacher cache keys its rows by (the
        shards' folder may move without invalidating it)."""
        return [f"{os.path.basename(s)}#{k}" for s, k in map(parse_item_path, (d.path for d in self.data))]

    def training_stream(self, rank: int, world: int, seed: int, workers: int = 0) -> WdsImageDataset:
        """A copy that shuffles (shard order and a seeded buffer, per epoch) and reads rank
        ``rank``'s shards of ``world``; what ``fit`` iterates. Under several ranks each rank and
        loader worker needs a shard of its own: fewer shards than ranks × ``workers`` is a
        ``DataError`` saying what to change."""
        shards, need = len(self._by_shard), int(world) * max(1, int(workers))
        if world > 1 and shards < need:
            raise DataError(
                f"{self.name or 'wds'}{self._where}: {shards} shard(s) cannot be split over {world} processes x "
                f"{max(1, int(workers))} loader worker(s) (each reads whole shards of its own): write the pool "
                f"into at least {need} shards, or set data.num_workers lower"
            )
        out = copy.copy(self)
        out._train = (int(rank), int(world), int(seed))
        return out

    def replay_stream(self, seed: int, view: int, rank: int = 0, world: int = 1) -> WdsImageDataset:
        """A copy yielding view ``view`` of every item (``derive_view_seed(seed, view, i)``) in shard
        order: what a teacher cache stores as its row ``i``; with ``world`` > 1 only the items of
        shards ``rank, rank + world, ...`` (each rank opens only its own shards)."""
        out = copy.copy(self)
        out._train, out.view_seed, out.view_period, out.epoch = None, int(seed), None, int(view)
        out._share = (int(rank), int(world))
        return out

    # -- iteration -----------------------------------------------------------------------------
    def _sample(self, shard: str, key: str, data: bytes | None, i: int) -> tuple[Any, int, int]:
        """Item ``i`` (sample ``key`` of ``shard``, image bytes ``data``) as ``(image, label, i)``."""
        where = f"sample {key!r} of shard {shard}{self._where}"
        if data is None:
            raise DataError(f"{where} has no image")
        img = decode_image(data, where)
        if self.view_seed is not None:
            t = self.train_transform or self.transform
            if t is None or not getattr(t, "train", False):
                raise DataError(f"{self.name or 'wds'}: replayable views need a seedable train transform")
            epoch = self.epoch % self.view_period if self.view_period else self.epoch
            img = seeded_view(t, img, derive_view_seed(self.view_seed, epoch, i))
        elif self.transform is not None:
            img = self.transform(img)
        return img, (-1 if self.unlabelled else self.data[i].label), i

    @staticmethod
    def _shuffled(shards: list[str], seed: int) -> list[str]:
        g = torch.Generator().manual_seed(seed)
        return [shards[j] for j in torch.randperm(len(shards), generator=g).tolist()]

    def __iter__(self) -> Iterator[tuple[Any, int, int]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if self._train is not None:
            rank, world, seed = self._train
            shards = self._shuffled(list(self._by_shard), seed * 100_003 + self.epoch)
        else:
            (rank, world), seed = self._share, 0
            shards = list(self._by_shard)
        endless = self._train is not None and world > 1
        mine = shards[rank::world][worker::workers]
        if not mine:
            return
        rng = random.Random((seed * 1_000_003 + self.epoch) * 10_007 + rank * 101 + worker)
        buffer: list[tuple[str, str, bytes | None, int]] = []
        size = self.shuffle_buffer if self._train is not None else 0
        passes = 0
        while True:
            for shard in mine:
                wanted, seen = self._by_shard[shard], 0
                for key, data in iter_shard(shard):
                    if (i := wanted.get(key)) is None:
                        continue
                    if seen == len(wanted):
                        raise DataError(
                            f"shard {shard} holds sample {key!r} twice (changed since it was indexed?)"
                        )
                    seen += 1
                    if size <= 1:  # no shuffle (evaluation, replay): no buffer, no random draw
                        yield self._sample(shard, key, data, i)
                        continue
                    buffer.append((shard, key, data, i))
                    if len(buffer) >= size:
                        j = rng.randrange(len(buffer))
                        buffer[j], buffer[-1] = buffer[-1], buffer[j]
                        yield self._sample(*buffer.pop())
                if seen < len(wanted):
                    raise DataError(
                        f"shard {shard} ended after {seen} of its {len(wanted)} samples of this pool: "
                        "truncated, or changed since it was indexed"
                    )
            rng.shuffle(buffer)  # each pass ends with its own samples
            for item in buffer:
                yield self._sample(*item)
            buffer.clear()
            if not endless:
                return
            passes += 1
            mine = self._shuffled(mine, seed * 100_003 + self.epoch + passes * 7_919)

    def __repr__(self) -> str:
        return (
            f"WdsImageDataset(name={self.name!r}, items={len(self)}, shards={len(self._by_shard)}, "
            f"classes={self.num_classes}, unlabelled={self.unlabelled}, skipped={len(self.skipped)})"
        )
