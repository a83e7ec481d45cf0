"""The distillation recipe in one place: the methods, their switches and their defaults
(docs/method.md, "The objective" and "Stage-2 recipes").

The config's allowed ``distill.method`` values, the CLI help and the report labels are read from
``METHODS``, so adding a method is one ``register_method`` call (plus the loss code, when
``ComKDLoss``'s switches do not cover it). Nothing here imports torch at import time: the config
system reads this table cheaply.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .config_io import nest

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class Method:
    """One distillation method.

    Attributes:
        name: the one spelling (``distill.method``, ``--method``, ``--methods``, report rows);
            ``_`` and upper case are accepted on input and mapped to it.
        label: the row label in reports.
        edu_attention: whether the student has EduAttention (and the gate α).
        loss: ``ComKDLoss`` switches (``use_ifalign``, ``use_kd``, ``feature_loss``).
        make_loss: builds the loss from the switches merged with the recipe values (``kd_weight``,
            ``temperature``, ``align_weight``, ``ifalign_stats``, ``feature_weight``); None:
            ``ComKDLoss``. A loss returns a dict of named terms with ``loss`` back-propagated.
        make_task: builds the stage-2 task from its inputs: ``(student, sides, loss, *,
            edu_lr_scale, ifalign_on, tower_lr_scale)``, ``sides`` the ``teachers`` teacher sides
            (``comkd.engine.tasks.TeacherSide``: outputs u_t, W, s_t, identity), the first being
            the one whose W the student stores. A callable, or ``"module:attribute"`` imported
            when stage 2 starts (so this table imports no trainer code); None:
            ``DistillTask.from_sides``. A method that needs other inputs or another training step
            is a table entry plus its task.
        teachers: how many teachers it distils from: ``teacher`` and ``distill.extra_teachers``.
        reference: a method the others are compared against (PromptKD): reports show it first.
    """

    name: str
    label: str
    edu_attention: bool
    loss: dict[str, Any] = field(default_factory=dict)
    make_loss: Callable[..., nn.Module] | None = None
    make_task: Callable[..., Any] | str | None = None
    teachers: int = 1
    reference: bool = False


# Reports list the reference methods first, then the others in this order.
METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("comkd", "ComKD-CLIP", edu_attention=True, loss={"use_ifalign": True}),
        Method("promptkd", "PromptKD", edu_attention=False, loss={"use_ifalign": False}, reference=True),
        Method("no-ifalign", "ComKD w/o IFAlign", edu_attention=True, loss={"use_ifalign": False}),
        Method("no-eduattention", "ComKD w/o EduAttention", edu_attention=False, loss={"use_ifalign": True}),
        Method(
            "feature-l1",
            "Feature L1",
            edu_attention=False,
            loss={"use_ifalign": False, "use_kd": False, "feature_loss": "l1"},
        ),
        Method(
            "feature-mse",
            "Feature MSE",
            edu_attention=False,
            loss={"use_ifalign": False, "use_kd": False, "feature_loss": "mse"},
        ),
        Method(  # an extension: PromptKD's KL on the mean of two teachers' probabilities
            "two-teachers",
            "PromptKD, two teachers",
            edu_attention=False,
            loss={"use_ifalign": False},
            make_task="comkd.engine.two_teachers:TwoTeachersTask.from_sides",
            teachers=2,
        ),
    )
}

# -- per-dataset and per-protocol defaults ----------------------------------------------------
PAPER_KD_WEIGHT = 1000.0
LOW_KD_WEIGHT = 200.0
LOW_KD_WEIGHT_DATASETS = frozenset({"fgvc_aircraft", "oxford_flowers", "dtd"})
# PromptKD's cross-dataset / domain-generalisation student: visual prompt depth 3 and w_kd 1000
# for every target (``protocols.runner.protocol_recipe`` applies them where unset).
CROSS_STUDENT_VISION_DEPTH = 3
CROSS_KD_WEIGHT = 1000.0


def paper_kd_weight(dataset: str) -> float:
    """w_kd of the paper's base-to-novel recipe: 200 for FGVCAircraft, Flowers102 and DTD, else 1000."""
    return LOW_KD_WEIGHT if dataset in LOW_KD_WEIGHT_DATASETS else PAPER_KD_WEIGHT


