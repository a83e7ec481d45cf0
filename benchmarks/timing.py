"""Timing and counting primitives of the bench: device sync, medians, FLOPs of one call, and
interleaved timed repetitions (seconds, ``time.perf_counter``)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work on ``device`` (a no-op elsewhere), so a timer sees it finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(xs: list[float]) -> float:
    """The median of ``xs`` as a float."""
    return float(statistics.median(xs))


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn``: ``torch.utils.flop_counter.FlopCounterMode``, 2 per multiply-add
    of every matrix product and convolution (forward and, where ``fn`` runs one, backward);
    norms, softmax, activations and other elementwise ops count nothing.

    Attention is counted whatever kernel would run: while counting, ``nn.MultiheadAttention``'s
    inference fast path is off (its fused native op is invisible to the counter, input and output
    projections included) and ``scaled_dot_product_attention`` runs its math backend (the
    counter has no formula for the CPU fused kernel), so QK^T and AV count as the matmuls they are.
    Both settings are restored afterwards; ``fn`` runs once, so it is a warm-up of the math path,
    not of the kernels a timed call uses."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
            fn()
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return int(fc.get_total_flops())


def time_interleaved(
    fns: dict[str, Callable[[], Any]], reps: int, device: torch.device, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds of each call of each function, ``reps`` per function, calls alternating between
    the functions (so load changes on a shared machine hit all alike)."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            sync(device)
            times[k].append(time.perf_counter() - t0)
    return times
