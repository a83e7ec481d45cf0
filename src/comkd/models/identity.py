"""Which teacher produced a student's class text features W (a student file's ``comkd.teacher``; a
teacher cache's ``teacher_digests`` and ``teacher_sources``). New class names need that same
teacher: its text features live in the space the student was distilled into, so a teacher that
differs in any recorded field is refused.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from dataclasses import asdict, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..digests import file_sha256, tensor_digest
from ..fileio import check_value, short
from .backbones import MAX_IMAGE_SIZE, ModelError, _is_local_file, weights_version
from .prompts import MAX_PROMPT_DEPTH, MAX_PROMPT_TOKENS

if TYPE_CHECKING:
    from .teacher import Teacher

# the frozen weights' digest per teacher object, with the weights' version it was taken at
_WEIGHT_DIGESTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

#: the fields of ``teacher_identity`` a student file records and ``check_teacher`` compares
IDENTITY_KEYS = ("model", "weights_sha256", "prompts_sha256", "image_size")


def teacher_digests(teacher: Teacher) -> dict[str, Any]:
    """The teacher's identity: model name, preprocessing, SHA-256 of its frozen CLIP weights and of
    its prompts, and ``key`` (a SHA-256 of all of them).

    The prompts (small) are hashed on every call. The frozen weights (1.7 GB for ViT-L/14) are
    hashed once and the digest reused until ``weights_version`` changes (edits through ``.data``
    are not seen).
    """
    version = weights_version(teacher.clip)
    if teacher not in _WEIGHT_DIGESTS or _WEIGHT_DIGESTS[teacher][0] != version:
        _WEIGHT_DIGESTS[teacher] = (version, tensor_digest(sorted(teacher.clip.state_dict().items())))
    pre = asdict(teacher.preprocess)
    pre["mean"], pre["std"] = [float(x) for x in pre["mean"]], [float(x) for x in pre["std"]]
    ident = {
        "model": teacher.model_name,
        "preprocess": pre,
        "weights_sha256": _WEIGHT_DIGESTS[teacher][1],
        "prompts_sha256": tensor_digest(sorted(teacher.prompt_state_dict().items())),
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


#: the type of each field of a recorded identity (``teacher_identity``), and of its ``source``
_IDENTITY_TYPES = {"model": "str", "weights_sha256": "str", "prompts_sha256": "str", "image_size": "int"}
_SOURCE_TYPES = {"pretrained": "str | None", "prompts": "str | None", "arch": "dict"}
#: the range of each integer field of a recorded ``TeacherArch``
_ARCH_RANGES = {
    "text_ctx": (0, MAX_PROMPT_TOKENS),
    "vision_tokens": (0, MAX_PROMPT_TOKENS),
    "text_depth": (0, MAX_PROMPT_DEPTH),
    "vision_depth": (0, MAX_PROMPT_DEPTH),
    "image_size": (1, MAX_IMAGE_SIZE),
}


def _check_mapping(value: Any, types: dict[str, str], where: str, *, required: tuple[str, ...]) -> dict:
    if not isinstance(value, dict):
        raise ModelError(f"{where} must be a JSON object, got {type(value).__name__} {short(value, 40)}")
    if extra := sorted(set(value) - set(types)):
        raise ModelError(f"{where} has an unknown field {short(extra[0])}")
    if missing := [k for k in required if k not in value]:
        raise ModelError(f"{where} has no field {missing[0]!r}")
    return value


def check_teacher_record(recorded: Any, where: str) -> dict[str, Any] | None:
    """``recorded`` (a student file's ``comkd.teacher``, parsed) when every field has the type and
    range its writer gives it, else a one-line ``ModelError`` naming ``where`` and the field: the
    identity (``IDENTITY_KEYS``) and, when present, ``source`` (``pretrained`` and ``prompts`` as
    given: a tag, ``none`` or a local file; ``arch``: the fields of ``TeacherArch``, prompt sizes
    within ``MAX_PROMPT_TOKENS``). Nothing is built from the record before it passes."""
    from .teacher import TeacherArch

    if recorded is None:
        return None
    _check_mapping(recorded, {**_IDENTITY_TYPES, "source": "dict"}, where, required=IDENTITY_KEYS)
    for k, kind in _IDENTITY_TYPES.items():
        lo, hi = (1, MAX_IMAGE_SIZE) if k == "image_size" else (None, None)
        check_value(recorded[k], kind, f"{where}.{k}", lo=lo, hi=hi, max_chars=512, error=ModelError)
    source = recorded.get("source")
    if source is None:
        return recorded
    _check_mapping(source, _SOURCE_TYPES, f"{where}.source", required=("arch",))
    for k, said in (
        ("pretrained", "an open_clip tag, 'none' or a local weight file"),
        ("prompts", "a local prompts file"),
    ):
        value = check_value(source.get(k), "str | None", f"{where}.source.{k}", error=ModelError)
        if isinstance(value, str) and value.startswith(("hf-hub:", "local-dir:")):
            raise ModelError(f"{where}.source.{k} must be {said}, got {short(value)}")
    types = {f.name: str(f.type) for f in fields(TeacherArch)}
    arch = _check_mapping(source["arch"], types, f"{where}.source.arch", required=("model",))
    for k, value in arch.items():
        lo, hi = _ARCH_RANGES.get(k, (None, None))
        check_value(
            value, types[k], f"{where}.source.arch.{k}", lo=lo, hi=hi, max_chars=512, error=ModelError
        )
    return recorded


def check_teacher(recorded: dict[str, Any] | None, current: dict[str, Any], student_path: Path) -> None:
    """Refuse a teacher whose identity differs from the one recorded in the student file."""
    if recorded is None:
        raise ModelError(
            f"{student_path} does not record which teacher produced its class text features (an older file); "
            "pass --force to recompute W with the given teacher anyway"
        )
    if diffs := [k for k in IDENTITY_KEYS if recorded.get(k) != current.get(k)]:
        said = ", ".join(
            f"{k} {str(recorded.get(k))[:12]!r} (given: {str(current.get(k))[:12]!r})" for k in diffs
        )
        raise ModelError(
            f"{student_path}: its W came from another teacher: {said}; give the teacher it was distilled from"
        )
