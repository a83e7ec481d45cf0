"""``--method two-teachers``: PromptKD from two prompted teachers at once (an extension, not in
the paper). The KD target is the mean of the teachers' class probabilities at the loss's
temperature τ, each teacher's logits ``s_k · u_k W_kᵀ`` taken against its own W_k; the student
stores the first teacher's W, and the second teacher is ``distill.extra_teachers[0]``.

The loss is ``ComKDLoss``'s KL, unchanged: it is handed ``τ · log p̄`` as the teacher's logits,
whose softmax at τ is exactly the mean p̄ = ½ (softmax(q_1/τ) + softmax(q_2/τ)).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .tasks import DistillTask


class TwoTeachersTask(DistillTask):
    """``DistillTask`` whose KD target averages the probabilities of all its teacher sides."""

    def teacher_logits(
        self, images: torch.Tensor, indices: torch.Tensor, epoch: int, u_t: torch.Tensor
    ) -> torch.Tensor:
        """``τ · log p̄`` ``[B, N]``: p̄ the mean over the teachers of softmax(q_k / τ)."""
        tau = float(self.loss.temperature)
        logits = [super().teacher_logits(images, indices, epoch, u_t)]
        logits += [side.logits(images, indices, epoch) for side in self.sides[1:]]
        log_p = torch.stack([F.log_softmax(q / tau, dim=-1) for q in logits])
        return tau * (torch.logsumexp(log_p, dim=0) - math.log(len(logits)))
