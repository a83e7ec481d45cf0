"""The paper's three protocols, chained over datasets and seeds (docs/method.md, "Evaluation").

Folder layout of a protocol run ``OUT``::

    OUT/config.yaml, results.json, report.md, plots/
    OUT/<dataset>/pretrain/                  stage 0 (offline presets only; once per dataset)
    OUT/<dataset>/seed<k>/teacher/           stage 1 (base2novel; cross/dg: OUT/source/seed<k>/teacher)
    OUT/<dataset>/seed<k>/<method>/          stage 2 + its results.json

``results.json``: ``{"protocol", "selection", "teacher_classes" (what stage 1 learned on: ``base``
for base2novel, ``all`` otherwise), "datasets": {dataset: {method: {"base": [per seed],
"novel": [...], "hm": [...]}}}}`` for base2novel (``{"acc": [...]}`` otherwise), with methods
including ``teacher`` and ``student_zeroshot``.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import RunConfig, save_config
from ..config_rules import check_batches_split, check_teacher_count, run_stages, teacher_classes
from ..engine.builders import STUDENT_CLIP, TEACHER_CLIP, TEACHER_PROMPTS, build_teacher, make_dataset
from ..engine.checkpoint import prune_checkpoints
from ..engine.distill import run_distill
from ..engine.evaluation import (
    evaluate_clip_zero_shot,
    evaluate_student,
    evaluate_subset,
    evaluate_teacher,
    has_val_split,
)
from ..engine.runplan import plan_part, run_plan
from ..engine.stages import (
    check_resume_run,
    run_cache_teacher,
    run_pretrain,
    run_train_teacher,
)
from ..engine.utils import launched_world_size, read_metrics, resolve_device, write_json
from ..methods import CROSS_KD_WEIGHT, CROSS_STUDENT_VISION_DEPTH, canonical_methods
from ..models.io import load_student
from ..runlock import locked_run
from .report import average_base2novel
from .sanity import (
    TeacherNotAheadError,
    announce,
    chance_warnings,
    random_tower_warnings,
    teacher_ahead_warning,
)

log = logging.getLogger(__name__)

BASE2NOVEL_DATASETS = [
    "imagenet",
    "caltech101",
    "oxford_pets",
    "stanford_cars",
    "oxford_flowers",
    "food101",
    "fgvc_aircraft",
    "sun397",
    "dtd",
    "eurosat",
    "ucf101",
]
CROSS_TARGETS = [d for d in BASE2NOVEL_DATASETS if d != "imagenet"]
DG_TARGETS = ["imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r"]


def _vision_layers(model: str) -> int | None:
    """The image tower's layer count from the open_clip model config (None when unknown)."""
    import open_clip

    from ..models import register_tiny_configs

    register_tiny_configs()
    name = Path(model).stem if model.endswith(".json") else model
    layers = ((open_clip.get_model_config(name) or {}).get("vision_cfg") or {}).get("layers")
    return layers if isinstance(layers, int) else None


def protocol_recipe(cfg: RunConfig, protocol: str) -> RunConfig:
    """``cfg`` with the protocol's student settings filled in where they are unset (None):
    cross/dg get PromptKD's cross-dataset depth and w_kd; base2novel keeps the per-dataset
    w_kd (``methods.paper_kd_weight``) and depth min(9, layers). The values are the recipe's
    (``comkd.methods``: PromptKD's cross-dataset student, docs/method.md "Evaluation")."""
    c = copy.deepcopy(cfg)
    if protocol in ("cross", "dg"):
        if c.student.vision_depth is None:  # capped at the tower's layers, as the default min(9, layers)
            layers = _vision_layers(c.student.model)
            c.student.vision_depth = min(CROSS_STUDENT_VISION_DEPTH, layers or CROSS_STUDENT_VISION_DEPTH)
        if c.distill.kd_weight is None:
            c.distill.kd_weight = CROSS_KD_WEIGHT
    return c


def _with_teacher_classes(cfg: RunConfig) -> RunConfig:
    """A copy of ``cfg`` whose ``train_teacher.subsample`` is the protocol's classes (base2novel:
    base; cross, dg, full: all), so ``config.yaml`` and ``results.json`` record them; a value that
    contradicts the protocol is a one-line ``ConfigError`` (``config.check_teacher_classes``)."""
    c = copy.deepcopy(cfg)
    c.train_teacher.subsample = teacher_classes(c)
    return c


