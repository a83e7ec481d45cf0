"""Few-shot sampling, base/novel class splits and deterministic per-class fractional splits, as in
CoOp / PromptKD. The base/novel halves (``subsample_classes``) are cut from the class list (for the
full CoOp datasets, the labels CoOp reads from the train split), each relabelled from 0.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace
from typing import Literal

from .errors import DataError
from .records import SPLIT_NAMES, Datum

log = logging.getLogger(__name__)

Subsample = Literal["all", "base", "novel"]


class FewShotSample(list):
    """A list of ``Datum`` from ``few_shot``; ``short_classes`` maps each label that had fewer than
    ``num_shots`` items to the number of items it kept."""

    short_classes: dict[int, int]

    def __init__(self, items: Sequence[Datum] = (), short_classes: dict[int, int] | None = None) -> None:
        super().__init__(items)
        self.short_classes = dict(short_classes or {})


def _by_label(data: Sequence[Datum]) -> dict[int, list[Datum]]:
    groups: dict[int, list[Datum]] = defaultdict(list)
    for d in data:
        groups[d.label].append(d)
    return groups


def few_shot(data: Sequence[Datum], num_shots: int = 16, seed: int = 1) -> FewShotSample:
    """Sample ``num_shots`` items per class without replacement (seeded, independent of global RNG).

    Classes are visited in label order and items keep their input order within a class before
    sampling, so the same input and seed always give the same subset. Classes with fewer than
    ``num_shots`` items keep all their items; they are logged and listed in ``short_classes``.
    """
    if num_shots < 1:
        raise DataError(f"num_shots must be >= 1, got {num_shots}")
    rng = random.Random(seed)
    out: list[Datum] = []
    short: dict[int, int] = {}
    for label, items in sorted(_by_label(data).items()):
        if len(items) >= num_shots:
            out.extend(rng.sample(items, num_shots))
        else:
            out.extend(items)
            short[label] = len(items)
    if short:
        log.warning(
            "few_shot: %d class(es) have fewer than %d items and keep all of them: %s",
            len(short),
            num_shots,
            short,
        )
    return FewShotSample(out, short)


def subsample_classes(classnames: Sequence[str] | int, which: Subsample = "all") -> list[int]:
    """Original label indices of the ``which`` half: base = first ``ceil(N/2)`` labels, novel = rest."""
    n = classnames if isinstance(classnames, int) else len(classnames)
    if which == "all":
        return list(range(n))
    m = math.ceil(n / 2)
    if which == "base":
        return list(range(m))
    if which == "novel":
        return list(range(m, n))
    raise DataError(f"subsample must be 'all', 'base' or 'novel', got {which!r}")


def base_novel_split(
    data: Sequence[Datum], classnames: Sequence[str], which: Subsample = "all"
) -> tuple[list[Datum], list[str], list[int]]:
    """Keep the items of the ``which`` classes and relabel them from 0.

    Returns ``(data, classnames, label_indices)``: the relabelled items, the subset's class names
    and the original label of each new label (``W[label_indices]`` slices teacher text features).
    ``which="all"`` returns the input unchanged (as new lists).
    """
    keep = subsample_classes(classnames, which)
    for d in data:
        if d.label == -1 and which == "all":  # an unlabelled image (comkd.data.unlabelled)
            continue
        if not 0 <= d.label < len(classnames):
            raise DataError(
                f"label {d.label} of {d.path} is outside the class list (0..{len(classnames) - 1})"
            )
    if which == "all":
        return list(data), list(classnames), keep
    relabel = {old: new for new, old in enumerate(keep)}
    out = [replace(d, label=relabel[d.label]) for d in data if d.label in relabel]
    return out, [classnames[i] for i in keep], keep


def split_per_class(
    data: Sequence[Datum], fractions: Sequence[float], seed: int = 0
) -> dict[str, list[Datum]]:
    """Split items per class into ``pretrain/train/val/test`` by ``fractions`` (4 numbers, sum <= 1).

    Within each class the items (sorted by path) are shuffled with a ``random.Random`` seeded from
    ``seed`` and the label, and cut at ``round(n * cumulative_fraction)``, so parts are disjoint,
    each class is split in the same proportions, and fractions summing to < 1 leave the rest unused.
    """
    fr = [float(f) for f in fractions]
    if len(fr) != len(SPLIT_NAMES) or any(f < 0 or f > 1 for f in fr) or sum(fr) > 1 + 1e-9:
        raise DataError(
            f"split fractions must be 4 numbers in [0, 1] (pretrain, train, val, test) summing to <= 1, got {fr}"
        )
    out: dict[str, list[Datum]] = {s: [] for s in SPLIT_NAMES}
    for label, items in sorted(_by_label(data).items()):
        items = sorted(items, key=lambda d: d.path)
        random.Random(seed * 100003 + label).shuffle(items)
        n = len(items)
        cuts = [0, *(min(n, round(n * cum + 1e-9)) for cum in itertools.accumulate(fr))]
        for name, start, stop in zip(SPLIT_NAMES, cuts[:-1], cuts[1:], strict=True):
            out[name].extend(items[start:stop])
    return out
