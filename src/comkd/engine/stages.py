"""Stage runners: each takes a ``RunConfig`` and a run folder, and writes the folder's files
(``config.yaml``, ``metrics.jsonl``, ``checkpoint.pt``, weights, ``results.json``). Each holds the
folder's run lock while it runs, and a fresh run does not overwrite a finished one's weights or
results unless called with ``overwrite=True`` (``comkd.runlock.locked_run``)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
import yaml

from ..config import SECTION_ALIASES, ConfigError, RunConfig, load_config, save_config, to_dict
from ..config_io import at_least, flat_keys
from ..config_rules import check_batches_split, resolve_recipe
from ..data import promptsrc_templates
from ..fileio import atomic_path
from ..models import save_clip_weights
from ..models.identity import teacher_sources
from ..runlock import locked_run
from .builders import (
    STUDENT_CLIP,
    TEACHER_CLIP,
    TEACHER_PROMPTS,
    build_student,
    build_teacher,
    load_role_clip,
    make_dataset,
)
from .checkpoint import SPEED_SETTINGS
from .evaluation import clip_zero_shot, pretrain_eval_split
from .lit import fit_ridge, lock_towers, set_logit_scale
from .loop import fit
from .self_training import self_train
from .tasks import PretrainTask, TeacherPromptTask, gaussian_epoch_weights
from .utils import (
    MetricsLog,
    barrier,
    check_shared_folder,
    init_distributed,
    is_main,
    launched_world_size,
    resolve_device,
    seed_everything,
    write_json,
)

log = logging.getLogger(__name__)


def start_stage(
    cfg: RunConfig, out_dir: str | Path, resume: bool, stage: str | None = None
) -> tuple[Path, torch.device, MetricsLog]:
    if stage is not None:  # before the group is joined: a refused batch leaves no rank waiting
        check_batches_split(cfg, (stage,), launched_world_size())
    init_distributed()
    out = Path(out_dir)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    if resume and stage is not None:
        _check_resume_config(cfg, out / "config.yaml", stage)
    check_shared_folder(out)  # every rank reads what rank 0 writes here: refused at once if it cannot
    if is_main():
        out.mkdir(parents=True, exist_ok=True)
        save_config(resolve_recipe(cfg), out / "config.yaml")  # the recipe values in effect
        if not resume:  # a fresh run does not inherit an earlier run's records
            (out / "metrics.jsonl").unlink(missing_ok=True)
    tb = out / "tensorboard" if cfg.tensorboard else None
    return out, device, MetricsLog(out / "metrics.jsonl", enabled=is_main(), tensorboard_dir=tb)


# settings a resumed run may change: where it runs and what it prints, not what it computes
RESUME_FREE = frozenset(
    {
        "device",
        "output_dir",
        "protocol",
        "eval_split",
        "log_every",
        "ckpt_every",
        "ckpt_interval_s",
        "keep_checkpoints",
        "tensorboard",
        "progress",
    }
)
RESUME_FREE_KEYS = frozenset(
    {"data.num_workers", "data.persistent_workers", "data.eval_batch_size"}
)  # and OPTIM_SPEED_KEYS
#: each stage's precision and speed switches: a resumed run may change them
OPTIM_SPEED_KEYS = tuple(f".optim.{k}" for k in SPEED_SETTINGS)


def _check_resume_config(cfg: RunConfig, path: Path, stage: str) -> None:
    """``--resume`` with any setting that changes what ``stage`` (a config section) computes other
    than the run's (its ``config.yaml``) is refused before ``config.yaml`` is rewritten, so it never
    claims settings not in effect. Compared: the seed and every other top-level setting except
    ``RESUME_FREE``, the data, teacher and student sections, and the stage's own section (its
    method, loss weights, recipe values, optimiser, augmentation); other stages' sections are not.
    The message names the first key that differs."""
    if not path.is_file():
        return
    try:
        old = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not readable YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(old, dict):
        raise ConfigError(f"{path}: not a comkd config (a mapping of settings)")
    earlier = [k for k, v in SECTION_ALIASES.items() if v == stage]  # a run saved under an earlier key
    if stage not in old:
        old = {**old, stage: next((old[k] for k in earlier if k in old), None) or {}}
    now = yaml.safe_load(yaml.safe_dump(to_dict(resolve_recipe(cfg)), sort_keys=False))
    sections = {"data", "teacher", "student", stage}
    stage_names = {"pretrain", "train_teacher", "distill", "full"}

    def compared(d: dict) -> dict[str, Any]:
        keep = {
            k: v
            for k, v in d.items()
            if k not in RESUME_FREE and (k in sections or (k not in stage_names and not isinstance(v, dict)))
        }
        flat = flat_keys(keep)
        return {
            k: v for k, v in flat.items() if k not in RESUME_FREE_KEYS and not k.endswith(OPTIM_SPEED_KEYS)
        }

    saved, current = compared(old), compared(now)
    for k, v in current.items():
        if k in saved and saved[k] != v:
            raise ConfigError(
                f"--resume: {k} is {v!r} now but the run in {path.parent} was started with "
                f"{saved[k]!r}; resume with the same settings or start a new run in another folder"
            )


#: what a whole run (``comkd run --resume``) may change: the stage list less what scores the rows
#: (protocol, eval_split), plus the teacher check's warning settings
RUN_RESUME_FREE_KEYS = (RESUME_FREE - {"protocol", "eval_split"}) | RESUME_FREE_KEYS
RUN_RESUME_FREE_KEYS |= {"distill.teacher_margin", "distill.require_teacher_ahead"}


def check_resume_run(cfg: RunConfig, path: Path) -> None:
    """``comkd run --resume``: every setting that changes a result (data, test set, classes, seed,
    method settings, recipe, every stage's section) is compared with the run's ``config.yaml``
    before any stage is skipped, so no row is read back from a run made with other settings. The
    message names the first key that differs."""
    if not path.is_file():
        return
    try:
        old = load_config(path)
    except ConfigError as e:
        raise ConfigError(f"--resume: {path} is not a config this run can be compared with ({e})") from None

    def flat(c: RunConfig) -> dict[str, Any]:
        d = flat_keys(yaml.safe_load(yaml.safe_dump(to_dict(resolve_recipe(c)), sort_keys=False)))
        return {
            k: v for k, v in d.items() if k not in RUN_RESUME_FREE_KEYS and not k.endswith(OPTIM_SPEED_KEYS)
        }

    saved, current = flat(old), flat(cfg)
    for k, v in current.items():
        if saved.get(k) != v:
            raise ConfigError(
                f"--resume: {k} is {v!r} now but the run in {path.parent} was made with {saved.get(k)!r}; "
                "its finished rows would be read back from the old setting: resume with the run's "
                "settings, or start a new run in another folder"
            )


def fit_kwargs(cfg: RunConfig, out: Path, device: torch.device, metrics: MetricsLog, resume: bool) -> dict:
    """``fit``'s keyword arguments for a stage of ``cfg``: the settings it shares by name with the
    config (top level and ``data``) and the stage's folder, device, metrics log and ``resume``."""
    run = {k: getattr(cfg, k) for k in ("seed", "log_every", "ckpt_every", "ckpt_interval_s", "progress")}
    data = {k: getattr(cfg.data, k) for k in ("num_workers", "persistent_workers")}
    return {"out_dir": out, "device": device, "metrics": metrics, "resume": resume, **run, **data}


@locked_run(results=("results.json", TEACHER_CLIP, STUDENT_CLIP))
def run_pretrain(
    cfg: RunConfig,
    out_dir: str | Path,
    *,
    which: tuple[str, ...] = ("teacher", "student"),
    resume: bool = False,
    pool: RunConfig | None = None,
) -> dict[str, Any]:
    """Stage 0: contrastively train the teacher and/or student CLIP on the labelled pretrain split
    (``pretrain.lock``: with towers frozen, LiT; ``pretrain.fit: ridge``: the image projection in
    closed form, ``comkd.engine.lit``).
    Writes ``teacher_clip.safetensors`` / ``student_clip.safetensors`` and their zero-shot
    accuracy on ``pretrain_eval_split(cfg)``. With ``pretrain.self_train_rounds`` and ``pool`` (a
    config whose ``train`` split is unlabelled images of the same classes) the teacher then
    self-trains on that pool (``comkd.engine.self_training``)."""
    out, device, metrics = start_stage(cfg, out_dir, resume, stage="pretrain")
    results: dict[str, Any] = {}
    eval_split = pretrain_eval_split(cfg)
    p = cfg.pretrain
    if p.self_train_rounds and pool is None and "teacher" in which:
        log.warning(
            "pretrain.self_train_rounds: no unlabelled pool given (comkd run --protocol full has one); no self-training"
        )

    def train(loaded, ds, name: str, lr: float | None, frozen, optim, seed: int, sub: Path) -> None:
        task = PretrainTask(loaded.model, loaded.tokenizer, ds.classnames, ds.templates, lr=lr, frozen=frozen)
        task.name = name
        seed_everything(seed)
        fit(task, ds, optim, **fit_kwargs(cfg, sub, device, metrics, resume))

    for role in which:
        loaded = load_role_clip(cfg, role, device)
        sub = out / role
        split = (p.teacher_split if role == "teacher" else p.student_split) or p.split
        shots = p.teacher_shots if role == "teacher" else p.student_shots
        name = f"pretrain_{role}"
        frozen = lock_towers(loaded.model, p.lock)
        if p.fit == "ridge":  # closed form: no steps, no checkpoint
            ds = make_dataset(cfg, split, loaded.preprocess, train=False, shots=shots)
            fitted = fit_ridge(
                loaded.model, loaded.tokenizer, ds, p.ridge_lambda, device, cfg.data.eval_batch_size
            )
            metrics.log({"stage": name, "type": "ridge", "lambda": p.ridge_lambda, **fitted})
        else:
            ds = make_dataset(cfg, split, loaded.preprocess, train=True, augment=p.augment, shots=shots)
            lr = p.teacher_lr if role == "teacher" else p.student_lr
            epochs = p.teacher_epochs if role == "teacher" else p.student_epochs
            optim = dataclasses.replace(p.optim, epochs=epochs) if epochs else p.optim
            train(loaded, ds, name, lr, frozen, optim, cfg.seed, sub)
        if p.logit_scale is not None:
            set_logit_scale(loaded.model, p.logit_scale)
        rounds: list[dict] = []
        if role == "teacher" and p.self_train_rounds and pool is not None:

            def train_round(
                rds, r: int, epochs: int, loaded=loaded, lr=lr, sub=sub, optim=optim, frozen=frozen
            ) -> None:
                name = f"pretrain_teacher_self_train_{r}"
                optim = dataclasses.replace(optim, epochs=epochs)
                train(loaded, rds, name, lr, frozen, optim, cfg.seed + r, sub / f"self_train_{r}")

            rounds = self_train(cfg, pool, loaded, ds, train_round, device)
        path = out / (TEACHER_CLIP if role == "teacher" else STUDENT_CLIP)
        if is_main():
            save_clip_weights(loaded.model, path, loaded.name, loaded.config)
        barrier()
        test = make_dataset(cfg, eval_split, loaded.preprocess, train=False)
        acc = clip_zero_shot(loaded, cfg, test, ds.templates, device)
        results[role] = {
            "weights": str(path),
            "zero_shot_acc": acc,
            "eval_split": eval_split,
            "pool": split,
            "pool_images": len(ds),
        }
        if rounds:
            results[role]["self_training"] = rounds
        metrics.log({"stage": name, "type": "eval", "split": eval_split, "acc": acc})
        log.info("pretrain %s: zero-shot %s acc %.2f%%", role, eval_split, acc)
    if is_main():
        write_json(out / "results.json", {"stage": "pretrain", **results})
    return results


# -- stage 1 -----------------------------------------------------------------------------------
@locked_run(results=(TEACHER_PROMPTS,))
def run_train_teacher(cfg: RunConfig, out_dir: str | Path, *, resume: bool = False) -> dict[str, Any]:
    """Stage 1: PromptSRC prompt learning on ``num_shots`` labelled shots of the base classes
    (``train_teacher.subsample``). Writes ``teacher_prompts.safetensors``."""
    from safetensors.torch import save_file

    out, device, metrics = start_stage(cfg, out_dir, resume, stage="train_teacher")
    teacher = build_teacher(cfg, device, prompts="")
    tt = cfg.train_teacher
    ds = make_dataset(
        cfg,
        "train",
        teacher.preprocess,
        train=True,
        subsample=tt.subsample,
        few_shot=True,
        augment=tt.augment,
    )
    templates = promptsrc_templates() if tt.text_templates == "promptsrc" else ds.templates
    gaussian = tt.prompt_averaging == "gaussian"  # Gaussian prompt aggregation's epoch weights, when on
    weights = gaussian_epoch_weights(tt.optim.epochs, *tt.resolved_gpa()) if gaussian else None
    task = TeacherPromptTask(
        teacher, ds.classnames, templates, tt.text_l1_weight, tt.image_l1_weight, tt.kl_weight, weights
    )
    fit(task, ds, tt.optim, **fit_kwargs(cfg, out, device, metrics, resume), on_epoch_end=task.on_epoch_end)
    if (averaged := task.averaged_prompts()) is not None:
        teacher.load_prompts(averaged)
    path = out / TEACHER_PROMPTS
    if is_main():
        with atomic_path(path) as tmp:
            save_file(
                {k: v.contiguous().cpu() for k, v in teacher.prompt_state_dict().items()},
                str(tmp),
                metadata={"comkd.teacher_model": cfg.teacher.model},
            )
    barrier()
    return {"prompts": str(path), "train_images": len(ds), "classes": ds.classnames}


# no --resume: a cache is rebuilt whole, the same for the same seed; a folder holding one is refused
# unless overwrite=True
@locked_run(results=("teacher_cache.bin",))
def run_cache_teacher(
    cfg: RunConfig, out_dir: str | Path, *, views: int | None = None, dtype: str = "float16"
) -> dict[str, Any]:
    """Store the teacher's image features for ``views`` augmented views (default: one per
    distillation epoch) of every ``distill.split`` image in ``out_dir/teacher_cache.bin``; then
    ``distill --teacher-cache`` with the same seed never runs the teacher."""
    from .cache_build import build_teacher_cache  # looked up at call time (tests replace it)

    k = views if views is not None else cfg.distill.optim.epochs
    at_least(k, 1, "views")
    if dtype not in ("float16", "bfloat16", "float32"):
        raise ConfigError(f"dtype: {dtype!r} is not allowed; choose one of float16, bfloat16, float32")
    out, device, _ = start_stage(cfg, out_dir, resume=False)
    teacher = build_teacher(cfg, device)
    student = build_student(cfg, teacher.embed_dim, device)
    ds = make_dataset(
        cfg, cfg.distill.split, student.preprocess, train=True, unlabelled=True, augment=cfg.distill.augment
    )
    path = build_teacher_cache(
        teacher,
        ds,
        out / "teacher_cache.bin",
        views=k,
        seed=cfg.seed,
        batch_size=cfg.data.eval_batch_size,
        device=device,
        dtype=getattr(torch, dtype),
        student_spec=student.preprocess,
        num_workers=cfg.data.num_workers,
        sources=teacher_sources(cfg.teacher.pretrained, cfg.teacher.prompts),
        progress=cfg.progress,
    )
    return {"cache": str(path), "views": k, "images": len(ds), "seed": cfg.seed}
