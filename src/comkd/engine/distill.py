"""Stage 2 (``run_distill``): teacher sides, the student's warm start, the method's task, the loop."""

from __future__ import annotations

import dataclasses
import logging
import pkgutil
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError, RunConfig
from ..config_rules import check_teacher_count, resolve_recipe
from ..losses import build_loss
from ..methods import get_method
from ..models import Student
from ..models.identity import teacher_identity, teacher_sources
from ..models.io import save_student
from ..models.projector import fit_projector
from ..runlock import locked_run
from .builders import STUDENT_FILE, build_student, build_teacher, eval_loader, make_dataset, teacher_source
from .cache_format import read_cache_info
from .cache_read import CachedTeacherOutputs
from .loop import fit
from .stages import fit_kwargs, start_stage
from .tasks import DistillTask, TeacherOutputs, TeacherSide
from .utils import all_reduce_sum, amp_context, barrier, is_main, rank, read_metrics, world_size

log = logging.getLogger(__name__)


@torch.no_grad()
def warm_start_projector(student: Student, ds, outputs, cfg: RunConfig, device: torch.device) -> int:
    """Fit the projector in closed form (ridge, no labels) from the student tower's features to the
    teacher's image features u_t over the first epoch's views of the distillation images (read
    from the teacher cache when there is one), both towers under ``distill.optim.amp``'s autocast.
    Under torchrun each rank runs its share of the pool (``eval_loader``'s of a map-style one; the
    views of its own shards of a stream, as a cache replay reads them) and the fit adds up every
    rank's sums. Returns the number of images used (all ranks')."""
    ds.set_epoch(0)
    student.eval()
    autocast, _ = amp_context(device, cfg.distill.optim.amp)
    shared = world_size() > 1 and (not ds.streaming or ds.view_seed is not None)
    # a stream under torchrun: view 0 of this rank's shards, the views epoch 0 reads
    source = ds.replay_stream(ds.view_seed, 0, rank(), world_size()) if ds.streaming and shared else ds
    loader = eval_loader(cfg, source, device)
    feats, targets = [], []
    for images, _, idx in loader:
        images = images.to(device)
        with autocast:
            feats.append(student.visual(images).float().cpu())
            targets.append(outputs(images, idx, 0).float().cpu())
    fit_projector(
        student.projector,
        torch.cat(feats).to(device),
        torch.cat(targets).to(device),
        cfg.distill.ridge_lambda,
        all_reduce=all_reduce_sum if shared else None,
    )
    n = sum(len(f) for f in feats)
    return int(all_reduce_sum(torch.tensor(float(n))).item()) if shared else n


@locked_run(results=(STUDENT_FILE, "results.json"))
def run_distill(
    cfg: RunConfig, out_dir: str | Path, *, resume: bool = False, eval_fn=None, step0_fn=None
) -> dict[str, Any]:
    """Stage 2: distil the prompted teacher into the student on unlabelled ``distill.split``
    images of all classes. Writes ``student.safetensors``. ``step0_fn(student)``, when given, scores
    the student before the first step; its result is returned as ``step0`` (after the warm start
    when there is one, with the score of the random-init projector under ``step0["random_init"]``)."""
    _check_distill_settings(cfg, eval_fn)
    out, device, metrics = start_stage(cfg, out_dir, resume, stage="distill")
    d = cfg.distill
    student, ds, sides = teacher_sides(cfg, device)
    n_train = student.num_trainable()
    log.info(
        "distill %s: student %s has %d trainable parameters (%.3f M)",
        d.method,
        cfg.student.model,
        n_train,
        n_train / 1e6,
    )
    loss = build_loss(
        d.method,
        kd_weight=resolve_recipe(cfg).distill.kd_weight,  # what start_stage saved in config.yaml
        temperature=d.temperature,
        align_weight=d.align_weight,
        ifalign_stats=d.ifalign_stats,
        feature_weight=d.feature_weight,
        kd_reduction=d.kd_reduction,
    )
    if not (resume and (out / "checkpoint.pt").exists()):  # a fresh run
        step0 = _start_student(student, ds, sides[0].outputs, cfg, device, step0_fn)
        if step0 is not None:  # kept for a resumed run, which does not score its start again
            metrics.log({"type": "step0", "stage": "distill", **step0})
    else:
        step0 = next((r for r in reversed(read_metrics(metrics.path)) if r.get("type") == "step0"), None)
        step0 = {k: v for k, v in step0.items() if k not in ("type", "stage")} if step0 else None
    task = _task_maker(d.method)(
        student,
        sides,
        loss,
        edu_lr_scale=d.edu_lr_scale,
        ifalign_on=d.ifalign_on,
        tower_lr_scale=d.tower_lr_scale,
    )
    best = _BestEpoch(student, eval_fn) if (d.select == "promptkd" and eval_fn is not None) else None
    fit_res = fit(
        task,
        ds,
        d.optim,
        **fit_kwargs(cfg, out, device, metrics, resume),
        on_epoch_end=best.on_epoch_end if best is not None else None,
    )
    if best is not None and best.state is not None:
        student.load_state_dict(best.state)
    path = out / STUDENT_FILE
    if is_main():
        save_student(student, path)  # the file records student.arch (what the model is), not the method
    barrier()  # the other ranks may read the file next (evaluation, later stages)
    alpha = float(student.edu_attention.alpha.detach()) if student.edu_attention is not None else None
    return {
        "student": str(path),
        "alpha": alpha,
        "train_images": len(ds),
        "trainable_params": n_train,
        "history": fit_res.history,
        "step0": step0,
        "selected_epoch": best.epoch if best is not None else None,
    }


