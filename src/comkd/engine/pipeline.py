"""The stage pipeline in one namespace: builders (``engine.builders``), stage runners
(``engine.stages``) and evaluation (``engine.evaluation``). Each lives in its own module; this one
re-exports them for callers that want the whole pipeline (``comkd run``, the protocols, the CLI).
"""

from __future__ import annotations

from ..models.io import save_student
from .builders import (
    LOADER_OPTIONS,
    STUDENT_CLIP,
    STUDENT_FILE,
    TEACHER_CLIP,
    TEACHER_PROMPTS,
    build_student,
    build_teacher,
    eval_loader,
    loader_options,
    make_dataset,
    student_arch,
    teacher_arch,
    teacher_source,
)
from .evaluation import (
    check_student_classes,
    clip_zero_shot,
    evaluate_clip_zero_shot,
    evaluate_student,
    evaluate_subset,
    evaluate_teacher,
    has_val_split,
    pretrain_eval_split,
)
from .stages import (
    check_resume_run,
    run_cache_teacher,
    run_distill,
    run_pretrain,
    run_train_teacher,
    start_stage,
    warm_start_projector,
)
from .tasks import TeacherOutputs
from .utils import is_main, resolve_device, write_json

__all__ = [
    "LOADER_OPTIONS",
    "TeacherOutputs",
    "start_stage",
    "is_main",
    "STUDENT_CLIP",
    "STUDENT_FILE",
    "TEACHER_CLIP",
    "TEACHER_PROMPTS",
    "build_student",
    "build_teacher",
    "check_resume_run",
    "check_student_classes",
    "clip_zero_shot",
    "evaluate_clip_zero_shot",
    "evaluate_student",
    "evaluate_subset",
    "evaluate_teacher",
    "has_val_split",
    "eval_loader",
    "loader_options",
    "make_dataset",
    "pretrain_eval_split",
    "resolve_device",
    "run_cache_teacher",
    "run_distill",
    "run_pretrain",
    "run_train_teacher",
    "save_student",
    "student_arch",
    "teacher_arch",
    "teacher_source",
    "warm_start_projector",
    "write_json",
]
