"""``--protocol full``: the user's own classes and images, no base/novel split.

0. Stage 0, when ``pretrain.enabled`` (the CPU preset ``own_tiny``: tiny CLIPs without downloaded
   weights): both CLIPs are pre-trained contrastively on the labelled ``full.shots``; with
   ``pretrain.self_train_rounds`` the teacher then self-trains on the unlabelled pool.
1. Teacher: prompt learning on ``num_shots`` labelled images of *all* classes (``full.shots``, or
   the train split of ``data`` when it is labelled); with no labels at all the teacher is used
   zero-shot, its text prompt being "a photo of a {class}." (no learned context, no visual prompts);
   ``teacher.prompts`` given: those prompts, no training.
2. Student: distilled on the unlabelled pool ``data`` (``distill.split``, default ``train``: every
   image of an ``unlabelled`` folder) for each method.
3. Evaluation (when there is a labelled test set: ``full.test``, or ``data``'s test split): overall
   accuracy (the same number ``comkd evaluate`` gives), accuracy per class and a confusion matrix
   plot, for the teacher, the undistilled student CLIP (zero-shot) and each distilled student.

Folder layout of a run ``OUT``::

    OUT/config.yaml, results.json, report.md
    OUT/plots/confusion_<model>.png  the teacher, student_zeroshot (undistilled) and each method
    OUT/pretrain/        stage 0 (``pretrain.enabled``: both CLIPs learn on the labelled ``full.shots``)
    OUT/teacher/         stage 1 (absent when the teacher is zero-shot or its prompts were given)
    OUT/<method>/        stage 2: student.safetensors, metrics.jsonl, results.json
"""

from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError, RunConfig, save_config
from ..config_rules import check_teacher_classes
from ..data import DataError, load_splits
from ..engine.builders import (
    STUDENT_CLIP,
    TEACHER_CLIP,
    TEACHER_PROMPTS,
    build_teacher,
    eval_loader,
    loader_options,
    make_dataset,
)
from ..engine.checkpoint import prune_checkpoints
from ..engine.distill import run_distill
from ..engine.evaluation import clip_class_weights
from ..engine.runplan import plan_part, run_plan
from ..engine.stages import check_resume_run, run_pretrain, run_train_teacher
from ..engine.tasks import accuracy, predict
from ..engine.utils import atomic_write_text, resolve_device, write_json
from ..methods import canonical_methods
from ..models import load_clip
from ..models.io import load_student
from ..runlock import locked_run
from .report import chance_level, size_line
from .sanity import announce, banner, chance_warnings, random_tower_warnings

log = logging.getLogger(__name__)

ZERO_SHOT_PROMPT = "a photo of a"  # 4 CLIP tokens: the learnable context starts as this phrase


def _abs_classes_file(cfg: RunConfig) -> str | None:
    f = cfg.data.classes_file
    if f is None or os.path.isabs(f):
        return f
    if not os.path.exists(f) and cfg.data.root and os.path.exists(os.path.join(cfg.data.root, f)):
        f = os.path.join(cfg.data.root, f)
    return os.path.abspath(f)


def source_config(cfg: RunConfig, path: str, split: str, key: str) -> RunConfig:
    """``cfg`` reading a labelled source instead of ``data``: a folder of class sub-folders
    (``imagefolder``) or a ``.csv`` file, every image in ``split``, classes matched by name to the
    class-names file of ``data``."""
    c = copy.deepcopy(cfg)
    p = Path(path).expanduser()
    if p.is_file() and p.suffix.lower() == ".csv":
        c.data.dataset = "csv"
    elif p.is_dir():
        c.data.dataset = "imagefolder"
    else:
        raise DataError(f"{key}: {path} is neither a folder of class sub-folders nor a .csv file")
    c.data.root, c.data.subdir, c.data.split_file = str(p), None, None
    c.data.fractions = {
        "pretrain": [1.0, 0.0, 0.0, 0.0],
        "train": [0.0, 1.0, 0.0, 0.0],
        "test": [0.0, 0.0, 0.0, 1.0],
    }[split]
    c.data.classes_file = _abs_classes_file(cfg)
    return c


def class_names(cfg: RunConfig) -> list[str]:
    """The class names of ``cfg.data``."""
    return load_splits(cfg.data.dataset, cfg.data.root, **loader_options(cfg)).classnames


def _check_names(cfg: RunConfig, names: list[str], what: str) -> None:
    got = class_names(cfg)
    if got != names:
        extra = [n for n in got if n not in names][:5]
        missing = [n for n in names if n not in got][:5]
        raise DataError(
            f"{what} ({cfg.data.root}) has classes that differ from the class names of the pool "
            f"({len(got)} vs {len(names)}; not in the names: {extra}; missing: {missing}; or in another order)"
        )


