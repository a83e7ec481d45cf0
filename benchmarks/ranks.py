"""The work around the training loop under torchrun (``comkd bench --only ranks``): the teacher
cache, the ridge warm start and evaluation on 2 ranks of 1 thread against 1 process of 2 threads,
the same work on the same CPU cores (issue 32's target: no more than 1.1x).

Each repetition runs both launches one after the other (interleaved, so a change of machine load
hits both). The cache is ``comkd cache-teacher --config demo`` (its wall time, and the build's own
time from its log line); the warm start and evaluation are timed inside a script (``_PHASES``) that
builds the demo's tiny pair once and then times each phase on every rank, rank 0 reporting the
slowest rank's time. Ratios are medians of the per-repetition ratios.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .report import child_env
from .timing import median

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]

_PHASES = r"""
import json, sys, time
import torch
from comkd.config import load_config
from comkd.engine.builders import build_student, build_teacher, make_dataset
from comkd.engine.distill import warm_start_projector
from comkd.engine.evaluation import evaluate_student, evaluate_teacher
from comkd.engine.tasks import TeacherOutputs
from comkd.engine.utils import barrier, exit_process, init_distributed, is_main

torch.set_num_threads(int(sys.argv[2]))
init_distributed()
cfg = load_config("demo")
dev = torch.device("cpu")
teacher = build_teacher(cfg, dev, prompts="")
student = build_student(cfg, teacher.embed_dim, dev)
ds = make_dataset(cfg, cfg.distill.split, student.preprocess, train=True, unlabelled=True, augment=cfg.distill.augment)
student.set_text_features(teacher.class_text_features(ds.full_classnames), ds.full_classnames)
reps = int(sys.argv[3])
times = {}
for name, fn in (
    ("warm_start", lambda: warm_start_projector(student, ds, TeacherOutputs(teacher, student.preprocess), cfg, dev)),
    ("evaluation", lambda: (evaluate_student(cfg, student, halves=True), evaluate_teacher(cfg, teacher, halves=True))),
):
    barrier()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    slowest = torch.tensor([time.perf_counter() - t0])
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(slowest, op=torch.distributed.ReduceOp.MAX)
    times[name] = float(slowest.item())
if is_main():
    with open(sys.argv[1], "w") as f:
        json.dump(times, f)
exit_process(0)  # how a comkd command ends (cli.main)
"""

_BUILD_S = re.compile(r"teacher cache: .* in ([0-9.]+) s on (\d+) process")


def _cache(two: bool, views: int, out: Path) -> dict[str, float]:
    """One ``cache-teacher --config demo`` launch: its wall time and the build's own time."""
    threads = "1" if two else "2"
    cmd = [
        *(TORCHRUN if two else [sys.executable]),
        "-m",
        "comkd.cli",
        "cache-teacher",
        "--config",
        "demo",
        "--views",
        str(views),
        "--threads",
        threads,
        "--out-dir",
        str(out),
        "--overwrite",
        "-v",
    ]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=child_env(OMP_NUM_THREADS=threads), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"cache-teacher ({'2 ranks' if two else '1 process'}) failed: {r.stderr[-2000:]}")
    builds = [float(m.group(1)) for m in _BUILD_S.finditer(r.stderr)]
    return {"wall_s": wall, "build_s": max(builds) if builds else float("nan")}


def _phases(two: bool, reps: int, tmp: Path) -> dict[str, float]:
    """The warm start and evaluation, ``reps`` times each, timed inside the processes."""
    script, out = tmp / "phases.py", tmp / f"phases_{int(two)}.json"
    script.write_text(_PHASES)
    threads = "1" if two else "2"
    cmd = [*(TORCHRUN if two else [sys.executable]), str(script), str(out), threads, str(reps)]
    r = subprocess.run(cmd, env=child_env(OMP_NUM_THREADS=threads), capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(
            f"warm start / evaluation ({'2 ranks' if two else '1 process'}) failed: {r.stderr[-2000:]}"
        )
    return json.loads(out.read_text())


def bench_ranks(quick: bool = False, reps: int | None = None) -> dict[str, Any]:
    """``ranks``: per figure the seconds of 1 process (2 threads) and 2 ranks (1 thread each), per
    repetition, and ``ratio`` = median over repetitions of (2 ranks / 1 process)."""
    reps = reps or (1 if quick else 3)
    views, inner = (4, 1) if quick else (40, 5)
    runs: dict[str, dict[str, list[float]]] = {}

    def add(name: str, side: str, value: float) -> None:
        runs.setdefault(name, {"one_process_s": [], "two_ranks_s": []})[side].append(value)

    with tempfile.TemporaryDirectory(prefix="comkd-ranks-") as d:
        tmp = Path(d)
        for _ in range(reps):
            for two in (False, True):
                side = "two_ranks_s" if two else "one_process_s"
                c = _cache(two, views, tmp / f"cache{int(two)}")
                add("cache_teacher_command", side, c["wall_s"])
                add("cache_build", side, c["build_s"])
                for name, s in _phases(two, inner, tmp).items():
                    add(name, side, s)
    out: dict[str, Any] = {
        "setup": (
            f"demo config (digits, tiny pair): cache-teacher --views {views} (whole command, and the build "
            f"from its log), warm start and student+teacher evaluation x{inner} inside one launch; "
            "1 process x 2 threads vs torchrun 2 ranks x 1 thread (gloo)"
        ),
        "target": "2 ranks <= 1.1 x 1 process",
    }
    for name, r in runs.items():
        ratios = [b / a for a, b in zip(r["one_process_s"], r["two_ranks_s"], strict=True)]
        out[name] = {**r, "ratio": median(ratios)}
    return {"ranks": out}
