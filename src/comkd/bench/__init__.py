"""Speed and memory benchmarks: ``run_bench(out)`` measures and writes one JSON file.

Every figure is measured on this machine when the function runs (medians of several timed
repetitions after a warm-up; competing variants are interleaved so drifting machine load hits
both alike). Figures (see ``benchmarks/README.md`` for what each one means and its target):

* ``comkd_vs_promptkd_step_ratio``   ComKD / PromptKD distillation step time (tiny pair, fixed batch)
* ``cache_speedup``                  distillation epoch time online / with the teacher cache
* ``loop_overhead_ratio``            ``engine.loop.fit`` step time on real data / bare step on one batch
* ``inference_speedup_paper_pair``   student ViT-B/16 vs teacher ViT-L/14 images/s (224 px, batch 8)
* ``flops_ratio_paper_pair``         teacher / student FLOPs per image (``FlopCounterMode``)
* ``inference_speedup_tiny_pair``, ``flops_ratio_tiny_pair``   the same for the tiny configs
* ``peak_memory_mb``                 per stage, each in a fresh process
* ``epoch_time_s``, ``epoch_time_linearity``   distillation epoch time at 1x, 2x, 4x the data

``quick=True`` shrinks every size (the paper pair runs at 64 px) for a smoke run of under a minute;
its figures are for checking the machinery, not for reporting.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import OptimConfig
from ..data import build_dataset, build_transform
from ..data.dataset import ImageDataset
from ..engine.cache import CachedTeacherOutputs, build_teacher_cache, teacher_key
from ..engine.loop import fit
from ..engine.tasks import DistillTask, TeacherOutputs
from ..engine.utils import amp_context, resolve_device
from ..losses import build_loss
from ..methods import method_spec
from ..models import TINY_STUDENT, TINY_TEACHER, Student, Teacher, create_student, create_teacher

log = logging.getLogger(__name__)

#: the top-level numeric figures every bench JSON holds (``peak_memory_mb``/``epoch_time_s`` are objects)
FIGURES = (
    "comkd_vs_promptkd_step_ratio",
    "cache_speedup",
    "loop_overhead_ratio",
    "inference_speedup_paper_pair",
    "flops_ratio_paper_pair",
    "inference_speedup_tiny_pair",
    "flops_ratio_tiny_pair",
    "epoch_time_linearity",
)
STAGES = ("pretrain", "train_teacher", "distill", "distill_cached", "inference")
PAPER_TEACHER, PAPER_STUDENT = "ViT-L-14", "ViT-B-16"
#: what ``weights`` says in every bench JSON: no figure here depends on the weights' values
WEIGHTS_NOTE = (
    "random on purpose (the paper pair is built with pretrained='none', the tiny models have no "
    "pretrained weights): times, FLOPs and memory do not depend on the weights' values"
)


@dataclass
class BenchSizes:
    """How much work each measurement does."""

    items: int = 256  # digits images in the distillation set (1x)
    batch: int = 32  # distillation batch
    reps: int = 7  # timed repetitions (medians are reported)
    step_reps: int = 11  # repetitions of the ComKD/PromptKD step comparison
    steps_per_rep: int = 5  # optimiser steps per repetition there
    tiny_infer_batch: int = 128
    tiny_infer_reps: int = 5
    paper_image_size: int = 224
    paper_batch: int = 8
    paper_reps_teacher: int = 2
    paper_reps_student: int = 4
    paper_classes: int = 1000  # W rows for the paper-pair student (ImageNet-sized)
    scaling_reps: int = 3
    memory_steps: int = 8
    deploy_paper: bool = True  # deployed-student runtimes: the paper pair (else the tiny pair at 32 px)
    deploy_batch: int = 64
    deploy_reps: int = 2


FULL = BenchSizes()
QUICK = BenchSizes(
    items=32,
    batch=8,
    reps=2,
    step_reps=3,
    steps_per_rep=2,
    tiny_infer_batch=32,
    tiny_infer_reps=2,
    paper_image_size=64,
    paper_reps_teacher=1,
    paper_reps_student=1,
    paper_classes=100,
    scaling_reps=1,
    memory_steps=2,
    deploy_paper=False,
)


# -- helpers -----------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def machine_info(device: torch.device) -> dict[str, Any]:
    """Platform, CPU count, library versions and the device the figures were measured on."""
    import open_clip

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "open_clip": getattr(open_clip, "__version__", "unknown"),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    if hasattr(os, "getloadavg"):
        info["loadavg_1min_start"] = round(os.getloadavg()[0], 2)
    return info


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn`` (``torch.utils.flop_counter``: 2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def time_interleaved(
    fns: dict[str, Callable[[], Any]], reps: int, device: torch.device, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds of each call of each function, ``reps`` per function, calls alternating between
    the functions (so load changes on a shared machine hit all alike)."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    _sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            _sync(device)
            times[k].append(time.perf_counter() - t0)
    return times


def _digits(
    items: int, view_seed: int = 1, split: str = "train", repeat: int = 1, image_size: int = 32
) -> ImageDataset:
    ds = build_dataset(
        "digits",
        split=split,
        train_transform=build_transform(image_size, train=True),
        view_seed=view_seed,
        unlabelled=True,
    )
    ds.data = (ds.data[:items]) * repeat
    return ds


def _student(
    teacher_dim: int, method: str, device: torch.device, model: str = TINY_STUDENT, **kw: Any
) -> Student:
    torch.manual_seed(0)
    return create_student(
        model,
        teacher_dim=teacher_dim,
        edu_attention=method_spec(method)["edu_attention"],
        device=device,
        **kw,
    )


def _distill_task(student: Student, outputs, w: torch.Tensor, s_t: float, method: str) -> DistillTask:
    student.set_text_features(w)
    return DistillTask(student, outputs, w, s_t, build_loss(method))


def _optim(batch: int, epochs: int = 1) -> OptimConfig:
    return OptimConfig(epochs=epochs, warmup_epochs=0, batch_size=batch)


def _fit_epoch_time(
    task: DistillTask, ds: ImageDataset, batch: int, device: torch.device, out: Path
) -> float:
    """Seconds of one ``fit`` epoch (``time_s`` of its record: data, steps, logging; no checkpoint)."""
    res = fit(task, ds, _optim(batch), out_dir=out, seed=1, device=device, progress=False, log_every=10)
    return float(res.history[-1]["time_s"])


class _BareStep:
    """The same task and optimiser as ``fit``, on one pre-loaded batch, in a tight loop."""

    def __init__(self, task: DistillTask, batch: tuple, device: torch.device, lr: float = 0.005):
        self.task, self.device = task, device
        self.batch = tuple(b.to(device) for b in batch)
        cfg = _optim(1)
        self.opt = torch.optim.SGD(
            task.parameter_groups(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        self.autocast, _ = amp_context(device, cfg.amp)

    def __call__(self, steps: int = 1) -> None:
        self.task.student.train()
        for _ in range(steps):
            self.opt.zero_grad(set_to_none=True)
            with self.autocast:
                loss = self.task.step(self.batch, 0)["loss"]
            loss.backward()
            self.opt.step()


def _first_batch(ds: ImageDataset, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ds.set_epoch(0)
    items = [ds[i] for i in range(n)]
    return (
        torch.stack([x for x, _, _ in items]),
        torch.tensor([y for _, y, _ in items]),
        torch.tensor([i for _, _, i in items]),
    )


# -- the measurements --------------------------------------------------------------------------
def bench_step_ratio(
    teacher: Teacher, ds: ImageDataset, w: torch.Tensor, sz: BenchSizes, device: torch.device
) -> dict[str, float]:
    """ComKD vs PromptKD optimiser step (student side: u_t precomputed, so the teacher does not
    dilute the difference), same students, batch and data; plus their FLOPs per step."""
    batch = _first_batch(ds, sz.batch)
    with torch.no_grad():
        u_t = TeacherOutputs(teacher, create_student(TINY_STUDENT, teacher_dim=teacher.embed_dim).preprocess)(
            batch[0].to(device), batch[2], 0
        )
    fixed = lambda images, indices, epoch: u_t  # noqa: E731
    steps = {
        m: _BareStep(
            _distill_task(_student(teacher.embed_dim, m, device), fixed, w, float(teacher.logit_scale), m),
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
        "comkd_vs_promptkd_step_ratio": _median(ratios),
        "comkd_step_s": _median(t["comkd"]) / sz.steps_per_rep,
        "promptkd_step_s": _median(t["promptkd"]) / sz.steps_per_rep,
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
    s_on = _student(teacher.embed_dim, "comkd", device)
    s_ca = _student(teacher.embed_dim, "comkd", device)
    t_on = _distill_task(s_on, TeacherOutputs(teacher, s_on.preprocess), w, s_t, "comkd")
    ds_ca = _digits(sz.items)
    outputs = CachedTeacherOutputs.open(cache, teacher=teacher, dataset=ds_ca, device=device)
    t_ca = _distill_task(s_ca, outputs, w, s_t, "comkd")
    steps = len(ds) // sz.batch
    s_bare = _student(teacher.embed_dim, "comkd", device)
    bare = _BareStep(_distill_task(s_bare, outputs, w, s_t, "comkd"), _first_batch(ds_ca, sz.batch), device)

    # data alone: the loader of fit without any model work
    from torch.utils.data import DataLoader

    from ..engine.sampling import EpochBatchSampler

    def data_only() -> None:
        for b in DataLoader(ds_ca, batch_sampler=EpochBatchSampler(len(ds_ca), sz.batch, 1)):
            outputs(b[0], b[2], 0)

    times: dict[str, list[float]] = {"online": [], "cached": [], "bare": [], "data": []}
    for r in range(sz.reps + 1):  # repetition 0 is the warm-up
        vals = {
            "online": _fit_epoch_time(t_on, ds, sz.batch, device, work / "on"),
            "cached": _fit_epoch_time(t_ca, ds_ca, sz.batch, device, work / "ca"),
        }
        t0 = time.perf_counter()
        bare(steps)
        _sync(device)
        vals["bare"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        data_only()
        vals["data"] = time.perf_counter() - t0
        if r:
            for k, v in vals.items():
                times[k].append(v)
    m = {k: _median(v) for k, v in times.items()}
    per_rep = lambda a, b: _median([x / y for x, y in zip(times[a], times[b], strict=True)])  # noqa: E731
    return {
        "cache_speedup": per_rep("online", "cached"),
        "distill_epoch_online_s": m["online"],
        "distill_epoch_cached_s": m["cached"],
        "loop_overhead_ratio": per_rep("cached", "bare"),
        "engine_step_s": m["cached"] / steps,
        "bare_step_s": m["bare"] / steps,
        "data_and_cache_read_s_per_step": m["data"] / steps,
    }


def _inference_pair(
    teacher: Teacher,
    student: Student,
    image_size: int,
    batch: int,
    reps_t: int,
    reps_s: int,
    device: torch.device,
) -> dict[str, float]:
    teacher.eval()
    student.eval()
    x = torch.randn(batch, 3, image_size, image_size, device=device)
    xt = torch.randn(batch, 3, teacher.preprocess.image_size, teacher.preprocess.image_size, device=device)
    with torch.no_grad():
        f_t = count_flops(lambda: teacher.encode_image(xt)) / batch  # also the warm-up
        f_s = count_flops(lambda: student(x)) / batch

        def timed(fn, reps):
            out = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                _sync(device)
                out.append(time.perf_counter() - t0)
            return _median(out)

        times = {"teacher": [], "student": []}
        for r in range(max(reps_t, reps_s)):  # interleaved; the teacher (slow) may get fewer runs
            if r < reps_t:
                times["teacher"].append(timed(lambda: teacher.encode_image(xt), 1))
            if r < reps_s:
                times["student"].append(timed(lambda: student(x), 1))
    t_t, t_s = _median(times["teacher"]), _median(times["student"])
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
    student = _student(teacher.embed_dim, "comkd", device)
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
    stored class features, random weights on purpose (``comkd.deploy.bench.build_pair``)."""
    from ..deploy.bench import build_pair

    return build_pair(PAPER_TEACHER, PAPER_STUDENT, sz.paper_image_size, sz.paper_classes, device)


