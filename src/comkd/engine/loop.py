"""One training loop for every stage (pre-training, teacher prompts, distillation).

A stage is a ``Task``: it owns its modules and turns a batch into named losses. ``fit`` adds what
every stage needs: deterministic data order and augmented views (from one seed), SGD/AdamW with
the schedule of docs/method.md ("The optimisation recipe"), AMP where it works, gradient accumulation, DDP under torchrun,
JSONL metrics, progress bars, atomic checkpoints, exact mid-epoch resume, and a stop on a
non-finite loss that keeps the last good checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from ..config import OptimConfig
from ..fileio import temp_path
from .utils import (
    all_reduce_sum,
    amp_context,
    atomic_torch_save,
    barrier,
    is_main,
    rank,
    show_progress,
    world_size,
)

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the message names the step and the checkpoint kept."""


class Task(Protocol):
    """A training stage: modules to train and how a batch becomes named losses."""

    name: str

    def modules(self) -> dict[str, nn.Module]:
        """Modules whose trainable state is checkpointed (and wrapped by DDP when distributed)."""

    def parameter_groups(self) -> list[dict]:
        """Optimiser parameter groups (``{"params": [...], "lr": ...}``; lr optional)."""

    def step(self, batch: Any, epoch: int) -> dict[str, torch.Tensor]:
        """Named losses of one batch; ``loss`` is back-propagated."""


# -- schedule ----------------------------------------------------------------------------------
def lr_at(cfg: OptimConfig, base_lr: float, epoch: int, step_in_epoch: int, steps_per_epoch: int) -> float:
    """The learning rate of a step, derived from the position alone (nothing to checkpoint).

    ``sgd``: constant ``warmup_lr`` for ``warmup_epochs`` (w), then cosine stepped per epoch that
    restarts after the warm-up: epoch e >= w runs at ``½·lr·(1 + cos(π·(e − w)/E))``, E = ``epochs``
    (Dassl/PromptKD's ConstantWarmup + CosineAnnealingLR with ``WARMUP_RECOUNT``). ``adamw``: per-step linear warm-up
    over ``warmup_frac`` of the steps, then cosine to zero (one-cycle).
    """
    if cfg.optimizer == "sgd":
        if epoch < cfg.warmup_epochs:  # a group with its own lr scales the warm-up value with it
            return cfg.warmup_lr * base_lr / cfg.lr
        return 0.5 * base_lr * (1 + math.cos(math.pi * (epoch - cfg.warmup_epochs) / cfg.epochs))
    total = cfg.epochs * steps_per_epoch
    t = epoch * steps_per_epoch + step_in_epoch
    warm = max(1, int(cfg.warmup_frac * total))
    if t < warm:
        return base_lr * (t + 1) / warm
    return 0.5 * base_lr * (1 + math.cos(math.pi * (t - warm) / max(1, total - warm)))


# -- data order --------------------------------------------------------------------------------
class EpochBatchSampler(Sampler[list[int]]):
    """Seeded per-epoch shuffling into global batches; each rank takes its slice of every batch.

    The order depends only on (seed, epoch), so a resumed run skips ``start_batch`` batches and
    sees exactly the batches an uninterrupted run would. Global batches are ``batch_size`` items
    (the last, short batch is dropped, as PromptKD's loader does) split evenly over the ranks.
    """

    def __init__(self, n: int, batch_size: int, seed: int, shuffle: bool = True, drop_last: bool = True):
        ws = world_size()
        if batch_size % ws:
            raise ValueError(f"global batch size {batch_size} is not divisible by the {ws} processes")
        self.n, self.batch_size, self.seed, self.shuffle, self.drop_last = (
            n,
            batch_size,
            seed,
            shuffle,
            drop_last,
        )
        self.epoch, self.start_batch = 0, 0
        self.rank, self.world = rank(), ws

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def num_batches(self) -> int:
        return self.n // self.batch_size if self.drop_last else math.ceil(self.n / self.batch_size)

    def __len__(self) -> int:
        return self.num_batches() - self.start_batch

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        per_rank = self.batch_size // self.world
        for b in range(self.start_batch, self.num_batches()):
            batch = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield (
                batch[self.rank * per_rank : (self.rank + 1) * per_rank]
                if len(batch) == self.batch_size
                else batch
            )


