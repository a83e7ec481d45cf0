"""Shared test helpers: argv lists for cheap tiny runs, subprocess environments, thread pinning,
and a toy task for the training loop."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from torch import nn

# `comkd distill` options for a cheap tiny student: one epoch on the embedded digits at 16 px.
TINY_DISTILL_OPTS = [
    "--student",
    "comkd-tiny-student",
    "--set",
    "data.image_size=16",
    "--set",
    "distill.optim.epochs=1",
    "--set",
    "distill.optim.warmup_epochs=0",
    "--set",
    "progress=false",
    "--no-evaluate",
]

# the tiny teacher and student at 16 px, quiet: for any stage command
TINY_MODEL_ARGS = [
    "--teacher",
    "comkd-tiny-teacher",
    "--student",
    "comkd-tiny-student",
    "--set",
    "data.image_size=16",
    "--set",
    "progress=false",
]

# a two-epoch tiny distillation in a subprocess, checkpointing every 5 steps (resume tests)
DISTILL_CMD = [
    sys.executable,
    "-m",
    "comkd.cli",
    "distill",
    "--teacher",
    "comkd-tiny-teacher",
    "--student",
    "comkd-tiny-student",
    "--epochs",
    "2",
    "--seed",
    "3",
    "--set",
    "data.image_size=16",
    "--set",
    "progress=false",
    "--set",
    "ckpt_every=5",
    "--set",
    "log_every=1",
]

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def subprocess_env(**extra: str) -> dict[str, str]:
    """This environment for a child process: one intra-op thread (a 2-core machine runs the
    suite), no torchrun variables inherited, and ``extra`` on top."""
    env = {k: v for k, v in os.environ.items() if k not in _TORCHRUN_VARS}
    return {**env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **extra}


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads, then restore the previous count."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models run as fast on one thread, and far steadier on a busy shared CPU."""
    with torch_threads(1):
        yield


# -- a toy task for the loop: a linear regression without batch statistics ---------------------
class ToyData(torch.utils.data.Dataset):
    """``(x [d], y, index)`` items, like the image datasets' ``(image, label, index)``."""

    def __init__(self, n: int = 64, dim: int = 5, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, dim, generator=g, dtype=torch.float64)
        self.y = self.x @ torch.arange(1.0, dim + 1, dtype=torch.float64) + 0.1 * torch.randn(
            n, generator=g, dtype=torch.float64
        )

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i], i


class ToyTask:
    """MSE of a linear model; ``noise`` multiplies predictions by draws from the global torch RNG
    (like dropout), so resume tests also check that the RNG stream is restored exactly;
    ``nan_at_step``: the loss is NaN from that call of ``step`` on."""

    name = "toy"

    def __init__(self, dim: int = 5, noise: bool = False, nan_at_step: int | None = None):
        g = torch.Generator().manual_seed(123)
        self.model = nn.Linear(dim, 1).double()
        with torch.no_grad():
            self.model.weight.copy_(torch.randn(1, dim, generator=g, dtype=torch.float64))
            self.model.bias.zero_()
        self.noise, self.nan_at_step, self.calls = noise, nan_at_step, 0
        self._wrapped: dict = {}

    def modules(self):
        return {"model": self.model}

    def parameter_groups(self):
        return [{"params": list(self.model.parameters())}]

    def wrap(self, wrapped):
        self._wrapped = wrapped

    def step(self, batch, epoch):
        x, y, _ = batch
        self.calls += 1
        pred = self._wrapped.get("model", self.model)(x).squeeze(-1)
        if self.noise:
            pred = pred * (1 + 0.1 * torch.rand(pred.shape, dtype=pred.dtype))
        loss = ((pred - y) ** 2).mean()
        if self.nan_at_step is not None and self.calls >= self.nan_at_step:
            loss = loss * float("nan")
        return {"loss": loss, "mae": (pred - y).abs().mean()}
