"""The GPU check: one command (``comkd bench --profile gpu``) that, on one GPU and without downloads
(random weights), measures what a GPU user of the paper pair needs to know, and writes one JSON.
``--quick`` runs the same code on the tiny pair at 32 px (what the tests run on CPU); every key is
the same in both forms and on every device.

It cannot waste a GPU slot: the JSON is rewritten after every section (a run killed at its time
limit keeps every finished section), a section that fails is recorded (``{"error": ...}``, and
its name in ``failed``) and the check goes on, ``--no-compile`` leaves out every
``torch.compile`` measurement, and ``--compile-budget-s`` skips the compiled measurements that
remain once one compilation (its warm-up call) took longer than the budget (a compilation in
progress cannot be stopped). ``section_wall_s`` says what each section cost.

Sections, in order (``images_per_s`` are images per second; ``peak_memory_mb`` is the CUDA
allocator's peak over the measurement, ``null`` on other devices):

* ``matmul_peak``: the device's dense matmul peak (``benchmarks.limits``);
* ``teacher_forward``: the prompted teacher image tower, no grad, in each precision;
* ``distill_online`` / ``distill_cached``: bare stage-2 optimiser steps (ComKD, AdamW) at batch
  ``batch`` with the teacher run online or its outputs read from a table on the device (what the
  teacher cache gives): ``fp32``, ``bf16`` (autocast; CUDA only, ``null`` elsewhere),
  ``compiled`` and ``compiled_bf16`` (the student under ``torch.compile``; skipped in the quick
  form, with ``--no-compile`` or past the compile budget);
* ``stage1_step_s``: one PromptSRC step (teacher prompts) over 100 and 1,000 classes;
* ``fit``: stage 2 through ``engine.loop.fit`` itself (sampler, loader, autocast, bookkeeping;
  online teacher), images/s at the GPU preset's batch (8) and at a full batch (``batch``), each
  with and without ``optim.compile`` (the compiled ones as above);
* each rate's achieved GFLOP/s and its share of the fp32 (or bf16) peak.

Expected time of the full form on one H100/H200 (not measured here: no GPU was lent): building the
random ViT-L/14 + ViT-B/16 pair and the matmul peak under a minute; the uncompiled sections a
minute or two; each of the six compilations 1-3 minutes. About 3 minutes with ``--no-compile``,
up to about 15 with compilation: give a 15-minute slot ``--compile-budget-s 120``.
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
    preset_batch: int = 8  # the GPU presets' stage-2 batch (b2n_vitl14_vitb16.yaml)


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
    preset_batch=2,
)

SECTIONS = ("matmul_peak", "teacher_forward", "distill_online", "distill_cached", "stage1_step_s", "fit")
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


class _Compile:
    """Whether a compiled measurement still runs: not in the quick form or with ``--no-compile``,
    nor once one compilation's warm-up call took longer than ``budget_s``."""

    def __init__(self, enabled: bool, budget_s: float | None):
        self.enabled, self.budget_s = enabled, budget_s
        self.over: str | None = None

    def skip(self) -> str | None:
        if not self.enabled:
            return "compilation off (quick form or --no-compile)"
        return self.over

    def spent(self, warmup_s: float) -> None:
        if self.budget_s is not None and warmup_s > self.budget_s:
            self.over = (
                f"skipped: a compilation took {warmup_s:.0f} s, over --compile-budget-s {self.budget_s:g}"
            )


