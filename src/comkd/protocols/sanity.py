"""Results that say nothing (a model near chance, a tower with random weights, a teacher no better
than its student on val), named in a run's log, ``report.md`` and ``results.json`` (``warnings``)."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from ..config import RunConfig

log = logging.getLogger(__name__)

#: a score below chance + this many points (top-1, %) is reported as chance-level
CHANCE_MARGIN = 5.0
_METRIC_WORDS = {"acc": "top-1", "base": "base-class top-1", "novel": "novel-class top-1"}


def _mean(v: float | list[float]) -> float:
    return sum(v) / len(v) if isinstance(v, list) else float(v)


def chance_warnings(
    scores: Mapping[str, Mapping[str, float | list[float]]],
    classes: Mapping[str, int],
    names: Mapping[str, str],
    where: str = "",
) -> list[str]:
    """One line per model and metric within ``CHANCE_MARGIN`` points of chance (100 / classes).

    Args:
        scores: model key -> {metric: accuracy in % (or a list over seeds, averaged)}.
        classes: metric -> number of classes it is scored over (``acc``, ``base``, ``novel``).
        names: model key -> what to call it (e.g. "teacher comkd-tiny-teacher").
        where: appended to each line (e.g. " on dtd").
    """
    out = []
    for key, row in scores.items():
        for metric, n in classes.items():
            if metric not in row or n < 2:
                continue
            acc, chance = _mean(row[metric]), 100.0 / n
            if acc < chance + CHANCE_MARGIN:
                out.append(
                    f"{names.get(key, key)}: {_METRIC_WORDS.get(metric, metric)} {acc:.2f}%{where} is within "
                    f"{CHANCE_MARGIN:g} points of chance ({chance:.2f}% with {n} classes); its numbers say "
                    "nothing about distillation"
                )
    return out


def random_tower_warnings(cfg: RunConfig) -> list[str]:
    """A line per tower of ``cfg`` that was built with random weights (no weights given, no stage 0)."""
    out = []
    for role in ("teacher", "student"):
        section = getattr(cfg, role)
        if section.pretrained in (None, "none") and not cfg.pretrain.enabled:
            out.append(
                f"{role} {section.model} has random weights ({role}.pretrained is "
                f"{section.pretrained or 'unset'} and there is no stage 0): a random CLIP scores near "
                "chance; give weights, or pre-train (pretrain.enabled, e.g. --config own_tiny)"
            )
    return out


class TeacherNotAheadError(ValueError):
    """``distill.require_teacher_ahead`` and a teacher that is not ahead on val: the run stops
    before stage 2 (its teacher prompts stay on disk for a rerun)."""


def teacher_ahead_warning(
    teacher: float, student: float, margin: float, metric: str, where: str = ""
) -> str | None:
    """A line when the prompted teacher's val score is less than ``margin`` points above the
    undistilled student's (both in %); None when it is ahead by at least the margin."""
    lead = teacher - student
    if lead >= margin:
        return None
    return (
        f"teacher not clearly ahead of its student{where}: val {metric} {teacher:.2f} vs the undistilled "
        f"student's {student:.2f} ({lead:+.2f} points, under the {margin:g}-point margin); distilling "
        "from it can cost the student accuracy (stop here with distill.require_teacher_ahead=true)"
    )


def announce(warnings: list[str]) -> list[str]:
    """Log each warning once; return them (for ``results.json``)."""
    for w in warnings:
        log.warning("%s", w)
    return warnings


def banner(warnings: list[str]) -> list[str]:
    """Markdown lines for the top of a report (empty when there is nothing to say)."""
    if not warnings:
        return []
    return ["> **Warning: these results may say nothing.**", *[f"> - {w}" for w in warnings], ""]
