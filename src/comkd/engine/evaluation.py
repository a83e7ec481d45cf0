"""Evaluation: zero-shot CLIP, teacher and student accuracy on a split (base / novel / HM), class checks."""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

from ..config import RunConfig
from ..data import DataError, load_splits
from ..data.dataset import ImageDataset
from ..models import LoadedModel, PreprocessSpec, Student, Teacher
from ..stats import harmonic_mean
from .builders import eval_loader, load_role_clip, loader_options, make_dataset
from .tasks import accuracy, predict
from .utils import resolve_device

log = logging.getLogger(__name__)


@torch.no_grad()
def clip_class_weights(model, tokenizer, classnames: list[str], templates: list[str], device) -> torch.Tensor:
    """``[C, D]`` unit text features of an open_clip model's classes, averaged over ``templates``."""
    tokens = [tokenizer([t.format(c) for c in classnames]).to(device) for t in templates]
    feats = [F.normalize(model.encode_text(tok).float(), dim=-1) for tok in tokens]
    return F.normalize(torch.stack(feats).mean(0), dim=-1)


def clip_logits(loaded: LoadedModel, ds: ImageDataset, templates: list[str], device):
    """``images -> logits`` of an open_clip model (eval mode) on ``ds``'s classes, zero-shot with
    template-averaged class prompts."""
    model = loaded.model.eval()
    w = clip_class_weights(model, loaded.tokenizer, ds.classnames, templates, device)
    return lambda x: model.encode_image(x).float() @ w.t()


@torch.no_grad()
def clip_zero_shot(
    loaded: LoadedModel, cfg: RunConfig, ds: ImageDataset, templates: list[str], device
) -> float:
    """Zero-shot accuracy of an open_clip model on ``ds`` (template-averaged class prompts)."""
    return accuracy(
        *predict(clip_logits(loaded, ds, templates, device), eval_loader(cfg, ds, device), device)
    )


def teacher_logits(teacher: Teacher, ds: ImageDataset):
    """``images -> logits`` of the prompted teacher on ``ds``'s classes (W sliced to them)."""
    w = teacher.class_text_features(ds.full_classnames)[ds.class_indices]
    return lambda x: teacher.encode_image(x) @ w.t()


def student_logits_on(student: Student, ds: ImageDataset):
    """``images -> logits`` of the distilled student (eval mode) on ``ds``'s classes (its stored W
    sliced to them). A dataset whose classes are not the ones stored in the student is refused,
    naming both."""
    check_student_classes(student, ds)
    student.eval()
    idx = ds.class_indices
    return lambda x: student(x, class_subset=idx).logits


def has_val_split(cfg: RunConfig) -> bool:
    """Whether ``cfg.data``'s dataset has a non-empty val split (settings are chosen there)."""
    return bool(load_splits(cfg.data.dataset, cfg.data.root, **loader_options(cfg)).val)


def pretrain_eval_split(cfg: RunConfig) -> str:
    """The split stage 0 is scored on: ``pretrain.eval_split`` if set, else ``val`` where the
    dataset has one (choices made on stage 0 must not look at test data), else ``test``."""
    if cfg.pretrain.eval_split:
        return cfg.pretrain.eval_split
    if has_val_split(cfg):
        return "val"
    log.warning("%s has no val split: stage 0 is scored on test", cfg.data.dataset)
    return "test"


def _preview(names: list[str], k: int = 4) -> str:
    return ", ".join(map(repr, names[:k])) + (", ..." if len(names) > k else "")


def check_student_classes(student: Student, ds: ImageDataset) -> None:
    """Raise a ``DataError`` when ``ds``'s classes differ from those stored in the student (its W)."""
    mine, theirs = list(student.classnames or []), list(ds.full_classnames)
    if not mine:  # W stored without names (Python API): only its size can be checked
        n = int(student.text_features.shape[0])
        if n != len(theirs):
            raise DataError(f"the student stores W for {n} classes but dataset {ds.name!r} has {len(theirs)}")
        return
    if mine != theirs:
        first = next(
            (i for i, (a, b) in enumerate(zip(mine, theirs, strict=False)) if a != b),
            min(len(mine), len(theirs)),
        )
        raise DataError(
            f"the student stores {len(mine)} classes ({_preview(mine)}) but dataset {ds.name!r} has "
            f"{len(theirs)} ({_preview(theirs)}); they first differ at class {first}: evaluate the student on "
            "the dataset (and class names) it was distilled for"
        )


def evaluate_subset(student: Student, ds: ImageDataset, cfg: RunConfig) -> float:
    """Student accuracy on ``ds`` (``student_logits_on``)."""
    device = next(student.parameters()).device
    return accuracy(*predict(student_logits_on(student, ds), eval_loader(cfg, ds, device), device))


def evaluate(cfg: RunConfig, spec: PreprocessSpec, split: str, acc_fn, halves: bool) -> dict[str, Any]:
    """``results.json`` of one model: with ``halves`` base/novel/HM (each half relabelled from 0,
    logits sliced from W; the base-to-novel protocol), else accuracy on all classes. ``acc_fn(ds)``
    scores one dataset."""

    def part(subsample: str) -> dict:
        ds = make_dataset(cfg, split, spec, train=False, subsample=subsample)
        return {"acc": acc_fn(ds), "classes": len(ds.classnames), "images": len(ds)}

    res: dict[str, Any] = {"dataset": cfg.data.dataset}
    if halves:
        res.update(base=part("base"), novel=part("novel"))
        res["hm"] = harmonic_mean(res["base"]["acc"], res["novel"]["acc"])
        return res
    return {**res, **part("all")}


def evaluate_student(
    cfg: RunConfig, student: Student, split: str = "test", halves: bool = False
) -> dict[str, Any]:
    """The distilled student (its stored W; no teacher, no text encoder); ``halves``: base, novel
    and their HM, else all classes."""
    return evaluate(cfg, student.preprocess, split, lambda ds: evaluate_subset(student, ds, cfg), halves)


def evaluate_teacher(
    cfg: RunConfig, teacher: Teacher, split: str = "test", halves: bool = False
) -> dict[str, Any]:
    """The prompted teacher, split as ``evaluate_student`` does."""
    device = next(teacher.parameters()).device
    teacher.eval()

    def acc(ds: ImageDataset) -> float:
        return accuracy(*predict(teacher_logits(teacher, ds), eval_loader(cfg, ds, device), device))

    return evaluate(cfg, teacher.preprocess, split, acc, halves)


def evaluate_clip_zero_shot(
    cfg: RunConfig, role: str, split: str = "test", halves: bool = False
) -> dict[str, Any]:
    """Zero-shot accuracy of the plain (undistilled) CLIP of ``role`` with its own text tower."""
    device = resolve_device(cfg.device)
    loaded = load_role_clip(cfg, role, device)
    return evaluate(
        cfg,
        loaded.preprocess,
        split,
        lambda ds: clip_zero_shot(loaded, cfg, ds, ds.templates, device),
        halves,
    )
