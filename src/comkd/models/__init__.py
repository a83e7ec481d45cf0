"""Models: backbones, prompts, teacher, student, projector, EduAttention, and student files."""

from .backbones import (
    RANDOM_WEIGHTS,
    TINY_STUDENT,
    TINY_TEACHER,
    LoadedModel,
    ModelError,
    PreprocessSpec,
    load_clip,
    register_tiny_configs,
    save_clip_weights,
    tag_quick_gelu,
    uses_quick_gelu,
)
from .edu_attention import EduAttention
from .io import load_student, save_student
from .projector import Projector
from .prompts import PromptedTextEncoder, PromptedVisionTower
from .student import Student, StudentArch, StudentOutput, create_student
from .teacher import Teacher, TeacherArch, create_teacher

__all__ = [
    "RANDOM_WEIGHTS",
    "TINY_STUDENT",
    "TINY_TEACHER",
    "EduAttention",
    "LoadedModel",
    "ModelError",
    "PreprocessSpec",
    "Projector",
    "PromptedTextEncoder",
    "PromptedVisionTower",
    "Student",
    "StudentArch",
    "StudentOutput",
    "Teacher",
    "TeacherArch",
    "create_student",
    "create_teacher",
    "load_clip",
    "load_student",
    "register_tiny_configs",
    "save_clip_weights",
    "save_student",
    "tag_quick_gelu",
    "uses_quick_gelu",
]
