"""The student's projector P (docs/method.md, "The student") and its closed-form warm start ("Extensions")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
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


class LinearProjector(nn.Sequential):
    """One Linear(d_s→d): ``[B, d_s]`` to ``[B, d]`` (a projector the ridge fit sets entirely)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__(nn.Linear(in_dim, out_dim))


def build_projector(kind: str, in_dim: int, out_dim: int) -> nn.Sequential:
    """``mlp`` (``Projector``) or ``linear``; ``Student`` has checked ``kind`` (``choices.Projector``)."""
    return Projector(in_dim, out_dim) if kind == "mlp" else LinearProjector(in_dim, out_dim)


def ridge(x: torch.Tensor, y: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form ridge regression with an unpenalised bias: argmin_{A,b} ‖x Aᵀ + b − y‖² + λ'‖A‖².

    ``x`` ``[M, p]``, ``y`` ``[M, q]``; returns ``A`` ``[q, p]`` and ``b`` ``[q]``. λ' = λ · mean
    diagonal of the centred Gram matrix, so ``lam`` does not depend on the features' scale.
    Solved in float64 on the centred data (centring is what leaves the bias unpenalised).
    """
    x, y = x.double(), y.double()
    mx, my = x.mean(0), y.mean(0)
    a = ridge_origin(x - mx, y - my, lam)
    return a, my - mx @ a.t()


def ridge_origin(x: torch.Tensor, y: torch.Tensor, lam: float) -> torch.Tensor:
    """Closed-form ridge regression through the origin (a projection without bias):
    ``A = yᵀx (xᵀx + λ'I)⁻¹ = argmin_A ‖x Aᵀ − y‖² + λ'‖A‖²``, λ' = λ · mean diagonal of ``xᵀx``.

    ``x`` ``[M, p]``, ``y`` ``[M, q]``; returns ``A`` ``[q, p]`` in float64."""
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"ridge: x {list(x.shape)} and y {list(y.shape)} must be [M, p] and [M, q]")
    x, y = x.double(), y.double()
    gram = x.t() @ x
    reg = lam * float(gram.diagonal().mean().clamp_min(1e-12))
    return torch.linalg.solve(gram + reg * torch.eye(gram.shape[0], dtype=gram.dtype), x.t() @ y).t()


def ridge_from_sums(
    n: float, sx: torch.Tensor, sy: torch.Tensor, sxx: torch.Tensor, sxy: torch.Tensor, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``ridge`` from sums over the rows instead of the rows: ``n`` rows, ``sx`` = Σx ``[p]``,
    ``sy`` = Σy ``[q]``, ``sxx`` = Σxxᵀ ``[p, p]``, ``sxy`` = Σxyᵀ ``[p, q]`` (what processes that
    each hold some of the rows can add up). The same fit as ``ridge`` on all the rows, in float64:
    the centred Gram matrix is Σxxᵀ − n·x̄x̄ᵀ."""
    sx, sy, sxx, sxy = (t.double() for t in (sx, sy, sxx, sxy))
    mx, my = sx / n, sy / n
    gram = sxx - n * torch.outer(mx, mx)
    cross = sxy - n * torch.outer(mx, my)
    reg = lam * float(gram.diagonal().mean().clamp_min(1e-12))
    a = torch.linalg.solve(gram + reg * torch.eye(gram.shape[0], dtype=gram.dtype), cross).t()
    return a, my - mx @ a.t()


def _summed(all_reduce, rows: torch.Tensor, *sums: torch.Tensor) -> list[torch.Tensor]:
    """The number of ``rows`` and ``sums`` added up over every process, packed into one all-reduce."""
    parts = (torch.tensor([float(len(rows))], dtype=rows.dtype, device=rows.device), *sums)
    total = all_reduce(torch.cat([t.reshape(-1) for t in parts]))
    return [s.reshape(t.shape) for s, t in zip(total.split([t.numel() for t in parts]), parts, strict=True)]


@torch.no_grad()
def fit_projector(
    projector: nn.Sequential,
    features: torch.Tensor,
    targets: torch.Tensor,
    lam: float = 1e-3,
    all_reduce=None,
) -> None:
    """Warm start: set ``projector`` so that ``projector(features) ≈ targets`` with no labels.

    ``features`` ``[M, d_s]`` (student tower outputs), ``targets`` ``[M, d]`` (teacher image
    features u_t of the same views). A linear projector is fitted entirely. For the MLP the first
    Linear keeps its random weights, BatchNorm's running statistics are set to those of its input
    over ``features`` (it must then stay frozen, in eval mode), and the last Linear is fitted on
    the hidden activations.

    ``all_reduce`` (a sum over processes, e.g. ``engine.utils.all_reduce_sum``): the rows are this
    process's share, and the BatchNorm statistics and the fit (``ridge_from_sums``) are those of
    every process's rows. Without it the fit is ``ridge`` on the rows themselves.
    """
    layers = list(projector)
    head = layers[-1]
    if len(layers) > 1:
        first, bn = layers[0], layers[1]
        z = first(features.to(first.weight.dtype))
        if all_reduce is None:
            bn.running_mean.copy_(z.mean(0))
            bn.running_var.copy_(z.var(0, unbiased=True))
        else:
            zd = z.double()
            n, s1, s2 = _summed(all_reduce, zd, zd.sum(0), (zd * zd).sum(0))
            n, mean = float(n), s1 / float(n)
            bn.running_mean.copy_(mean)
            bn.running_var.copy_((s2 - n * mean * mean) / max(n - 1.0, 1.0))
        normed = F.batch_norm(z, bn.running_mean, bn.running_var, bn.weight, bn.bias, eps=bn.eps)
        hidden = nn.Sequential(*layers[2:-1])(normed)  # the layers before the head, BatchNorm in eval mode
    else:
        hidden = features
    if all_reduce is None:
        a, b = ridge(hidden, targets, lam)
    else:  # one all-reduce of the packed float64 sums
        x, y = hidden.double(), targets.double()
        n, sx, sy, sxx, sxy = _summed(all_reduce, x, x.sum(0), y.sum(0), x.t() @ x, x.t() @ y)
        a, b = ridge_from_sums(float(n), sx, sy, sxx, sxy, lam)
    head.weight.copy_(a.to(head.weight.dtype))
    head.bias.copy_(b.to(head.bias.dtype))
