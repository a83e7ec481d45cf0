"""The one protocol loop (docs/method.md, "Evaluation"); what differs between protocols is a
``Protocol`` in ``PROTOCOLS`` (``protocols/protocol.py``).

``results.json``, every protocol: ``{"protocol", "selection", "split", "seeds", "teacher_classes"
(what stage 1 learned on), "datasets": {dataset: {model: {"base": [per seed], "novel": [...],
"hm": [...]}}}`` for base2novel (``{"acc": [...]}`` otherwise), with the models ``teacher``,
``student_zeroshot`` and each method; ``"details"`` (dataset -> model -> per seed: every number
its scoring gave), ``"test_size"``, ``"warnings"``, ``"teacher_check"``}, and what the protocol
adds (``Protocol.extra_results``; base2novel: ``hm_of_means``, ``average``).
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import RunConfig, save_config
from ..config_rules import check_batches_split, check_teacher_count, run_stages, teacher_classes
from ..engine.checkpoint import prune_checkpoints
from ..engine.distill import run_distill
from ..engine.runplan import plan_part, run_plan
from ..engine.stages import check_resume_run, run_cache_teacher
from ..engine.utils import is_main, launched_world_size, read_metrics, resolve_device, write_json
from ..methods import canonical_methods
from ..models.io import load_student
from ..runlock import locked_run
from .full import OwnClasses
from .protocol import CROSS_TARGETS, DG_TARGETS, Base2Novel, Protocol, Transfer, for_dataset, image_only
from .report import average_base2novel, hm_of_means
from .sanity import (
    TeacherNotAheadError,
    announce,
    chance_warnings,
    random_tower_warnings,
    teacher_ahead_warning,
)

log = logging.getLogger(__name__)

#: every protocol, by its ``protocol`` config value
PROTOCOLS: dict[str, Protocol] = {
    "base2novel": Base2Novel(),
    "cross": Transfer("cross", CROSS_TARGETS),
    "dg": Transfer("dg", DG_TARGETS),
    "full": OwnClasses(),
}


def distill_and_score(
    cfg: RunConfig, method: str, out: str | Path, *, resume: bool = False, score: bool = True
) -> dict[str, Any]:
    """Stage 2 of ``method`` into ``out``, the student scored as its protocol scores it (on
    ``eval_split``; ``score`` False or nothing to score on: not scored), written to
    ``out/results.json``; with ``resume``, a finished one is read back."""
    proto, out = PROTOCOLS[cfg.protocol], Path(out)
    c = copy.deepcopy(cfg)
    c.distill.method = method
    done = out / "results.json"
    if resume and done.exists():
        return json.loads(done.read_text())
    if c.distill.teacher_cache == "auto":  # one cache per dataset and seed, shared by every method
        cache = out.parent / "teacher_cache" / "teacher_cache.bin"
        if not cache.exists():
            run_cache_teacher(c, cache.parent)
        c.distill.teacher_cache = str(cache)
    ecfg = proto.scoring(c) if score else None
    split = c.eval_split
    info = run_distill(
        c,
        out,
        resume=resume,
        eval_fn=proto.select_score(c) if c.distill.select == "promptkd" and ecfg is not None else None,
        step0_fn=(lambda s: proto.row(proto.score_student(ecfg, s, split))) if ecfg is not None else None,
    )
    res: dict[str, Any] = {k: info[k] for k in ("student", "alpha", "selected_epoch", "train_images")}
    res.update(method=method, selection=c.distill.select)
    res.update({k: info[k] for k in ("trainable_params", "step0")})
    if ecfg is not None:
        student = load_student(info["student"], resolve_device(c.device))
        res.update(proto.score_student(ecfg, student, split), split=split)
    if is_main():
        write_json(done, res)
    prune_checkpoints(out, keep=c.keep_checkpoints)
    return res


@locked_run(results=("results.json",))
def run_protocol(
    cfg: RunConfig,
    out_dir: str | Path,
    *,
    datasets: list[str] | None = None,
    seeds: list[int] | None = None,
    methods: list[str] | None = None,
    resume: bool = False,
    source: str = "imagenet",
) -> dict[str, Any]:
    """Run ``cfg.protocol`` for datasets × seeds × methods; write results.json and report.md.
    Everything a run can be refused for (methods, teacher counts, batches, teacher classes, the
    protocol's own rules) is checked before any stage runs."""
    proto = PROTOCOLS[cfg.protocol]
    methods = canonical_methods(methods) or proto.default_methods(cfg)
    for m in methods:  # a method of several teachers has them, before any stage
        check_teacher_count(cfg.distill, method=m)
    check_batches_split(cfg, run_stages(cfg), launched_world_size())  # every stage's batch splits
    cfg = copy.deepcopy(cfg)
    cfg.train_teacher.subsample = teacher_classes(cfg)  # recorded; one contradicting the protocol refused
    seeds = seeds or [cfg.seed]
    proto.check_run(cfg, datasets, seeds)
    if len(seeds) == 1:  # config.yaml records the seed a one-seed run ran
        cfg.seed = seeds[0]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if resume:  # before any finished stage is read back
        check_resume_run(cfg, out / "config.yaml")
    save_config(cfg, out / "config.yaml")
    groups = proto.groups(cfg, datasets, source)
    tally = _Tally(proto)
    teach = ["teacher"] * proto.trains_teacher(cfg)
    parts = [
        k
        for _, targets in groups
        for k in ["pretrain"] * cfg.pretrain.enabled
        + len(seeds) * [*teach, *["distill"] * (len(targets) * len(methods))]
    ]
    with run_plan(parts):
        for src, targets in groups:
            scfg = proto.pretrain(for_dataset(cfg, src), proto.folder(out, src), resume)
            tally.warn(random_tower_warnings(scfg))
            for seed in seeds:
                scfg.seed = seed
                tcfg, tally.mode = proto.teacher(scfg, proto.folder(out, src, seed), resume)
                for ds in targets:
                    dcfg = proto.target(tcfg, ds)
                    tally.baselines(ds, dcfg, cfg.eval_split)
                    for m in methods:
                        mdir = proto.folder(out, ds, seed) / m
                        with plan_part("distill"):
                            res = distill_and_score(dcfg, m, mdir, resume=resume)
                        tally.add(ds, m, res)
                        tally.curves.setdefault(ds, {}).setdefault(m, []).append(epoch_records(mdir))
    results = tally.results(cfg, seeds)
    proto.report(results, out, tally.curves)
    write_json(out / "results.json", results)
    return results


def epoch_records(folder: Path) -> list[dict]:
    """The per-epoch records of a stage's ``metrics.jsonl`` (a report's training curves)."""
    return [r for r in read_metrics(folder / "metrics.jsonl") if r.get("type") == "epoch"]


@dataclass
class _Tally:
    """What a protocol run gathers: scores per dataset and model, the full scoring results, epoch
    curves, class counts of each half, and the warnings (each once, announced as found)."""

    proto: Protocol
    mode: str = "prompted"  # how the teacher was prepared (Protocol.teacher)
    table: dict[str, dict] = field(default_factory=dict)
    details: dict[str, dict[str, list[dict]]] = field(default_factory=dict)
    curves: dict[str, dict[str, list[list[dict]]]] = field(default_factory=dict)
    test_size: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    # dataset -> seed -> the val scores of the teacher check ({"teacher", "student_zeroshot", ...})
    teacher_checks: dict[str, dict[str, dict]] = field(default_factory=dict)
    _zero_shot: dict[str, tuple[dict, float | None]] = field(default_factory=dict)  # per dataset (and seed)

    def warn(self, found: list[str]) -> None:
        self.warnings += [w for w in announce(found) if w not in self.warnings]

    def add(self, ds: str, model: str, res: dict) -> None:
        """One scored model of one seed (a result without scores, nothing to score on: details only)."""
        self.details.setdefault(ds, {}).setdefault(model, []).append(res)
        if "acc" not in res and "hm" not in res:
            return
        row = self.table.setdefault(ds, {}).setdefault(model, {})
        for k, v in self.proto.row(res).items():
            row.setdefault(k, []).append(v)

    def baselines(self, ds: str, cfg: RunConfig, split: str) -> None:
        """The prompted teacher and the undistilled student (a CLIP student once per dataset: it has
        no seed) on ``split``, and the teacher's check on val before stage 2."""
        ecfg = self.proto.scoring(cfg)
        if ecfg is None:
            return
        checked = self.proto.checks_teacher(ecfg)
        key = f"{ds}/seed{cfg.seed}" if image_only(cfg) else ds  # an image-only head is fitted per seed
        # each model is built once for the split scored and, when checked, val
        splits = (split, "val") if checked and split != "val" else (split,)
        if key not in self._zero_shot:
            zs, *zs_val = self.proto.score_zero_shot(ecfg, splits)
            self._zero_shot[key] = (zs, self.proto.row((zs_val or [zs])[0]) if checked else None)
        tres, *t_val = self.proto.score_teacher(ecfg, splits)
        self.add(ds, "teacher", tres)
        self.add(ds, "student_zeroshot", self._zero_shot[key][0])
        parts = {"base": tres["base"], "novel": tres["novel"]} if "base" in tres else {"all": tres}
        self.test_size[ds] = {
            k: {n: int(v[n]) for n in ("classes", "images") if n in v} for k, v in parts.items()
        }
        if checked:
            self.check_teacher(ds, ecfg, self.proto.row((t_val or [tres])[0]), self._zero_shot[key][1])

    def check_teacher(self, ds: str, cfg: RunConfig, teacher: dict, student: dict) -> None:
        """The teacher before it teaches: its val score (HM with halves, top-1 otherwise) against
        the undistilled student's; a lead under ``distill.teacher_margin`` is a warning, or stops the
        run with ``distill.require_teacher_ahead``."""
        metric, margin = ("hm" if "hm" in teacher else "acc"), cfg.distill.teacher_margin
        t, s = teacher[metric], student[metric]
        line = teacher_ahead_warning(
            t, s, margin, metric.upper() if metric == "hm" else "top-1", f" on {ds} (seed {cfg.seed})"
        )
        self.teacher_checks.setdefault(ds, {})[str(cfg.seed)] = {
            "metric": metric,
            "teacher": t,
            "student_zeroshot": s,
            "margin": margin,
            "ahead": line is None,
        }
        if line is not None and cfg.distill.require_teacher_ahead:
            raise TeacherNotAheadError(
                f"stopped before stage 2 (distill.require_teacher_ahead): {line.split(' (stop here')[0]}"
            )
        self.warn([line] if line else [])

    def results(self, cfg: RunConfig, seeds: list[int]) -> dict[str, Any]:
        for ds, rows in self.table.items():
            who = {m: f"student distilled with {m}" for m in rows} | {
                "teacher": "teacher",
                "student_zeroshot": "undistilled student",
            }
            classes = {k: v["classes"] for k, v in self.test_size.get(ds, {}).items() if "classes" in v}
            classes = {"acc" if k == "all" else k: v for k, v in classes.items()}
            self.warn(chance_warnings(rows, classes, who, f" on {ds}"))
        results = {
            "protocol": cfg.protocol,
            "selection": cfg.distill.select,
            "split": cfg.eval_split,
            "seeds": seeds,
            "teacher_classes": cfg.train_teacher.subsample,
            "datasets": self.table,
            "details": self.details,
            "warnings": self.warnings,
            "teacher_check": self.teacher_checks,
            "test_size": self.test_size,  # dataset -> part -> {"classes", "images"} scored
        }
        if self.proto.halves:  # the paper's HM (of the means over seeds); the table's "hm": per seed
            results["hm_of_means"] = {
                d: {m: hm_of_means(r) for m, r in t.items()} for d, t in self.table.items()
            }
            if len(self.table) > 1:
                results["average"] = average_base2novel(self.table)
        return results | self.proto.extra_results(cfg, self.mode)