def _for_dataset(cfg: RunConfig, dataset: str | None) -> RunConfig:
    c = copy.deepcopy(cfg)
    if dataset is not None and dataset != c.data.dataset:
        c.data.dataset = dataset
        c.data.split_file = None  # a split file belongs to one dataset
    return c


def _eval_fn(cfg: RunConfig):
    """Checkpoint selection ``promptkd``: score each epoch on base-test (b2n) or test accuracy."""

    def fn(student) -> dict:
        if cfg.protocol == "base2novel":
            ds = make_dataset(cfg, "test", student.preprocess, train=False, subsample="base")
            acc = evaluate_subset(student, ds, cfg)
            return {"score": acc, "select_base_test_acc": acc}
        res = evaluate_student(cfg, student)
        return {"score": res["acc"], "select_test_acc": res["acc"]}

    return fn


def _scores(res: dict) -> dict[str, float]:
    if "base" in res:
        return {"base": res["base"]["acc"], "novel": res["novel"]["acc"], "hm": res["hm"]}
    return {"acc": res["acc"]}


def _class_counts(res: dict) -> dict[str, int]:
    """metric -> the number of classes it is scored over, from an ``evaluate_*`` result."""
    parts = {"base": res["base"], "novel": res["novel"]} if "base" in res else {"acc": res}
    return {k: int(v["classes"]) for k, v in parts.items() if "classes" in v}  # absent: not checked


def _test_size(res: dict) -> dict[str, dict[str, int]]:
    """part (``base``, ``novel`` or ``all``) -> ``{"classes", "images"}`` scored, from an
    ``evaluate_*`` result (the report's chance level and test-set size)."""
    parts = {"base": res["base"], "novel": res["novel"]} if "base" in res else {"all": res}
    sizes = {k: {n: int(v[n]) for n in ("classes", "images") if n in v} for k, v in parts.items()}
    return {k: v for k, v in sizes.items() if v}


def _append(table: dict, dataset: str, method: str, scores: dict[str, float]) -> None:
    row = table.setdefault(dataset, {}).setdefault(method, {})
    for k, v in scores.items():
        row.setdefault(k, []).append(v)


def _pretrain_if_enabled(cfg: RunConfig, root: Path, resume: bool) -> RunConfig:
    if not cfg.pretrain.enabled:
        return cfg
    out = root / "pretrain"
    done = out / STUDENT_CLIP
    with plan_part("pretrain"):
        if not (resume and done.exists() and (out / TEACHER_CLIP).exists()):
            run_pretrain(cfg, out, resume=resume)
    prune_checkpoints(out, keep=cfg.keep_checkpoints)
    cfg = copy.deepcopy(cfg)
    cfg.teacher.pretrained = str(out / TEACHER_CLIP)
    cfg.student.pretrained = str(out / STUDENT_CLIP)
    return cfg


def _teacher_stage(cfg: RunConfig, out: Path, resume: bool) -> RunConfig:
    prompts = out / TEACHER_PROMPTS
    with plan_part("teacher"):
        if not (resume and prompts.exists()):
            run_train_teacher(cfg, out, resume=resume)
    prune_checkpoints(out, keep=cfg.keep_checkpoints)
    cfg = copy.deepcopy(cfg)
    cfg.teacher.prompts = str(prompts)
    return cfg


def _distill_and_eval(cfg: RunConfig, method: str, out: Path, resume: bool) -> dict:
    with plan_part("distill"):
        return _distill_and_score(cfg, method, out, resume)


