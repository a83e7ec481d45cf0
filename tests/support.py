"""Helpers the tests import (``from support import ...``): argv lists for cheap tiny runs,
subprocess environments, thread pinning, tiny teacher and student files, and a toy task for the
training loop. The fixtures built on them live in conftest.py."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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


# -- shared tiny models on disk ------------------------------------------------------------------
def write_tiny_student(
    path: Path, classnames: list[str], *, seed: int = 0, alpha: float | None = None
) -> Path:
    """A tiny (undistilled) student file: ``comkd-tiny-student`` at 16 px against a 32-d teacher,
    a random unit-norm W over ``classnames``; ``alpha`` sets EduAttention's gate."""
    from comkd.models import create_student
    from comkd.models.io import save_student

    torch.manual_seed(seed)
    s = create_student("comkd-tiny-student", None, teacher_dim=32, image_size=16)
    s.set_text_features(torch.nn.functional.normalize(torch.randn(len(classnames), 32), dim=-1), classnames)
    if alpha is not None:
        with torch.no_grad():
            s.edu_attention.alpha.fill_(alpha)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_student(s, path)
    return path


def write_tiny_teacher(folder: Path, tag: str, seed: int) -> tuple[Path, Path]:
    """Weights and prompts files of a random ``comkd-tiny-teacher`` (16 px) drawn with ``seed``:
    ``folder/teacher_<tag>.safetensors`` and ``folder/prompts_<tag>.safetensors``."""
    from safetensors.torch import save_file

    from comkd.models import create_teacher, load_clip, save_clip_weights

    torch.manual_seed(seed)
    m = load_clip("comkd-tiny-teacher", None, image_size=16)
    weights, prompts = folder / f"teacher_{tag}.safetensors", folder / f"prompts_{tag}.safetensors"
    save_clip_weights(m.model, weights, m.name, m.config)
    t = create_teacher("comkd-tiny-teacher", str(weights), image_size=16)
    save_file({k: v.contiguous() for k, v in t.prompt_state_dict().items()}, str(prompts))
    return weights, prompts


# -- a toy task for the loop: a linear regression without batch statistics ---------------------
class ToyData(torch.utils.data.Dataset):
    """``(x [d], y, index)`` items, like the image datasets' ``(image, label, index)``; the members
    of the dataset contract the loop reads (items by index, no views to draw)."""

    streaming = False

    def set_epoch(self, epoch: int) -> None:
        pass

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


class EpochToyData(ToyData):
    """``ToyData`` whose items move with the epoch (``x + epoch``), as augmented views do: a loader
    whose workers missed ``set_epoch`` would yield the wrong ones."""

    epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, i: int):
        x, y, i = super().__getitem__(i)
        return x + self.epoch, y, i


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


# -- bad input: a one-line error ---------------------------------------------------------------
#: the quiet 16-px settings of the tiny towers, as --set values
TINY_SETS = ["progress=false", "data.image_size=16"]


def one_line_error(r, *names: str, code: int = 1) -> None:
    """``r`` (a CliRunner result) failed with exit ``code``, no traceback, and a first error line
    naming each of ``names``."""
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output
    err = [x for x in r.output.splitlines() if x.startswith(("error:", "config error:"))]
    assert err, r.output
    for n in names:
        assert n in err[0], (n, err[0])


def demo_student_file(folder: Path, names: list[str]) -> tuple[Path, Any]:
    """``folder/student.safetensors``: the demo preset's (undistilled) student against a 32-d
    teacher, a random W over ``names``; and that preset's config."""
    from comkd.config import load_config
    from comkd.engine.builders import build_student
    from comkd.models.io import save_student

    cfg = load_config("demo")
    student = build_student(cfg, 32, "cpu")
    student.set_text_features(torch.nn.functional.normalize(torch.randn(len(names), 32), dim=-1), names)
    path = folder / "student.safetensors"
    save_student(student, path)
    return path, cfg


def resave_student(src, dst, drop=(), meta_edit=None, keep_digest: bool = True) -> None:
    """Write ``src``'s tensors and metadata to ``dst`` without the ``drop`` tensors, with
    ``meta_edit(meta)``'s keys updated, and without the digest unless ``keep_digest``."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from comkd.models.io import STUDENT_DIGEST_KEY

    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
    sd = {k: v for k, v in load_file(str(src)).items() if k not in drop}
    if meta_edit:
        meta.update(meta_edit(meta))
    if not keep_digest:
        meta.pop(STUDENT_DIGEST_KEY)
    save_file(sd, str(dst), metadata=meta)


def run_model(res: dict, model: str) -> dict:
    """A one-dataset, one-seed run's ``results.json``: what scoring ``model`` gave (``details``)."""
    (models,) = res["details"].values()
    (one,) = models[model]
    return one
