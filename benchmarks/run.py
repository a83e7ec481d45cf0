"""``run_bench``: every measurement in turn, one JSON file (what ``comkd bench`` runs).

Builds the shared fixtures once (the tiny teacher, the digits set, its class features and a
teacher cache), runs the sections of ``training``, ``inference``, ``memory`` and ``data_path``,
and writes the figures with the machine they were measured on (``report``).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from comkd.engine.cache_build import build_teacher_cache
from comkd.engine.utils import resolve_device
from comkd.models import TINY_STUDENT, TINY_TEACHER, Teacher, create_student, create_teacher

from .errors import BenchError
from .fixtures import digits, quiet
from .inference import (
    bench_deployed_student,
    bench_eager_scaling,
    bench_inference_paper,
    bench_inference_tiny,
)
from .limits import limits_section
from .memory import bench_peak_memory
from .ranks import bench_ranks
from .report import machine_info, ordered, write_json
from .sizes import FULL, QUICK, WEIGHTS_NOTE, BenchSizes
from .training import bench_cache_and_loop, bench_epoch_scaling, bench_step_ratio

log = logging.getLogger("benchmarks")

Say = Callable[..., None]


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

    Every argument is checked before any work starts (``check_request``: a ``BenchError`` naming it).

    Args:
        out: the JSON file, written under the name given (``bench7.txt`` too); an existing folder,
            or a name without a suffix, gets ``bench.json`` inside.
        quick: small sizes for a smoke run (< 1 minute on 2 CPU cores); figures not for reporting.
        device: ``auto`` (CUDA, then MPS, then CPU), ``cpu``, ``cuda``, ...
        threads: torch intra-op threads during the bench (default: torch's choice). On a machine
            shared with other busy processes, 1 thread gives far steadier figures.
        progress: log each section as it starts (logger ``benchmarks``, level INFO).
        shards: WebDataset shards for the data-path figures (default: CIFAR-10's in ../shared, if
            there; see ``benchmarks.data_path``).
        only: one section alone (``ONLY``: data, eager, limits), merged into an existing ``out``.

    Returns the dict written: ``machine`` (object), the numbers listed in ``FIGURES``,
    ``peak_memory_mb`` and ``epoch_time_s`` (objects) and supporting figures.
    """
    out, dev = check_request(out, device=device, threads=threads, shards=shards, only=only)
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
    if only is not None:
        return _only_data(out, only, dev, shards, quick, threads, t_start, say, old_threads)
    try:
        with tempfile.TemporaryDirectory(prefix="comkd-bench-") as tmp, quiet():
            timings = _run_sections(res, Path(tmp), dev, sz, shards, quick, threads, say)
    finally:
        torch.set_num_threads(old_threads)
    if hasattr(os, "getloadavg"):
        res["machine"]["loadavg_1min_end"] = round(os.getloadavg()[0], 2)
    res["section_wall_s"] = timings
    res["wall_s"] = time.perf_counter() - t_start
    res = ordered(res)
    write_json(out, res)
    say("bench: wrote %s (%.0f s)", out, res["wall_s"])
    return res


#: the sections ``only`` runs alone
ONLY = {
    "data": "data path (shards vs folder, streamed epoch memory)",
    "eager": "the paper student's eager images/s by batch",
    "limits": "the machine's matmul peak and each figure's share of it",
    "ranks": "cache, warm start and evaluation: torchrun 2 ranks x 1 thread vs 1 process x 2 threads",
}


def _only_data(
    out: Path,
    only: str,
    dev: torch.device,
    shards: str | None,
    quick: bool,
    threads: int | None,
    t_start: float,
    say: Say,
    old_threads: int,
) -> dict[str, Any]:
    """One section alone, merged into the JSON already at ``out``: ``data`` (the data path),
    ``eager`` (the paper student's eager images/s by batch), ``limits`` (the matmul peak, and the
    utilisation of the figures already in ``out``) or ``ranks`` (the work around the loop under
    torchrun, ``benchmarks.ranks``)."""
    prev = _previous(out) if out.exists() else {}
    sz = QUICK if quick else FULL
    say("bench: %s ...", ONLY[only])
    try:
        if only == "data":
            part = _data_path(shards, quick, threads)
            part["data_path"]["machine"] = machine_info(dev)
            part["data_path"]["wall_s"] = time.perf_counter() - t_start
        elif only == "eager":
            part = bench_eager_scaling(sz, dev, sz.eager_batches)
        elif only == "ranks":
            part = bench_ranks(quick)
        else:
            part = limits_section(prev, dev, sz.peak_batch, sz.paper_image_size, sz.peak_min_s)
    finally:
        torch.set_num_threads(old_threads)
    if only != "data":  # where and when this section ran (the rest of ``out`` may be older)
        part[f"{only}_machine"] = {**machine_info(dev), "wall_s": time.perf_counter() - t_start}
    res = {**prev, **part}
    write_json(out, res)
    return res


def bench_out(out: str | Path) -> Path:
    """The file a bench writes for ``--out``: the name given, or ``bench.json`` inside an existing
    folder or a name without a suffix."""
    out = Path(out)
    return out / "bench.json" if out.is_dir() or not (out.suffix or out.exists()) else out


