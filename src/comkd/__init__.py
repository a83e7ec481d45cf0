"""comkd: ComKD-CLIP knowledge distillation from a large CLIP teacher into a small, fast student.

Public API (see DESIGN.md): ``create_teacher``, ``create_student``, ``EduAttention``, ``kd_kl``,
``ifalign``, ``ComKDLoss``, ``build_dataset``, ``base_novel_split``, ``load_student``.
"""

from .data import base_novel_split, build_dataset
from .losses import ComKDLoss, ifalign, kd_kl
from .models import EduAttention, create_student, create_teacher, load_student

__version__ = "0.1.0"

__all__ = [
    "ComKDLoss",
    "EduAttention",
    "base_novel_split",
    "build_dataset",
    "create_student",
    "create_teacher",
    "ifalign",
    "kd_kl",
    "load_student",
]