def eval_config(cfg: RunConfig) -> RunConfig | None:
    """The config that reads the labelled test images of a ``full`` run, or None when there are none."""
    if cfg.full.test:
        return source_config(cfg, cfg.full.test, "test", "full.test")
    if cfg.data.dataset != "unlabelled":
        return copy.deepcopy(cfg)
    return None


def scoring_config(cfg: RunConfig) -> RunConfig | None:
    """The config whose test split scores a student of ``cfg``: an own-data run's (``protocol:
    full``) labelled test images, None when it has none; ``cfg`` itself for the other protocols.
    Unlabelled data to score on is refused here, in one line, before anything trains."""
    ecfg = eval_config(cfg) if cfg.protocol == "full" else cfg
    if ecfg is not None and ecfg.data.dataset == "unlabelled":
        raise DataError(
            f"data.root {ecfg.data.root}: unlabelled images have no test split to score the student on; "
            "give labelled test images (--set protocol=full --set full.test=FOLDER_OR_CSV) or --no-evaluate"
        )
    return ecfg


def zero_shot_teacher(cfg: RunConfig) -> RunConfig:
    """``cfg`` with a teacher whose prompt is exactly "a photo of a {class}." (no learned prompts)."""
    c = copy.deepcopy(cfg)
    t = c.teacher
    t.prompts, t.text_ctx, t.text_depth, t.ctx_init, t.vision_tokens = None, 4, 1, ZERO_SHOT_PROMPT, 0
    return c


def _pretrain_stage(cfg: RunConfig, out: Path, names: list[str], resume: bool) -> RunConfig:
    """Stage 0 when ``pretrain.enabled`` (CLIPs without downloaded weights): both towers learn
    contrastively on the labelled images the user gave (``full.shots``, every image; per tower
    ``pretrain.teacher_shots`` / ``student_shots`` per class when set), scored on those images."""
    if not cfg.pretrain.enabled:
        return cfg
    if cfg.full.shots:
        pcfg = source_config(cfg, cfg.full.shots, "pretrain", "full.shots")
    elif cfg.data.dataset != "unlabelled":
        pcfg = copy.deepcopy(cfg)
    else:
        raise ConfigError(
            "pretrain.enabled: stage 0 needs labelled images; set full.shots=FOLDER_OR_CSV (a few images "
            "per class) or use towers with weights (teacher.pretrained / student.pretrained)"
        )
    _check_names(pcfg, names, "full.shots" if cfg.full.shots else "the labelled data")
    if cfg.full.shots:
        pcfg.pretrain.split, pcfg.pretrain.teacher_split, pcfg.pretrain.student_split = "pretrain", None, None
        pcfg.pretrain.eval_split = pcfg.pretrain.eval_split or "pretrain"  # no val: the images it fitted
    sub = out / "pretrain"
    with plan_part("pretrain"):
        if not (resume and (sub / STUDENT_CLIP).exists() and (sub / TEACHER_CLIP).exists()):
            run_pretrain(pcfg, sub, resume=resume, pool=cfg if cfg.data.dataset == "unlabelled" else None)
    prune_checkpoints(sub, keep=cfg.keep_checkpoints)
    c = copy.deepcopy(cfg)
    c.teacher.pretrained, c.student.pretrained = str(sub / TEACHER_CLIP), str(sub / STUDENT_CLIP)
    return c


def _teacher_stage(cfg: RunConfig, out: Path, names: list[str], resume: bool) -> tuple[RunConfig, str]:
    if cfg.teacher.prompts:
        return copy.deepcopy(cfg), "given prompts"
    if cfg.full.shots:
        scfg = source_config(cfg, cfg.full.shots, "train", "full.shots")
    elif cfg.data.dataset != "unlabelled":
        scfg = copy.deepcopy(cfg)
    else:
        return zero_shot_teacher(cfg), "zero-shot"
    _check_names(scfg, names, "full.shots" if cfg.full.shots else "the labelled data")
    scfg.train_teacher.subsample = "all"
    prompts = out / "teacher" / TEACHER_PROMPTS
    with plan_part("teacher"):
        if not (resume and prompts.exists()):
            run_train_teacher(scfg, out / "teacher", resume=resume)
    prune_checkpoints(out / "teacher", keep=cfg.keep_checkpoints)
    t = copy.deepcopy(cfg)
    t.teacher.prompts = str(prompts)
    return t, "prompted"


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, n: int) -> torch.Tensor:
    """``[n, n]`` counts: row = true class, column = predicted class."""
    cm = torch.zeros(n, n, dtype=torch.long)
    cm.index_put_((labels.long(), preds.long()), torch.ones_like(labels, dtype=torch.long), accumulate=True)
    return cm


