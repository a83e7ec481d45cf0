"""``--protocol full`` (``OwnClasses``): the user's own classes and images, no base/novel split.

Stage 1 prompt-tunes the teacher on labelled images of *all* classes (``full.shots``, or
``data``'s labelled train split; with none it is zero-shot); stage 2 distils on the unlabelled pool
``data``. With labelled test images (``full.test``, or ``data``'s test split) every model is scored:
overall accuracy (as ``comkd evaluate`` gives it), accuracy per class and a confusion matrix.

Folder layout of a run ``OUT``::

    OUT/config.yaml, results.json, report.md
    OUT/plots/confusion_<model>.png  the teacher, student_zeroshot (undistilled) and each method
    OUT/pretrain/        stage 0
    OUT/teacher/         stage 1 (absent when the teacher is zero-shot or its prompts were given)
    OUT/<method>/        stage 2: student.safetensors, metrics.jsonl, results.json

``results.json`` has every protocol's form (``datasets``: the one dataset, one seed) plus
``classes``, ``teacher_mode``, ``test`` and, per scored model, accuracy per class and the
confusion matrix (``details``).
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError, RunConfig
from ..data import DataError, load_splits
from ..engine.builders import (
    eval_loader,
    loader_options,
    make_dataset,
)
from ..engine.tasks import accuracy, predict
from ..engine.utils import atomic_write_text
from .protocol import Protocol, image_only, pretrain_stage, teacher_stage
from .report import chance_level, save_figure, size_line, subplots
from .sanity import banner

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
    return labelled_config(cfg, "test", "test")


def zero_shot_teacher(cfg: RunConfig) -> RunConfig:
    """``cfg`` with a teacher whose prompt is exactly "a photo of a {class}." (no learned prompts)."""
    c = copy.deepcopy(cfg)
    t = c.teacher
    t.prompts, t.text_ctx, t.text_depth, t.ctx_init, t.vision_tokens = None, 4, 1, ZERO_SHOT_PROMPT, 0
    return c


def labelled_config(cfg: RunConfig, split: str, key: str = "shots") -> RunConfig | None:
    """The config that reads the user's labelled images ``full.<key>`` (``shots``, or ``test``) as
    ``split``, else ``data`` itself when it is labelled; None when there are none."""
    if path := getattr(cfg.full, key):
        return source_config(cfg, path, split, f"full.{key}")
    return copy.deepcopy(cfg) if cfg.data.dataset != "unlabelled" else None


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, n: int) -> torch.Tensor:
    """``[n, n]`` counts: row = true class, column = predicted class."""
    return torch.bincount(labels.long() * n + preds.long(), minlength=n * n).reshape(n, n)


def per_class_accuracy(cm: torch.Tensor, names: list[str]) -> dict[str, float]:
    """Accuracy (%) of each class with test images."""
    return {
        names[i]: 100.0 * float(cm[i, i]) / float(cm[i].sum()) for i in range(len(names)) if cm[i].sum() > 0
    }


def plot_confusion(cm: torch.Tensor, names: list[str], path: Path, title: str) -> None:
    n = len(names)
    size = min(4 + 0.35 * n, 30)
    fig, ax = subplots(figsize=(size, size * 0.9))
    rows = cm.float() / cm.sum(1, keepdim=True).clamp_min(1)
    im = ax.imshow(rows.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), names, rotation=90, fontsize=7)
    ax.set_yticks(range(n), names, fontsize=7)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    if n <= 25:
        for i, j in cm.nonzero().tolist():
            color = "white" if rows[i, j] > 0.5 else "black"
            ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=6, color=color)
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of the true class")
    fig.tight_layout()
    save_figure(fig, path)


class OwnClasses(Protocol):
    """``protocol: full`` (the module docstring): one dataset, one seed, the stages above."""

    name = "full"

    def check_run(self, cfg: RunConfig, datasets: list[str] | None, seeds: list[int]) -> None:
        for what, given in (("seed", seeds), ("dataset", datasets or [])):
            if len(given) > 1:
                raise ValueError(
                    f"the full protocol runs one {what} per run folder, got {len(given)} "
                    f"({', '.join(map(str, given))}): run each {what} with its own --out-dir"
                )

    def default_methods(self, cfg: RunConfig) -> list[str]:
        return [cfg.distill.method]

    def folder(self, out: Path, dataset: str, seed: int | None = None) -> Path:
        return out

    def shots(self, cfg: RunConfig, spec) -> Any:
        """``full.shots`` (every image), or ``num_shots`` per class of ``data``'s labelled train split."""
        lcfg = labelled_config(cfg, "train")
        if lcfg is None:
            raise ConfigError(
                f"student.model {cfg.student.model}: an image-only student's undistilled score fits its "
                "projection on labelled images; set full.shots=FOLDER_OR_CSV"
            )
        few = None if cfg.full.shots else cfg.data.num_shots
        return make_dataset(lcfg, "train", spec, train=False, shots=few)

    def trains_teacher(self, cfg: RunConfig) -> bool:
        return not cfg.teacher.prompts and bool(cfg.full.shots or cfg.data.dataset != "unlabelled")

    def pretrain(self, cfg: RunConfig, out: Path, resume: bool) -> RunConfig:
        """Stage 0 when ``pretrain.enabled`` (CLIPs without downloaded weights): both towers learn
        contrastively on the labelled images the user gave (``full.shots``, every image; per tower
        ``pretrain.teacher_shots`` / ``student_shots`` per class when set), scored on those images."""
        names = class_names(cfg)
        if cfg.full.test:
            _check_names(eval_config(cfg), names, "full.test")
        if not cfg.pretrain.enabled:
            return cfg
        pcfg = labelled_config(cfg, "pretrain")
        if pcfg is None:
            raise ConfigError(
                "pretrain.enabled: stage 0 needs labelled images; set full.shots=FOLDER_OR_CSV (a few images "
                "per class) or use towers with weights (teacher.pretrained / student.pretrained)"
            )
        _check_names(pcfg, names, "full.shots" if cfg.full.shots else "the labelled data")
        if cfg.full.shots:
            pcfg.pretrain.split = "pretrain"
            pcfg.pretrain.teacher_split = pcfg.pretrain.student_split = None
            pcfg.pretrain.eval_split = pcfg.pretrain.eval_split or "pretrain"  # no val: the images it fitted
        # an image-only student (timm:) has no CLIP to pre-train: it keeps its weights
        roles = ("teacher",) if image_only(cfg) else ("teacher", "student")
        pool = cfg if cfg.data.dataset == "unlabelled" else None
        return pretrain_stage(cfg, out, resume, pcfg, roles, pool)

    def teacher(self, cfg: RunConfig, out: Path, resume: bool) -> tuple[RunConfig, str]:
        if cfg.teacher.prompts:
            return copy.deepcopy(cfg), "given prompts"
        scfg = labelled_config(cfg, "train")
        if scfg is None:
            return zero_shot_teacher(cfg), "zero-shot"
        _check_names(scfg, class_names(cfg), "full.shots" if cfg.full.shots else "the labelled data")
        scfg.train_teacher.subsample = "all"
        return teacher_stage(cfg, out, resume, scfg), "prompted"

    def scoring(self, cfg: RunConfig) -> RunConfig | None:
        ecfg = eval_config(cfg)
        return None if ecfg is None else super().scoring(ecfg)

    def checks_teacher(self, cfg: RunConfig) -> bool:
        return False

    @torch.no_grad()
    def measure(self, cfg: RunConfig, spec, split: str, logits_for, device) -> dict[str, Any]:
        """Accuracy overall and per class, and the confusion matrix, on every class of ``split``."""
        ds = make_dataset(cfg, split, spec, train=False)
        names = ds.full_classnames
        preds, labels = predict(logits_for(ds), eval_loader(cfg, ds, device), device)
        cm = confusion_matrix(preds, labels, len(names))
        return {
            "acc": accuracy(preds, labels),
            "classes": len(names),
            "images": len(ds),
            "per_class": per_class_accuracy(cm, names),
            "confusion": cm.tolist(),
        }

    def extra_results(self, cfg: RunConfig, mode: str) -> dict[str, Any]:
        ecfg = eval_config(cfg)
        return {
            "classes": class_names(cfg),
            "teacher_mode": mode,
            # what stage 1 learned on (None: no stage 1, the teacher zero-shot or its prompts given)
            "teacher_classes": "all" if mode == "prompted" else None,
            "test": ecfg.data.root if ecfg is not None else None,
        }

    def report(self, results: dict[str, Any], out: Path, curves: dict) -> None:
        for models in results.get("details", {}).values():
            for key, runs in models.items():
                title = {"teacher": "teacher", "student_zeroshot": "undistilled student"}.get(key, key)
                for res in (r for r in runs if "confusion" in r):  # scored on labelled test images
                    plot = out / "plots" / f"confusion_{key}.png"
                    title_acc = f"{title}: {res['acc']:.2f}% top-1"
                    plot_confusion(torch.tensor(res["confusion"]), results["classes"], plot, title_acc)
                    res["confusion_plot"] = str(plot.relative_to(out))
        atomic_write_text(out / "report.md", report(results))


def report(results: dict[str, Any]) -> str:
    """Markdown: the accuracy table with the chance level and the test-set size, per-class
    accuracy and the confusion plots of every model."""
    names = results["classes"]
    details = next(iter(results.get("details", {}).values()), {})
    scored = "teacher" in details  # a labelled test set: full.test, or the data's test split
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
    who = {"teacher": "Teacher", "student_zeroshot": "Student, undistilled (zero-shot)"}
    rows = [(who.get(m, m), runs[0]) for m, runs in details.items()]
    sizes = next(iter(results.get("test_size", {}).values()), {})
    lines += ["| model | top-1 (%) |", "|---|---|"] + [f"| {w} | {r['acc']:.2f} |" for w, r in rows]
    lines += [f"| Chance level (100 / classes) | {chance_level(len(names)):.2f} |", "", size_line(sizes), ""]
    short = {"teacher": "teacher", "student_zeroshot": "undistilled"}
    per = [(short.get(m, m), runs[0]["per_class"]) for m, runs in details.items()]
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
