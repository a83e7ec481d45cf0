"""The parts of a bench JSON that are not measurements: the machine the figures were measured
on, the order of the top-level keys, and the atomic write of the file."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

from .sizes import FIGURES

#: the repository root, which holds this package: child processes import ``benchmarks`` from it
REPO_ROOT = Path(__file__).resolve().parents[1]


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a benchmark's child process: this one's, ``extra``, and the repository
    root first on ``PYTHONPATH`` (``benchmarks`` is not installed with the package)."""
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, **extra, "PYTHONPATH": path}


def machine_info(device: torch.device) -> dict[str, Any]:
    """Platform, CPU count, library versions and the device the figures were measured on."""
    import open_clip

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "open_clip": getattr(open_clip, "__version__", "unknown"),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    if hasattr(os, "getloadavg"):
        info["loadavg_1min_start"] = round(os.getloadavg()[0], 2)
    return info


def ordered(res: dict[str, Any]) -> dict[str, Any]:
    """``res`` with ``machine``, ``quick``, ``weights``, the ``FIGURES`` and the per-stage objects
    first, then every other key in its insertion order."""
    first = ["machine", "quick", "weights", *FIGURES, "peak_memory_mb", "epoch_time_s"]
    return {**{k: res[k] for k in first if k in res}, **{k: v for k, v in res.items() if k not in first}}


def write_json(out: Path, res: dict[str, Any]) -> None:
    """Write ``res`` to ``out`` as indented JSON, atomically."""
    from comkd.fileio import atomic_write_text

    atomic_write_text(out, json.dumps(res, indent=2) + "\n")
