"""The loop's opt-in speed switches (``OptimConfig``), undone when ``fit`` ends: a stage leaves its
models and the process as it found them.

* ``compile``: ``nn.Module.compile`` (``torch.compile`` in place: state-dict keys unchanged) of the
  task's trainable modules and of its frozen ones (``frozen_modules``: the online teacher's image
  tower in stage 2). The first steps pay the compilation.
* ``hold_frozen_dtype``: under an active autocast (a GPU's bf16), the frozen modules are cast to its
  dtype once, instead of their float32 weights being re-cast at every step; their float32 weights
  are kept on the CPU and put back exactly when ``fit`` ends.
* ``tf32``: on CUDA, float32 matmuls and convolutions that autocast does not reach (the losses,
  the optimiser's) may use TF32 tensor cores during ``fit``; off again after.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


class SpeedSwitches:
    """The switches of one ``fit``: ``apply()`` at its start, ``restore()`` at its end."""

    def __init__(self, cfg: Any, task: Any, device: torch.device, autocast: Any):
        self.cfg, self.device = cfg, device
        self.trainable = dict(task.modules())
        self.frozen: dict[str, nn.Module] = task.frozen_modules() if hasattr(task, "frozen_modules") else {}
        self.dtype = getattr(autocast, "fast_dtype", None) if isinstance(autocast, torch.autocast) else None
        self._kept: dict[str, dict[str, torch.Tensor]] = {}
        self._tf32: tuple[bool, bool] | None = None

    def apply(self) -> None:
        cfg = self.cfg
        if cfg.tf32 and self.device.type == "cuda":
            self._tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        if cfg.hold_frozen_dtype and self.dtype is None:
            log.info("optim.hold_frozen_dtype: no autocast in this stage; the frozen modules stay float32")
        elif cfg.hold_frozen_dtype:
            for k, m in self.frozen.items():
                self._kept[k] = {n: t.detach().to("cpu", copy=True) for n, t in _tensors(m)}
                m.to(self.dtype)
        if cfg.compile:
            for m in [*self.trainable.values(), *self.frozen.values()]:
                m.compile()

    def restore(self) -> None:
        if self._tf32 is not None:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self._tf32
            self._tf32 = None
        for k, kept in self._kept.items():  # each tensor back as it was: values and dtype
            for n, t in _tensors(self.frozen[k]):
                t.data = kept[n].to(t.device)
        self._kept = {}


def _tensors(m: nn.Module):
    """Every parameter and buffer of ``m`` (non-persistent buffers too: ``Module.to`` casts them)."""
    yield from m.named_parameters(remove_duplicate=False)
    yield from m.named_buffers(remove_duplicate=False)
