"""One training loop for every stage (pre-training, teacher prompts, distillation).

A stage is a ``Task`` (``engine.tasks``): it owns its modules and turns a batch into named losses.
``fit`` adds what every stage needs: deterministic data order and augmented views from one seed
(``engine.sampling``), SGD/AdamW with the schedule of docs/method.md, "The optimisation recipe"
(``engine.schedule``), AMP where it works, gradient accumulation, DDP under torchrun, JSONL
metrics, progress bars, atomic checkpoints with exact mid-epoch resume (``engine.checkpoint``),
and a stop on a non-finite loss that keeps the last good checkpoint.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..config import OptimConfig
from .checkpoint import (
    check_checkpoint,
    check_resume_optim,
    keep_good_checkpoint,
    link_previous,
    load_checkpoint,
    optim_settings,
    restore_part,
    rng_state,
    set_rng_state,
    trainable_state,
)
from .sampling import EpochBatchSampler, StreamBatches
from .schedule import build_optimizer, lr_at
from .utils import (
    all_reduce_sum,
    amp_context,
    atomic_torch_save,
    barrier,
    is_main,
    show_progress,
    world_size,
)

if TYPE_CHECKING:
    from .tasks import Task

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the message names the step and the checkpoint kept."""


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)
    checkpoint: Path | None = None
    resumed_from: dict | None = None


LINE_EVERY_S = 60.0  # a log line at least this often inside a long epoch


def _say(line: str) -> None:
    """One progress line on stderr (a redirected run's log)."""
    import sys

    print(line, file=sys.stderr, flush=True)


def _terms(values: dict[str, float]) -> str:
    """``loss 0.1234 (kd 0.1, align 0.02)``: the loss first, then its named terms."""
    rest = ", ".join(f"{k} {v:.4g}" for k, v in values.items() if k != "loss")
    return f"loss {values.get('loss', float('nan')):.4g}" + (f" ({rest})" if rest else "")


def _elapsed(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s" if m else f"{seconds:.1f}s"


def _progress(total: int, desc: str, enabled: bool):
    if not show_progress(enabled):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, mininterval=0.5)


