"""Checkpoints of ``fit``: safe reading and resume checks, trainable state, RNG states, and keeping
the last good checkpoint when a loss turns non-finite."""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import OptimConfig
from ..fileio import temp_path
from .utils import barrier, is_main

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read safely; the message names the file."""


class DiskFullError(RuntimeError):
    """The disk filled while a checkpoint was written; the message names the file, the checkpoint
    kept and how to go on."""


def is_disk_full(e: BaseException) -> bool:
    """Whether ``e`` from writing a file says the disk (or quota) is full: an ``OSError`` with
    ENOSPC / EDQUOT, or torch.save's zip writer failing mid-file (``[enforce fail at
    inline_container.cc:...] . unexpected pos ...``: a short write)."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return True
    text = str(e)
    return "No space left on device" in text or (
        "inline_container.cc" in text and ("unexpected pos" in text or "failed writing" in text)
    )


def disk_full_message(path: Path, had_previous: bool) -> str:
    """The one line for a checkpoint that could not be written for want of disk space."""
    kept = (
        f"the previous checkpoint {path} is kept; free space and rerun with --resume"
        if had_previous
        else "no checkpoint was written yet; free space and rerun"
    )
    return f"disk full while writing {path}; {kept}"


#: the files a training stage checkpoints to (``engine.loop``): the last, and the one before it
CHECKPOINT_NAMES = ("checkpoint.pt", "checkpoint.prev.pt")


def prune_checkpoints(folder: str | Path, *, keep: bool = False) -> int:
    """Delete the checkpoints under ``folder`` (its sub-folders too) once the stage that wrote them
    is finished and its outputs are on disk (``comkd run`` / ``demo``; ``keep``: the run's
    ``keep_checkpoints``, which leaves them): a protocol resumes a finished stage from its outputs,
    never from its checkpoint. Returns the bytes freed (0 on a non-main torchrun rank, which
    writes nothing)."""
    if keep or not is_main():
        return 0
    freed = 0
    for name in CHECKPOINT_NAMES:
        for path in Path(folder).rglob(name):
            freed += path.stat().st_size
            path.unlink(missing_ok=True)
    if freed:
        log.info("%s is finished: its checkpoints (%.1f MB) are deleted", folder, freed / 2**20)
    return freed


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


#: the optimiser settings of how fast a stage runs, not what it computes: a resumed run may change
#: them (amp may change with the device), every other one it must share with its checkpoint
SPEED_SETTINGS = ("amp", "compile", "hold_frozen_dtype", "tf32")


def optim_settings(cfg: OptimConfig) -> dict[str, Any]:
    """The optimiser and schedule settings a checkpoint records (plain values)."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in SPEED_SETTINGS}


def check_resume_optim(saved: dict | None, cfg: OptimConfig, path: Path, run: dict | None = None) -> None:
    """Refuse to resume with optimiser or schedule settings other than the checkpoint's: the
    resumed run would follow neither recipe while its config claimed one. ``run``: what the
    settings came to in this run (the global batch and lr factor, which move with the number of
    processes under ``batch_per: rank`` or an lr rule), compared where the checkpoint has them. A
    setting newer than the checkpoint is compared with its default."""
    if saved is None:  # a checkpoint from before the settings were recorded
        return
    defaults = optim_settings(OptimConfig())
    saved = {**{k: v for k, v in defaults.items() if k not in saved}, **saved}
    now = {**optim_settings(cfg), **{k: v for k, v in (run or {}).items() if k in saved}}
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


def restore_part(path: Path, key: str, fn: Callable[[], Any]) -> None:
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


def rng_state() -> dict:
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


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    n = st["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def link_previous(ckpt_path: Path, prev_path: Path) -> None:
    """Keep the current checkpoint as ``prev_path`` (a hard link, else a copy) before it is replaced."""
    if not ckpt_path.exists():
        return
    tmp = temp_path(prev_path)  # the one temp-name scheme (comkd.fileio)
    tmp.unlink(missing_ok=True)
    try:
        os.link(ckpt_path, tmp)
    except OSError:
        shutil.copy2(ckpt_path, tmp)
    os.replace(tmp, prev_path)


def keep_good_checkpoint(ckpt_path: Path, prev_path: Path, saved_steps: list[int], bad: int) -> str:
    """After a non-finite loss at step ``bad`` (computed with the weights after ``bad`` updates),
    keep a checkpoint whose weights came before the diverging update: the newest one if it was taken
    before step ``bad``, else the one before it (``prev_path``). With no older one, the newest stays
    in place (a resume must not silently start from scratch) and the message says what it holds.
    Returns what was kept, for the message."""
    if not ckpt_path.exists():
        return "no checkpoint was written yet"
    newest = saved_steps[-1] if saved_steps else None
    if newest is None or (bad >= 0 and newest < bad):
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