def deployed_pair(sz: BenchSizes) -> tuple[str, str, int]:
    """Teacher, student and image size of the deployed-student figures."""
    return (
        (PAPER_TEACHER, PAPER_STUDENT, sz.paper_image_size)
        if sz.deploy_paper
        else (TINY_TEACHER, TINY_STUDENT, 32)
    )


def _deployed(sz: BenchSizes, work: Path) -> dict[str, Any]:
    """``deployed_student`` (``comkd.deploy.bench``) and its ONNX Runtime / eager speedups."""
    from ..deploy.bench import bench_deployed

    pair = deployed_pair(sz)
    r = bench_deployed(*pair, sz.deploy_batch, sz.deploy_reps, sz.paper_classes, work / "deployed")
    b = sz.deploy_batch
    return {
        "deployed_student": r,
        "deployed_onnxruntime_vs_eager_b1": r["vs_eager_speedup_b1"]["onnxruntime"],
        f"deployed_onnxruntime_vs_eager_b{b}": r[f"vs_eager_speedup_b{b}"]["onnxruntime"],
    }


def bench_epoch_scaling(
    teacher: Teacher, w: torch.Tensor, sz: BenchSizes, device: torch.device, work: Path
) -> dict[str, Any]:
    """Online distillation epoch time at 1x, 2x, 4x the images (the 1x items repeated)."""
    s_t = float(teacher.logit_scale)
    student = _student(teacher.embed_dim, "comkd", device)
    task = _distill_task(student, TeacherOutputs(teacher, student.preprocess), w, s_t, "comkd")
    sets = {f"{m}x": _digits(sz.items, repeat=m) for m in (1, 2, 4)}
    _fit_epoch_time(task, sets["1x"], sz.batch, device, work / "scale")  # warm-up
    times: dict[str, list[float]] = {k: [] for k in sets}
    for _ in range(sz.scaling_reps):
        for k, ds in sets.items():
            times[k].append(_fit_epoch_time(task, ds, sz.batch, device, work / "scale"))
    ep = {k: _median(v) for k, v in times.items()}
    return {"epoch_time_s": ep, "epoch_time_linearity": (ep["4x"] / ep["1x"]) / 4}


