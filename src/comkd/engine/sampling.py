"""The order of training data: seeded per-epoch, per-rank batches of a map-style or a streaming dataset."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from .utils import rank, world_size


def _per_rank(batch_size: int) -> int:
    """Each process's share of a global batch of ``batch_size`` (which they must split evenly)."""
    if batch_size % world_size():
        raise ValueError(f"global batch size {batch_size} is not divisible by the {world_size()} processes")
    return batch_size // world_size()


class EpochBatchSampler(Sampler[list[int]]):
    """Seeded per-epoch shuffling into global batches; each rank takes its slice of every batch.

    The order depends only on (seed, epoch), so a resumed run skips ``start_batch`` batches and
    sees exactly the batches an uninterrupted run would. Global batches are ``batch_size`` items
    (the last, short batch is dropped, as PromptKD's loader does) split evenly over the ranks.
    """

    def __init__(self, n: int, batch_size: int, seed: int, shuffle: bool = True):
        self.per_rank = _per_rank(batch_size)
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.epoch, self.start_batch = 0, 0
        self.rank = rank()

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def num_batches(self) -> int:
        return self.n // self.batch_size

    def __len__(self) -> int:
        return self.num_batches() - self.start_batch

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        for b in range(self.start_batch, self.num_batches()):
            batch = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield batch[self.rank * self.per_rank : (self.rank + 1) * self.per_rank]


class EpochItems(torch.utils.data.Dataset):
    """A map-style dataset read through ``(epoch, index)`` keys (``EpochKeys``): each item sets the
    dataset's epoch first, so loader workers that persist across epochs (``data.persistent_workers``)
    draw each epoch's augmented views, which a copy of the dataset made when they started would not."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        self.dataset.set_epoch(epoch)  # an attribute set: cheap beside decoding the image
        return self.dataset[index]


class EpochKeys(Sampler[list[tuple[int, int]]]):
    """``sampler``'s batches with each index keyed by the sampler's epoch (for ``EpochItems``)."""

    def __init__(self, sampler: EpochBatchSampler):
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = self.sampler.epoch
        for batch in self.sampler:
            yield [(epoch, i) for i in batch]


class StreamBatches:
    """The batches of a streaming dataset (``streaming = True``, e.g. ``WdsImageDataset``) with the
    interface of ``EpochBatchSampler``: the dataset shuffles and splits itself over the ranks
    (``training_stream``); this rebatches what the loader workers yield into exact per-rank batches
    of ``batch_size / world`` and stops after ``len(dataset) // batch_size`` global batches (the
    last, short one dropped), so every rank takes the same number of steps. A resumed epoch re-reads
    the stream, whose order depends only on (seed, epoch), and skips ``start_batch`` batches."""

    def __init__(
        self, dataset: Any, batch_size: int, seed: int, num_workers: int = 0, pin_memory: bool = False
    ):
        self.per_rank = _per_rank(batch_size)
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.stream = dataset.training_stream(rank(), world_size(), seed, num_workers)
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch
        self.stream.set_epoch(epoch)

    def num_batches(self) -> int:
        return len(self.dataset) // self.batch_size

    def __len__(self) -> int:
        return self.num_batches() - self.start_batch

    def __iter__(self) -> Iterator[Any]:
        loader = DataLoader(
            self.stream, batch_size=self.per_rank, num_workers=self.num_workers, pin_memory=self.pin_memory
        )
        pending: Any = None  # samples carried over from short worker batches (a tuple of tensors)
        b = 0
        for part in loader:  # workers' batches end short at their last shard: re-cut to per_rank
            if pending is not None:
                part = type(part)(torch.cat([x, y]) for x, y in zip(pending, part, strict=True))
            start = 0
            while len(part[0]) - start >= self.per_rank and b < self.num_batches():
                if b >= self.start_batch:  # a full batch from one worker passes through unsliced
                    whole = start == 0 and len(part[0]) == self.per_rank
                    yield part if whole else type(part)(t[start : start + self.per_rank] for t in part)
                start += self.per_rank
                b += 1
            if b >= self.num_batches():
                return
            pending = type(part)(t[start:] for t in part) if start < len(part[0]) else None
        if b < self.num_batches():
            raise RuntimeError(
                f"the stream of {self.dataset!r} ended after {b} of {self.num_batches()} batches"
            )


def split_batch(batch: Any, parts: int) -> list[Any]:
    """A batch (a tensor, or a tuple of them) cut into ``parts`` micro-batches (``grad_accum``)."""
    if parts == 1:
        return [batch]
    if isinstance(batch, (list, tuple)):
        chunks = [torch.chunk(b, parts) if torch.is_tensor(b) else [b] * parts for b in batch]
        return [type(batch)(c[i] for c in chunks) for i in range(parts)]
    return list(torch.chunk(batch, parts))


def batch_to(batch: Any, device: torch.device) -> Any:
    """Every tensor of a batch on ``device`` (non-blocking: pinned host memory copies async)."""
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(batch_to(b, device) for b in batch)
    return batch


def epoch_loader(
    dataset: Any,
    sampler: EpochBatchSampler,
    *,
    num_workers: int,
    pin: bool,
    seed: int,
    epoch: int,
    persistent: bool,
) -> DataLoader:
    """The loader of one epoch of a map-style dataset: a fresh one (workers forked for the epoch),
    or with ``persistent`` one loader kept for the stage (``EpochItems``/``EpochKeys``: its
    workers see each epoch through the keys). Its own generator: creating an iterator must not draw
    from the global torch RNG, or a resumed run (one extra iterator) would see a shifted stream."""
    data, batches = (EpochItems(dataset), EpochKeys(sampler)) if persistent else (dataset, sampler)
    return DataLoader(
        data,
        batch_sampler=batches,
        num_workers=num_workers,
        pin_memory=pin,
        persistent_workers=persistent,
        generator=torch.Generator().manual_seed(seed * 100_003 + (0 if persistent else epoch)),
    )
