"""Peak memory of each pipeline stage, each in a fresh process (MB).

``bench_peak_memory`` sends one job per stage to the fork server (``benchmarks.forkserver``: one
interpreter that has imported torch and this module, forking a child per stage), or, where
``fork`` is missing, runs each stage in a fresh interpreter; ``stage_peak_memory`` is what each
child runs.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from comkd.config import OptimConfig
from comkd.data import build_dataset, build_transform
from comkd.engine.cache_read import CachedTeacherOutputs
from comkd.engine.loop import fit
from comkd.engine.tasks import TeacherOutputs
from comkd.models import TINY_STUDENT, TINY_TEACHER, create_student, create_teacher

from .errors import BenchError
from .fixtures import NoRandomWeightWarnings, digits, distill_task, optim_config
from .sizes import STAGES, BenchSizes

#: the module ``python -m`` runs as the fork server
FORK_SERVER = "benchmarks.forkserver"


def _rss_peak_mb() -> float:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def stage_peak_memory(
    stage: str, device: str, cache: str, steps: int, batch: int, items: int, work: str, threads: int = 0
) -> dict:
    """Run one stage in the calling process and return its peak memory growth in MB."""
    logging.getLogger().addFilter(NoRandomWeightWarnings())
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


def _run_stage(
    stage: str, device: torch.device, cache: Path, steps: int, batch: int, items: int, work: Path
) -> None:
    """``steps`` steps of ``stage`` on the tiny pair (``cache``: the teacher cache the cached
    stages read; ``items``: digits images in the distillation set)."""
    from comkd.engine.tasks import PretrainTask, TeacherPromptTask
    from comkd.models import load_clip

    kw = {"out_dir": work / stage, "seed": 1, "device": device, "progress": False, "stop_after_steps": steps}
    cfg = optim_config(batch, epochs=100)
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
        ds = digits(items)
        w = teacher.class_text_features(ds.full_classnames)
        task = distill_task(
            student, TeacherOutputs(teacher, student.preprocess), w, float(teacher.logit_scale), "comkd"
        )
        fit(task, ds, cfg, **kw)
    elif stage == "distill_cached":  # no teacher at all: u_t, W and s_t come from the cache
        ds = digits(items)
        outputs = CachedTeacherOutputs.open(cache, dataset=ds, device=device)
        student = create_student(TINY_STUDENT, teacher_dim=outputs.dim, device=device)
        task = distill_task(student, outputs, outputs.text_features, outputs.logit_scale, "comkd")
        fit(task, ds, cfg, **kw)
    elif stage == "inference":
        ds = build_dataset("digits", split="test", transform=build_transform(32, train=False))
        outputs = CachedTeacherOutputs.open(cache, dataset=digits(items), device=device)
        student = create_student(TINY_STUDENT, teacher_dim=outputs.dim, device=device).eval()
        student.set_text_features(outputs.text_features, outputs.classnames)
        from torch.utils.data import DataLoader

        with torch.no_grad():
            for i, (x, _, _) in enumerate(DataLoader(ds, batch_size=batch)):
                student(x.to(device))
                if i + 1 >= steps:
                    break
    else:
        raise BenchError(f"unknown stage {stage!r}; choose from {STAGES}")


def _stage_processes(jobs: list[dict[str, Any]]) -> tuple[list[str], subprocess.CompletedProcess]:
    """Run each job (the keyword arguments of ``stage_peak_memory``) in a fresh process: the JSON
    result lines, and the (last) process, whose exit code and stderr explain a missing result."""
    from .report import child_env

    env = child_env(PYTHONWARNINGS="ignore")
    if not hasattr(os, "fork"):  # pragma: no cover - Windows
        return _fresh_interpreters(jobs, env)
    text = "".join(json.dumps(j) + "\n" for j in jobs)
    proc = subprocess.run(
        [sys.executable, "-m", FORK_SERVER],
        input=text,
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    return [x for x in proc.stdout.splitlines() if x.startswith("{")], proc


def _fresh_interpreters(  # pragma: no cover - Windows
    jobs: list[dict[str, Any]], env: dict[str, str]
) -> tuple[list[str], subprocess.CompletedProcess]:
    """Where ``fork`` is missing: one fresh interpreter per job."""
    lines: list[str] = []
    for j in jobs:
        code = (
            "import json; from benchmarks.memory import stage_peak_memory; "
            f"print(json.dumps(stage_peak_memory(**{j!r})))"
        )
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900
        )
        lines += [x for x in proc.stdout.splitlines() if x.startswith("{")]
    return lines, proc


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
    lines, proc = _stage_processes(jobs)
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
