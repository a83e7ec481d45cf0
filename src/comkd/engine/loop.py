"""One training loop for every stage: a ``Task`` (``engine.tasks``) turns a batch into named losses;
``fit`` adds the seeded data order (``engine.sampling``), the schedule of docs/method.md, "The
optimisation recipe" (``engine.schedule``), AMP, accumulation, DDP, metrics, checkpoints with exact
mid-epoch resume (``engine.checkpoint``) and the stop on a non-finite loss."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader

from ..config import OptimConfig
from ..config_rules import batch_note, global_batch, lr_factor
from ..data.contract import TrainingDataset
from .checkpoint import (
    DiskFullError,
    check_checkpoint,
    check_resume_optim,
    disk_full_message,
    is_disk_full,
    keep_good_checkpoint,
    link_previous,
    load_checkpoint,
    optim_settings,
    restore_part,
    rng_state,
    set_rng_state,
    trainable_state,
)
from .runplan import plan_note
from .sampling import EpochBatchSampler, StreamBatches, batch_to, epoch_loader, split_batch
from .schedule import build_optimizer, lr_at
from .speed import SpeedSwitches
from .utils import (
    all_agree,
    all_reduce_sum,
    amp_context,
    atomic_torch_save,
    barrier,
    first_bad_step,
    is_main,
    progress_bar,
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
    print(line, file=sys.stderr, flush=True)


def _terms(values: dict[str, float]) -> str:
    """``loss 0.1234 (kd 0.1, align 0.02)``: the loss first, then its named terms."""
    rest = ", ".join(f"{k} {v:.4g}" for k, v in values.items() if k != "loss")
    return f"loss {values.get('loss', float('nan')):.4g}" + (f" ({rest})" if rest else "")


def _elapsed(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s" if m else f"{seconds:.1f}s"


def fit(
    task: Task,
    dataset: TrainingDataset,
    cfg: OptimConfig,
    *,
    out_dir: str | Path,
    seed: int,
    device: torch.device,
    metrics=None,
    resume: bool = False,
    log_every: int = 10,
    ckpt_every: int = 0,
    ckpt_interval_s: float = 0.0,
    progress: bool = True,
    num_workers: int = 0,
    persistent_workers: bool = False,
    on_epoch_end: Callable[[int], dict] | None = None,
    stop_after_steps: int | None = None,
) -> FitResult:
    """Train ``task`` on ``dataset`` for ``cfg.epochs`` epochs.

    Checkpoints go to ``out_dir/checkpoint.pt`` (atomic; every epoch end and every ``ckpt_every``
    optimiser steps; an epoch end less than ``ckpt_interval_s`` seconds after the last checkpoint
    is skipped, except the last epoch's). With ``resume`` the run continues from that file
    mid-epoch, and its final state equals an uninterrupted run's with the same seed. ``on_epoch_end(epoch)`` may return
    evaluation metrics, logged with the epoch record. ``stop_after_steps`` ends the run early (tests).
    """
    run = _Trainer(
        task, dataset, cfg, Path(out_dir), seed, device, metrics, progress, num_workers, persistent_workers
    )
    if resume and run.ckpt_path.exists():
        run.restore()
    run.start()
    run.speed.apply()
    try:
        for epoch in range(run.start_epoch, cfg.epochs):
            for batch in run.batches(epoch):
                run.step(batch, epoch)
                run.after_step(epoch, log_every, ckpt_every)
                if stop_after_steps is not None and run.global_step >= stop_after_steps:
                    run.close_bar()
                    return run.result
            run.end_epoch(epoch, on_epoch_end, ckpt_interval_s)
    finally:
        run.speed.restore()
    run.result.checkpoint = run.ckpt_path
    return run.result


class _Trainer:
    """The state of one ``fit`` (modules, optimiser, sampler, counters, epoch sums, checkpoint files)."""

    def __init__(
        self,
        task,
        dataset,
        cfg: OptimConfig,
        out_dir: Path,
        seed,
        device,
        metrics,
        progress,
        num_workers,
        persistent_workers: bool,
    ):
        self.task, self.dataset, self.cfg, self.out_dir = task, dataset, cfg, out_dir
        self.seed, self.device, self.metrics = seed, device, metrics
        self.progress, self.num_workers = progress, num_workers
        # workers kept across epochs (map-style data only: a stream is re-split every epoch)
        self.persistent = persistent_workers and num_workers > 0 and not dataset.streaming
        self.loader: DataLoader | None = None
        self.ckpt_path = out_dir / "checkpoint.pt"
        self.prev_path = self.ckpt_path.with_name("checkpoint.prev.pt")
        if is_main():  # temp files of a run killed mid-save
            for stray in [*out_dir.glob(".checkpoint.pt.tmp*"), *out_dir.glob(".checkpoint.prev.pt.tmp*")]:
                stray.unlink(missing_ok=True)
        self.mods = task.modules()
        self.ddp: list[Any] = []  # the DDP wrappers (under torchrun), for no_sync
        if world_size() > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [device.index] if device.type == "cuda" else None
            wrapped = {
                k: DDP(m, device_ids=ids)
                for k, m in self.mods.items()
                if any(p.requires_grad for p in m.parameters())
            }
            task.wrap(wrapped)
            self.ddp = list(wrapped.values())
        # the global batch of a step, and the lr rule for it (config_rules: batch_per, lr_scaling)
        self.per_step = per_step = global_batch(cfg, world_size())
        self.lr_factor = lr_factor(cfg, world_size())
        self.optimizer = build_optimizer(cfg, task.parameter_groups(), self.lr_factor)
        self.autocast, use_scaler = amp_context(device, cfg.amp)
        self.scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
        self.speed = SpeedSwitches(cfg, task, device, self.autocast)
        if dataset.streaming:  # the dataset streams itself (WebDataset shards): shuffled and split per rank
            self.sampler: EpochBatchSampler | StreamBatches = StreamBatches(
                dataset, per_step, seed, num_workers, device.type == "cuda"
            )
        else:
            self.sampler = EpochBatchSampler(len(dataset), per_step, seed)
        self.steps_per_epoch = self.sampler.num_batches()
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{task.name}: {len(dataset)} training images are fewer than one batch of {per_step}; "
                "lower the batch size"
            )
        self.result = FitResult()
        self.start_epoch, self.start_batch, self.global_step = 0, 0, 0
        # running sums of the epoch in progress: checkpointed (summed over the ranks) so a resumed epoch's
        # metrics equal an uninterrupted run's (they average every batch of the epoch, not only those after)
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.bar = None

    # -- checkpoints -----------------------------------------------------------------------
    def restore(self) -> None:
        """Continue from ``checkpoint.pt``: every key checked before anything is restored."""
        task, path = self.task, self.ckpt_path
        state = load_checkpoint(path)
        if state.get("task") != task.name:
            raise ValueError(f"{path} belongs to stage {state.get('task')!r}, not {task.name!r}")
        check_resume_optim(state.get("optim"), self.cfg, path, self._run_settings())
        check_checkpoint(state, path, self.mods)
        # the parts that can still fail first, the module weights (checked above) last
        restore_part(path, "optimizer", lambda: self.optimizer.load_state_dict(state["optimizer"]))
        restore_part(path, "scaler", lambda: self.scaler.load_state_dict(state["scaler"]))
        restore_part(path, "rng", lambda: set_rng_state(state["rng"]))
        for k, m in self.mods.items():
            m.load_state_dict(state["modules"][k], strict=False)  # exactly its checkpointed keys
        if hasattr(task, "load_state_dict") and state.get("task_state") is not None:
            restore_part(path, "task_state", lambda: task.load_state_dict(state["task_state"]))
        # the epoch so far, summed over every rank when saved: rank 0 carries it, the others restart
        self.sums = {k: v.to(self.device) for k, v in state.get("sums", {}).items()} if is_main() else {}
        self.count = state.get("count", 0) if is_main() else 0
        self.start_epoch, self.start_batch = state["epoch"], state["batch"]
        self.global_step = state["global_step"]
        self.result.history = state["history"]
        self.result.resumed_from = {k: state[k] for k in ("epoch", "batch", "global_step")}
        if self.metrics is not None:
            self.metrics.truncate_after(task.name, self.global_step)
        if self.start_batch >= self.steps_per_epoch:
            self.start_epoch, self.start_batch = self.start_epoch + 1, 0
        if self.start_epoch >= self.cfg.epochs:
            log.warning(
                "%s: the run in %s already finished its %d epochs; nothing to train (--resume is a no-op)",
                task.name,
                self.out_dir,
                self.cfg.epochs,
            )
        else:
            log.info(
                "%s: resumed from %s at epoch %d batch %d",
                task.name,
                path,
                self.start_epoch,
                self.start_batch,
            )

    def start(self) -> None:
        # the last two checkpoints' steps: a NaN found at a check may come from the weights of the
        # newest one (saved after the diverging update), so the one before it is kept too
        self.saved_steps: list[int] = [self.global_step] if self.result.resumed_from else []
        if not self.result.resumed_from and is_main():  # a fresh run keeps nothing of an earlier run's
            self.prev_path.unlink(missing_ok=True)
        # a log (stderr not a terminal) gets a line a minute inside a long epoch, where a terminal
        # has its bar; both get a header and a line per epoch that stays (with the time left)
        self.lines = self.progress and is_main() and not show_progress(self.progress)
        self.epoch_lines = bool(self.progress) and is_main()
        self.t_fit = self.t_line = self.t_saved = time.perf_counter()
        self.first_epoch = self.start_epoch
        self.lr_now = self.optimizer.param_groups[0]["lr"]
        if self.epoch_lines and self.start_epoch < self.cfg.epochs:
            resumed = f", resumed at epoch {self.start_epoch + 1}" if self.result.resumed_from else ""
            plan = plan_note()  # a whole run's part and overall time left (comkd run / demo)
            _say(
                f"== {self.task.name}: {self.cfg.epochs} epochs of {self.steps_per_epoch} steps "
                f"(batch {batch_note(self.cfg, world_size())}){resumed} -> {self.out_dir}"
                + (f"\n   {plan}" if plan else "")
            )

    def save(self, epoch: int, batch: int) -> None:
        # mid-epoch: the epoch's running sums over every rank (a collective: every rank saves)
        sums, count = self._totals() if batch else ({}, 0)
        if is_main():
            had_previous, task = self.ckpt_path.exists(), self.task
            try:
                if self.saved_steps:  # the current file is this run's: keep it as the previous one
                    link_previous(self.ckpt_path, self.prev_path)
                state = {
                    "task": task.name,
                    "modules": {k: trainable_state(m) for k, m in self.mods.items()},
                    "optimizer": self.optimizer.state_dict(),
                    "scaler": self.scaler.state_dict(),
                    "rng": rng_state(),
                    "task_state": task.state_dict() if hasattr(task, "state_dict") else None,
                    "sums": {k: v.detach().cpu() for k, v in sums.items()},
                    "count": int(count),
                    "epoch": epoch,
                    "batch": batch,
                    "global_step": self.global_step,
                    "history": self.result.history,
                    "optim": {**optim_settings(self.cfg), **self._run_settings()},
                }
                atomic_torch_save(state, self.ckpt_path)
            except Exception as e:  # a full disk: one line; the atomic write left the old file in place
                if not is_disk_full(e):
                    raise
                raise DiskFullError(disk_full_message(self.ckpt_path, had_previous)) from None
        self.t_saved = time.perf_counter()
        self.saved_steps[:] = [*self.saved_steps[-1:], self.global_step]
        barrier()

    def _totals(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The running sums and step count of the epoch in progress, summed over the ranks (a collective)."""
        sums = {k: all_reduce_sum(v.to(self.device)) for k, v in self.sums.items()}
        return sums, all_reduce_sum(torch.tensor(float(self.count), device=self.device))

    def check_finite(self, epoch: int) -> None:
        step = first_bad_step(self.bad_step)
        if step == -1:
            return
        kept = keep_good_checkpoint(self.ckpt_path, self.prev_path, self.saved_steps, step)
        where = f"optimiser step {step + 1}" if step >= 0 else "another process"
        raise NonFiniteLossError(
            f"{self.task.name}: the loss became NaN/inf at {where} (epoch {epoch + 1}); {kept}"
        )

    # -- one epoch ---------------------------------------------------------------------------
    def batches(self, epoch: int):
        """The epoch's batches (a resumed epoch skips those already trained); resets the epoch state."""
        first = self.start_batch if epoch == self.start_epoch else 0
        self.sampler.set_epoch(epoch, first)
        self.dataset.set_epoch(epoch)
        for m in self.mods.values():
            m.train()
        if first == 0:
            self.sums, self.count = {}, 0
        self.bad_step = torch.full((), -1, dtype=torch.long, device=self.device)
        desc = f"{self.task.name} {epoch + 1}/{self.cfg.epochs}"
        self.bar = progress_bar(len(self.sampler), desc, self.progress and is_main(), leave=False)
        self.t0 = time.perf_counter()
        self.batch_idx = self.sampler.start_batch
        if self.dataset.streaming:
            return self.sampler
        if self.loader is None or not self.persistent:  # persistent: one loader for the stage
            self.loader = epoch_loader(
                self.dataset,
                self.sampler,
                num_workers=self.num_workers,
                pin=self.device.type == "cuda",
                seed=self.seed,
                epoch=epoch,
                persistent=self.persistent,
            )
        return self.loader

    def step(self, batch, epoch: int) -> None:
        """One optimiser step: the schedule's lr, ``grad_accum`` micro-batches, clipping, the update."""
        cfg, opt = self.cfg, self.optimizer
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, g["base_lr"], epoch, self.batch_idx, self.steps_per_epoch)
        self.lr_now = opt.param_groups[0]["lr"]  # the main group's (others may be scaled)
        opt.zero_grad(set_to_none=True)
        micro = split_batch(batch, cfg.grad_accum)
        for j, mb in enumerate(micro):
            mb = batch_to(mb, self.device)
            with ExitStack() as hold:
                if j < len(micro) - 1:  # DDP all-reduces the gradients once, after the last micro-batch
                    for m in self.ddp:
                        hold.enter_context(m.no_sync())
                with self.autocast:
                    losses = self.task.step(mb, epoch)
                self.scaler.scale(losses["loss"] / len(micro)).backward()
            finite = torch.isfinite(losses["loss"].detach())
            self.bad_step.masked_fill_((~finite) & (self.bad_step < 0), self.global_step)
            for k, v in losses.items():
                self.sums[k] = self.sums.get(k, 0) + v.detach().float() / len(micro)
        if cfg.grad_clip:
            self.scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], cfg.grad_clip)
        self.scaler.step(opt)
        self.scaler.update()
        self.global_step += 1
        self.batch_idx += 1
        self.count += 1
        if self.bar is not None:
            self.bar.update(1)

    def after_step(self, epoch: int, log_every: int, ckpt_every: int) -> None:
        """The NaN check, the step record, a mid-epoch checkpoint and the minute line, when due."""
        at_log = self.global_step % log_every == 0
        at_ckpt = ckpt_every and self.global_step % ckpt_every == 0
        inside = self.batch_idx < self.steps_per_epoch
        if at_log or at_ckpt or not inside:
            self.check_finite(epoch)
        if at_log:
            sums, n = self._totals()  # running means of the epoch so far, over the ranks
            means = {k: float(v) / float(n) for k, v in sums.items()}
            if self.metrics is not None and is_main():
                rec = {"stage": self.task.name, "epoch": epoch, "step": self.global_step, "lr": self.lr_now}
                rec.update(means)
                rec.update(self.task.extra_metrics() if hasattr(self.task, "extra_metrics") else {})
                self.metrics.log(rec)
                if self.bar is not None:
                    self.bar.set_postfix(loss=f"{rec['loss']:.4f}")
        if at_ckpt and inside:
            self.save(epoch, self.batch_idx)
        if self.lines and time.perf_counter() - self.t_line >= LINE_EVERY_S and inside:
            self.t_line = time.perf_counter()
            _say(
                f"{self.task.name} epoch {epoch + 1}/{self.cfg.epochs} batch {self.batch_idx}/{self.steps_per_epoch}: "
                f"{_terms({k: float(v) / self.count for k, v in self.sums.items()})}, lr {self.lr_now:.3g}, "
                f"{self._images_per_s(self.t_line - self.t0):.1f} images/s, "
                f"{_elapsed(self.t_line - self.t_fit)} elapsed"
            )

    def _images_per_s(self, seconds: float) -> float:
        return self.count * self.per_step / max(seconds, 1e-9)

    def _run_settings(self) -> dict[str, Any]:
        return {"global_batch": self.per_step, "lr_factor": self.lr_factor}

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def end_epoch(
        self, epoch: int, on_epoch_end: Callable[[int], dict] | None, ckpt_interval_s: float
    ) -> None:
        """The epoch record (means over the ranks, the task's metrics, ``on_epoch_end``'s), its
        log line, and the epoch-end checkpoint when due (the last epoch's always)."""
        self.close_bar()
        task = self.task
        sums, n = self._totals()
        rec = {
            "stage": task.name,
            "type": "epoch",
            "epoch": epoch,
            "step": self.global_step,
            "world_size": world_size(),
            "batch": self.per_step,
        }
        rec.update({k: float(v / n) if self.count else float("nan") for k, v in sums.items()})
        rec["time_s"] = time.perf_counter() - self.t0
        rec.update(task.extra_metrics() if hasattr(task, "extra_metrics") else {})
        if on_epoch_end is not None:
            rec.update(on_epoch_end(epoch) or {})
        self.result.history.append(rec)
        if self.epoch_lines:
            self.t_line = time.perf_counter()
            terms = {k: v for k, v in rec.items() if k in self.sums}
            spent, run_epochs = self.t_line - self.t_fit, epoch + 1 - self.first_epoch
            left = self.cfg.epochs - epoch - 1
            eta = f", about {_elapsed(spent / run_epochs * left)} left" if left else ""
            _say(
                f"{task.name} epoch {epoch + 1}/{self.cfg.epochs}: {_terms(terms)}, lr {self.lr_now:.3g}, "
                f"{self._images_per_s(rec['time_s']):.1f} images/s, {_elapsed(spent)} elapsed{eta}"
            )
        if self.metrics is not None and is_main():
            self.metrics.log(rec)
        # every rank decides alike: rank 0's clock, sent to the others (save() holds a barrier)
        due = (
            epoch + 1 == self.cfg.epochs
            or ckpt_interval_s <= 0
            or all_agree(time.perf_counter() - self.t_saved >= ckpt_interval_s, self.device)
        )
        if due:
            self.save(epoch + 1, 0)
        self.start_batch = 0