# -- peak memory, one fresh process per stage ---------------------------------------------------
def _rss_peak_mb() -> float:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def stage_peak_memory(
    stage: str, device: str, cache: str, steps: int, batch: int, items: int, work: str, threads: int = 0
) -> dict:
    """Run one stage in the calling process and return its peak memory growth in MB."""
    logging.getLogger().addFilter(_NoRandomWeightWarnings())
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev) if cuda else _rss_peak_mb()
    _run_stage(stage, dev, Path(cache), steps, batch, items, Path(work))
    if cuda:
        torch.cuda.synchronize(dev)
        return {"stage": stage, "peak_mb": (torch.cuda.max_memory_allocated(dev) - base) / 2**20}
    return {"stage": stage, "peak_mb": _rss_peak_mb() - base, "baseline_mb": base}


# A tiny fork server: one fresh interpreter imports torch and comkd once, then forks a child per
# stage (before any torch compute or CUDA use in the server), so each stage starts from the same
# clean process without paying the imports (~5 s here) again. Jobs and results are JSON lines.
_FORK_SERVER = r"""
import json, os, sys, traceback
from comkd import bench
from comkd.data.builtin import _digit_images
_digit_images(32)  # decode the embedded digits once, before forking
for line in sys.stdin:
    job = json.loads(line)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            res = bench.stage_peak_memory(**job)
        except BaseException as e:
            res = {"stage": job["stage"], "error": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"}
        os.write(w, json.dumps(res).encode())
        os._exit(0)
    os.close(w)
    chunks = []
    while True:
        c = os.read(r, 1 << 16)
        if not c:
            break
        chunks.append(c)
    os.close(r)
    os.waitpid(pid, 0)
    out = b"".join(chunks).decode() or json.dumps({"stage": job["stage"], "error": "the stage process died"})
    sys.stdout.write(out + "\n")
    sys.stdout.flush()
"""


