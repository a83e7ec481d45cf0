"""New class names after distillation (``comkd classes``): the student's W recomputed by the
teacher that produced it, the one its file records (``comkd.teacher``: model, input size, SHA-256
of its weights and prompts); any other teacher is refused, its text features living in another
space than the one the student was distilled into.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

from ..config import RunConfig
from ..data.unlabelled import read_names_file
from ..models.backbones import ModelError
from ..models.identity import check_teacher, teacher_identity

log = logging.getLogger(__name__)


_ARCH_KEYS = ("model", "text_ctx", "text_depth", "ctx_init", "vision_tokens", "vision_depth", "quick_gelu")


def teacher_config(
    cfg: RunConfig, recorded: dict[str, Any] | None, student_path: Path, *, from_record: bool
) -> RunConfig:
    """The config that rebuilds the student's teacher. ``from_record``: the teacher the student
    file records (model, options, weights and prompts; ``cfg.teacher.pretrained`` / ``prompts``
    when set replace the recorded files). Otherwise ``cfg.teacher``, with the recorded weights and
    prompts filling what it leaves unset (a run's top-level config names no stage-1 prompts)."""
    tcfg = copy.deepcopy(cfg)
    source = (recorded or {}).get("source")
    if from_record:
        if source is None:
            raise ModelError(
                f"{student_path} does not record how to rebuild its teacher (a file made before this "
                "record existed); pass the run's --config, or --teacher / --teacher-pretrained / --teacher-prompts"
            )
        arch = source.get("arch") or {}
        for k in _ARCH_KEYS:
            if k in arch:
                setattr(tcfg.teacher, k, arch[k] if k != "quick_gelu" else bool(arch[k]))
        tcfg.data.image_size = arch.get("image_size") or recorded.get("image_size")
    if source is not None and tcfg.teacher.model == (source.get("arch") or {}).get("model"):
        for key, flag in (("pretrained", "--teacher-pretrained"), ("prompts", "--teacher-prompts")):
            given = getattr(tcfg.teacher, key)
            if given is None and source.get(key) is not None:
                path = source[key]
                looks_like_file = Path(path).suffix in (".safetensors", ".pt", ".bin", ".pth")
                if looks_like_file and not Path(path).exists():
                    raise ModelError(
                        f"{student_path}: its teacher's {key} file {path} is no longer there; pass {flag} FILE"
                    )
                setattr(tcfg.teacher, key, path)
    if recorded is not None and tcfg.data.image_size is None:
        tcfg.data.image_size = recorded["image_size"]
    return tcfg


def recompute_classes(
    cfg: RunConfig,
    student_path: str | Path,
    names_file: str | Path,
    out: str | Path | None = None,
    *,
    force: bool = False,
    from_record: bool = False,
) -> dict[str, Any]:
    """Write a copy of the student with W = the teacher's prompted text features of the names in
    ``names_file`` (one a line). The teacher is the one the student file records (``from_record``)
    or ``cfg.teacher`` (see ``teacher_config``), at the recorded input size; its identity is checked."""
    from ..engine.builders import build_teacher, teacher_source
    from ..engine.utils import resolve_device, seed_everything
    from ..models.hub import student_and_out
    from ..models.io import load_student, save_student

    student_path, out = student_and_out(student_path, out, ".safetensors")
    names = read_names_file(str(names_file))
    device = resolve_device(cfg.device)
    student = load_student(student_path, device)
    recorded = student.teacher_identity
    tcfg = teacher_config(cfg, recorded, student_path, from_record=from_record)
    seed_everything(cfg.seed)  # prompts that were never trained are drawn from the seed, as in distill
    try:
        teacher = build_teacher(tcfg, device)
    except ModelError as e:
        if not from_record:
            raise
        raise ModelError(
            f"{student_path}: cannot rebuild the teacher its metadata comkd.teacher.source records: {e}"
        ) from None
    current = teacher_identity(teacher)
    if not force:
        check_teacher(recorded, current, student_path)
    student.set_text_features(teacher.class_text_features(names), names)
    student.teacher_identity = {**current, "source": teacher_source(tcfg)}
    out = out or student_path.with_name(f"{student_path.stem}-{Path(names_file).stem}.safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_student(student, out)  # the same StudentArch, the new W and names
    log.info("wrote %s: %d classes", out, len(names))
    return {"student": str(out), "classes": names, "teacher": current, "checked": not force}
