"""Shared test helpers."""

from __future__ import annotations

# `comkd distill` options for a cheap tiny student: one epoch on the embedded digits at 16 px.
TINY_DISTILL_OPTS = [
    "--student", "comkd-tiny-student",
    "--set", "data.image_size=16",
    "--set", "distill.optim.epochs=1",
    "--set", "distill.optim.warmup_epochs=0",
    "--set", "progress=false",
    "--no-evaluate",
]
