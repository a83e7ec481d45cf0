"""The ComKD-CLIP objective (docs/method.md, "The objective") and its ablations: the switches of
each named method are in ``comkd.methods``; ``build_loss`` turns a method name into its loss.

IFAlign is here whole: ``ifalign`` (the statistics matched) and ``ifalign_pair`` (which features
it compares, ``distill.ifalign_on``). ``ComKDLoss`` returns a dict of named terms: ``loss`` (what is back-propagated), ``kd`` (weighted
logit KL), ``align`` (unweighted IFAlign), and for the feature baselines ``feature``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .choices import IfalignOn, IfalignStats, KdReduction, values
from .methods import get_method

__all__ = ["IFALIGN_ON", "IFALIGN_STATS", "ComKDLoss", "build_loss", "ifalign", "ifalign_pair", "kd_kl"]

IFALIGN_STATS = values(IfalignStats)


KD_REDUCTIONS = values(KdReduction)


def kd_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    reduction: str = "promptkd",
) -> torch.Tensor:
    """τ² · Σ KL(softmax(q_t/τ) ‖ softmax(q_s/τ)) / (B·N), unweighted (PromptKD's reduction); with
    ``reduction='textbook'`` divided by B only (the KL per image, as Eq. 8 reads plainly: PromptKD's
    value times N).

    Both logits ``[B, N]``; the teacher's carry no gradient.
    """
    if reduction not in KD_REDUCTIONS:
        raise ValueError(f"kd_kl: reduction must be one of {KD_REDUCTIONS}, got {reduction!r}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"kd_kl: student logits {list(student_logits.shape)} and teacher logits "
            f"{list(teacher_logits.shape)} differ"
        )
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.detach().float() / t, dim=-1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="sum", log_target=True)
    return kl * (t * t) / (student_logits.numel() if reduction == "promptkd" else student_logits.shape[0])


def ifalign(
    student_features: torch.Tensor, teacher_features: torch.Tensor, stats: str = "per_channel"
) -> torch.Tensor:
    """L_align = mean_c |μ_s − μ_t| + mean_c |σ²_s − σ²_t| (biased variance).

    ``per_channel`` (default): statistics over the batch, one per channel.
    ``per_sample``: statistics over the channels of each sample, averaged over the batch.
    """
    if student_features.shape != teacher_features.shape:
        raise ValueError(
            f"ifalign: student features {list(student_features.shape)} and teacher features "
            f"{list(teacher_features.shape)} differ"
        )
    if stats not in IFALIGN_STATS:
        raise ValueError(f"ifalign: stats must be one of {IFALIGN_STATS}, got {stats!r}")
    dim = 0 if stats == "per_channel" else 1
    s, t = student_features.float(), teacher_features.detach().float()
    mu_s, mu_t = s.mean(dim), t.mean(dim)
    var_s, var_t = s.var(dim, unbiased=False), t.var(dim, unbiased=False)
    return (mu_s - mu_t).abs().mean() + (var_s - var_t).abs().mean()


#: what IFAlign compares (``distill.ifalign_on``); see ``ifalign_pair``
IFALIGN_ON = values(IfalignOn)


def ifalign_pair(
    features: torch.Tensor | None, projected: torch.Tensor | None, u_t: torch.Tensor, on: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two feature sets IFAlign matches, ``[B, d]`` each.

    ``features``: u_s against u_t, both unit-norm (the paper). ``projected``: P(f) before its
    normalisation against the unit-norm u_t, so IFAlign also pulls P(f)'s scale towards 1.
    ``projected_matched``: P(f) against u_t scaled to P(f)'s mean norm over the batch (a constant,
    no gradient): both sides on the same scale, so only the spread of P(f) around its scale and its
    channel statistics are matched, not the scale itself (which the logits never see).
    """
    if on == "features":
        return features, u_t
    if on == "projected":
        return projected, u_t
    if on == "projected_matched":
        return projected, u_t * projected.detach().norm(dim=-1).mean()
    raise ValueError(f"ifalign_on must be one of {', '.join(IFALIGN_ON)}, got {on!r}")


class ComKDLoss(nn.Module):
    """L_total = w_kd · L_kd + λ_align · L_align (+ a feature term for the baselines).

    Args:
        kd_weight: w_kd (1000; 200 for FGVCAircraft, Flowers102, DTD).
        temperature: τ.
        align_weight: λ_align.
        use_ifalign: False drops L_align from the total (``no_ifalign``, PromptKD).
        ifalign_stats: ``per_channel`` or ``per_sample``.
        feature_loss: None, ``l1`` or ``mse``: feature-distillation baselines between the projected
            student features and the teacher's image features.
        use_kd: False drops the logit KL (the feature baselines use only the feature term).
        feature_weight: weight of the feature term.
        kd_reduction: ``promptkd`` (Σ KL / (B·N)) or ``textbook`` (Σ KL / B); see ``kd_kl``.
    """

    def __init__(
        self,
        kd_weight: float = 1000.0,
        temperature: float = 1.0,
        align_weight: float = 1.0,
        use_ifalign: bool = True,
        ifalign_stats: str = "per_channel",
        feature_loss: str | None = None,
        use_kd: bool = True,
        feature_weight: float = 1.0,
        kd_reduction: str = "promptkd",
    ):
        super().__init__()
        if kd_reduction not in KD_REDUCTIONS:
            raise ValueError(f"kd_reduction must be one of {KD_REDUCTIONS}, got {kd_reduction!r}")
        self.kd_reduction = kd_reduction
        if feature_loss not in (None, "l1", "mse"):
            raise ValueError(f"feature_loss must be None, 'l1' or 'mse', got {feature_loss!r}")
        if ifalign_stats not in IFALIGN_STATS:
            raise ValueError(f"ifalign_stats must be one of {IFALIGN_STATS}, got {ifalign_stats!r}")
        self.kd_weight, self.temperature = kd_weight, temperature
        self.align_weight, self.use_ifalign, self.ifalign_stats = align_weight, use_ifalign, ifalign_stats
        self.feature_loss, self.use_kd, self.feature_weight = feature_loss, use_kd, feature_weight

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        student_features: torch.Tensor,
        teacher_features: torch.Tensor,
        align_features: torch.Tensor | None = None,
        align_targets: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Logits ``[B, N]``; features ``[B, d]`` (u_s and u_t). ``align_features`` ``[B', d]``: the
        student features IFAlign matches instead of u_s (e.g. the projector output before
        normalisation, or the global batch gathered over ranks), with ``align_targets`` ``[B', d]``
        the teacher features of the same images (default u_t). Returns the named terms."""
        kd = (
            self.kd_weight * kd_kl(student_logits, teacher_logits, self.temperature, self.kd_reduction)
            if self.use_kd
            else student_logits.new_zeros((), dtype=torch.float32)
        )
        a_s = student_features if align_features is None else align_features
        a_t = teacher_features if align_targets is None else align_targets
        align = ifalign(a_s, a_t, self.ifalign_stats)
        total = kd + (self.align_weight * align if self.use_ifalign else 0.0)
        out = {"kd": kd, "align": align}
        if self.feature_loss is not None:
            fn = F.l1_loss if self.feature_loss == "l1" else F.mse_loss
            feat = fn(student_features.float(), teacher_features.detach().float())
            total = total + self.feature_weight * feat
            out["feature"] = feat
        out["loss"] = total
        return out


def build_loss(method: str, **recipe: Any) -> nn.Module:
    """The loss of a named method: its table switches (``comkd.methods.METHODS``), with recipe
    values (``kd_weight``, ``temperature``, ...) on top; the method's own ``make_loss`` when it
    has one, else ``ComKDLoss``."""
    m = get_method(method)
    return (m.make_loss or ComKDLoss)(**{**m.loss, **recipe})
