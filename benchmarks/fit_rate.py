"""The GPU check's ``fit`` section: stage-2 images/s through ``comkd.engine.loop.fit`` itself (its
sampler, loader, pinned copies, autocast, loss bookkeeping; online teacher), at the GPU preset's
batch and at a full batch, plain and with the loop's speed switches (``optim.compile``,
``hold_frozen_dtype``, ``tf32``).

The rate is read from the loop's own steps: the time between the start of its second step and
the start of its last (each start waits for the device), so the first step (warm-up, and the
compilation under ``optim.compile``) is not in it; ``first_step_s`` is that first step.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch


class RandomImages(torch.utils.data.Dataset):
    """``n`` random ``size``-px images in host memory as ``(image, -1, index)``, with the members of
    the dataset contract the loop reads (no views to draw)."""

    streaming = False

    def __init__(self, n: int, size: int):
        self.x = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))

    def set_epoch(self, epoch: int) -> None:
        pass

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], -1, i


def _one(sz, dev: torch.device, teacher, student, w, batch: int, switches: bool) -> dict[str, Any]:
    from comkd.config import OptimConfig
    from comkd.engine.loop import fit
    from comkd.engine.tasks import DistillTask, TeacherOutputs
    from comkd.losses import build_loss

    from .timing import sync

    student.train()
    task = DistillTask(
        student,
        TeacherOutputs(teacher, student.preprocess),
        w,
        float(teacher.logit_scale),
        build_loss("comkd"),
    )
    starts: list[float] = []
    step = task.step

    def timed(b, epoch):
        sync(dev)
        starts.append(time.perf_counter())
        return step(b, epoch)

    task.step = timed
    n_steps = sz.steps + 2
    optim = OptimConfig(
        epochs=1,
        batch_size=batch,
        lr=1e-6,
        warmup_epochs=0,
        compile=switches,
        hold_frozen_dtype=switches,
        tf32=switches,
    )
    with tempfile.TemporaryDirectory(prefix="comkd-gpu-fit-") as d:
        fit(
            task,
            RandomImages(batch * n_steps, sz.image_size),
            optim,
            out_dir=Path(d),
            seed=0,
            device=dev,
            progress=False,
            stop_after_steps=n_steps,
        )
    sync(dev)
    steps = len(starts) - 2
    seconds = starts[-1] - starts[1]
    return {
        "batch": batch,
        "images_per_s": batch * steps / seconds,
        "first_step_s": starts[1] - starts[0],
        "steps_timed": steps,
    }


def fit_rates(sz, dev: torch.device, teacher, student, w, comp) -> dict[str, Any]:
    """``preset_batch`` / ``full_batch`` (plain), then ``*_switches`` (compile, frozen tower held
    in the autocast dtype, TF32); the compiled ones skipped as ``comp`` (``gpu_check._Compile``)
    says. Plain first: ``optim.compile`` compiles the modules in place."""
    out: dict[str, Any] = {}
    for switches in (False, True):
        for label, batch in (("preset_batch", sz.preset_batch), ("full_batch", sz.batch)):
            key = label + ("_switches" if switches else "")
            why = comp.skip() if switches else None
            if why is not None:
                out[key] = {"skipped": why}
                continue
            try:
                out[key] = _one(sz, dev, teacher, student, w, batch, switches)
            except Exception as e:  # noqa: BLE001 - recorded, not raised: the check goes on
                out[key] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            if switches:
                comp.spent(out[key].get("first_step_s", 0.0))
    return out