def _run_stage(
    stage: str, device: torch.device, cache: Path, steps: int, batch: int, items: int, work: Path
) -> None:
    from ..engine.tasks import PretrainTask, TeacherPromptTask
    from ..models import load_clip

    kw = {"out_dir": work / stage, "seed": 1, "device": device, "progress": False, "stop_after_steps": steps}
    cfg = _optim(batch, epochs=100)
    if stage == "pretrain":
        loaded = load_clip(TINY_TEACHER, device=device)
        ds = build_dataset(
            "digits", split="pretrain", train_transform=build_transform(32, train=True), view_seed=1
        )
        fit(
            PretrainTask(loaded.model, loaded.tokenizer, ds.classnames, ds.templates),
            ds,
            OptimConfig(optimizer="adamw", lr=1e-3, epochs=100, batch_size=batch),
            **kw,
        )
    elif stage == "train_teacher":
        teacher = create_teacher(TINY_TEACHER, device=device)
        ds = build_dataset(
            "digits", split="train", train_transform=build_transform(32, train=True), view_seed=1
        )
        fit(TeacherPromptTask(teacher, ds.classnames, ds.templates), ds, cfg, **kw)
    elif stage == "distill":
        teacher = create_teacher(TINY_TEACHER, device=device)
        student = create_student(TINY_STUDENT, teacher_dim=teacher.embed_dim, device=device)
        ds = _digits(items)
        w = teacher.class_text_features(ds.full_classnames)
        task = _distill_task(
            student, TeacherOutputs(teacher, student.preprocess), w, float(teacher.logit_scale), "comkd"
        )
        fit(task, ds, cfg, **kw)
    elif stage == "distill_cached":  # no teacher at all: u_t, W and s_t come from the cache
        ds = _digits(items)
        outputs = CachedTeacherOutputs.open(cache, dataset=ds, device=device)
        student = create_student(TINY_STUDENT, teacher_dim=outputs.dim, device=device)
        task = _distill_task(student, outputs, outputs.text_features, outputs.logit_scale, "comkd")
        fit(task, ds, cfg, **kw)
    elif stage == "inference":
        ds = build_dataset("digits", split="test", transform=build_transform(32, train=False))
        outputs = CachedTeacherOutputs.open(cache, dataset=_digits(items), device=device)
        student = create_student(TINY_STUDENT, teacher_dim=outputs.dim, device=device).eval()
        student.set_text_features(outputs.text_features, outputs.classnames)
        from torch.utils.data import DataLoader

        with torch.no_grad():
            for i, (x, _, _) in enumerate(DataLoader(ds, batch_size=batch)):
                student(x.to(device))
                if i + 1 >= steps:
                    break
    else:
        raise ValueError(f"unknown stage {stage!r}; choose from {STAGES}")


