"""The config's rules that are more than a type: a method's teacher count, the classes each
protocol's teacher learns on, the seed range, method names and devices. Each takes the values it
checks (no import of ``comkd.config``), raises a one-line ``ConfigError`` naming the key, and is
called by the config's ``validate`` and again where a run sets a value itself."""

from __future__ import annotations

import copy
import os
from typing import Any, Literal

from .config_io import ConfigError
from .methods import METHODS, canonical_method, paper_kd_weight


def check_teacher_count(d: Any, prefix: str = "distill.", method: str | None = None) -> None:
    """A method of several teachers needs them: ``teacher``, then as many ``distill.extra_teachers``
    as its ``teachers`` count says (a method of fewer uses the first ones, or none). Checked on
    every config, and for each method of a run before any stage."""
    name = canonical_method(method or d.method)
    wanted, got = METHODS[name].teachers, len(d.extra_teachers)
    if got + 1 < wanted:
        raise ConfigError(
            f"{prefix}extra_teachers: method {name!r} distils from {wanted} teachers: `teacher` and "
            f"{wanted - 1} here, got {got}; e.g. distill.extra_teachers=[{{model: M, pretrained: W, prompts: P}}]"
        )


#: the classes each protocol's teacher learns its prompts on (``train_teacher.subsample``; unset: these),
#: as in PromptKD (base2novel: 16 shots of the base classes), and why
TEACHER_CLASSES: dict[str, Literal["base", "all"]] = {
    "base2novel": "base",
    "cross": "all",
    "dg": "all",
    "full": "all",
}
_WHY_TEACHER_CLASSES = {
    "base2novel": "learns on the base classes only (novel classes seen in stage 1 would inflate every novel "
    "and HM score)",
    "cross": "learns on all classes of the source dataset",
    "dg": "learns on all classes of the source dataset",
    "full": "learns on all of your classes",
}


def check_teacher_classes(cfg: Any, prefix: str = "") -> None:
    """Refuse a ``train_teacher.subsample`` other than the protocol's (``TEACHER_CLASSES``), in one
    line naming the key and the protocol; unset (null) is the protocol's."""
    need, got = TEACHER_CLASSES[cfg.protocol], cfg.train_teacher.subsample
    if got is None or got == need:
        return
    hint = " (the paper's ViT-L/14 -> ViT-B/16 pair: --config b2n_vitl14_vitb16)" if need == "base" else ""
    raise ConfigError(
        f"{prefix}train_teacher.subsample: {got!r} contradicts protocol {cfg.protocol}, whose teacher "
        f"{_WHY_TEACHER_CLASSES[cfg.protocol]}; set train_teacher.subsample={need} or leave it unset{hint}"
    )


def teacher_classes(cfg: Any) -> Literal["base", "all"]:
    """The classes stage 1 learns on: ``train_teacher.subsample``, or the protocol's when unset; a
    value that contradicts the protocol is refused (``check_teacher_classes``)."""
    check_teacher_classes(cfg)
    return cfg.train_teacher.subsample or TEACHER_CLASSES[cfg.protocol]