def fit(
    task: Task,
    dataset: Dataset,
    cfg: OptimConfig,
    *,
    out_dir: str | Path,
    seed: int,
    device: torch.device,
    metrics=None,
    resume: bool = False,
    log_every: int = 10,
    ckpt_every: int = 0,
    progress: bool = True,
    num_workers: int = 0,
    on_epoch_end: Callable[[int], dict] | None = None,
    stop_after_steps: int | None = None,
) -> FitResult:
    """Train ``task`` on ``dataset`` for ``cfg.epochs`` epochs.

    Checkpoints go to ``out_dir/checkpoint.pt`` (atomic; every epoch end and every ``ckpt_every``
    optimiser steps). With ``resume`` the run continues from that file mid-epoch, and its final
    state equals an uninterrupted run's with the same seed. ``on_epoch_end(epoch)`` may return
    evaluation metrics, logged with the epoch record. ``stop_after_steps`` ends the run early (tests).
    """
    out_dir = Path(out_dir)
    ckpt_path = out_dir / "checkpoint.pt"
    if is_main():  # temp files of a run killed mid-save
        for stray in [*out_dir.glob(".checkpoint.pt.tmp*"), *out_dir.glob(".checkpoint.prev.pt.tmp*")]:
            stray.unlink(missing_ok=True)
    mods = task.modules()
    ddp_mods: dict[str, nn.Module] = {}
    if world_size() > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        for k, m in mods.items():
            if any(p.requires_grad for p in m.parameters()):
                ddp_mods[k] = DDP(m, device_ids=[device.index] if device.type == "cuda" else None)
        task.wrap(ddp_mods)
    optimizer = build_optimizer(cfg, task.parameter_groups())
    autocast, use_scaler = amp_context(device, cfg.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)

    streaming = bool(getattr(dataset, "streaming", False))
    if streaming:  # the dataset streams itself (WebDataset shards): shuffled and split per rank
        sampler: EpochBatchSampler | StreamBatches = StreamBatches(
            dataset, cfg.batch_size * cfg.grad_accum, seed, num_workers, device.type == "cuda"
        )
    else:
        sampler = EpochBatchSampler(len(dataset), cfg.batch_size * cfg.grad_accum, seed)
    steps_per_epoch = sampler.num_batches()
    if steps_per_epoch == 0:
        raise ValueError(
            f"{task.name}: {len(dataset)} training images are fewer than one batch of "
            f"{cfg.batch_size * cfg.grad_accum}; lower the batch size"
        )
    result = FitResult()
    start_epoch, start_batch, global_step = 0, 0, 0
    # running sums of the epoch in progress: checkpointed so a resumed epoch's metrics equal an
    # uninterrupted run's (they average every batch of the epoch, not only those after the resume)
    sums: dict[str, torch.Tensor] = {}
    count = 0
    if resume and ckpt_path.exists():
        state = load_checkpoint(ckpt_path)
        if state.get("task") != task.name:
            raise ValueError(f"{ckpt_path} belongs to stage {state.get('task')!r}, not {task.name!r}")
        check_resume_optim(state.get("optim"), cfg, ckpt_path)
        check_checkpoint(state, ckpt_path, mods)  # every key, before anything is restored
        # the parts that can still fail first, the module weights (checked above) last
        restore_part(ckpt_path, "optimizer", lambda: optimizer.load_state_dict(state["optimizer"]))
        restore_part(ckpt_path, "scaler", lambda: scaler.load_state_dict(state["scaler"]))
        restore_part(ckpt_path, "rng", lambda: set_rng_state(state["rng"]))
        for k, m in mods.items():
            m.load_state_dict(state["modules"][k], strict=False)  # exactly its checkpointed keys
        if hasattr(task, "load_state_dict") and state.get("task_state") is not None:
            restore_part(ckpt_path, "task_state", lambda: task.load_state_dict(state["task_state"]))
        sums = {k: v.to(device) for k, v in state.get("sums", {}).items()}
        count = state.get("count", 0)
        start_epoch, start_batch, global_step = state["epoch"], state["batch"], state["global_step"]
        result.history = state["history"]
        result.resumed_from = {"epoch": start_epoch, "batch": start_batch, "global_step": global_step}
        if metrics is not None:
            metrics.truncate_after(task.name, global_step)
        if start_batch >= steps_per_epoch:
            start_epoch, start_batch = start_epoch + 1, 0
        if start_epoch >= cfg.epochs:
            log.warning(
                "%s: the run in %s already finished its %d epochs; nothing to train (--resume is a no-op)",
                task.name,
                out_dir,
                cfg.epochs,
            )
        else:
            log.info(
                "%s: resumed from %s at epoch %d batch %d", task.name, ckpt_path, start_epoch, start_batch
            )

    # the last two checkpoints' steps: a NaN found at a check may come from the weights of the
    # newest one (saved after the diverging update), so the one before it is kept too
    saved_steps: list[int] = [global_step] if result.resumed_from else []
    prev_path = ckpt_path.with_name("checkpoint.prev.pt")
    if not result.resumed_from and is_main():  # a fresh run keeps nothing of an earlier run's
        prev_path.unlink(missing_ok=True)

    def save(epoch: int, batch: int) -> None:
        if is_main():
            if saved_steps:  # the current file is this run's: keep it as the previous one
                link_previous(ckpt_path, prev_path)
            atomic_torch_save(
                {
                    "task": task.name,
                    "modules": {k: trainable_state(m) for k, m in mods.items()},
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(),
                    "rng": rng_state(),
                    "task_state": task.state_dict() if hasattr(task, "state_dict") else None,
                    "sums": {k: v.detach().cpu() for k, v in sums.items()} if batch else {},
                    "count": count if batch else 0,
                    "epoch": epoch,
                    "batch": batch,
                    "global_step": global_step,
                    "history": result.history,
                    "optim": optim_settings(cfg),
                },
                ckpt_path,
            )
        saved_steps[:] = [*saved_steps[-1:], global_step]
        barrier()

    def check_finite() -> None:
        step = _bad_step(bad_step)
        if step == -1:
            return
        kept = keep_good_checkpoint(ckpt_path, prev_path, saved_steps, step)
        where = f"optimiser step {step + 1}" if step >= 0 else "another process"
        raise NonFiniteLossError(
            f"{task.name}: the loss became NaN/inf at {where} (epoch {epoch + 1}); {kept}"
        )

    set_epoch = getattr(dataset, "set_epoch", None)
    # a log (stderr not a terminal) gets a line per epoch, and one a minute inside a long epoch
    lines = progress and is_main() and not show_progress(progress)
    t_fit, t_line = time.perf_counter(), time.perf_counter()
    lr_now = optimizer.param_groups[0]["lr"]
    for epoch in range(start_epoch, cfg.epochs):
        sampler.set_epoch(epoch, start_batch if epoch == start_epoch else 0)
        if set_epoch is not None:
            set_epoch(epoch)
        for m in mods.values():
            m.train()
        loader = (
            sampler
            if streaming
            else DataLoader(
                dataset,
                batch_sampler=sampler,
                num_workers=num_workers,
                pin_memory=device.type == "cuda",
                persistent_workers=False,
                # own generator: creating the iterator must not draw from the global torch RNG, or a
                # resumed run (one extra iterator per resume) would see a shifted RNG stream
                generator=torch.Generator().manual_seed(seed * 100_003 + epoch),
            )
        )
        if epoch != start_epoch or start_batch == 0:
            sums, count = {}, 0
        bad_step = torch.full((), -1, dtype=torch.long, device=device)
        bar = _progress(len(sampler), f"{task.name} {epoch + 1}/{cfg.epochs}", progress and is_main())
        t0 = time.perf_counter()
        batch_idx = sampler.start_batch
        for batch in loader:
            for g in optimizer.param_groups:
                g["lr"] = lr_at(cfg, g["base_lr"], epoch, batch_idx, steps_per_epoch)
            lr_now = optimizer.param_groups[0]["lr"]  # the main group's (others may be scaled)
            optimizer.zero_grad(set_to_none=True)
            micro = _split(batch, cfg.grad_accum)
            for mb in micro:
                mb = _to_device(mb, device)
                with autocast:
                    losses = task.step(mb, epoch)
                loss = losses["loss"] / len(micro)
                scaler.scale(loss).backward()
                finite = torch.isfinite(losses["loss"].detach())
                bad_step = torch.where(
                    (~finite) & (bad_step < 0), torch.full_like(bad_step, global_step), bad_step
                )
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0) + v.detach().float() / len(micro)
            if cfg.grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(
                    [p for g in optimizer.param_groups for p in g["params"]], cfg.grad_clip
                )
            scaler.step(optimizer)
            scaler.update()
            global_step += 1
            batch_idx += 1
            count += 1
            if bar is not None:
                bar.update(1)
            at_log = global_step % log_every == 0
            at_ckpt = ckpt_every and global_step % ckpt_every == 0
            if at_log or at_ckpt or batch_idx == steps_per_epoch:
                check_finite()
            if at_log:
                # running means of the epoch so far, averaged over the ranks (all ranks take part)
                means = {
                    k: float(all_reduce_sum(v.to(device))) / (count * world_size()) for k, v in sums.items()
                }
            if at_log and metrics is not None and is_main():
                rec = {"stage": task.name, "epoch": epoch, "step": global_step, "lr": lr_now}
                rec.update(means)
                rec.update(task.extra_metrics() if hasattr(task, "extra_metrics") else {})
                metrics.log(rec)
                if bar is not None:
                    bar.set_postfix(loss=f"{rec['loss']:.4f}")
            if at_ckpt and batch_idx < steps_per_epoch:
                save(epoch, batch_idx)
            if lines and time.perf_counter() - t_line >= LINE_EVERY_S and batch_idx < steps_per_epoch:
                t_line = time.perf_counter()
                _say(
                    f"{task.name} epoch {epoch + 1}/{cfg.epochs} batch {batch_idx}/{steps_per_epoch}: "
                    f"{_terms({k: float(v) / count for k, v in sums.items()})}, lr {lr_now:.3g}, "
                    f"{count * cfg.batch_size * cfg.grad_accum / (t_line - t0):.1f} images/s, "
                    f"{_elapsed(t_line - t_fit)} elapsed"
                )
            if stop_after_steps is not None and global_step >= stop_after_steps:
                if bar is not None:
                    bar.close()
                return result
        if bar is not None:
            bar.close()
        n = all_reduce_sum(torch.tensor(float(count), device=device))
        epoch_rec = {
            "stage": task.name,
            "type": "epoch",
            "epoch": epoch,
            "step": global_step,
            "world_size": world_size(),
        }
        for k, v in sums.items():
            epoch_rec[k] = float(all_reduce_sum(v.to(device)) / n) if count else float("nan")
        epoch_rec["time_s"] = time.perf_counter() - t0
        epoch_rec.update(task.extra_metrics() if hasattr(task, "extra_metrics") else {})
        if on_epoch_end is not None:
            epoch_rec.update(on_epoch_end(epoch) or {})
        result.history.append(epoch_rec)
        if lines:
            t_line = time.perf_counter()
            terms = {k: v for k, v in epoch_rec.items() if k in sums}
            _say(
                f"{task.name} epoch {epoch + 1}/{cfg.epochs}: {_terms(terms)}, lr {lr_now:.3g}, "
                f"{count * cfg.batch_size * cfg.grad_accum / max(epoch_rec['time_s'], 1e-9):.1f} images/s, "
                f"{_elapsed(t_line - t_fit)} elapsed"
            )
        if metrics is not None and is_main():
            metrics.log(epoch_rec)
        save(epoch + 1, 0)
        start_batch = 0
    result.checkpoint = ckpt_path
    return result


def _bad_step(bad_step: torch.Tensor) -> int:
    """The first step (0-based) since the last check whose loss was non-finite; -1 if none, -2 if
    only another process saw one (one sync per check)."""
    step = int(bad_step.item())
    if world_size() > 1:
        any_bad = all_reduce_sum(torch.tensor(float(step >= 0), device=bad_step.device))
        if float(any_bad) > 0 and step < 0:
            step = -2
    return step


def _split(batch: Any, parts: int) -> list[Any]:
    if parts == 1:
        return [batch]
    if isinstance(batch, (list, tuple)):
        chunks = [torch.chunk(b, parts) if torch.is_tensor(b) else [b] * parts for b in batch]
        return [type(batch)(c[i] for c in chunks) for i in range(parts)]
    return list(torch.chunk(batch, parts))


def _to_device(batch: Any, device: torch.device) -> Any:
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device) for b in batch)
    return batch