class StreamBatches:
    """The batches of a streaming dataset (``streaming = True``, e.g. ``WdsImageDataset``) with the
    interface of ``EpochBatchSampler``: the dataset shuffles and splits itself over the ranks
    (``training_stream``); this rebatches what the loader workers yield into exact per-rank batches
    of ``batch_size / world`` and stops after ``len(dataset) // batch_size`` global batches (the
    last, short one dropped, as ``EpochBatchSampler`` does), so every rank takes the same number of
    steps. A resumed epoch re-reads the stream and skips ``start_batch`` batches: the stream's
    order depends only on (seed, epoch), so it sees the batches an uninterrupted run would."""

    def __init__(
        self, dataset: Any, batch_size: int, seed: int, num_workers: int = 0, pin_memory: bool = False
    ):
        ws = world_size()
        if batch_size % ws:
            raise ValueError(f"global batch size {batch_size} is not divisible by the {ws} processes")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.per_rank = batch_size // ws
        self.stream = dataset.training_stream(rank(), ws, seed)
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch
        self.stream.set_epoch(epoch)

    def num_batches(self) -> int:
        return len(self.dataset) // self.batch_size

    def __len__(self) -> int:
        return self.num_batches() - self.start_batch

    def __iter__(self) -> Iterator[Any]:
        loader = DataLoader(
            self.stream,
            batch_size=self.per_rank,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=False,
        )
        pending: Any = None  # samples carried over from short worker batches (a tuple of tensors)
        b = 0
        for part in loader:  # workers' batches end short at their last shard: re-cut to per_rank
            if pending is not None:
                part = type(part)(torch.cat([x, y]) for x, y in zip(pending, part, strict=True))
            start = 0
            while len(part[0]) - start >= self.per_rank and b < self.num_batches():
                if b >= self.start_batch:  # a full batch from one worker passes through unsliced
                    whole = start == 0 and len(part[0]) == self.per_rank
                    yield part if whole else type(part)(t[start : start + self.per_rank] for t in part)
                start += self.per_rank
                b += 1
            if b >= self.num_batches():
                return
            pending = type(part)(t[start:] for t in part) if start < len(part[0]) else None
        if b < self.num_batches():
            raise RuntimeError(
                f"the stream of {self.dataset!r} ended after {b} of {self.num_batches()} batches"
            )


# -- checkpoints -------------------------------------------------------------------------------
class CheckpointError(ValueError):
    """A checkpoint that cannot be read safely; the message names the file."""


def load_checkpoint(path: str | Path) -> dict:
    """Read a training checkpoint as data only (``weights_only=True``: tensors, numbers, strings,
    containers). A file that would need code to unpickle, or a truncated/empty one, is refused
    with a one-line error naming it; nothing in it is executed."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure becomes one line naming the file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"cannot resume from {path}: not a readable comkd checkpoint (loaded as data only, "
            f"nothing executed): {first[:200]}"
        ) from None
    if not isinstance(state, dict) or "task" not in state:
        raise CheckpointError(f"cannot resume from {path}: not a comkd training checkpoint")
    return state


# settings a resumed run must share with its checkpoint (amp may change with the device)
_RESUME_FREE = ("amp",)


def optim_settings(cfg: OptimConfig) -> dict[str, Any]:
    """The optimiser and schedule settings a checkpoint records (plain values)."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _RESUME_FREE}


def check_resume_optim(saved: dict | None, cfg: OptimConfig, path: Path) -> None:
    """Refuse to resume with optimiser or schedule settings other than the checkpoint's: the
    resumed run would follow neither recipe while its config claimed one."""
    if saved is None:  # a checkpoint from before the settings were recorded
        return
    now = optim_settings(cfg)
    diff = [f"{k} {saved.get(k)!r} in the checkpoint, {now[k]!r} now" for k in now if saved.get(k) != now[k]]
    if diff:
        raise CheckpointError(
            f"cannot resume from {path}: optimiser/schedule settings differ ({'; '.join(diff)}); "
            "resume with the checkpoint's settings or start a new run in another folder"
        )


_CHECKPOINT_KEYS: dict[str, type | tuple[type, ...]] = {
    "modules": dict,
    "optimizer": dict,
    "scaler": dict,
    "rng": dict,
    "epoch": int,
    "batch": int,
    "global_step": int,
    "history": list,
}


def check_checkpoint(state: dict, path: Path, mods: dict[str, nn.Module]) -> None:
    """Refuse a checkpoint that would not restore this run exactly, before anything is restored:
    every key present with its type, the epoch/batch/step non-negative, and each module's saved
    tensors exactly the ones it checkpoints (``trainable_state``: none missing, none extra, same
    shapes) and finite. Each failure is one ``CheckpointError`` line naming the file and the key."""
    for key, kind in _CHECKPOINT_KEYS.items():
        v = state.get(key)
        if not isinstance(v, kind) or isinstance(v, bool):
            got = "missing" if key not in state else f"a {type(v).__name__}"
            raise CheckpointError(f"cannot resume from {path}: key {key!r} is {got}, not a {kind.__name__}")
        if kind is int and v < 0:
            raise CheckpointError(f"cannot resume from {path}: key {key!r} is {v}, not a count")
    for name, module in mods.items():
        saved = state["modules"].get(name)
        if not isinstance(saved, dict):
            raise CheckpointError(f"cannot resume from {path}: no weights of {name!r} (modules.{name})")
        want = trainable_state(module)
        missing = sorted(set(want) - set(saved))
        extra = sorted(set(saved) - set(want))
        if missing or extra:
            which, keys = ("lacks", missing) if missing else ("has unknown", extra)
            raise CheckpointError(
                f"cannot resume from {path}: modules.{name} {which} {len(keys)} tensor(s) "
                f"(e.g. {keys[0]!r}); it was written by another model or method"
            )
        for k, ref in want.items():
            t = saved[k]
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(ref.shape):
                got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise CheckpointError(
                    f"cannot resume from {path}: modules.{name}.{k} is {got}, this run has {list(ref.shape)}"
                )
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise CheckpointError(f"cannot resume from {path}: modules.{name}.{k} holds NaN/inf")


