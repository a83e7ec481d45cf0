"""The optimiser of a stage and its learning-rate schedule (``OptimConfig``): SGD with PromptKD's
constant warm-up then per-epoch cosine, or AdamW with a per-step one-cycle cosine."""

from __future__ import annotations

import math

import torch

from ..config import OptimConfig


def lr_at(cfg: OptimConfig, base_lr: float, epoch: int, step_in_epoch: int, steps_per_epoch: int) -> float:
    """The learning rate of a step, derived from the position alone (nothing to checkpoint).

    ``sgd``: constant ``warmup_lr`` for ``warmup_epochs`` (w, at most ``epochs - 1``), then cosine stepped per epoch that
    restarts after the warm-up: epoch e >= w runs at ``½·lr·(1 + cos(π·(e − w)/E))``, E = ``epochs``
    (Dassl/PromptKD's ConstantWarmup + CosineAnnealingLR with ``WARMUP_RECOUNT``). ``adamw``: per-step linear warm-up
    over ``warmup_frac`` of the steps, then cosine to zero (one-cycle).
    """
    if cfg.optimizer == "sgd":
        w = cfg.sgd_warmup_epochs  # at most epochs - 1: a short schedule keeps one cosine epoch
        if epoch < w:  # a group with its own lr scales the warm-up value with it
            return cfg.warmup_lr * base_lr / cfg.lr
        return 0.5 * base_lr * (1 + math.cos(math.pi * (epoch - w) / cfg.epochs))
    total = cfg.epochs * steps_per_epoch
    t = epoch * steps_per_epoch + step_in_epoch
    warm = max(1, int(cfg.warmup_frac * total))
    if t < warm:
        return base_lr * (t + 1) / warm
    return 0.5 * base_lr * (1 + math.cos(math.pi * (t - warm) / max(1, total - warm)))


def build_optimizer(cfg: OptimConfig, groups: list[dict], lr_factor: float = 1.0) -> torch.optim.Optimizer:
    """SGD or AdamW over ``groups``, with the multi-tensor (``foreach``) update on every device: on
    a CPU it equals the default per-tensor loop bit for bit and is faster over many small tensors.
    ``lr_factor`` (``config_rules.lr_factor``: the batch rule) multiplies every group's lr."""
    for g in groups:
        g.setdefault("lr", cfg.lr * g.pop("lr_scale", 1.0))
        g["lr"] *= lr_factor  # exact when 1.0
        g["base_lr"] = g["lr"]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, foreach=True
        )
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
