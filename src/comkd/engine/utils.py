"""Small engine utilities: seeding, devices, distributed helpers, atomic files, metrics logs."""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import random
import secrets
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
import torch.distributed as dist

from ..config_rules import torchrun_world_size
from ..fileio import atomic_path, atomic_write_text  # the one atomic-write helper (comkd.fileio)

log = logging.getLogger(__name__)


def show_progress(enabled: bool) -> bool:
    """Progress bars only when asked for and stderr is a terminal (a redirected run's log gets no
    carriage-return redraws)."""
    return bool(enabled) and hasattr(sys.stderr, "isatty") and sys.stderr.isatty()


def progress_bar(total: int, desc: str, enabled: bool, leave: bool = True):
    """A tqdm bar over ``total`` steps, or None where ``show_progress(enabled)`` wants no bar."""
    if not show_progress(enabled):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=leave, dynamic_ncols=True, mininterval=0.5)


def seed_everything(seed: int) -> None:
    """One seed for Python, NumPy and torch (data order and views derive from it too)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA (this rank's GPU under torchrun), then MPS, then CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"device {name!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available (no GPU found)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} requested but this machine has {torch.cuda.device_count()} GPU(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r} requested but MPS is not available")
    return dev


def amp_context(device: torch.device, mode: str):
    """Autocast where it works: CUDA (bf16 if supported, else fp16); off on CPU/MPS unless ``on``."""
    enabled = mode == "on" or (mode == "auto" and device.type == "cuda")
    if not enabled:
        return nullcontext(), False
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype), dtype == torch.float16
    return torch.autocast(device.type, dtype=torch.bfloat16), False


# -- distributed -------------------------------------------------------------------------------
_joined = False  # this process joined a torchrun group (exit_process then skips C++ teardown)


def init_distributed() -> bool:
    """Join the torchrun process group if launched by torchrun (gloo on CPU, nccl on CUDA)."""
    global _joined
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    _joined = True
    # Leave the group on any exit; a finished command leaves it earlier (cli.common._run).
    atexit.register(shutdown_distributed, wait=False)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return True


def shutdown_distributed(wait: bool = True) -> None:
    """Leave the process group if one is up (idempotent).

    With ``wait`` (a clean finish) the ranks first meet at a barrier, so none closes its
    connections while a peer still uses them. The exit hook ``init_distributed`` registers does not
    wait: a rank that failed must not leave the others hanging in a barrier.
    """
    if dist.is_available() and dist.is_initialized():
        try:
            if wait:
                dist.barrier()
        finally:
            dist.destroy_process_group()


def exit_process(code: int | str | None = 0) -> NoReturn:
    """End this process with ``code`` (``sys.exit``'s meaning): how every comkd command ends.

    A process that joined a torchrun group leaves it (meeting the other ranks first when ``code``
    is a success), runs the exit hooks, flushes its streams and ends with ``os._exit``, skipping the
    interpreter's C++ teardown. Why: DDP imports ``torch._dynamo``, and after that import
    ``destroy_process_group`` no longer frees gloo's group (torch 2.14: its threads keep running),
    so they meet the static destructors at teardown, and now and then a rank aborted ("terminate
    called without an active exception", SIGABRT) after all its work was written, failing a
    finished run. Any other process ends with ``sys.exit(code)``.
    """
    if not _joined:
        sys.exit(code)
    shutdown_distributed(wait=code in (0, None))
    if isinstance(code, str):  # sys.exit prints a message and exits 1
        print(code, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing left to keep
            pass
    os._exit(code or 0)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def launched_world_size() -> int:
    """The processes of this run: the group's size, or before it is joined the ``WORLD_SIZE``
    torchrun set (1 outside torchrun), so checks can run before any rank waits for the others."""
    return dist.get_world_size() if dist.is_initialized() else torchrun_world_size()


def is_main() -> bool:
    return rank() == 0


def comm_device() -> torch.device:
    """Where the process group's collectives run: this rank's GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the ranks (a copy, on ``t``'s device); ``t`` itself in one process."""
    if not dist.is_initialized():
        return t
    total = t.to(comm_device(), copy=True)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.to(t.device)


class RankShare(torch.utils.data.Subset):
    """This rank's strided share of a map-style dataset: items ``rank, rank + W, ...`` of ``n``
    (every item of it in one process). ``gather_loader_rows`` puts the ranks' results back in order."""

    def __init__(self, dataset: Any):
        self.total = len(dataset)
        super().__init__(dataset, range(rank(), self.total, world_size()))


def gather_loader_rows(t: torch.Tensor, loader: Any) -> torch.Tensor:
    """``t``, rows ``[m, ...]`` computed in order over ``loader``, for every item of its dataset:
    when the loader reads a ``RankShare`` (rank r's rows are items ``r, r + W, ...`` of ``n``), the
    ranks' rows back in item order, ``[n, ...]`` on ``t``'s device, by one all-gather of
    ``ceil(n / W)`` rows per rank; ``t`` itself otherwise."""
    w = world_size()
    if not isinstance(loader.dataset, RankShare) or w == 1:
        return t
    n, rest = loader.dataset.total, t.shape[1:]
    per = -(-n // w)
    pad = torch.zeros((per, *rest), dtype=t.dtype, device=comm_device())
    pad[: len(t)] = t
    # row j of rank r is item j·W + r: interleave the ranks' rows
    return gather_batch(pad).view(w, per, *rest).transpose(0, 1).reshape(per * w, *rest)[:n].to(t.device)


def gather_batch(t: torch.Tensor, grad: bool = False) -> torch.Tensor:
    """Concatenate every rank's ``[b, ...]`` share into the global ``[W·b, ...]`` batch (rank order).

    With ``grad`` the gather is differentiable (``torch.distributed.nn.all_gather``): its backward
    sums each rank's gradient into the owner's share, which, with DDP's gradient average, gives
    exactly the gradient of a loss computed once on the global batch. A single process returns ``t``.
    """
    if world_size() == 1:
        return t
    if grad:
        import torch.distributed.nn as dist_nn

        return torch.cat(dist_nn.all_gather(t), dim=0)
    parts = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=0)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_agree(flag: bool, device: torch.device) -> bool:
    """Rank 0's ``flag`` on every rank (one broadcast under torchrun; ``flag`` itself otherwise)."""
    if world_size() == 1:
        return flag
    t = torch.tensor(float(flag), device=device)
    torch.distributed.broadcast(t, src=0)
    return bool(t.item())


def first_bad_step(bad_step: torch.Tensor) -> int:
    """The first step (0-based) since the last check whose loss was non-finite; -1 if none, -2 if
    only another process saw one (one sync per check)."""
    step = int(bad_step.item())
    if world_size() > 1:
        any_bad = all_reduce_sum(torch.tensor(float(step >= 0), device=bad_step.device))
        if float(any_bad) > 0 and step < 0:
            step = -2
    return step


class NotSharedError(RuntimeError):
    """Under torchrun, a rank cannot see the run folder rank 0 writes (no shared filesystem)."""


def check_shared_folder(folder: str | Path) -> None:
    """Under torchrun, every rank must see the run folder rank 0 writes (the others read its prompts,
    checkpoints and student): where any rank cannot, every rank raises ``NotSharedError`` at once,
    instead of one failing late (student file not found) or ``--resume`` hanging (one rank restoring,
    another starting fresh). One process: no-op."""
    if world_size() == 1:
        return
    folder = Path(folder)
    token = [secrets.token_hex(8) if is_main() else None]
    dist.broadcast_object_list(token, src=0)
    probe = folder / f".comkd-shared-{token[0]}"
    if is_main():
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_text(token[0])
    dist.barrier()
    try:
        seen = probe.read_text() == token[0]
    except OSError:
        seen = False
    blind = all_reduce_sum(torch.tensor([0.0 if seen else 1.0])).item()
    dist.barrier()
    if is_main():
        probe.unlink(missing_ok=True)
    if blind:
        raise NotSharedError(
            f"{int(blind)} of {dist.get_world_size()} processes cannot see {folder.resolve()}, the run folder rank 0 "
            "writes: comkd under torchrun needs that folder on a filesystem every node shares (put --out-dir on it)"
        )


# -- files -----------------------------------------------------------------------------------
def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """Write with ``torch.save`` to a temp file, fsync, then rename: a kill never leaves half a file."""
    with atomic_path(path, fsync=True) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def _first_non_finite(obj: Any, key: str = "") -> tuple[str, float] | None:
    """``(key path, value)`` of the first NaN or infinity in a JSON-like object, else None."""
    if isinstance(obj, float):
        return None if math.isfinite(obj) else (key or "(the value)", obj)
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for k, v in items:
        found = _first_non_finite(v, f"{key}[{k}]" if isinstance(k, int) else f"{key}.{k}" if key else str(k))
        if found is not None:
            return found
    return None


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as JSON (atomically). A NaN or infinity is refused (``ValueError`` naming the
    file and the key; nothing is written): it is not valid JSON, and no result of a sound run."""
    try:
        text = json.dumps(obj, indent=2, sort_keys=False, allow_nan=False)
    except ValueError:
        found = _first_non_finite(obj)
        if found is None:
            raise
        raise ValueError(
            f"{path}: not written: {found[0]} is {found[1]}, not a finite number (the run diverged "
            "or read damaged weights)"
        ) from None
    atomic_write_text(path, text + "\n")


class MetricsLog:
    """Append-only JSONL metrics (rank 0 only); ``truncate_after`` drops lines written after the
    checkpoint a resumed run restarts from, so the log equals an uninterrupted run's."""

    def __init__(self, path: str | Path, enabled: bool = True, tensorboard_dir: str | Path | None = None):
        self.path = Path(path)
        self.enabled = enabled
        self.tb = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard_dir is not None:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError as e:  # pragma: no cover - optional extra
                    raise ImportError("tensorboard logging needs `pip install comkd[tb]`") from e
                self.tb = SummaryWriter(str(tensorboard_dir))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None and "step" in record:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    self.tb.add_scalar(f"{record.get('stage', 'train')}/{k}", v, record["step"])

    def truncate_after(self, stage: str, step: int) -> None:
        if not self.enabled or not self.path.exists():
            return
        recs = [(x, _parse_line(x, self.path)) for x in self.path.read_text().splitlines()]
        keep = [
            x for x, r in recs if r is not None and not (r.get("stage") == stage and r.get("step", -1) > step)
        ]
        atomic_write_text(self.path, "".join(x + "\n" for x in keep))


def _parse_line(line: str, path: Path) -> dict | None:
    """One JSONL record; a half-written line (a killed run's last) is dropped with a warning."""
    if not line.strip():
        return None
    try:
        rec = json.loads(line)
    except json.JSONDecodeError:
        log.warning("%s: dropping a line that is not complete JSON: %.60s", path, line)
        return None
    return rec if isinstance(rec, dict) else None


def read_metrics(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.exists():
        return []
    return [r for r in (_parse_line(x, p) for x in p.read_text().splitlines()) if r is not None]