def check_seed(seed, key: str = "seed") -> None:
    """A seed numpy, torch and Python all take: an integer in [0, 2**32 - 1]."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ConfigError(f"{key}: must be an integer in [0, 2**32 - 1] (numpy's seed range), got {seed!r}")


def method_name(name: str, key: str) -> str:
    """The method table's spelling of ``name``; a one-line error listing the table's names."""
    try:
        return canonical_method(name)
    except ValueError:
        raise ConfigError(f"{key}: {name!r} is not allowed; choose one of {', '.join(METHODS)}") from None


def check_device(name: str, key: str) -> None:
    if name == "auto":  # checked without importing torch: a config error costs no 2-second import
        return
    import torch

    try:
        torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"{key}: {name!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None


def resolve_recipe(cfg: Any) -> Any:
    """A copy of ``cfg`` with every recipe default left unset filled with the value in effect:
    ``distill.kd_weight`` None -> ``comkd.methods.paper_kd_weight(data.dataset)``; ``distill.method``
    in the table's spelling; ``train_teacher.subsample`` None -> the protocol's classes
    (``TEACHER_CLASSES``); each sgd stage's ``warmup_epochs`` as cut to ``epochs - 1``; with Gaussian
    prompt averaging, ``train_teacher.gpa_mean``/``gpa_std`` in the stage's own epochs (``gpa_epochs``
    = its epochs). The stage runners save and use this copy, so ``config.yaml`` holds real values."""
    c = copy.deepcopy(cfg)
    c.distill.method = canonical_method(c.distill.method)
    for stage in (c.pretrain, c.train_teacher, c.distill):
        if stage.optim.optimizer == "sgd":
            stage.optim.warmup_epochs = stage.optim.sgd_warmup_epochs
    tt = c.train_teacher
    tt.subsample = teacher_classes(c)
    if tt.prompt_averaging == "gaussian":
        tt.gpa_mean, tt.gpa_std = tt.resolved_gpa()
        tt.gpa_epochs = tt.optim.epochs
    if c.distill.kd_weight is None:
        c.distill.kd_weight = paper_kd_weight(c.data.dataset)
    return c


def global_batch(o: Any, world: int) -> int:
    """Images one optimiser step of ``o`` (an ``OptimConfig``) takes over ``world`` processes:
    ``batch_size × grad_accum``, times ``world`` when ``batch_per: rank``."""
    return o.batch_size * o.grad_accum * (world if o.batch_per == "rank" else 1)


def lr_factor(o: Any, world: int) -> float:
    """What ``lr_scaling`` multiplies every lr of the stage by: (global batch / ``lr_base_batch``)
    for linear, its square root for sqrt, 1 for none. ``lr_base_batch`` 0 is ``batch_size ×
    grad_accum``, the batch the lr was set for (so one process, or ``batch_per: global``, gets 1)."""
    if o.lr_scaling == "none":
        return 1.0
    ratio = global_batch(o, world) / (o.lr_base_batch or o.batch_size * o.grad_accum)
    return ratio if o.lr_scaling == "linear" else ratio**0.5


def batch_note(o: Any, world: int) -> str:
    """What a stage's start line says of its batch: the global batch, how it splits over the
    processes, and the lr rule where one applies (``64 = 8 a process x 8, lr x 2.83 (sqrt rule)``)."""
    images = global_batch(o, world)
    note = str(images) + (f" = {images // world} a process x {world}" if world > 1 else "")
    if o.lr_scaling != "none":
        note += f", lr x {lr_factor(o, world):.3g} ({o.lr_scaling} rule)"
    return note


def check_batches_split(cfg: Any, stages: tuple[str, ...], world: int) -> None:
    """Each of ``stages``' global batch (``global_batch``) splits evenly over the run's ``world``
    processes, and stage 2 with the projector's BatchNorm in training mode gets at least 2 images a
    process, else a one-line ``ConfigError`` naming the key; checked before any heavy import (with
    torchrun's ``WORLD_SIZE``) and by each stage again."""
    for stage in stages:
        o = getattr(cfg, stage).optim
        images = global_batch(o, world)
        if images % world:
            raise ConfigError(
                f"{stage}.optim.batch_size: {o.batch_size} images a step (x grad_accum {o.grad_accum}) do not "
                f"split over the {world} processes of this run; use a multiple of {world} (the batch is global; "
                f"{stage}.optim.batch_per=rank makes it per process)"
            )
        if stage != "distill":
            continue
        st = resolve_recipe(cfg).student
        per_micro_batch = images // (world * o.grad_accum)
        if st.projector == "mlp" and st.projector_bn == "train" and per_micro_batch < 2:
            raise ConfigError(
                f"{stage}.optim.batch_size: {per_micro_batch} image a process per micro-batch over "
                f"{world} processes, but the projector's BatchNorm in training mode (student.projector_bn: train) "
                f"needs at least 2: raise the batch, or set {stage}.optim.batch_per=rank"
            )


def run_stages(cfg: Any) -> tuple[str, ...]:
    """The training stages a whole run (``comkd run`` / ``demo``) goes through."""
    return ("pretrain",) * bool(cfg.pretrain.enabled) + ("train_teacher", "distill")


def torchrun_world_size() -> int:
    """The processes torchrun started for this run (its ``WORLD_SIZE``; 1 outside torchrun)."""
    return max(1, int(os.environ.get("WORLD_SIZE", "1")))
