"""Training-side measurements on the tiny pair: the ComKD vs PromptKD optimiser step, the
teacher-cache speedup and engine overhead of ``fit`` epochs, and epoch time as the data grows.
Times are seconds; ratios are medians of per-repetition ratios where the variants interleave."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from comkd.data.dataset import ImageDataset
from comkd.engine.cache_read import CachedTeacherOutputs
from comkd.engine.tasks import TeacherOutputs
from comkd.models import TINY_STUDENT, Teacher, create_student

from .fixtures import BareStep, digits, distill_task, first_batch, fit_epoch_time, tiny_student
from .sizes import BenchSizes
from .timing import count_flops, median, sync, time_interleaved


def bench_step_ratio(
    teacher: Teacher, ds: ImageDataset, w: torch.Tensor, sz: BenchSizes, device: torch.device
) -> dict[str, float]:
    """ComKD vs PromptKD optimiser step (student side: u_t precomputed, so the teacher does not
    dilute the difference), same students, batch and data; plus their FLOPs per step."""
    batch = first_batch(ds, sz.batch)
    with torch.no_grad():
        u_t = TeacherOutputs(teacher, create_student(TINY_STUDENT, teacher_dim=teacher.embed_dim).preprocess)(
            batch[0].to(device), batch[2], 0
        )
    fixed = lambda images, indices, epoch: u_t  # noqa: E731
    steps = {
        m: BareStep(
            distill_task(tiny_student(teacher.embed_dim, m, device), fixed, w, float(teacher.logit_scale), m),
            batch,
            device,
        )
        for m in ("comkd", "promptkd")
    }
    flops = {m: count_flops(lambda s=s: s(1)) for m, s in steps.items()}
    t = time_interleaved(
        {m: (lambda s=s: s(sz.steps_per_rep)) for m, s in steps.items()}, sz.step_reps, device
    )
    ratios = [a / b for a, b in zip(t["comkd"], t["promptkd"], strict=True)]
    return {
        "comkd_vs_promptkd_step_ratio": median(ratios),
        "comkd_step_s": median(t["comkd"]) / sz.steps_per_rep,
        "promptkd_step_s": median(t["promptkd"]) / sz.steps_per_rep,
        "comkd_vs_promptkd_step_flops_ratio": flops["comkd"] / flops["promptkd"],
    }


def bench_cache_and_loop(
    teacher: Teacher,
    ds: ImageDataset,
    cache: Path,
    w: torch.Tensor,
    sz: BenchSizes,
    device: torch.device,
    work: Path,
) -> dict[str, float]:
    """Distillation epochs through ``fit``: online teacher vs cache, and the cached task's bare
    step on one batch (engine overhead), interleaved per repetition."""
    s_t = float(teacher.logit_scale)
    s_on = tiny_student(teacher.embed_dim, "comkd", device)
    s_ca = tiny_student(teacher.embed_dim, "comkd", device)
    t_on = distill_task(s_on, TeacherOutputs(teacher, s_on.preprocess), w, s_t, "comkd")
    ds_ca = digits(sz.items)
    outputs = CachedTeacherOutputs.open(cache, teacher=teacher, dataset=ds_ca, device=device)
    t_ca = distill_task(s_ca, outputs, w, s_t, "comkd")
    steps = len(ds) // sz.batch
    s_bare = tiny_student(teacher.embed_dim, "comkd", device)
    bare = BareStep(distill_task(s_bare, outputs, w, s_t, "comkd"), first_batch(ds_ca, sz.batch), device)

    # data alone: the loader of fit without any model work
    from torch.utils.data import DataLoader

    from comkd.engine.sampling import EpochBatchSampler

    def data_only() -> None:
        for b in DataLoader(ds_ca, batch_sampler=EpochBatchSampler(len(ds_ca), sz.batch, 1)):
            outputs(b[0], b[2], 0)

    times: dict[str, list[float]] = {"online": [], "cached": [], "bare": [], "data": []}
    for r in range(sz.reps + 1):  # repetition 0 is the warm-up
        vals = {
            "online": fit_epoch_time(t_on, ds, sz.batch, device, work / "on"),
            "cached": fit_epoch_time(t_ca, ds_ca, sz.batch, device, work / "ca"),
        }
        t0 = time.perf_counter()
        bare(steps)
        sync(device)
        vals["bare"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        data_only()
        vals["data"] = time.perf_counter() - t0
        if r:
            for k, v in vals.items():
                times[k].append(v)
    m = {k: median(v) for k, v in times.items()}
    per_rep = lambda a, b: median([x / y for x, y in zip(times[a], times[b], strict=True)])  # noqa: E731
    return {
        "cache_speedup": per_rep("online", "cached"),
        "distill_epoch_online_s": m["online"],
        "distill_epoch_cached_s": m["cached"],
        "loop_overhead_ratio": per_rep("cached", "bare"),
        "engine_step_s": m["cached"] / steps,
        "bare_step_s": m["bare"] / steps,
        "data_and_cache_read_s_per_step": m["data"] / steps,
    }


def bench_epoch_scaling(
    teacher: Teacher, w: torch.Tensor, sz: BenchSizes, device: torch.device, work: Path
) -> dict[str, Any]:
    """Online distillation epoch time at 1x, 2x, 4x the images (the 1x items repeated)."""
    s_t = float(teacher.logit_scale)
    student = tiny_student(teacher.embed_dim, "comkd", device)
    task = distill_task(student, TeacherOutputs(teacher, student.preprocess), w, s_t, "comkd")
    sets = {f"{m}x": digits(sz.items, repeat=m) for m in (1, 2, 4)}
    fit_epoch_time(task, sets["1x"], sz.batch, device, work / "scale")  # warm-up
    times: dict[str, list[float]] = {k: [] for k in sets}
    for _ in range(sz.scaling_reps):
        for k, ds in sets.items():
            times[k].append(fit_epoch_time(task, ds, sz.batch, device, work / "scale"))
    ep = {k: median(v) for k, v in times.items()}
    return {"epoch_time_s": ep, "epoch_time_linearity": (ep["4x"] / ep["1x"]) / 4}