def bench_peak_memory(device: torch.device, cache: Path, sz: BenchSizes, work: Path) -> dict[str, Any]:
    """Peak memory growth of each stage, each in a fresh process (forked from a server that has
    only imported torch and comkd; one fresh interpreter per stage where ``fork`` is missing).
    CPU: ``ru_maxrss`` at the end minus at the start of the stage; CUDA:
    ``torch.cuda.max_memory_allocated`` minus the memory allocated at the start."""
    jobs = [
        {
            "stage": s,
            "device": str(device),
            "cache": str(cache),
            "steps": sz.memory_steps,
            "batch": sz.batch,
            "items": sz.items,
            "work": str(work),
            "threads": torch.get_num_threads(),
        }
        for s in STAGES
    ]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    if hasattr(os, "fork"):
        text = "".join(json.dumps(j) + "\n" for j in jobs)
        proc = subprocess.run(
            [sys.executable, "-c", _FORK_SERVER],
            input=text,
            capture_output=True,
            text=True,
            env=env,
            timeout=900,
        )
        lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    else:  # pragma: no cover - Windows
        lines = []
        for j in jobs:
            code = (
                f"import json; from comkd import bench; print(json.dumps(bench.stage_peak_memory(**{j!r})))"
            )
            proc = subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900
            )
            lines += [x for x in proc.stdout.splitlines() if x.startswith("{")]
    results = {r["stage"]: r for r in map(json.loads, lines)}
    out: dict[str, float] = {}
    for s in STAGES:
        r = results.get(s)
        if r is None or "error" in r:
            why = r["error"] if r else f"no result (exit code {proc.returncode}): {proc.stderr[-2000:]}"
            raise RuntimeError(f"peak-memory stage {s!r} failed: {why}")
        out[s] = round(float(r["peak_mb"]), 1)
    how = (
        "torch.cuda.max_memory_allocated minus memory allocated at the stage's start, fresh process per stage"
        if device.type == "cuda"
        else "ru_maxrss growth over the stage in a fresh process per stage (torch and comkd already imported)"
    )
    res: dict[str, Any] = {"peak_memory_mb": out, "peak_memory_method": how}
    if device.type != "cuda":
        res["process_baseline_rss_mb"] = round(float(results[STAGES[0]].get("baseline_mb", float("nan"))), 1)
    return res


