"""The shared inputs of the measurements: the digits distillation set, seeded tiny students,
distillation tasks, the optimiser config, one timed ``fit`` epoch, a bare optimiser step on one
pre-loaded batch, and the filter that drops open_clip's 'no pretrained weights' warnings."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from comkd.config import OptimConfig
from comkd.data import build_dataset, build_transform
from comkd.data.dataset import ImageDataset
from comkd.engine.loop import fit
from comkd.engine.tasks import DistillTask
from comkd.engine.utils import amp_context
from comkd.losses import build_loss
from comkd.methods import method_spec
from comkd.models import TINY_STUDENT, Student, create_student


def digits(
    items: int, view_seed: int = 1, split: str = "train", repeat: int = 1, image_size: int = 32
) -> ImageDataset:
    """The first ``items`` digits images of ``split`` (unlabelled, train transform at
    ``image_size`` px), the list repeated ``repeat`` times (``items * repeat`` samples)."""
    ds = build_dataset(
        "digits",
        split=split,
        train_transform=build_transform(image_size, train=True),
        view_seed=view_seed,
        unlabelled=True,
    )
    ds.data = (ds.data[:items]) * repeat
    return ds


def tiny_student(
    teacher_dim: int, method: str, device: torch.device, model: str = TINY_STUDENT, **kw: Any
) -> Student:
    """A student for ``method`` (its EduAttention setting), seeded with 0 so every call builds the
    same weights."""
    torch.manual_seed(0)
    return create_student(
        model,
        teacher_dim=teacher_dim,
        edu_attention=method_spec(method)["edu_attention"],
        device=device,
        **kw,
    )


def distill_task(student: Student, outputs, w: torch.Tensor, s_t: float, method: str) -> DistillTask:
    """``method``'s distillation task; ``w`` (C, D) class text features, ``s_t`` the teacher's
    logit scale, ``outputs`` the teacher outputs (online or cached)."""
    student.set_text_features(w)
    return DistillTask(student, outputs, w, s_t, build_loss(method))


def optim_config(batch: int, epochs: int = 1) -> OptimConfig:
    """The default optimiser at ``batch`` for ``epochs`` epochs, no warm-up."""
    return OptimConfig(epochs=epochs, warmup_epochs=0, batch_size=batch)


def fit_epoch_time(task: DistillTask, ds: ImageDataset, batch: int, device: torch.device, out: Path) -> float:
    """Seconds of one ``fit`` epoch (``time_s`` of its record: data, steps, logging; no checkpoint)."""
    res = fit(task, ds, optim_config(batch), out_dir=out, seed=1, device=device, progress=False, log_every=10)
    return float(res.history[-1]["time_s"])


class BareStep:
    """The same task and optimiser as ``fit``, on one pre-loaded batch, in a tight loop."""

    def __init__(self, task: DistillTask, batch: tuple, device: torch.device, lr: float = 0.005):
        self.task, self.device = task, device
        self.batch = tuple(b.to(device) for b in batch)
        cfg = optim_config(1)
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


def first_batch(ds: ImageDataset, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first ``n`` samples of epoch 0: images (n, 3, H, W), labels (n,), indices (n,)."""
    ds.set_epoch(0)
    items = [ds[i] for i in range(n)]
    return (
        torch.stack([x for x, _, _ in items]),
        torch.tensor([y for _, y, _ in items]),
        torch.tensor([i for _, _, i in items]),
    )


class NoRandomWeightWarnings(logging.Filter):
    """Drops open_clip's 'No pretrained weights loaded' records."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")


@contextmanager
def quiet():
    """Drop open_clip's 'no pretrained weights' warnings (the bench uses random weights on purpose)."""
    f = NoRandomWeightWarnings()
    logging.getLogger().addFilter(f)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(f)