def per_class_accuracy(cm: torch.Tensor, names: list[str]) -> dict[str, float]:
    """Accuracy (%) of each class with test images."""
    return {
        names[i]: 100.0 * float(cm[i, i]) / float(cm[i].sum()) for i in range(len(names)) if cm[i].sum() > 0
    }


def plot_confusion(cm: torch.Tensor, names: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(names)
    size = min(4 + 0.35 * n, 30)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    rows = cm.float() / cm.sum(1, keepdim=True).clamp_min(1)
    im = ax.imshow(rows.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), names, rotation=90, fontsize=7)
    ax.set_yticks(range(n), names, fontsize=7)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    if n <= 25:
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(
                        j,
                        i,
                        int(cm[i, j]),
                        ha="center",
                        va="center",
                        fontsize=6,
                        color="white" if rows[i, j] > 0.5 else "black",
                    )
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of the true class")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def score(
    logits_fn, ecfg: RunConfig, spec, names: list[str], device: torch.device, ds=None
) -> dict[str, Any]:
    """Accuracy overall and per class, and the confusion matrix, of ``logits_fn`` on the test
    images (``ds``: the test dataset, already built with ``spec``)."""
    ds = ds if ds is not None else make_dataset(ecfg, "test", spec, train=False)
    if ds.full_classnames != names:
        raise DataError(
            f"test set {ecfg.data.root}: its classes differ from the model's {len(names)} class names"
        )
    preds, labels = predict(logits_fn, eval_loader(ecfg, ds, device), device)
    cm = confusion_matrix(preds, labels, len(names))
    return {
        "acc": accuracy(preds, labels),
        "images": len(ds),
        "per_class": per_class_accuracy(cm, names),
        "confusion": cm.tolist(),
    }


def score_zero_shot_student(ecfg: RunConfig, names: list[str], device: torch.device) -> dict[str, Any]:
    """The undistilled student CLIP, zero-shot with its own text tower, scored as ``score`` scores
    the others (per class, confusion matrix): the model, prompt templates, classes and loader of
    ``evaluate_clip_zero_shot``, so the accuracy is the one ``comkd evaluate`` would give it."""
    m = ecfg.student
    loaded = load_clip(
        m.model, m.pretrained, image_size=ecfg.data.image_size, quick_gelu=m.quick_gelu or None, device=device
    )
    loaded.model.eval()
    ds = make_dataset(ecfg, "test", loaded.preprocess, train=False)
    w = clip_class_weights(loaded.model, loaded.tokenizer, ds.classnames, ds.templates, device)
    return score(
        lambda x: loaded.model.encode_image(x).float() @ w.t(), ecfg, loaded.preprocess, names, device, ds=ds
    )


def _plot(res: dict[str, Any], names: list[str], out: Path, key: str, title: str) -> None:
    """``out/plots/confusion_<key>.png`` of a scored model; its path goes into ``res``."""
    plot = out / "plots" / f"confusion_{key}.png"
    plot_confusion(torch.tensor(res["confusion"]), names, plot, f"{title}: {res['acc']:.2f}% top-1")
    res["confusion_plot"] = str(plot.relative_to(out))


@locked_run(results=("results.json",))  # one writer; no silent overwrite
def run_full(
    cfg: RunConfig, out_dir: str | Path, *, methods: list[str] | None = None, resume: bool = False
) -> dict[str, Any]:
    """Run the ``full`` protocol (see the module docstring); writes results.json and report.md."""
    # the teacher learns on all classes: a config that says otherwise is refused before any stage
    check_teacher_classes(replace(cfg, protocol="full"))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if resume:  # before any finished stage is read back (a new full.test, classes, data...)
        check_resume_run(cfg, out / "config.yaml")
    save_config(cfg, out / "config.yaml")
    methods = canonical_methods(methods) or [cfg.distill.method]
    with run_plan(_parts(cfg, methods)):
        return _run_full(cfg, out, methods, resume)


def _parts(cfg: RunConfig, methods: list[str]) -> list[str]:
    """The parts of a full run, for its overall estimate of the time left."""
    prompted = not cfg.teacher.prompts and (cfg.full.shots or cfg.data.dataset != "unlabelled")
    return (
        ["pretrain"] * bool(cfg.pretrain.enabled) + ["teacher"] * bool(prompted) + ["distill"] * len(methods)
    )