def _task_maker(method: str):
    """The method's ``make_task`` (a callable, or ``"module:attribute"`` imported now), else
    ``DistillTask.from_sides``."""
    make = get_method(method).make_task
    if make is None:
        return DistillTask.from_sides
    return pkgutil.resolve_name(make) if isinstance(make, str) else make


def _check_distill_settings(cfg: RunConfig, eval_fn) -> None:
    """Settings only ``comkd run`` can honour, and the method's teacher count, refused before
    anything is loaded."""
    check_teacher_count(cfg.distill)
    if cfg.distill.select == "promptkd" and eval_fn is None:
        raise ConfigError(
            "distill.select: 'promptkd' picks the epoch with the best test accuracy, which needs an "
            "evaluation set; only `comkd run` has one. Use distill.select=last here"
        )
    if cfg.distill.teacher_cache == "auto":
        raise ConfigError(
            "distill.teacher_cache: 'auto' (one cache per seed, shared by every method) is a setting "
            "of `comkd run`; here give a cache file made by `comkd cache-teacher`"
        )


def teacher_sides(cfg: RunConfig, device: torch.device) -> tuple[Student, Any, list[TeacherSide]]:
    """What stage 2 reads: the student (the first teacher's W stored, every teacher recorded), the
    unlabelled pool, and one ``TeacherSide`` per teacher of the method: ``teacher`` (online, or
    from ``distill.teacher_cache`` without loading it), then ``distill.extra_teachers`` (online)."""
    d = cfg.distill
    if d.teacher_cache:  # the teacher is never loaded: u_t, W and s_t come from the cache
        info = read_cache_info(d.teacher_cache)
        want = Path(cfg.teacher.model).stem if cfg.teacher.model.endswith(".json") else cfg.teacher.model
        if info.header["teacher"]["model"] != want:
            raise ValueError(
                f"teacher cache {d.teacher_cache} is for teacher {info.header['teacher']['model']!r}, "
                f"the config says {want!r}"
            )
        student = build_student(cfg, int(info.header["dim"]), device)
        ds = make_dataset(cfg, d.split, student.preprocess, train=True, unlabelled=True, augment=d.augment)
        outputs = CachedTeacherOutputs.open(
            d.teacher_cache,
            dataset=ds,
            device=device,
            student_spec=student.preprocess,
            sources=teacher_sources(cfg.teacher.pretrained, cfg.teacher.prompts),
        )
        if outputs.classnames != ds.full_classnames:
            raise ValueError(f"teacher cache {d.teacher_cache}: its W is for other class names")
        identity = {**teacher_identity(info.header["teacher"]), "source": teacher_source(cfg)}
        sides = [TeacherSide(outputs, outputs.text_features, outputs.logit_scale, identity)]
    else:
        teacher = build_teacher(cfg, device)
        student = build_student(cfg, teacher.embed_dim, device)
        ds = make_dataset(cfg, d.split, student.preprocess, train=True, unlabelled=True, augment=d.augment)
        sides = [_online_side(cfg, teacher, student, ds)]
        wanted = get_method(d.method).teachers
        if len(d.extra_teachers) >= wanted:
            log.warning(
                "distill.extra_teachers: method %s distils from %d teacher(s); %d extra teacher(s) not used",
                d.method,
                wanted,
                len(d.extra_teachers) - wanted + 1,
            )
        for i, tc in enumerate(d.extra_teachers[: wanted - 1]):
            c = dataclasses.replace(cfg, teacher=tc)
            sides.append(
                _online_side(c, build_teacher(c, device), student, ds, f"distill.extra_teachers[{i}]")
            )
    student.set_text_features(sides[0].w, ds.full_classnames)
    # comkd classes rebuilds the teacher from its "source"; several teachers: all recorded
    student.teacher_identity = sides[0].identity
    student.teacher_identities = [s.identity for s in sides] if len(sides) > 1 else None
    return student, ds, sides


def _online_side(cfg: RunConfig, teacher, student: Student, ds, key: str = "teacher") -> TeacherSide:
    """A loaded teacher as stage 2 reads it: u_t online, W of the dataset's classes, s_t."""
    w = teacher.class_text_features(ds.full_classnames)
    identity = {**teacher_identity(teacher), "source": teacher_source(cfg)}
    log.info("distill: %s %s, W %s", key, cfg.teacher.model, tuple(w.shape))
    return TeacherSide(TeacherOutputs(teacher, student.preprocess), w, float(teacher.logit_scale), identity)


def _start_student(student, ds, outputs, cfg: RunConfig, device, step0_fn) -> dict | None:
    """A fresh run's ``step0`` (``run_distill``) and ridge warm start (a resumed run restores it)."""
    step0 = step0_fn(student) if step0_fn is not None else None
    if cfg.distill.projector_init == "ridge":
        n_fit = warm_start_projector(student, ds, outputs, cfg, device)
        log.info("distill %s: projector fitted by ridge regression on %d images", cfg.distill.method, n_fit)
        if step0_fn is not None:
            step0 = {**step0_fn(student), "random_init": step0}
    return step0


class _BestEpoch:
    """``distill.select: promptkd``: score the student after every epoch with ``eval_fn`` and keep
    the weights of the best epoch."""

    def __init__(self, student, eval_fn):
        self.student, self.eval_fn = student, eval_fn
        self.score, self.epoch, self.state = -1.0, None, None

    def on_epoch_end(self, epoch: int) -> dict:
        self.student.eval()
        res = self.eval_fn(self.student)
        if res["score"] > self.score:
            self.score, self.epoch = res["score"], epoch
            self.state = {k: v.detach().cpu().clone() for k, v in self.student.state_dict().items()}
        return {k: v for k, v in res.items() if isinstance(v, (int, float))}