# -- entry point -------------------------------------------------------------------------------
def run_bench(
    out: Path,
    quick: bool = False,
    *,
    device: str = "auto",
    threads: int | None = None,
    progress: bool = True,
    shards: str | None = None,
    only: str | None = None,
) -> dict[str, Any]:
    """Run every benchmark and write the figures to ``out`` (a JSON file; a folder gets ``bench.json``).

    Args:
        out: the JSON file (or a folder for ``bench.json``).
        quick: small sizes for a smoke run (< 1 minute on 2 CPU cores); figures not for reporting.
        device: ``auto`` (CUDA, then MPS, then CPU), ``cpu``, ``cuda``, ...
        threads: torch intra-op threads during the bench (default: torch's choice). On a machine
            shared with other busy processes, 1 thread gives far steadier figures.
        progress: log each section as it starts (logger ``comkd.bench``, level INFO).
        shards: WebDataset shards for the data-path figures (default: CIFAR-10's in ../shared, if
            there; see ``comkd.bench.data_path``).
        only: ``data`` runs the data-path section alone and merges it into an existing ``out``.

    Returns the dict written: ``machine`` (object), the numbers listed in ``FIGURES``,
    ``peak_memory_mb`` and ``epoch_time_s`` (objects) and supporting figures.
    """
    out = Path(out)
    if out.suffix != ".json":
        out = out / "bench.json"
    dev = resolve_device(device)
    sz = QUICK if quick else FULL
    say = log.info if progress else log.debug
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    t_start = time.perf_counter()
    res: dict[str, Any] = {
        "machine": machine_info(dev),
        "quick": quick,
        "weights": WEIGHTS_NOTE,
        "sizes": asdict(sz),
    }
    timings: dict[str, float] = {}
    if only is not None:
        if only != "data":
            raise ValueError(f"only: {only!r} is not a section; choose 'data'")
        from .data_path import bench_data_path

        say("bench: data path (shards vs folder, streamed epoch memory) ...")
        prev = json.loads(out.read_text()) if out.exists() else {}
        data = bench_data_path(shards, quick=quick, threads=int(threads or 1))
        data["data_path"]["machine"] = machine_info(dev)
        data["data_path"]["wall_s"] = time.perf_counter() - t_start
        res = {**prev, **data}
        _write_json(out, res)
        return res
    try:
        with tempfile.TemporaryDirectory(prefix="comkd-bench-") as tmp, _quiet():
            work = Path(tmp)
            torch.manual_seed(0)
            teacher = create_teacher(TINY_TEACHER, device=dev)
            ds = _digits(sz.items)
            w = teacher.class_text_features(ds.full_classnames)
            spec = create_student(TINY_STUDENT, teacher_dim=teacher.embed_dim).preprocess
            t0 = time.perf_counter()
            cache = build_teacher_cache(
                teacher,
                _digits(sz.items),
                work / "teacher.tcache",
                views=1,
                seed=1,
                batch_size=64,
                device=dev,
                student_spec=spec,
                progress=False,
            )
            res["cache_build_s_per_item_view"] = (time.perf_counter() - t0) / sz.items
            sections: list[tuple[str, Callable[[], dict]]] = [
                ("ComKD vs PromptKD step", lambda: bench_step_ratio(teacher, ds, w, sz, dev)),
                (
                    "cache speedup, loop overhead",
                    lambda: bench_cache_and_loop(teacher, ds, cache, w, sz, dev, work),
                ),
                ("tiny-pair inference", lambda: bench_inference_tiny(teacher, w, sz, dev)),
                ("epoch-time scaling", lambda: bench_epoch_scaling(teacher, w, sz, dev, work)),
                ("paper-pair inference (ViT-L/14 vs ViT-B/16)", lambda: bench_inference_paper(sz, dev)),
                ("peak memory per stage", lambda: bench_peak_memory(dev, cache, sz, work)),
                ("deployed student: eager / TorchScript / ONNX Runtime (CPU)", lambda: _deployed(sz, work)),
                (
                    "data path: shards vs folder, streamed epoch memory",
                    lambda: _data_path(shards, quick, threads),
                ),
            ]
            for name, fn in sections:
                say("bench: %s ...", name)
                t0 = time.perf_counter()
                res.update(fn())
                timings[name] = round(time.perf_counter() - t0, 2)
    finally:
        torch.set_num_threads(old_threads)
    if hasattr(os, "getloadavg"):
        res["machine"]["loadavg_1min_end"] = round(os.getloadavg()[0], 2)
    res["section_wall_s"] = timings
    res["wall_s"] = time.perf_counter() - t_start
    res = _ordered(res)
    _write_json(out, res)
    say("bench: wrote %s (%.0f s)", out, res["wall_s"])
    return res