def gpu_check(
    out: str | Path,
    *,
    quick: bool = False,
    device: str = "auto",
    compile: bool = True,
    compile_budget_s: float | None = None,
) -> dict[str, Any]:
    """Run every section on ``device``, rewriting the JSON at ``out`` after each (see the module
    docstring). The full form needs a CUDA device; every argument is checked first
    (``run.check_request``). A section that raises is recorded and the check goes on."""
    from .report import machine_info, write_json
    from .run import check_request

    out, dev = check_request(out, device=device, profile="gpu", quick=quick)
    sz = GPU_QUICK if quick else GPU_FULL
    t_start = time.perf_counter()
    torch.manual_seed(0)
    res: dict[str, Any] = {
        "machine": machine_info(dev),
        "quick": quick,
        "sizes": asdict(sz),
        "compile": {"enabled": bool(compile and sz.compile), "budget_s": compile_budget_s},
        "failed": [],
        "section_wall_s": {},
    }
    ctx = _Context(sz, dev, _Compile(bool(compile and sz.compile), compile_budget_s))
    for name in SECTIONS:
        t0 = time.perf_counter()
        try:
            res[name] = getattr(ctx, name)()
        except Exception as e:  # noqa: BLE001 - recorded, not raised: the check goes on
            res[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            res["failed"].append(name)
        res["section_wall_s"][name] = time.perf_counter() - t0
        res["wall_s"] = time.perf_counter() - t_start
        write_json(out, res)
    return res


class _Context:
    """What the sections share (the pair, a batch, the peak), built by the first section that
    needs it; each public method is one section."""

    def __init__(self, sz: GpuSizes, dev: torch.device, comp: _Compile):
        self.sz, self.dev, self.comp = sz, dev, comp
        self._pair: tuple | None = None
        self.peak: dict[str, Any] = {}

    def pair(self):
        if self._pair is None:
            teacher, student, w = _pair(self.sz, self.dev)
            teacher.eval()
            s = self.sz.image_size
            self._pair = (teacher, student, w, torch.randn(self.sz.batch, 3, s, s, device=self.dev))
        return self._pair

    def peaks(self) -> tuple[float | None, float | None]:
        return self.peak.get("fp32_gflops_per_s"), self.peak.get("bf16_gflops_per_s")

    def matmul_peak(self) -> dict[str, Any]:
        from .limits import matmul_peak, paper_towers

        sz = self.sz
        self.peak = matmul_peak(self.dev, sz.peak_batch, sz.peak_min_s, paper_towers(sz.image_size))
        return self.peak

    def teacher_forward(self) -> dict[str, Any]:
        from .timing import count_flops

        teacher, _, _, x = self.pair()
        dev, sz = self.dev, self.sz
        p32, pbf = self.peaks()

        def forward(prec: str):
            def fn():
                with torch.no_grad(), _autocast(dev, prec):
                    teacher.encode_image(x)

            return fn

        f_teacher = count_flops(forward("fp32"))
        return {
            prec: _rate(forward(prec), f_teacher, sz.batch, sz, dev, pbf if prec == "bf16" else p32)
            if prec in _precisions(dev)
            else None
            for prec in PRECISIONS
        }

    def distill_online(self) -> dict[str, Any]:
        return self._distill("distill_online")

    def distill_cached(self) -> dict[str, Any]:
        return self._distill("distill_cached")

    def _distill(self, kind: str) -> dict[str, Any]:
        teacher, student, w, x = self.pair()
        p32, pbf = self.peaks()
        return _distill_section(kind, self.sz, self.dev, teacher, student, w, x, p32, pbf, self.comp)

    def stage1_step_s(self) -> dict[str, Any]:
        return _stage1(self.sz, self.dev, self.pair()[0])

    def fit(self) -> dict[str, Any]:
        teacher, student, w, _ = self.pair()
        from .fit_rate import fit_rates

        return fit_rates(self.sz, self.dev, teacher, student, w, self.comp)


def _distill_section(kind, sz, dev, teacher, student, w, x, p32, pbf, comp: _Compile) -> dict[str, Any]:
    from comkd.engine.tasks import adapt_images

    from .timing import count_flops

    with torch.no_grad():
        u_t = teacher.encode_image(adapt_images(x, student.preprocess, teacher.preprocess))
    idx = torch.arange(sz.batch, device=dev)
    labels = torch.zeros(sz.batch, dtype=torch.long, device=dev)
    batch = (x, labels, idx)
    table = None if kind == "distill_online" else (lambda images, indices, epoch: u_t[indices])
    task, opt = _distill_task(student, teacher, w, table)

    def step(prec: str):
        def fn():
            opt.zero_grad(set_to_none=True)
            with _autocast(dev, prec):
                loss = task.step(batch, 0)["loss"]
            loss.backward()
            opt.step()

        return fn

    flops = count_flops(step("fp32"))
    out: dict[str, Any] = {}
    for prec in PRECISIONS:
        run = prec in _precisions(dev)
        out[prec] = (
            _rate(step(prec), flops, sz.batch, sz, dev, pbf if prec == "bf16" else p32) if run else None
        )
    for prec, key in (("fp32", "compiled"), ("bf16", "compiled_bf16")):
        out[key] = _compiled(sz, dev, task, step(prec), flops, pbf if prec == "bf16" else p32, comp, prec)
    return out


def _compiled(sz, dev, task, fn, flops, peak, comp: _Compile, prec: str) -> dict[str, Any] | None:
    """The same step with the student under ``torch.compile``; its error where it fails."""
    if prec not in _precisions(dev):
        return None
    why = comp.skip()
    if why is not None:
        return {"skipped": why}
    try:
        task.wrap({"student": torch.compile(task.student)})
        t0 = time.perf_counter()
        fn()  # the compilation
        from .timing import sync

        sync(dev)
        warmup = time.perf_counter() - t0
        comp.spent(warmup)
        return {**_rate(fn, flops, sz.batch, sz, dev, peak), "compile_s": warmup}
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
