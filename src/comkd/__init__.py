"""comkd: ComKD-CLIP knowledge distillation from a large CLIP teacher into a small, fast student.

Public API (see docs/architecture.md): ``create_teacher``, ``create_student``, ``EduAttention``,
``kd_kl``, ``ifalign``, ``ComKDLoss``, ``build_dataset``, ``base_novel_split``, ``load_student``,
``list_presets``. The names are imported on first use, so ``import comkd`` (and ``comkd --help``)
does not load torch and open_clip until a model or dataset is asked for.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> the module that defines it
_LAZY = {
    "ComKDLoss": ".losses",
    "ifalign": ".losses",
    "kd_kl": ".losses",
    "EduAttention": ".models",
    "create_student": ".models",
    "create_teacher": ".models",
    "load_student": ".models",
    "base_novel_split": ".data",
    "build_dataset": ".data",
    "list_presets": ".config",
}

__all__ = [
    "ComKDLoss",
    "EduAttention",
    "base_novel_split",
    "build_dataset",
    "create_student",
    "create_teacher",
    "ifalign",
    "kd_kl",
    "list_presets",
    "load_student",
]

if TYPE_CHECKING:  # for type checkers and IDEs: the eager imports
    from .config import list_presets
    from .data import base_novel_split, build_dataset
    from .losses import ComKDLoss, ifalign, kd_kl
    from .models import EduAttention, create_student, create_teacher, load_student


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'comkd' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
