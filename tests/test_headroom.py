"""The headroom probe (experiments/headroom.py): its KD loss against a NumPy reference, every head
starting as PromptKD's own logits, a fit that can only lower the loss, and base/novel scoring."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from experiments.headroom import HEADS, Head, base_novel_hm, fit_head, kd_loss


def test_kd_loss_matches_numpy() -> None:
    g = torch.Generator().manual_seed(0)
    q_s, q_t, t = torch.randn(6, 5, generator=g) * 3, torch.randn(6, 5, generator=g) * 3, 2.0

    def softmax(x):
        e = np.exp(x - x.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    p_t, p_s = softmax(q_t.numpy() / t), softmax(q_s.numpy() / t)
    ref = (p_t * (np.log(p_t) - np.log(p_s))).sum(1).mean() * t * t
    assert float(kd_loss(q_s, q_t, t)) == pytest.approx(float(ref), rel=1e-5)


@pytest.mark.parametrize("kind", HEADS)
def test_every_head_starts_as_promptkd_and_a_fit_lowers_the_loss(kind) -> None:
    torch.manual_seed(0)
    d, n = 8, 5
    u = F.normalize(torch.randn(64, d), dim=-1)
    w = F.normalize(torch.randn(n, d), dim=-1)
    q_t = 20.0 * F.normalize(u + 0.3 * torch.randn(64, d), dim=-1) @ w.t() + torch.randn(n)
    head = Head(kind, d, n, scale=20.0, renorm=True)
    with torch.no_grad():
        torch.testing.assert_close(head(u, w), 20.0 * u @ w.t())
        start = float(kd_loss(head(u, w), q_t, 1.0))
    fit_head(head, u, w, q_t, 1.0, steps=60, lr=1e-2)
    with torch.no_grad():
        assert float(kd_loss(head(u, w), q_t, 1.0)) < start


def test_base_novel_hm_slices_the_logits_per_half() -> None:
    # 4 classes: base 0, 1; novel 2, 3. Image 0 (class 0): best over all is class 2, best among
    # base is 0 (right); image 1 (class 3): best among novel is 2 (wrong)
    logits = torch.tensor([[5.0, 1.0, 9.0, 0.0], [0.0, 0.0, 4.0, 3.0]])
    labels = torch.tensor([0, 3])
    r = base_novel_hm(logits, labels, [0, 1], [2, 3])
    assert r["base"] == 100.0 and r["novel"] == 0.0 and r["hm"] == 0.0
