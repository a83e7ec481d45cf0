"""Speed of the deployed student on this CPU: eager PyTorch, TorchScript and ONNX Runtime, against
the eager teacher image tower (what would be deployed without distillation).

``bench_deployed`` exports the student with ``comkd.deploy.export`` (the same files ``comkd
export`` writes), then times batch-1 latency and batch-``batch`` throughput of each runtime,
interleaved repetition by repetition (medians; three warm-up calls each at batch 1, and two more for TorchScript at the large batch). ONNX Runtime gets as many
intra-op threads as torch has. Everything runs on the CPU, whatever device the rest of the bench
uses, so the runtimes compare like with like.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from comkd.deploy.export import export_metadata, export_onnx, export_torchscript
from comkd.deploy.onnx_runtime import OnnxStudent
from comkd.models import RANDOM_WEIGHTS, Student, Teacher, create_student, create_teacher

RUNTIMES = ("eager", "torchscript", "onnxruntime")


def _time(fns: dict[str, Any], x: torch.Tensor, reps: int, warmup: dict[str, int]) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.no_grad():
        for k, fn in fns.items():
            for _ in range(warmup.get(k, 0)):
                fn(x)
        for _ in range(reps):
            for k, fn in fns.items():
                t0 = time.perf_counter()
                fn(x)
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def build_student(
    student_name: str, image_size: int, classes: int, teacher_dim: int, device: str | torch.device = "cpu"
) -> tuple[Student, torch.Tensor]:
    """The benchmarked student in eval mode, random weights on purpose, and W: ``classes`` random
    unit rows of ``teacher_dim`` stored in it (the random state is the caller's)."""
    student = create_student(
        student_name, RANDOM_WEIGHTS, teacher_dim=teacher_dim, image_size=image_size, device=device
    )
    w = F.normalize(torch.randn(classes, teacher_dim, device=device), dim=-1)
    student.set_text_features(w, [f"class {i}" for i in range(classes)])
    return student.eval(), w


def build_pair(
    teacher_name: str,
    student_name: str,
    image_size: int,
    classes: int,
    device: str | torch.device = "cpu",
) -> tuple[Teacher, Student, torch.Tensor]:
    """The benchmarked teacher and student in eval mode, with random weights on purpose
    (``pretrained='none'``: speed and FLOPs do not depend on the weights, and no download is
    needed), and W: ``classes`` random unit rows stored in the student."""
    torch.manual_seed(0)
    teacher = create_teacher(teacher_name, RANDOM_WEIGHTS, image_size=image_size, device=device).eval()
    student, w = build_student(student_name, image_size, classes, teacher.embed_dim, device)
    return teacher, student, w


def bench_deployed(
    teacher_name: str, student_name: str, image_size: int, batch: int, reps: int, classes: int, work: Path
) -> dict[str, Any]:
    """Latency (batch 1, ms) and throughput (batch ``batch``, images/s) of the student in each
    runtime and of the teacher in eager PyTorch, the student/teacher speedup of each runtime, and
    each runtime's speedup over eager (random weights; ``classes`` stored class features)."""
    teacher, student, w = build_pair(teacher_name, student_name, image_size, classes)
    work.mkdir(parents=True, exist_ok=True)
    meta = export_metadata(student)
    onnx_path = export_onnx(student, work / "student.onnx", meta)
    _, traced = export_torchscript(student, work / "student.pt", meta)
    ort = OnnxStudent(onnx_path, threads=torch.get_num_threads())
    fns = {
        "eager": lambda x: student(x).logits,
        "torchscript": traced,
        "onnxruntime": ort.predict_logits,
        "teacher_eager": lambda x: teacher.encode_image(x) @ w.t(),
    }
    s = image_size
    g = torch.Generator().manual_seed(1)
    x1, xb = torch.randn(1, 3, s, s, generator=g), torch.randn(batch, 3, s, s, generator=g)
    # TorchScript's profiling executor optimises its graph for an input shape over the first calls
    t1 = _time(fns, x1, reps, warmup=dict.fromkeys(fns, 3))
    tb = _time(fns, xb, reps, warmup={"torchscript": 2})  # the others are warm after batch 1
    with torch.no_grad():
        ref = student(xb).logits
        diffs = {k: float((fns[k](xb) - ref).abs().max()) for k in ("torchscript", "onnxruntime")}
    return {
        "teacher": teacher_name,
        "student": student_name,
        "image_size": image_size,
        "batch": batch,
        "reps": reps,
        "threads": torch.get_num_threads(),
        "classes": classes,
        "weights": RANDOM_WEIGHTS,
        "latency_ms_b1": {k: 1000.0 * v for k, v in t1.items()},
        f"throughput_ips_b{batch}": {k: batch / v for k, v in tb.items()},
        "student_teacher_speedup_b1": {k: t1["teacher_eager"] / t1[k] for k in RUNTIMES},
        f"student_teacher_speedup_b{batch}": {k: tb["teacher_eager"] / tb[k] for k in RUNTIMES},
        "vs_eager_speedup_b1": {k: t1["eager"] / t1[k] for k in RUNTIMES[1:]},
        f"vs_eager_speedup_b{batch}": {k: tb["eager"] / tb[k] for k in RUNTIMES[1:]},
        "max_abs_logit_diff_vs_eager": diffs,
    }
