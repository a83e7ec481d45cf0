"""The GPU check: one command (``comkd bench --profile gpu``) that, on one GPU in a few minutes and
without downloads (random weights), measures what a GPU user of the paper pair needs to know, and
writes one JSON. ``--quick`` runs the same code on the tiny pair at 32 px (what the tests run on
CPU); every key is the same in both forms and on every device.

Figures (``images_per_s`` are images per second; ``peak_memory_mb`` is the CUDA allocator's peak
over the section, ``null`` on other devices):

* ``matmul_peak``: the device's dense matmul peak (``benchmarks.limits``);
* ``teacher_forward``: the prompted teacher image tower, no grad, in each precision;
* ``distill_online`` / ``distill_cached``: stage-2 optimiser steps (ComKD, AdamW) with the teacher
  run online or its outputs read from a table on the device (what the teacher cache gives);
  ``fp32`` and ``bf16`` (autocast; CUDA only, ``null`` elsewhere), and ``compiled`` (the student
  under ``torch.compile``; its error where it fails, skipped in the quick form);
* ``stage1_step_s``: one PromptSRC step (teacher prompts) over 100 and 1,000 classes;
* each section's achieved GFLOP/s and its share of the fp32 (or bf16) peak.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .sizes import PAPER_STUDENT, PAPER_TEACHER


@dataclass(frozen=True)
class GpuSizes:
    teacher: str = PAPER_TEACHER
    student: str = PAPER_STUDENT
    image_size: int = 224
    batch: int = 64
    steps: int = 10
    classes: tuple[int, ...] = (100, 1000)
    peak_batch: int = 8
    peak_min_s: float = 0.5
    compile: bool = True


GPU_FULL = GpuSizes()
GPU_QUICK = GpuSizes(
    teacher="comkd-tiny-teacher",
    student="comkd-tiny-student",
    image_size=32,
    batch=4,
    steps=2,
    classes=(10, 20),
    peak_batch=1,
    peak_min_s=0.02,
    compile=False,
)

SECTIONS = ("teacher_forward", "distill_online", "distill_cached", "stage1_step_s")
PRECISIONS = ("fp32", "bf16")  # bf16 (autocast) on CUDA only: null elsewhere


def _peak_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _timed(fn, steps: int, device: torch.device) -> float:
    """Seconds per call of ``fn`` over ``steps`` calls after one warm-up call."""
    from .timing import sync

    fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / steps


def _autocast(device: torch.device, precision: str):
    import contextlib

    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _precisions(device: torch.device) -> list[str]:
    return ["fp32", "bf16"] if device.type == "cuda" else ["fp32"]


def _rate(fn, flops: float, batch: int, sz: GpuSizes, device: torch.device, peak: float) -> dict[str, Any]:
    _reset_peak(device)
    s = _timed(fn, sz.steps, device)
    return {
        "images_per_s": batch / s,
        "gflops_per_s": flops / s / 1e9,
        "mfu": flops / s / 1e9 / peak if peak else None,
        "peak_memory_mb": _peak_mb(device),
    }


def _pair(sz: GpuSizes, device: torch.device):
    from .deployed import build_pair

    return build_pair(sz.teacher, sz.student, sz.image_size, max(sz.classes), device)


def _distill_task(student, teacher, w, outputs):
    """The ComKD task and its AdamW optimiser, the teacher online (``outputs`` None) or from a table."""
    from comkd.engine.tasks import DistillTask, TeacherOutputs
    from comkd.losses import build_loss

    student.train()
    task = DistillTask(
        student,
        TeacherOutputs(teacher, student.preprocess) if outputs is None else outputs,
        w,
        float(teacher.logit_scale),
        build_loss("comkd", kd_weight=1.0),
    )
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-5)
    return task, opt


def gpu_check(out: str | Path, *, quick: bool = False, device: str = "auto") -> dict[str, Any]:
    """Run every section on ``device`` and write the JSON to ``out`` (see the module docstring). The
    full form needs a CUDA device; every argument is checked first (``run.check_request``)."""
    from .limits import matmul_peak, paper_towers
    from .report import machine_info, write_json
    from .run import check_request
    from .timing import count_flops

    out, dev = check_request(out, device=device, profile="gpu", quick=quick)
    sz = GPU_QUICK if quick else GPU_FULL
    t_start = time.perf_counter()
    torch.manual_seed(0)
    peak = matmul_peak(dev, sz.peak_batch, sz.peak_min_s, paper_towers(sz.image_size))
    res: dict[str, Any] = {
        "machine": machine_info(dev),
        "quick": quick,
        "sizes": asdict(sz),
        "matmul_peak": peak,
    }
    p32, pbf = peak["fp32_gflops_per_s"], peak.get("bf16_gflops_per_s")
    teacher, student, w = _pair(sz, dev)
    teacher.eval()
    s = sz.image_size
    x = torch.randn(sz.batch, 3, s, s, device=dev)

    def forward(prec: str):
        def fn():
            with torch.no_grad(), _autocast(dev, prec):
                teacher.encode_image(x)

        return fn

    f_teacher = count_flops(forward("fp32"))
    res["teacher_forward"] = {
        prec: _rate(forward(prec), f_teacher, sz.batch, sz, dev, pbf if prec == "bf16" else p32)
        if prec in _precisions(dev)
        else None
        for prec in PRECISIONS
    }
    res["distill_online"], res["distill_cached"] = _distill_sections(
        sz, dev, teacher, student, w, x, p32, pbf
    )
    res["stage1_step_s"] = _stage1(sz, dev, teacher)
    res["wall_s"] = time.perf_counter() - t_start
    write_json(out, res)
    return res


def _distill_sections(sz, dev, teacher, student, w, x, p32, pbf) -> tuple[dict, dict]:
    from .timing import count_flops

    with torch.no_grad():
        from comkd.engine.tasks import adapt_images

        u_t = teacher.encode_image(adapt_images(x, student.preprocess, teacher.preprocess))
    idx = torch.arange(sz.batch, device=dev)
    labels = torch.zeros(sz.batch, dtype=torch.long, device=dev)
    batch = (x, labels, idx)
    out: dict[str, dict] = {"distill_online": {}, "distill_cached": {}}
    for kind in out:
        table = None if kind == "distill_online" else (lambda images, indices, epoch: u_t[indices])
        task, opt = _distill_task(student, teacher, w, table)

        def step(prec: str, task=task, opt=opt):
            def fn():
                opt.zero_grad(set_to_none=True)
                with _autocast(dev, prec):
                    loss = task.step(batch, 0)["loss"]
                loss.backward()
                opt.step()

            return fn

        flops = count_flops(step("fp32"))
        for prec in PRECISIONS:
            run = prec in _precisions(dev)
            out[kind][prec] = (
                _rate(step(prec), flops, sz.batch, sz, dev, pbf if prec == "bf16" else p32) if run else None
            )
        out[kind]["compiled"] = _compiled(sz, dev, task, opt, batch, flops, p32)
    return out["distill_online"], out["distill_cached"]


def _compiled(sz, dev, task, opt, batch, flops, peak) -> dict[str, Any]:
    """The same fp32 step with the student under ``torch.compile``; its error where it fails."""
    if not sz.compile:
        return {"skipped": "quick form (compilation takes minutes on a CPU)"}
    student = task.student
    try:
        task.wrap({"student": torch.compile(student)})

        def fn():
            opt.zero_grad(set_to_none=True)
            task.step(batch, 0)["loss"].backward()
            opt.step()

        return _rate(fn, flops, sz.batch, sz, dev, peak)
    except Exception as e:  # noqa: BLE001 - recorded, not raised: the check goes on
        return {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    finally:
        task.wrap({})


def _stage1(sz: GpuSizes, dev: torch.device, teacher) -> dict[str, Any]:
    """Seconds of one PromptSRC step (CE + the three regularisers, SGD) over each class count."""
    from comkd.engine.tasks import TeacherPromptTask

    s = sz.image_size
    x = torch.randn(sz.batch, 3, s, s, device=dev)
    out: dict[str, Any] = {}
    for n in sz.classes:
        names = [f"class {i}" for i in range(n)]
        task = TeacherPromptTask(teacher, names, ["a photo of a {}."])
        opt = torch.optim.SGD(task.parameter_groups()[0]["params"], lr=1e-5, momentum=0.9)
        y = torch.randint(0, n, (sz.batch,), device=dev)

        def fn(task=task, opt=opt, y=y):
            opt.zero_grad(set_to_none=True)
            task.step((x, y, None), 0)["loss"].backward()
            opt.step()

        _reset_peak(dev)
        out[str(n)] = {"seconds": _timed(fn, sz.steps, dev), "peak_memory_mb": _peak_mb(dev)}
    return out