def check_request(
    out: str | Path,
    *,
    device: str = "auto",
    threads: int | None = None,
    shards: str | None = None,
    only: str | None = None,
    profile: str = "cpu",
    quick: bool = False,
) -> tuple[Path, torch.device]:
    """Check every option of a bench run before any work starts: a ``BenchError`` (one line naming
    the option) for a section, thread count, device, shard file or output path the run could not
    use, and for the full GPU check on a machine without a GPU. Returns the file to write and the
    device."""
    if profile not in ("cpu", "gpu"):
        raise BenchError(f"--profile: {profile!r} is not allowed; choose cpu or gpu")
    if only is not None and only not in ONLY:
        raise BenchError(f"--only: {only!r} is not a section; choose one of {', '.join(ONLY)}")
    if profile == "gpu" and (only is not None or shards is not None):
        which = "--only" if only is not None else "--shards"
        raise BenchError(
            f"{which}: belongs to the cpu profile; the GPU check (--profile gpu) has no sections"
        )
    if threads is not None and (isinstance(threads, bool) or int(threads) < 1):
        raise BenchError(f"--threads: must be a positive number of threads, got {threads}")
    try:
        dev = resolve_device(device)
    except ValueError as e:
        raise BenchError(f"--{e}" if str(e).startswith("device ") else f"--device: {e}") from None
    if profile == "gpu" and not quick and dev.type != "cuda":
        why = "no GPU is available" if not torch.cuda.is_available() else f"--device {device} is not a GPU"
        raise BenchError(
            f"--profile gpu: {why} (device {dev}); the GPU check needs a CUDA device "
            "(--quick runs its small form on any device)"
        )
    if shards is not None and only in (None, "data"):
        from comkd.data.errors import DataError
        from comkd.data.shards import expand_shards

        try:
            expand_shards(shards)
        except DataError as e:
            raise BenchError(f"--shards: {e}") from None
    path = bench_out(out)
    from comkd.fileio import file_problem

    problem = file_problem(path)
    if problem:
        raise BenchError(f"--out {out}: {problem}")
    if only is not None and path.exists():
        _previous(path)
    return path, dev


def _previous(out: Path) -> dict[str, Any]:
    """The bench JSON ``--only`` merges into; a file that is not one is a ``BenchError`` naming it."""
    try:
        prev = json.loads(out.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise BenchError(f"--out {out}: not a bench JSON to merge --only into ({type(e).__name__})") from None
    if not isinstance(prev, dict):
        raise BenchError(f"--out {out}: not a bench JSON to merge --only into (a {type(prev).__name__})")
    return prev


def _run_sections(
    res: dict[str, Any],
    work: Path,
    dev: torch.device,
    sz: BenchSizes,
    shards: str | None,
    quick: bool,
    threads: int | None,
    say: Say,
) -> dict[str, float]:
    """Build the fixtures, run each section and add its figures to ``res``; each section's wall
    time (s, rounded to 0.01)."""
    torch.manual_seed(0)
    teacher = create_teacher(TINY_TEACHER, device=dev)
    ds = digits(sz.items)
    w = teacher.class_text_features(ds.full_classnames)
    cache, res["cache_build_s_per_item_view"] = _teacher_cache(teacher, sz, dev, work)
    sections: list[tuple[str, Callable[[], dict]]] = [
        ("ComKD vs PromptKD step", lambda: bench_step_ratio(teacher, ds, w, sz, dev)),
        ("cache speedup, loop overhead", lambda: bench_cache_and_loop(teacher, ds, cache, w, sz, dev, work)),
        ("tiny-pair inference", lambda: bench_inference_tiny(teacher, w, sz, dev)),
        ("epoch-time scaling", lambda: bench_epoch_scaling(teacher, w, sz, dev, work)),
        ("paper-pair inference (ViT-L/14 vs ViT-B/16)", lambda: bench_inference_paper(sz, dev)),
        ("peak memory per stage", lambda: bench_peak_memory(dev, cache, sz, work)),
        (
            "deployed student: eager / TorchScript / ONNX Runtime (CPU)",
            lambda: bench_deployed_student(sz, work),
        ),
        ("data path: shards vs folder, streamed epoch memory", lambda: _data_path(shards, quick, threads)),
        (
            "machine limit: matmul peak and each paper-pair figure's share of it",
            lambda: limits_section(res, dev, sz.peak_batch, sz.paper_image_size, sz.peak_min_s),
        ),
    ]
    timings: dict[str, float] = {}
    for name, fn in sections:
        say("bench: %s ...", name)
        t0 = time.perf_counter()
        res.update(fn())
        timings[name] = round(time.perf_counter() - t0, 2)
    return timings


def _teacher_cache(teacher: Teacher, sz: BenchSizes, dev: torch.device, work: Path) -> tuple[Path, float]:
    """The teacher cache of the first ``sz.items`` digits images (one view) in ``work``, and its
    build time in seconds per item and view."""
    spec = create_student(TINY_STUDENT, teacher_dim=teacher.embed_dim).preprocess
    t0 = time.perf_counter()
    cache = build_teacher_cache(
        teacher,
        digits(sz.items),
        work / "teacher.tcache",
        views=1,
        seed=1,
        batch_size=64,
        device=dev,
        student_spec=spec,
        progress=False,
    )
    return cache, (time.perf_counter() - t0) / sz.items


def _data_path(shards: str | None, quick: bool, threads: int | None) -> dict[str, Any]:
    from .data_path import bench_data_path

    return bench_data_path(shards, quick=quick, threads=int(threads or 1))