def _distill_and_score(cfg: RunConfig, method: str, out: Path, resume: bool) -> dict:
    c = copy.deepcopy(cfg)
    c.distill.method = method
    done = out / "results.json"
    if resume and done.exists():
        import json

        return json.loads(done.read_text())
    if c.distill.teacher_cache == "auto":  # one cache per dataset and seed, shared by every method
        cache = out.parent / "teacher_cache" / "teacher_cache.bin"
        if not cache.exists():
            run_cache_teacher(c, cache.parent)
        c.distill.teacher_cache = str(cache)
    info = run_distill(
        c,
        out,
        resume=resume,
        eval_fn=_eval_fn(c) if c.distill.select == "promptkd" else None,
        step0_fn=lambda s: _scores(evaluate_student(c, s, split=c.eval_split)),
    )
    student = load_student(info["student"], resolve_device(c.device))
    res = evaluate_student(c, student, split=c.eval_split)
    res["split"] = c.eval_split
    res["step0"] = info["step0"]
    res.update(
        method=method,
        alpha=info["alpha"],
        selection=c.distill.select,
        selected_epoch=info["selected_epoch"],
        train_images=info["train_images"],
        trainable_params=info["trainable_params"],
    )
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
    ``methods`` are checked (and spelled as the table spells them) before any stage runs."""
    methods = canonical_methods(methods)
    for m in methods or []:  # a method of several teachers has them, before any stage
        check_teacher_count(cfg.distill, method=m)
    check_batches_split(
        cfg, run_stages(cfg), launched_world_size()
    )  # every stage's batch splits over the ranks
    cfg = _with_teacher_classes(cfg)  # one contradicting the protocol is refused here, before any stage
    if cfg.protocol == "full":  # the user's own classes: one dataset, one seed (protocols/full.py)
        from .full import run_full

        if seeds and len(seeds) > 1:
            raise ValueError(
                f"the full protocol runs one seed per run folder, got {len(seeds)} "
                f"({', '.join(map(str, seeds))}): run each seed with its own --out-dir"
            )
        fcfg = _for_dataset(cfg, datasets[0] if datasets else None)
        if seeds:
            fcfg.seed = seeds[0]
        return run_full(fcfg, out_dir, methods=methods, resume=resume)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if resume:  # before any finished stage is read back
        check_resume_run(cfg, out / "config.yaml")
    save_config(cfg, out / "config.yaml")
    seeds = seeds or [cfg.seed]
    methods = methods or ["promptkd", "comkd"]
    protocol = cfg.protocol
    if datasets is None:
        datasets = {"base2novel": [cfg.data.dataset], "cross": CROSS_TARGETS, "dg": DG_TARGETS}[protocol]
    acc = _Tally()
    stage0 = ["pretrain"] * bool(cfg.pretrain.enabled)
    if protocol == "base2novel":
        parts = len(datasets) * (stage0 + len(seeds) * ["teacher", *["distill"] * len(methods)])
        with run_plan(parts):
            _base2novel(cfg, out, datasets, seeds, methods, resume, acc)
    else:
        with run_plan(stage0 + len(seeds) * ["teacher", *["distill"] * (len(datasets) * len(methods))]):
            _transfer(cfg, out, source, datasets, seeds, methods, resume, acc)
    for ds_name, rows in acc.table.items():
        who = {m: f"student distilled with {m}" for m in rows} | {
            "teacher": "teacher",
            "student_zeroshot": "undistilled student",
        }
        acc.warn(chance_warnings(rows, acc.n_classes.get(ds_name, {}), who, f" on {ds_name}"))
    results = {
        "protocol": protocol,
        "selection": cfg.distill.select,
        "split": cfg.eval_split,
        "seeds": seeds,
        "teacher_classes": cfg.train_teacher.subsample,  # what stage 1 learned on: base2novel base, else all
        "datasets": acc.table,
        "warnings": acc.warnings,
        "teacher_check": acc.teacher_checks,
        # dataset -> part -> {"classes", "images"} of the split scored (chance level, test-set size)
        "test_size": acc.test_size,
    }
    if protocol == "base2novel":  # the paper's HM (of the means over seeds); table's "hm": per seed
        from .report import hm_of_means

        results["hm_of_means"] = {
            d: {m: hm_of_means(row) for m, row in t.items()} for d, t in acc.table.items()
        }
    if protocol == "base2novel" and len(acc.table) > 1:
        results["average"] = average_base2novel(acc.table)
    write_json(out / "results.json", results)
    from .report import write_report

    write_report(results, out, curves=acc.curves)
    return results


@dataclass
class _Tally:
    """What a protocol run gathers: scores per dataset and method, epoch curves, class counts of
    each half, and the warnings (each once, announced in the log as it is found)."""

    table: dict[str, dict] = field(default_factory=dict)
    curves: dict[str, dict[str, list[list[dict]]]] = field(default_factory=dict)
    n_classes: dict[str, dict[str, int]] = field(default_factory=dict)
    test_size: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    # dataset -> seed -> the val scores of the teacher check ({"teacher", "student_zeroshot", ...})
    teacher_checks: dict[str, dict[str, dict]] = field(default_factory=dict)
    _student_val: dict[str, float | None] = field(default_factory=dict)  # None: no val split

    def warn(self, found: list[str]) -> None:
        self.warnings += [w for w in announce(found) if w not in self.warnings]

    def teacher(self, ds_name: str, tcfg: RunConfig, split: str) -> None:
        """Score the prompted teacher of ``tcfg`` on ``split``, and check it is ahead of the
        undistilled student on val before stage 2 (then free it)."""
        teacher = build_teacher(tcfg, resolve_device(tcfg.device))
        tres = evaluate_teacher(tcfg, teacher, split=split)
        _append(self.table, ds_name, "teacher", _scores(tres))
        self.n_classes[ds_name] = _class_counts(tres)
        self.test_size[ds_name] = _test_size(tres)
        self.check_teacher(ds_name, tcfg, teacher, tres if split == "val" else None)
        del teacher

    def check_teacher(self, ds_name: str, tcfg: RunConfig, teacher, val_res: dict | None) -> None:
        """The teacher before it teaches: its val score (HM for base2novel, top-1 otherwise) against
        the undistilled student's; a lead under ``distill.teacher_margin`` is a warning, or stops the
        run with ``distill.require_teacher_ahead``. A dataset without a val split is not checked."""
        metric = "hm" if tcfg.protocol == "base2novel" else "acc"
        if ds_name not in self._student_val:  # once per dataset: the undistilled student has no seed
            has_val = has_val_split(tcfg)
            zs = evaluate_clip_zero_shot(tcfg, "student", split="val") if has_val else None
            self._student_val[ds_name] = _scores(zs)[metric] if zs else None
        s, margin = self._student_val[ds_name], tcfg.distill.teacher_margin
        if s is None:
            log.info("%s has no val split: the teacher is not checked before stage 2", ds_name)
            return
        t = _scores(val_res or evaluate_teacher(tcfg, teacher, split="val"))[metric]
        line = teacher_ahead_warning(
            t, s, margin, metric.upper() if metric == "hm" else "top-1", f" on {ds_name} (seed {tcfg.seed})"
        )
        self.teacher_checks.setdefault(ds_name, {})[str(tcfg.seed)] = {
            "metric": metric,
            "teacher": t,
            "student_zeroshot": s,
            "margin": margin,
            "ahead": line is None,
        }
        if line is not None and tcfg.distill.require_teacher_ahead:
            raise TeacherNotAheadError(
                f"stopped before stage 2 (distill.require_teacher_ahead): {line.split(' (stop here')[0]}"
            )
        self.warn([line] if line else [])


def _base2novel(cfg, out: Path, datasets, seeds, methods, resume: bool, acc: _Tally) -> None:
    """Per dataset: stage 0 once; per seed the teacher's prompts on base classes, then each method."""
    for ds_name in datasets:
        dcfg = _pretrain_if_enabled(_for_dataset(cfg, ds_name), out / ds_name, resume)
        acc.warn(random_tower_warnings(dcfg))
        zs = evaluate_clip_zero_shot(dcfg, "student", split=cfg.eval_split)
        for seed in seeds:
            scfg = copy.deepcopy(dcfg)
            scfg.seed = seed
            sdir = out / ds_name / f"seed{seed}"
            tcfg = _teacher_stage(scfg, sdir / "teacher", resume)
            acc.teacher(ds_name, tcfg, cfg.eval_split)
            _append(acc.table, ds_name, "student_zeroshot", _scores(zs))
            for m in methods:
                res = _distill_and_eval(tcfg, m, sdir / m, resume)
                _append(acc.table, ds_name, m, _scores(res))
                acc.curves.setdefault(ds_name, {}).setdefault(m, []).append(
                    [r for r in read_metrics(sdir / m / "metrics.jsonl") if r.get("type") == "epoch"]
                )