# -- stage-2 recipes ---------------------------------------------------------------------------
#: ``distill.recipe``: every switch of a stage-2 reading, set at once (dotted config key -> value).
#: A recipe sits at the config layer that names it (preset file, flags or ``--set``): keys given
#: explicitly in that layer or a later one override it. ``paper`` is PromptKD's published stage 2
#: and ComKD-CLIP's plain reading, and equals the built-in defaults; ``recommended`` is the reading
#: chosen on validation data (docs/method.md, "Stage-2 recipes"; docs/results.md for the evidence).
RECIPES: dict[str, dict[str, Any]] = {
    "paper": {
        "student.edu_mode": "paper",
        "student.projector_bn": "train",
        "distill.projector_init": "random",
        "distill.ifalign_on": "features",
        "distill.edu_lr_scale": 0.01,
        "distill.optim.optimizer": "sgd",
        "distill.optim.lr": 0.005,
        "distill.optim.weight_decay": 5e-4,
    },
    "recommended": {
        "student.edu_mode": "cosine",
        "student.projector_bn": "frozen",
        "distill.projector_init": "ridge",
        "distill.ifalign_on": "projected",
        "distill.edu_lr_scale": 1.0,
        "distill.optim.optimizer": "adamw",
        "distill.optim.lr": 1e-4,
        "distill.optim.weight_decay": 0.0,
    },
}

RECIPE_HELP = {
    "paper": "PromptKD's stage 2 as published: dot-product EduAttention, random projector, SGD 0.005",
    "recommended": "chosen on val data: cosine EduAttention, ridge-started frozen-BN projector, AdamW 1e-4",
}


def recipe_updates(name: str) -> dict:
    """The nested config update of recipe ``name`` (a ``ValueError`` naming the recipes if unknown)."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    return nest(RECIPES[name])


# -- the table ---------------------------------------------------------------------------------
def canonical_method(name: str) -> str:
    """The table's spelling of ``name`` (``no_ifalign`` → ``no-ifalign``); a ``ValueError``
    listing the valid names when there is none."""
    key = str(name).replace("_", "-").lower()
    if key not in METHODS:
        raise ValueError(f"unknown distillation method {name!r}; choose one of {', '.join(METHODS)}")
    return key


def canonical_methods(names: list[str] | None) -> list[str] | None:
    """Each of ``names`` in the table's spelling, duplicates dropped, order kept (None stays None);
    a ``ValueError`` naming the unknown one and the valid names. Checked once, before a run starts."""
    return None if names is None else list(dict.fromkeys(canonical_method(n) for n in names))


def get_method(name: str) -> Method:
    """The table entry of ``name`` (any accepted spelling)."""
    return METHODS[canonical_method(name)]


def report_order() -> list[str]:
    """The methods in report row order: reference methods first, then the table's order."""
    return sorted(METHODS, key=lambda name: not METHODS[name].reference)  # stable: table order kept


def register_method(method: Method) -> None:
    """Add ``method`` to the table (a name already there is refused)."""
    if method.name != method.name.replace("_", "-").lower():
        raise ValueError(f"method name {method.name!r}: use lower case and '-' (the one spelling)")
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is already registered")
    METHODS[method.name] = method


def unregister_method(name: str) -> None:
    """Remove a method added by ``register_method``."""
    METHODS.pop(canonical_method(name))


def method_spec(name: str) -> dict:
    """The switches of a method as a dict: ``{"loss": {...}, "edu_attention": bool}``."""
    m = get_method(name)
    return {"loss": dict(m.loss), "edu_attention": m.edu_attention}
