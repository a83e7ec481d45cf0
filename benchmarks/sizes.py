"""What the bench measures and how much work each measurement does: the figure and stage names
every bench JSON holds, the paper pair's model names, and the ``FULL`` / ``QUICK`` sizes.

Imports nothing heavy (no torch), so ``benchmarks`` can re-export these names cheaply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

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
    peak_batch: int = 8  # images in the matmul-peak GEMMs (rows = batch × tokens)
    eager_batches: tuple[int, ...] = (1, 8, 64)  # batch sizes of the eager-scaling figure
    peak_min_s: float = 0.5  # seconds each GEMM shape is repeated for


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
    peak_batch=2,
    eager_batches=(1, 2, 8),
    peak_min_s=0.05,
)


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