def _transfer(cfg, out: Path, source: str, datasets, seeds, methods, resume: bool, acc: _Tally) -> None:
    """cross / dg: one teacher per seed, prompt-tuned on all classes of the source dataset, then
    each method on each target dataset (dg: distilled on the target images, transductively)."""
    scfg0 = _pretrain_if_enabled(_for_dataset(cfg, source), out / source, resume)
    acc.warn(random_tower_warnings(scfg0))
    for seed in seeds:
        scfg = copy.deepcopy(scfg0)
        scfg.seed = seed
        scfg.train_teacher.subsample = "all"
        tcfg = _teacher_stage(scfg, out / source / f"seed{seed}" / "teacher", resume)
        for ds_name in datasets:
            dcfg = protocol_recipe(_for_dataset(tcfg, ds_name), cfg.protocol)
            if cfg.protocol == "dg":
                dcfg.distill.split = "test"
            acc.teacher(ds_name, dcfg, cfg.eval_split)
            zs = evaluate_clip_zero_shot(dcfg, "student", split=cfg.eval_split)
            _append(acc.table, ds_name, "student_zeroshot", _scores(zs))
            for m in methods:
                res = _distill_and_eval(dcfg, m, out / ds_name / f"seed{seed}" / m, resume)
                _append(acc.table, ds_name, m, _scores(res))