def _restore(path: Path, key: str, fn: Callable[[], Any]) -> None:
    """Run one restore step; its failure (a damaged or foreign state) is one line naming the key."""
    try:
        fn()
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"cannot resume from {path}: its {key!r} state does not fit this run: {first}"
        ) from None


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The state a checkpoint needs: everything except the frozen parts a module declares in
    ``frozen_prefixes`` (trainable parameters under those prefixes, such as prompts, are kept)."""
    frozen = tuple(getattr(module, "frozen_prefixes", ()))
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    return {
        k: v.detach().cpu().clone()
        for k, v in module.state_dict().items()
        if not (frozen and k.startswith(frozen)) or k in trainable
    }


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)
    checkpoint: Path | None = None
    resumed_from: dict | None = None


def _rng_state() -> dict:
    """Every RNG state as tensors and plain Python values, so checkpoints load with
    ``weights_only=True`` (no pickled NumPy objects)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    st = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    n = st["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _build_optimizer(cfg: OptimConfig, groups: list[dict]) -> torch.optim.Optimizer:
    for g in groups:
        g.setdefault("lr", cfg.lr * g.pop("lr_scale", 1.0))
        g["base_lr"] = g["lr"]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


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
    optimizer = _build_optimizer(cfg, task.parameter_groups())
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
        _restore(ckpt_path, "optimizer", lambda: optimizer.load_state_dict(state["optimizer"]))
        _restore(ckpt_path, "scaler", lambda: scaler.load_state_dict(state["scaler"]))
        _restore(ckpt_path, "rng", lambda: _set_rng_state(state["rng"]))
        for k, m in mods.items():
            m.load_state_dict(state["modules"][k], strict=False)  # exactly its checkpointed keys
        if hasattr(task, "load_state_dict") and state.get("task_state") is not None:
            _restore(ckpt_path, "task_state", lambda: task.load_state_dict(state["task_state"]))
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
                _link_previous(ckpt_path, prev_path)
            atomic_torch_save(
                {
                    "task": task.name,
                    "modules": {k: trainable_state(m) for k, m in mods.items()},
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(),
                    "rng": _rng_state(),
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
        kept = _keep_good_checkpoint(ckpt_path, prev_path, saved_steps, step)
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


def _link_previous(ckpt_path: Path, prev_path: Path) -> None:
    """Keep the current checkpoint as ``prev_path`` (a hard link, else a copy) before it is replaced."""
    import os
    import shutil

    if not ckpt_path.exists():
        return
    tmp = temp_path(prev_path)  # the one temp-name scheme (comkd.fileio)
    tmp.unlink(missing_ok=True)
    try:
        os.link(ckpt_path, tmp)
    except OSError:
        shutil.copy2(ckpt_path, tmp)
    os.replace(tmp, prev_path)


def _keep_good_checkpoint(ckpt_path: Path, prev_path: Path, saved_steps: list[int], bad: int) -> str:
    """After a non-finite loss at step ``bad`` (computed with the weights after ``bad`` updates),
    keep a checkpoint whose weights came before the diverging update: the newest one if it was taken
    before step ``bad``, else the one before it (``prev_path``). With no older one, the newest stays
    in place (a resume must not silently start from scratch) and the message says what it holds.
    Returns what was kept, for the message."""
    newest = saved_steps[-1] if saved_steps else None
    if newest is None or not ckpt_path.exists():
        return (
            f"last good checkpoint kept at {ckpt_path}"
            if ckpt_path.exists()
            else "no checkpoint was written yet"
        )
    if bad >= 0 and newest < bad:
        return f"last good checkpoint kept at {ckpt_path}"
    older = saved_steps[-2] if len(saved_steps) > 1 else None
    if older is None and prev_path.exists():  # resumed: the one before the checkpoint resumed from
        try:
            older = int(load_checkpoint(prev_path)["global_step"])
        except (CheckpointError, KeyError, TypeError, ValueError):
            older = None
    if older is not None and older < newest and prev_path.exists():
        barrier()
        if is_main():
            prev_path.replace(ckpt_path)
        barrier()
        return (
            f"kept the checkpoint of step {older} at {ckpt_path}, taken before the diverging update "
            f"(the one of step {newest} already held its result)"
        )
    return (
        f"the only checkpoint, of step {newest}, was taken after the diverging update (its weights may "
        f"already be bad); kept at {ckpt_path}"
    )


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
