"""The loop's opt-in speed switches (``comkd.engine.speed``) on a CPU: frozen towers held in the
autocast dtype during a stage and given back exactly, ``torch.compile`` of the student and the
teacher's image tower giving the eager losses, and the switches free to change on ``--resume``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from benchmarks.fit_rate import RandomImages
from comkd.config import OptimConfig
from comkd.engine.loop import fit
from comkd.engine.tasks import DistillTask, TeacherOutputs
from comkd.losses import ComKDLoss
from comkd.models import create_student, create_teacher
from comkd.models.backbones import TINY_STUDENT, TINY_TEACHER

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ["a", "b", "c", "d"]


def _task() -> tuple[DistillTask, nn.Module]:
    torch.manual_seed(0)
    teacher = create_teacher(TINY_TEACHER, image_size=16)
    student = create_student(TINY_STUDENT, teacher_dim=teacher.embed_dim, image_size=16)
    w = teacher.class_text_features(NAMES)
    student.set_text_features(w, NAMES)
    loss = ComKDLoss(kd_weight=1.0, align_weight=1.0, feature_weight=0.0)
    task = DistillTask(
        student, TeacherOutputs(teacher, student.preprocess), w, float(teacher.logit_scale), loss
    )
    return task, teacher


def _losses(tmp_path, name: str, **switches) -> tuple[list[float], DistillTask, nn.Module, list]:
    task, teacher = _task()
    seen: list[torch.dtype] = []  # the teacher tower's dtype at each step
    step = task.step

    def watched(batch, epoch):
        seen.append(next(teacher.visual.parameters()).dtype)
        return step(batch, epoch)

    task.step = watched
    from comkd.engine.utils import MetricsLog, read_metrics

    out = tmp_path / name
    optim = OptimConfig(epochs=1, batch_size=8, lr=0.01, warmup_epochs=0, **switches)
    fit(
        task,
        RandomImages(32, 16),
        optim,
        out_dir=out,
        seed=1,
        device=torch.device("cpu"),
        progress=False,
        log_every=1,
        metrics=MetricsLog(out / "m.jsonl"),
    )
    return [r["loss"] for r in read_metrics(out / "m.jsonl") if "lr" in r], task, teacher, seen


def test_frozen_towers_are_held_in_the_autocast_dtype_and_given_back_exactly(tmp_path):
    task, teacher = _task()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    held, task, teacher, seen = _losses(tmp_path, "held", amp="on", hold_frozen_dtype=True)
    assert seen == [torch.bfloat16] * 4  # CPU autocast is bf16: the tower ran in it at every step
    after = teacher.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
    plain, *_ = _losses(tmp_path, "plain", amp="on")
    assert all(torch.isfinite(torch.tensor(held))) and len(held) == len(plain) == 4
    # the same model in the same autocast, its weights rounded to bf16 once instead of per matmul
    assert held == pytest.approx(plain, rel=0.05)
    _, _, _, seen = _losses(tmp_path, "noamp", hold_frozen_dtype=True)  # no autocast: nothing held
    assert seen == [torch.float32] * 4


@pytest.mark.slow
def test_compiled_student_and_teacher_tower_give_the_eager_losses(tmp_path):
    """torch.compile (inductor, CPU) of the student and the teacher's image tower: the losses of
    4 steps equal the eager ones to float rounding, and the modules are compiled in place."""
    eager, *_ = _losses(tmp_path, "eager")
    compiled, task, teacher, _ = _losses(tmp_path, "compiled", compile=True)
    assert compiled == pytest.approx(eager, rel=1e-4, abs=1e-6)
    assert task.student._compiled_call_impl is not None and teacher.visual._compiled_call_impl is not None
    assert set(task.student.state_dict()) == set(_task()[0].student.state_dict())  # keys unchanged


def test_a_cached_teacher_has_no_frozen_tower_to_switch():
    task, teacher = _task()
    assert list(task.frozen_modules()) == ["teacher0"] and task.frozen_modules()["teacher0"] is teacher.visual
    task.teacher_outputs = lambda images, idx, epoch: torch.zeros(len(images), teacher.embed_dim)
    assert task.frozen_modules() == {}
