"""The student's projector P (METHOD.md section 2)."""

from __future__ import annotations

from torch import nn


class Projector(nn.Sequential):
    """Linear(d_s→d) → BatchNorm(d) → ReLU → Linear(d→d): ``[B, d_s]`` to ``[B, d]``."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__(
            nn.Linear(in_dim, out_dim),
            nn.BatchNorm1d(out_dim),
            nn.ReLU(inplace=True),
            nn.Linear(out_dim, out_dim),
        )
        self.in_dim, self.out_dim = in_dim, out_dim
