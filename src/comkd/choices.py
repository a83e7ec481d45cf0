"""The allowed values of every enumerated setting, written once. The config's fields are typed
with these ``Literal``s (so a config file, ``--set`` and the flags are checked against them), and
the library checks the same values with ``check`` where it is called without a config. No torch."""

from __future__ import annotations

from typing import Any, Literal, get_args

Attend = Literal["all", "subset"]  # the classes of W EduAttention sees
EduMode = Literal["paper", "cosine"]  # EduAttention's scores: scaled dot product, or cosine
# paper mode's score divisor: √(C/h) (the scaled dot product), or C/h itself (Eq. 6 calls C a
# hyper-parameter; read as the softmax temperature)
EduScale = Literal["sqrt_c", "temperature"]
Projector = Literal["mlp", "linear"]
ProjectorBN = Literal["train", "frozen"]
Scope = Literal["prompts", "full"]  # what of the student's tower learns
KdReduction = Literal["promptkd", "textbook"]
IfalignStats = Literal["per_channel", "per_sample"]
IfalignOn = Literal["features", "projected", "projected_matched"]
BatchPer = Literal["global", "rank"]  # optim.batch_size: images a step over all processes, or per process
LrScaling = Literal["none", "linear", "sqrt"]  # the lr as the global batch moves from optim.lr_base_batch
# the protocols (comkd.protocols.runner.PROTOCOLS; the classes each teacher learns on:
# config_rules.TEACHER_CLASSES)
Protocol = Literal["base2novel", "cross", "dg", "full"]


def values(choice: Any) -> tuple[str, ...]:
    """The allowed values of ``choice`` (one of the ``Literal``s above), in order."""
    return get_args(choice)


def check(value: Any, choice: Any, what: str, error: type[Exception] = ValueError) -> None:
    """``value`` is one of ``choice``'s values, else ``error`` naming ``what`` and the values."""
    allowed = get_args(choice)
    if value not in allowed:
        raise error(f"{what} must be one of {', '.join(allowed)}, got {value!r}")
