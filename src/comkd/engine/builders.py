"""Builders from a ``RunConfig``: teacher, student, datasets, loaders, and the run-folder file names."""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
from typing import Any

import torch
from torch.utils.data import DataLoader

from ..config import AugmentConfig, ConfigError, DataConfig, RunConfig
from ..config_rules import teacher_classes
from ..data import DATASETS, DataError, WdsImageDataset, build_dataset, build_transform
from ..data.dataset import ImageDataset
from ..methods import get_method
from ..models import LoadedModel, PreprocessSpec, Student, StudentArch, Teacher, load_clip
from ..models.teacher import TeacherArch
from .utils import RankShare, world_size

log = logging.getLogger(__name__)

TEACHER_CLIP = "teacher_clip.safetensors"
STUDENT_CLIP = "student_clip.safetensors"
TEACHER_PROMPTS = "teacher_prompts.safetensors"
STUDENT_FILE = "student.safetensors"


def _shared_options(arch_type: type, section: Any) -> dict[str, Any]:
    """The options a config section (``StudentConfig``, ``TeacherConfig``) shares by name with an
    architecture dataclass: each is written once, in the config, and read here."""
    names = {f.name for f in dataclasses.fields(arch_type)} & {f.name for f in dataclasses.fields(section)}
    return {k: getattr(section, k) for k in names}


def teacher_arch(cfg: RunConfig) -> TeacherArch:
    """The ``TeacherArch`` of ``cfg``: the options of ``cfg.teacher`` and ``data.image_size``."""
    return TeacherArch(**_shared_options(TeacherArch, cfg.teacher), image_size=cfg.data.image_size)


def build_teacher(cfg: RunConfig, device: torch.device, prompts: str | None = None) -> Teacher:
    """The teacher of ``cfg`` with ``teacher.pretrained`` weights and ``prompts`` (default
    ``teacher.prompts``; ``""``: none) on ``device``."""
    return Teacher.build(
        teacher_arch(cfg),
        cfg.teacher.pretrained,
        prompts=prompts if prompts is not None else cfg.teacher.prompts,
        device=device,
    )


def load_role_clip(cfg: RunConfig, role: str, device: torch.device) -> LoadedModel:
    """The plain open_clip model of the ``teacher`` or ``student`` section (its weights, the data's
    image size), as stage 0 trains it and the zero-shot baselines score it."""
    m = cfg.teacher if role == "teacher" else cfg.student
    return load_clip(
        m.model, m.pretrained, image_size=cfg.data.image_size, quick_gelu=m.quick_gelu or None, device=device
    )


def student_arch(cfg: RunConfig, teacher_dim: int) -> StudentArch:
    """The ``StudentArch`` of ``cfg``: every option ``StudentConfig`` shares with it by name, d of
    the teacher, EduAttention as the method's recipe says, and ``data.image_size``."""
    edu = get_method(cfg.distill.method).edu_attention
    return StudentArch(
        **_shared_options(StudentArch, cfg.student),
        teacher_dim=teacher_dim,
        edu_attention=edu,
        image_size=cfg.data.image_size,
    )


def build_student(cfg: RunConfig, teacher_dim: int, device: torch.device) -> Student:
    """The student of ``cfg`` (``student_arch``) with ``student.pretrained`` weights on ``device``."""
    arch = student_arch(cfg, teacher_dim)
    return Student.build(arch, cfg.student.pretrained, logit_scale=cfg.student.logit_scale, device=device)


#: data-config fields handed to a dataset loader when its signature takes them (no dataset names here)
LOADER_OPTIONS = ("split_file", "classes_file", "subdir", "fractions", "split_seed", "pools", "test_folder")


def loader_options(cfg: RunConfig) -> dict[str, Any]:
    """The keyword arguments of ``load_splits`` for ``cfg.data``: each of ``LOADER_OPTIONS`` the
    dataset's loader takes (read from its signature) and that is set; one it does not take but that
    is set to a non-default value is a one-line ``ConfigError`` naming the key."""
    d = cfg.data
    kw: dict[str, Any] = {"skip_bad": d.skip_bad}
    loader = DATASETS.get(d.dataset)
    if loader is None:  # load_splits names the valid datasets
        return kw
    takes = inspect.signature(loader).parameters
    defaults = DataConfig()
    for name in LOADER_OPTIONS:
        value = getattr(d, name)
        if name in takes:
            if value is not None:
                kw[name] = value
        elif value != getattr(defaults, name):
            raise ConfigError(
                f"data.{name}: dataset {d.dataset!r} does not take this setting (set to {value!r})"
            )
    return kw


