"""Which teacher produced a student's class text features W, and new class names from it.

A student file records its teacher (``comkd.teacher``: model name, input size, SHA-256 of its
frozen weights and of its prompts). New class names need that same teacher: its text features
live in the space the student was distilled into, and a teacher that differs in any recorded
field is refused. A teacher cache (``engine.cache_format``) records the same digests
(``teacher_digests``, ``teacher_key``) and the files the teacher was built from
(``teacher_sources``).
"""

from __future__ import annotations

import hashlib
import json
import weakref
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..digests import file_sha256, tensor_digest
from .backbones import ModelError, _is_local_file, weights_version

if TYPE_CHECKING:
    from .student import Student
    from .teacher import Teacher

# the frozen weights' digest per teacher object, with the weights' version it was taken at
_WEIGHT_DIGESTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

#: the fields of ``teacher_identity`` a student file records and ``check_teacher`` compares
IDENTITY_KEYS = ("model", "weights_sha256", "prompts_sha256", "image_size")


def teacher_digests(teacher: Teacher) -> dict[str, Any]:
    """The teacher's identity: model name, preprocessing, SHA-256 of its frozen CLIP weights and of
    its prompts, and ``key`` (a SHA-256 of all of them).

    The prompts (small) are hashed on every call. The frozen weights (1.7 GB for ViT-L/14) are
    hashed once and the digest reused until a weight is replaced or changed in place through
    autograd-visible ops (``load_state_dict``, ``copy_``, optimiser steps). Edits through ``.data``
    bypass PyTorch's version counter and are not seen.
    """
    version = weights_version(teacher.clip)
    hit = _WEIGHT_DIGESTS.get(teacher)
    if hit is not None and hit[0] == version:
        weights = hit[1]
    else:
        weights = tensor_digest(sorted(teacher.clip.state_dict().items()))
        _WEIGHT_DIGESTS[teacher] = (version, weights)
    prompts = tensor_digest(sorted(teacher.prompt_state_dict().items()))
    pre = asdict(teacher.preprocess)
    pre["mean"], pre["std"] = [float(x) for x in pre["mean"]], [float(x) for x in pre["std"]]
    ident = {
        "model": teacher.model_name,
        "preprocess": pre,
        "weights_sha256": weights,
        "prompts_sha256": prompts,
    }
    ident["key"] = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
    return ident


def teacher_key(teacher: Teacher) -> str:
    """SHA-256 identifying the teacher: model name, preprocessing, frozen weights and prompts."""
    return teacher_digests(teacher)["key"]


def teacher_sources(pretrained: str | None, prompts: str | None) -> dict[str, str | None]:
    """What the teacher was built from, as the config names it: ``teacher.pretrained`` and
    ``teacher.prompts``, each the SHA-256 of the file for a local file, else the value itself
    (an open_clip tag, ``none``, None). A run with a cache never loads the teacher, so these are
    what it can compare."""

    def ident(value: str | None, is_file: bool) -> str | None:
        if not value or not is_file:
            return value or None
        if not Path(value).is_file():
            raise FileNotFoundError(f"teacher file not found: {value}")
        return "sha256:" + file_sha256(value)

    return {
        "teacher.pretrained": ident(pretrained, _is_local_file(pretrained)),
        "teacher.prompts": ident(prompts, True),
    }


def teacher_identity(teacher: Teacher | dict) -> dict[str, Any]:
    """The teacher that produces W, as recorded in a student file: model name, input size and the
    SHA-256 of its frozen weights and of its prompts (from the teacher, or a cache header's copy of
    ``teacher_digests``)."""
    if not isinstance(teacher, dict):
        teacher = teacher_digests(teacher)
    out = {k: teacher[k] for k in ("model", "weights_sha256", "prompts_sha256")}
    out["image_size"] = int(teacher["preprocess"]["image_size"])
    return out


def check_teacher(recorded: dict[str, Any] | None, current: dict[str, Any], student_path: Path) -> None:
    """Refuse a teacher whose identity differs from the one recorded in the student file."""
    if recorded is None:
        raise ModelError(
            f"{student_path} does not record which teacher produced its class text features (an older file); "
            "pass --force to recompute W with the given teacher anyway"
        )
    diffs = [k for k in IDENTITY_KEYS if recorded.get(k) != current.get(k)]
    if diffs:
        said = ", ".join(
            f"{k} {str(recorded.get(k))[:12]!r} (given: {str(current.get(k))[:12]!r})" for k in diffs
        )
        raise ModelError(
            f"{student_path}: its W came from another teacher: {said}; give the teacher it was distilled from"
        )


def set_classes(student: Student, names: list[str], teacher: Teacher, *, force: bool = False) -> None:
    """Set ``student``'s W to ``teacher``'s prompted text features of ``names``; a teacher other
    than the one the student records is refused (``ModelError`` naming the digest) unless ``force``."""
    current = teacher_identity(teacher)
    if not force:
        check_teacher(student.teacher_identity, current, Path("the student"))
    student.set_text_features(teacher.class_text_features(list(names)), list(names))
    student.teacher_identity = {**(student.teacher_identity or {}), **current}
