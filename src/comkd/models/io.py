"""Student files: save and load a deployable student (one safetensors file).

A student file holds every weight (the image tower included), the stored W, and metadata:

* ``comkd.student_config``: ``dataclasses.asdict(student.arch)`` (older files record a distillation
  ``method`` name instead of ``edu_attention``: ``LEGACY_METHOD_EDU_ATTENTION``).
* ``comkd.classnames``, ``comkd.preprocess``; ``comkd.teacher``, the teacher that produced W, when
  known (``comkd classes`` checks it); ``comkd.teachers``, every such record (W's first), only for
  a student of several teachers.
* ``comkd.sha256``: a digest over the tensors and the metadata above, checked at load.

Loading needs neither the teacher, a text encoder, the training engine nor the config system. The
metadata is data from the user: each string is bounded in size and nesting before it is parsed
and each field checked for type and range before anything is built from it; a bad one is a
one-line ``ModelError`` naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from ..digests import tensor_digest
from ..fileio import atomic_path, check_value, parse_json, short
from .backbones import MAX_IMAGE_SIZE, RANDOM_WEIGHTS, ModelError, spec_from_metadata, spec_json
from .identity import check_teacher_record
from .prompts import MAX_PROMPT_DEPTH, MAX_PROMPT_TOKENS
from .student import Student, StudentArch

log = logging.getLogger(__name__)

STUDENT_CONFIG_KEY = "comkd.student_config"
STUDENT_DIGEST_KEY = "comkd.sha256"
_STUDENT_META = (STUDENT_CONFIG_KEY, "comkd.classnames", "comkd.preprocess")
#: the longest metadata string read: class names (a million classes of ~30 characters), the rest
MAX_CLASSNAMES_CHARS = 32 * 2**20
MAX_RECORD_CHARS = 64 * 2**10  # each teacher record, and the list of them
MAX_TEACHERS = 16  # teacher records a student file may list (comkd.teachers)
#: the range of each integer field of a recorded ``StudentArch`` (``teacher_dim`` must also equal
#: the width of the stored W); checked before anything is built
_ARCH_RANGES = {
    "teacher_dim": (1, 1 << 16),
    "vision_tokens": (0, MAX_PROMPT_TOKENS),
    "vision_depth": (0, MAX_PROMPT_DEPTH),
    "edu_heads": (1, 1024),
    "edu_attn_dim": (1, 1 << 16),
    "image_size": (1, MAX_IMAGE_SIZE),
}

#: the only method names an older file can hold, and whether they mean EduAttention (frozen)
LEGACY_METHOD_EDU_ATTENTION = {
    "comkd": True,
    "no-ifalign": True,
    "promptkd": False,
    "no-eduattention": False,
    "feature-l1": False,
    "feature-mse": False,
}


def student_digest(sd: dict[str, torch.Tensor], meta: dict[str, str]) -> str:
    """SHA-256 over every tensor (name, dtype, shape, bytes) and the metadata that rebuilds the
    student, so a flipped bit or an edited field is caught at load."""
    h = hashlib.sha256(tensor_digest(sorted(sd.items())).encode())
    for k in _STUDENT_META:
        h.update(f"\n{k}={meta.get(k)}".encode())
    return h.hexdigest()


def non_finite(sd: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor of ``sd`` holding NaN or inf, else None."""
    return next((k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)


def check_classnames(names: Any, where: str, *, allow_empty: bool = False) -> list[str]:
    """``names`` as a list of distinct non-empty strings (an empty list only with ``allow_empty``:
    a student file without classes yet), else a ``ModelError`` naming ``where``."""
    if not isinstance(names, list) or not (names or allow_empty):
        raise ModelError(f"{where} must be a non-empty JSON list of class names, got {type(names).__name__}")
    if bad := [n for n in names if not isinstance(n, str) or not n.strip()]:
        raise ModelError(f"{where} holds {short(bad[0])}, not a class name (a string)")
    seen: set[str] = set()
    if dup := sorted({n for n in names if n in seen or seen.add(n)}):
        raise ModelError(f"{where} lists {short(dup[:5], 200)} more than once")
    return names


def arch_from_metadata(c: dict[str, Any]) -> StudentArch:
    """The ``StudentArch`` recorded in a file's ``comkd.student_config`` (either format), each
    field checked against its type and range (a ``ValueError`` naming it) before anything is built."""
    if not isinstance(c, dict):
        raise ValueError(f"{STUDENT_CONFIG_KEY} must be a JSON object, got {type(c).__name__}")
    c = dict(c)
    if "edu_attention" not in c:  # the older format: a method name says whether EduAttention is there
        if "method" not in c:
            raise ValueError(f"{STUDENT_CONFIG_KEY} has neither 'edu_attention' nor 'method'")
        method = str(check_value(c.pop("method"), "str", f"{STUDENT_CONFIG_KEY}.method", max_chars=100))
        method = method.replace("_", "-").lower()
        if method not in LEGACY_METHOD_EDU_ATTENTION:
            raise ValueError(f"method {method!r} is not one a student file was ever written with")
        c["edu_attention"] = LEGACY_METHOD_EDU_ATTENTION[method]
    fields = dataclasses.fields(StudentArch)
    types = {f.name: str(f.type) for f in fields}
    if extra := sorted(set(c) - set(types)):
        raise ValueError(f"unknown field {short(extra[0])} in {STUDENT_CONFIG_KEY}")
    if missing := [f.name for f in fields if f.name not in c and f.default is dataclasses.MISSING]:
        raise ValueError(f"{STUDENT_CONFIG_KEY} has no field {missing[0]!r}")
    for k, value in c.items():
        lo, hi = _ARCH_RANGES.get(k, (None, None))
        check_value(value, types[k], f"{STUDENT_CONFIG_KEY}.{k}", lo=lo, hi=hi, max_chars=512)
    return StudentArch(**c)


def save_student(student: Student, path: str | Path) -> None:
    """The deployable student: all weights (tower included), the stored W and class names, and
    its ``StudentArch`` to rebuild it, in one safetensors file (written atomically)."""
    from safetensors.torch import save_file

    meta = {
        STUDENT_CONFIG_KEY: json.dumps(dataclasses.asdict(student.arch)),
        "comkd.classnames": json.dumps(student.classnames),
        "comkd.preprocess": json.dumps(spec_json(student.preprocess)),
    }
    if getattr(student, "teacher_identity", None):  # which teacher produced W (comkd classes checks it)
        meta["comkd.teacher"] = json.dumps(student.teacher_identity)
    if getattr(student, "teacher_identities", None):  # several teachers: each, W's first
        meta["comkd.teachers"] = json.dumps(student.teacher_identities)
    sd = {k: v.detach().contiguous().cpu().clone() for k, v in student.state_dict().items()}
    if bad := non_finite(sd):  # a diverged run's weights are not a student: refuse to write them as one
        raise ModelError(f"not writing {path}: tensor {bad!r} holds NaN/inf")
    meta[STUDENT_DIGEST_KEY] = student_digest(sd, meta)
    with atomic_path(path) as tmp:
        save_file(sd, str(tmp), metadata=meta)


def load_student(path: str | Path, device: str | torch.device = "cpu") -> Student:
    """Rebuild a student saved by ``save_student`` (no teacher, no text encoder needed). ``path``: a
    student file, or ``hf-hub:ORG/NAME[@REVISION]`` (its ``student.safetensors``, through
    huggingface_hub's cache; ``comkd.models.hub``)."""
    from .backbones import read_safetensors
    from .hub import student_path

    path = student_path(path)
    if not path.is_file():
        raise ModelError(f"student file not found: {path}")
    if path.suffix.lower() == ".onnx":
        raise ModelError(
            f"{path} is an ONNX export, which load_student (PyTorch) does not read: run it with "
            f"`comkd predict {path} IMAGES --runtime onnx`, or in Python with "
            "comkd.deploy.onnx_runtime.OnnxStudent(path).predict(images)"
        )
    sd, meta = read_safetensors(path, f"{path} is not a readable safetensors student file")
    if STUDENT_CONFIG_KEY not in meta:
        raise ModelError(f"{path} is not a comkd student file (no {STUDENT_CONFIG_KEY} metadata)")
    if STUDENT_DIGEST_KEY not in meta:
        log.warning("%s has no %s digest (written by an older comkd): not verified", path, STUDENT_DIGEST_KEY)
    elif meta[STUDENT_DIGEST_KEY] != student_digest(sd, meta):
        raise ModelError(
            f"{path} is corrupt or was edited: its tensors or metadata do not match the sha256 stored in it "
            f"({STUDENT_DIGEST_KEY}); re-copy or re-create the file"
        )
    if bad := non_finite(sd):
        raise ModelError(f"{path}: tensor {bad!r} holds NaN/inf; this file is not a usable student")
    where = f"{path}: metadata"

    def parsed(key: str, max_chars: int = MAX_RECORD_CHARS) -> Any:
        return parse_json(meta.get(key, "[]"), f"{where} {key}", max_chars=max_chars, error=ModelError)

    classnames = parsed("comkd.classnames", MAX_CLASSNAMES_CHARS)
    check_classnames(classnames, f"{where} comkd.classnames", allow_empty=True)
    if "comkd.preprocess" in meta:  # not used to rebuild (the arch says it) but checked as recorded
        parsed("comkd.preprocess")
        spec_from_metadata(meta, str(path))
    teacher = None
    if "comkd.teacher" in meta:  # checked before anything is built from it (comkd classes)
        teacher = check_teacher_record(parsed("comkd.teacher"), f"{where} comkd.teacher")
    teachers = None
    if "comkd.teachers" in meta:  # a student of several teachers: each record checked alike
        teachers = parsed("comkd.teachers")
        if not isinstance(teachers, list) or not 2 <= len(teachers) <= MAX_TEACHERS:
            raise ModelError(f"{where} comkd.teachers must be a list of 2..{MAX_TEACHERS} teacher records")
        teachers = [check_teacher_record(t, f"{where} comkd.teachers[{i}]") for i, t in enumerate(teachers)]
    config = parsed(STUDENT_CONFIG_KEY)
    try:
        arch = arch_from_metadata(config)
        if "text_features" not in sd:
            raise ModelError("no text_features tensor (the stored W)")
        w = sd["text_features"]
        if w.ndim != 2 or w.shape[1] != arch.teacher_dim:
            raise ModelError(
                f"its W (text_features) has shape {list(w.shape)}, not [classes, {arch.teacher_dim}] "
                f"({STUDENT_CONFIG_KEY}.teacher_dim)"
            )
        # s and every weight come from the file: the random init is overwritten
        student = Student.build(arch, RANDOM_WEIGHTS, logit_scale=1.0, device=device)
        student.set_text_features(w, classnames)
        student.load_state_dict(sd, strict=True)
        student.teacher_identity = teacher
        student.teacher_identities = teachers
    except (KeyError, TypeError, ValueError, RuntimeError) as e:  # edited metadata, missing/extra tensors
        what = f"missing field {e}" if isinstance(e, KeyError) else str(e).strip().splitlines()[0][:200]
        raise ModelError(f"{path}: does not rebuild a student: {what}") from None
    return student.eval()