def _run_full(cfg: RunConfig, out: Path, methods: list[str], resume: bool) -> dict[str, Any]:
    names = class_names(cfg)
    ecfg = eval_config(cfg)
    if ecfg is not None and cfg.full.test:
        _check_names(ecfg, names, "full.test")
    cfg = _pretrain_stage(cfg, out, names, resume)
    ecfg = eval_config(cfg)  # with the stage-0 weights, when there is a stage 0
    warnings = announce(random_tower_warnings(cfg))  # said before the stages run, and in the results
    tcfg, mode = _teacher_stage(cfg, out, names, resume)
    device = resolve_device(cfg.device)
    results: dict[str, Any] = {
        "protocol": "full",
        "seed": cfg.seed,
        "classes": names,
        "teacher_mode": mode,
        # what stage 1 learned on (None: no stage 1, the teacher zero-shot or its prompts given)
        "teacher_classes": "all" if mode == "prompted" else None,
        "test": ecfg.data.root if ecfg is not None else None,
        "methods": {},
        "warnings": warnings,
    }
    if ecfg is not None:
        teacher = build_teacher(tcfg, device)
        teacher.eval()
        w = teacher.class_text_features(names)
        results["teacher"] = score(
            lambda x: teacher.encode_image(x) @ w.t(), ecfg, teacher.preprocess, names, device
        )
        del teacher
        results["student_zeroshot"] = score_zero_shot_student(ecfg, names, device)
        _plot(results["teacher"], names, out, "teacher", f"teacher {cfg.teacher.model} ({mode})")
        _plot(results["student_zeroshot"], names, out, "student_zeroshot", f"undistilled {cfg.student.model}")
        # the chance level and the test-set size of the report
        results["test_size"] = {"all": {"classes": len(names), "images": results["teacher"]["images"]}}
    for m in methods:
        c = copy.deepcopy(tcfg)
        c.distill.method = m
        mdir = out / m
        done = mdir / "results.json"
        if resume and done.exists():
            res = json.loads(done.read_text())
        else:
            with plan_part("distill"):
                info = run_distill(c, mdir, resume=resume)
            res = {
                "method": m,
                "student": info["student"],
                "alpha": info["alpha"],
                "train_images": info["train_images"],
            }
            if ecfg is not None:
                student = load_student(info["student"], device)
                res.update(score(lambda x, s=student: s(x).logits, ecfg, student.preprocess, names, device))
                _plot(res, names, out, m, m)
            write_json(done, res)
        prune_checkpoints(mdir, keep=c.keep_checkpoints)
        results["methods"][m] = res
    if ecfg is not None:
        scored = {"teacher": results["teacher"], "student_zeroshot": results["student_zeroshot"]}
        scored |= results["methods"]
        who = {
            "teacher": f"teacher {cfg.teacher.model} ({mode})",
            "student_zeroshot": f"undistilled student {cfg.student.model}",
        } | {m: f"student {cfg.student.model} distilled with {m}" for m in methods}
        warnings += announce(chance_warnings(scored, {"acc": len(names)}, who, " on the test set"))
    write_json(out / "results.json", results)
    atomic_write_text(out / "report.md", report(results))
    return results


def report(results: dict[str, Any]) -> str:
    """Markdown: the accuracy table with the chance level and the test-set size, per-class
    accuracy and the confusion plots of every model."""
    names = results["classes"]
    scored = (
        "teacher" in results
    )  # a labelled test set: full.test, or the data's test split (root None: digits)
    test = results["test"] or ("the data's test split" if scored else "none")
    lines = [
        "# Own classes (protocol full)",
        "",
        *banner(results.get("warnings", [])),
        f"{len(names)} classes; teacher: {results['teacher_mode']}; test set: {test}.",
        "",
    ]
    if not scored:
        lines.append("No labelled test set was given (`full.test`), so no accuracy is reported.")
        return "\n".join(lines) + "\n"
    rows = [
        ("Teacher", results["teacher"]),
        ("Student, undistilled (zero-shot)", results["student_zeroshot"]),
    ]
    rows += [(m, r) for m, r in results["methods"].items()]
    sizes = results.get("test_size") or {}
    n_classes = (sizes.get("all") or {}).get("classes") or len(names)
    lines += ["| model | top-1 (%) |", "|---|---|"] + [f"| {who} | {r['acc']:.2f} |" for who, r in rows]
    lines += [f"| Chance level (100 / classes) | {chance_level(n_classes):.2f} |", "", size_line(sizes), ""]
    per = [("teacher", results["teacher"].get("per_class"))]
    per += [("undistilled", results["student_zeroshot"].get("per_class"))]
    per += [(m, r.get("per_class")) for m, r in results["methods"].items()]
    per = [(m, p) for m, p in per if p is not None]  # a results.json of an older run: no undistilled column
    lines += [
        "## Accuracy per class (%)",
        "",
        "| class | " + " | ".join(m for m, _ in per) + " |",
        "|---|" + "---|" * len(per),
    ]
    for c in names:
        cells = [p.get(c) for _, p in per]
        lines.append(f"| {c} | " + " | ".join("–" if v is None else f"{v:.1f}" for v in cells) + " |")
    lines += ["", "## Confusion matrices", ""]
    for m, r in rows:
        if "confusion_plot" in r:
            lines += [f"![confusion matrix, {m}]({r['confusion_plot']})", ""]
    return "\n".join(lines)