def _data_path(shards: str | None, quick: bool, threads: int | None) -> dict[str, Any]:
    from .data_path import bench_data_path

    return bench_data_path(shards, quick=quick, threads=int(threads or 1))


def _write_json(out: Path, res: dict[str, Any]) -> None:
    from ..fileio import atomic_write_text

    atomic_write_text(out, json.dumps(res, indent=2) + "\n")


def _ordered(res: dict[str, Any]) -> dict[str, Any]:
    first = ["machine", "quick", "weights", *FIGURES, "peak_memory_mb", "epoch_time_s"]
    return {**{k: res[k] for k in first if k in res}, **{k: v for k, v in res.items() if k not in first}}


class _NoRandomWeightWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")


@contextmanager
def _quiet():
    """Drop open_clip's 'no pretrained weights' warnings (the bench uses random weights on purpose)."""
    f = _NoRandomWeightWarnings()
    logging.getLogger().addFilter(f)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(f)


def finite_figures(res: dict[str, Any]) -> bool:
    """True when every required figure (and every value of the per-stage objects) is a finite number."""
    nums = (
        [res[k] for k in FIGURES] + list(res["peak_memory_mb"].values()) + list(res["epoch_time_s"].values())
    )
    return (
        all(isinstance(v, (int, float)) and math.isfinite(v) for v in nums)
        and set(res["peak_memory_mb"]) == set(STAGES)
        and set(res["epoch_time_s"]) == {"1x", "2x", "4x"}
    )