def make_dataset(
    cfg: RunConfig,
    split: str,
    spec: PreprocessSpec,
    *,
    train: bool,
    subsample: str | None = "all",
    few_shot: bool = False,
    shots: int | None = None,
    unlabelled: bool = False,
    augment: AugmentConfig | None = None,
) -> ImageDataset | WdsImageDataset:
    """A split of the configured dataset with the backbone's transforms; train splits draw
    reproducible views from the run seed. ``few_shot``: keep ``data.num_shots`` items per class
    (stage 1); ``shots``: keep that many instead (stage 0's ``pretrain.*_shots``). ``subsample``
    None: the teacher's classes (``train_teacher.subsample`` unset: the protocol's)."""
    if subsample is None:
        subsample = teacher_classes(cfg)
    args = (spec.image_size, spec.mean, spec.std, spec.interpolation)
    aug = augment or AugmentConfig()
    train_tf = build_transform(*args, train=True, scale=(aug.crop_scale_min, 1.0), hflip=aug.hflip)
    test_tf = build_transform(*args, train=False)
    if shots is None and few_shot:
        shots = cfg.data.num_shots
    ds = build_dataset(
        cfg.data.dataset,
        cfg.data.root,
        split,
        test_tf if not train else None,
        num_shots=shots,
        subsample=subsample,
        seed=cfg.seed,
        unlabelled=unlabelled,
        train_transform=train_tf if train else None,
        view_seed=cfg.seed if train else None,
        shuffle_buffer=cfg.data.shuffle_buffer,
        digits_size=cfg.data.image_size or 32,  # the embedded digits' rendering size
        **loader_options(cfg),
    )
    if ds.skipped:
        log.warning("%s/%s: %d bad images skipped (skip_bad=true)", cfg.data.dataset, split, len(ds.skipped))
    # one class trains with a zero loss and fails at evaluation: refuse it up front
    where = f"dataset {cfg.data.dataset!r}" + (f" ({cfg.data.root})" if cfg.data.root else "")
    if len(ds.full_classnames) < 2:
        raise DataError(
            f"{where} has {len(ds.full_classnames)} class {ds.full_classnames}; "
            "training and evaluation need at least 2"
        )
    if few_shot and len(ds.classnames) < 2:
        raise DataError(
            f"the {subsample!r} classes of {where} are only {ds.classnames}; prompt learning needs at least 2"
        )
    return ds


def eval_loader(cfg: RunConfig, ds, device: torch.device) -> DataLoader:
    """The evaluation loader of ``ds``: in order, ``data.eval_batch_size`` and ``data.num_workers``.
    Under torchrun it loads this rank's ``RankShare`` of a map-style ``ds`` (``tasks.predict``
    gathers the ranks' predictions; a loop of its own sees only this rank's items)."""
    return DataLoader(
        RankShare(ds) if world_size() > 1 and not ds.streaming else ds,
        batch_size=cfg.data.eval_batch_size,
        shuffle=False,
        num_workers=cfg.data.num_workers,
        pin_memory=device.type == "cuda",
    )


def teacher_source(cfg: RunConfig) -> dict[str, Any]:
    """How to rebuild the teacher of ``cfg`` (recorded in a student file beside its identity, so
    ``comkd classes`` needs nothing else): weights and prompts as given (local files made absolute)
    and every option of its ``TeacherArch``."""

    def where(v: str | None) -> str | None:
        return os.path.abspath(v) if v and v != "none" and os.path.exists(v) else v

    return {
        "pretrained": where(cfg.teacher.pretrained),
        "prompts": where(cfg.teacher.prompts),
        "arch": dataclasses.asdict(teacher_arch(cfg)),
    }
