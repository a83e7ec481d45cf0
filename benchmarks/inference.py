"""Inference-side measurements: teacher vs student images/s and FLOPs per image for the tiny
pair (32 px) and the paper pair (ViT-L/14 vs ViT-B/16 at ``paper_image_size``), random weights,
no grad; and the deployed student in eager / TorchScript / ONNX Runtime (``benchmarks.deployed``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from comkd.models import TINY_STUDENT, TINY_TEACHER, Student, Teacher
from comkd.models.identity import teacher_key

from .fixtures import tiny_student
from .sizes import PAPER_STUDENT, PAPER_TEACHER, BenchSizes
from .timing import count_flops, median, sync


def _inference_pair(
    teacher: Teacher,
    student: Student,
    image_size: int,
    batch: int,
    reps_t: int,
    reps_s: int,
    device: torch.device,
) -> dict[str, float]:
    """Teacher image tower vs student forward on random (batch, 3, H, W) images: speedup (ratio
    of median seconds), FLOPs ratio, images/s and GFLOPs per image of each."""
    teacher.eval()
    student.eval()
    x = torch.randn(batch, 3, image_size, image_size, device=device)
    xt = torch.randn(batch, 3, teacher.preprocess.image_size, teacher.preprocess.image_size, device=device)
    with torch.no_grad():
        # counting is also the warm-up, though attention runs its math path there, not the fused
        # kernels timed below
        f_t = count_flops(lambda: teacher.encode_image(xt)) / batch
        f_s = count_flops(lambda: student(x)) / batch

        def timed(fn, reps):
            out = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                sync(device)
                out.append(time.perf_counter() - t0)
            return median(out)

        times = {"teacher": [], "student": []}
        for r in range(max(reps_t, reps_s)):  # interleaved; the teacher (slow) may get fewer runs
            if r < reps_t:
                times["teacher"].append(timed(lambda: teacher.encode_image(xt), 1))
            if r < reps_s:
                times["student"].append(timed(lambda: student(x), 1))
    t_t, t_s = median(times["teacher"]), median(times["student"])
    return {
        "speedup": t_t / t_s,  # medians (the slow teacher may have fewer repetitions than the student)
        "flops_ratio": f_t / f_s,
        "teacher_ips": batch / t_t,
        "student_ips": batch / t_s,
        "teacher_gflops": f_t / 1e9,
        "student_gflops": f_s / 1e9,
    }


def bench_inference_tiny(
    teacher: Teacher, w: torch.Tensor, sz: BenchSizes, device: torch.device
) -> dict[str, float]:
    """The tiny teacher vs a ComKD tiny student (``w`` (C, D) stored class features), 32 px."""
    student = tiny_student(teacher.embed_dim, "comkd", device)
    student.set_text_features(w)
    r = _inference_pair(
        teacher, student, 32, sz.tiny_infer_batch, sz.tiny_infer_reps, sz.tiny_infer_reps, device
    )
    return {
        "inference_speedup_tiny_pair": r["speedup"],
        "flops_ratio_tiny_pair": r["flops_ratio"],
        "tiny_teacher_images_per_s": r["teacher_ips"],
        "tiny_student_images_per_s": r["student_ips"],
        "tiny_teacher_gflops_per_image": r["teacher_gflops"],
        "tiny_student_gflops_per_image": r["student_gflops"],
    }


def bench_inference_paper(sz: BenchSizes, device: torch.device) -> dict[str, float]:
    """ViT-L/14 teacher (prompted image tower) vs ViT-B/16 student (prompted tower, projector,
    EduAttention over ``paper_classes`` stored class features), random weights, no grad.
    Also times the teacher key (SHA-256 of all ViT-L/14 weights)."""
    size = sz.paper_image_size
    teacher, student, _ = paper_pair(sz, device)
    t0 = time.perf_counter()
    teacher_key(teacher)
    key_s = time.perf_counter() - t0
    gb = sum(t.numel() * t.element_size() for t in teacher.clip.state_dict().values()) / 1e9
    r = _inference_pair(
        teacher, student, size, sz.paper_batch, sz.paper_reps_teacher, sz.paper_reps_student, device
    )
    del teacher, student
    return {
        "inference_speedup_paper_pair": r["speedup"],
        "flops_ratio_paper_pair": r["flops_ratio"],
        "paper_teacher_images_per_s": r["teacher_ips"],
        "paper_student_images_per_s": r["student_ips"],
        "paper_teacher_gflops_per_image": r["teacher_gflops"],
        "paper_student_gflops_per_image": r["student_gflops"],
        "paper_pair_image_size": size,
        "teacher_key_s_vit_l14": key_s,
        "teacher_weights_gb_vit_l14": gb,
    }


def paper_pair(sz: BenchSizes, device: torch.device | str = "cpu") -> tuple[Teacher, Student, torch.Tensor]:
    """The ViT-L/14 teacher and ViT-B/16 student at ``sz.paper_image_size`` with ``sz.paper_classes``
    stored class features, random weights on purpose (``benchmarks.deployed.build_pair``)."""
    from .deployed import build_pair

    return build_pair(PAPER_TEACHER, PAPER_STUDENT, sz.paper_image_size, sz.paper_classes, device)


def deployed_pair(sz: BenchSizes) -> tuple[str, str, int]:
    """Teacher, student and image size of the deployed-student figures."""
    return (
        (PAPER_TEACHER, PAPER_STUDENT, sz.paper_image_size)
        if sz.deploy_paper
        else (TINY_TEACHER, TINY_STUDENT, 32)
    )


def bench_deployed_student(sz: BenchSizes, work: Path) -> dict[str, Any]:
    """``deployed_student`` (``benchmarks.deployed``) and its ONNX Runtime / eager speedups."""
    from .deployed import bench_deployed

    pair = deployed_pair(sz)
    r = bench_deployed(*pair, sz.deploy_batch, sz.deploy_reps, sz.paper_classes, work / "deployed")
    b = sz.deploy_batch
    return {
        "deployed_student": r,
        "deployed_onnxruntime_vs_eager_b1": r["vs_eager_speedup_b1"]["onnxruntime"],
        f"deployed_onnxruntime_vs_eager_b{b}": r[f"vs_eager_speedup_b{b}"]["onnxruntime"],
    }


def bench_eager_scaling(
    sz: BenchSizes, device: torch.device, batches: tuple[int, ...] = (1, 8, 64)
) -> dict[str, Any]:
    """Eager images/s of the paper-pair student (no grad) at each batch size, as deployed (CPU
    batches run in chunks of ``Student.infer_chunk_pixels``) and, at the largest batch, unchunked: the
    figure the chunking exists for. Medians of 3 repetitions (2 at the largest batch)."""
    import statistics

    from .deployed import build_student
    from .timing import sync

    torch.manual_seed(0)  # the student alone (no ViT-L/14 to build), against a 768-d teacher
    s = sz.paper_image_size
    student, _ = build_student(PAPER_STUDENT, s, sz.paper_classes, 768, device)
    g = torch.Generator().manual_seed(0)

    def rate(b: int) -> float:
        x = torch.randn(b, 3, s, s, generator=g).to(device)
        times = []
        with torch.no_grad():
            student(x[: min(b, 8)])
            for _ in range(2 if b == max(batches) else 3):
                sync(device)
                t0 = time.perf_counter()
                student(x)
                sync(device)
                times.append(time.perf_counter() - t0)
        return b / statistics.median(times)

    by_batch = {str(b): rate(b) for b in batches}
    onnx = _onnx_vs_eager_b1(student, s, by_batch.get("1"))
    chunk, student.infer_chunk_pixels = student.infer_chunk_pixels, 0
    unchunked = rate(max(batches))
    student.infer_chunk_pixels = chunk
    return {
        "eager_student_images_per_s_by_batch": by_batch,
        "eager_student_unchunked_images_per_s": {str(max(batches)): unchunked},
        "eager_student_infer_chunk_images": max(1, chunk // (s * s)),
        **onnx,
    }


def _onnx_vs_eager_b1(student, image_size: int, eager_ips: float | None) -> dict[str, Any]:
    """ONNX Runtime's batch-1 images/s of the same student (exported as ``comkd export`` does, as
    many intra-op threads as torch, ONNX Runtime's default full graph optimisation) and its ratio
    to eager; empty without onnxruntime."""
    import statistics
    import tempfile

    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return {}
    from comkd.deploy.export import export_metadata, export_onnx
    from comkd.deploy.onnx_runtime import OnnxStudent

    with tempfile.TemporaryDirectory(prefix="comkd-onnx-") as tmp:
        path = Path(tmp) / "student.onnx"
        export_onnx(student, path, export_metadata(student, {}))
        ort = OnnxStudent(path, threads=torch.get_num_threads())
        x = torch.randn(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))
        ort.predict_logits(x)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            ort.predict_logits(x)
            times.append(time.perf_counter() - t0)
    ips = 1.0 / statistics.median(times)
    out: dict[str, Any] = {"onnxruntime_student_images_per_s_b1": ips}
    if eager_ips:
        out["onnxruntime_vs_eager_b1"] = ips / eager_ips
    return out
