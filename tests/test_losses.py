"""Unit tests for comkd.losses (docs/method.md, "IFAlign" and "The objective").

Every value is checked against an independent NumPy computation written from the equations,
not from the implementation.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from comkd.losses import ComKDLoss, build_loss, ifalign, kd_kl
from comkd.methods import METHODS, method_spec

# -- independent references (NumPy, float64, explicit loops) -------------------------------------


def np_softmax_rows(x: np.ndarray) -> np.ndarray:
    out = np.empty_like(x)
    for b in range(x.shape[0]):
        e = np.exp(x[b] - x[b].max())
        out[b] = e / e.sum()
    return out


def np_kd_kl(q_s: np.ndarray, q_t: np.ndarray, tau: float, textbook: bool = False) -> float:
    """τ² · Σ_b Σ_n p_t log(p_t / p_s) / (B·N); / B for the textbook reading."""
    p_s = np_softmax_rows(q_s / tau)
    p_t = np_softmax_rows(q_t / tau)
    b, n = q_s.shape
    total = 0.0
    for i in range(b):
        for j in range(n):
            total += p_t[i, j] * np.log(p_t[i, j] / p_s[i, j])
    return tau * tau * total / (b if textbook else b * n)


def np_ifalign(u_s: np.ndarray, u_t: np.ndarray, stats: str) -> float:
    """mean |μ_s − μ_t| + mean |σ²_s − σ²_t| with biased variance; statistics over the batch
    (per_channel) or over the channels of each sample (per_sample)."""
    if stats == "per_sample":
        u_s, u_t = u_s.T, u_t.T  # the statistics then run over the former dim 1
    rows, cols = u_s.shape
    mu_terms, var_terms = [], []
    for c in range(cols):
        xs = [u_s[i, c] for i in range(rows)]
        xt = [u_t[i, c] for i in range(rows)]
        mu_s, mu_t = sum(xs) / rows, sum(xt) / rows
        var_s = sum((v - mu_s) ** 2 for v in xs) / rows
        var_t = sum((v - mu_t) ** 2 for v in xt) / rows
        mu_terms.append(abs(mu_s - mu_t))
        var_terms.append(abs(var_s - var_t))
    return sum(mu_terms) / cols + sum(var_terms) / cols


def unit_rows(b: int, d: int, dtype=torch.float64) -> torch.Tensor:
    x = torch.randn(b, d, dtype=dtype)
    return x / x.norm(dim=1, keepdim=True)


# -- kd_kl -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_kd_kl_matches_numpy(tau: float) -> None:
    torch.manual_seed(0)
    q_s = torch.randn(3, 5, dtype=torch.float64) * 3
    q_t = torch.randn(3, 5, dtype=torch.float64) * 3
    got = kd_kl(q_s, q_t, temperature=tau)
    want = np_kd_kl(q_s.numpy(), q_t.numpy(), tau)
    assert got.ndim == 0
    assert want > 0
    assert float(got) == pytest.approx(want, rel=1e-5, abs=1e-7)


def test_kd_kl_is_zero_for_equal_logits_and_not_symmetric() -> None:
    torch.manual_seed(1)
    q = torch.randn(4, 6)
    assert float(kd_kl(q, q.clone())) == pytest.approx(0.0, abs=1e-7)
    a, b = torch.randn(2, 6) * 4, torch.randn(2, 6) * 4
    # KL(p_t ‖ p_s) with the teacher first: swapping the arguments changes the value
    assert float(kd_kl(a, b)) == pytest.approx(
        np_kd_kl(a.double().numpy(), b.double().numpy(), 1.0), rel=1e-5
    )
    assert float(kd_kl(b, a)) == pytest.approx(
        np_kd_kl(b.double().numpy(), a.double().numpy(), 1.0), rel=1e-5
    )
    assert abs(float(kd_kl(a, b)) - float(kd_kl(b, a))) > 1e-4


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_kd_kl_gradient_flows_only_to_student(tau: float) -> None:
    torch.manual_seed(2)
    q_s = (torch.randn(3, 4, dtype=torch.float64) * 2).requires_grad_(True)
    q_t = (torch.randn(3, 4, dtype=torch.float64) * 2).requires_grad_(True)
    kd_kl(q_s, q_t, temperature=tau).backward()
    assert q_t.grad is None
    assert q_s.grad is not None
    # d/dq_s [τ² Σ p_t log(p_t/p_s) / (BN)] = τ (p_s − p_t) / (BN)
    p_s = np_softmax_rows(q_s.detach().numpy() / tau)
    p_t = np_softmax_rows(q_t.detach().numpy() / tau)
    want = tau * (p_s - p_t) / q_s.numel()
    np.testing.assert_allclose(q_s.grad.numpy(), want, rtol=1e-4, atol=1e-8)
    assert np.abs(want).max() > 1e-3


def test_kd_kl_shape_mismatch_names_both_shapes() -> None:
    torch.manual_seed(3)
    with pytest.raises(ValueError) as err:
        kd_kl(torch.randn(2, 3), torch.randn(2, 5))
    msg = str(err.value)
    assert "[2, 3]" in msg and "[2, 5]" in msg


# -- ifalign ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("stats", ["per_channel", "per_sample"])
def test_ifalign_matches_numpy(stats: str) -> None:
    torch.manual_seed(4)
    u_s = unit_rows(5, 7)
    u_t = unit_rows(5, 7) * 1.3 + 0.1  # make the statistics clearly different
    got = ifalign(u_s, u_t, stats=stats)
    want = np_ifalign(u_s.numpy(), u_t.numpy(), stats)
    assert got.ndim == 0
    assert want > 1e-2
    assert float(got) == pytest.approx(want, rel=1e-5)


def test_ifalign_default_is_per_channel_with_biased_variance() -> None:
    torch.manual_seed(5)
    u_s, u_t = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    got = float(ifalign(u_s, u_t))
    assert got == pytest.approx(np_ifalign(u_s.numpy(), u_t.numpy(), "per_channel"), rel=1e-5)
    # the unbiased-variance reading gives a different number (B = 4)
    s, t = u_s.numpy(), u_t.numpy()
    unbiased = np.abs(s.mean(0) - t.mean(0)).mean() + np.abs(s.var(0, ddof=1) - t.var(0, ddof=1)).mean()
    assert abs(got - unbiased) > 1e-3
    assert abs(got - np_ifalign(s, t, "per_sample")) > 1e-3


@pytest.mark.parametrize("stats", ["per_channel", "per_sample"])
def test_ifalign_is_zero_for_equal_features(stats: str) -> None:
    torch.manual_seed(6)
    u = unit_rows(6, 8, torch.float32)
    assert float(ifalign(u, u.clone(), stats=stats)) == 0.0


def test_ifalign_teacher_gets_no_gradient() -> None:
    torch.manual_seed(7)
    u_s = unit_rows(4, 5).requires_grad_(True)
    u_t = (unit_rows(4, 5) * 2).requires_grad_(True)
    ifalign(u_s, u_t).backward()
    assert u_t.grad is None
    assert u_s.grad is not None and u_s.grad.abs().max() > 0


def test_ifalign_rejects_bad_input() -> None:
    torch.manual_seed(8)
    with pytest.raises(ValueError, match=r"\[4, 5\].*\[4, 6\]"):
        ifalign(torch.randn(4, 5), torch.randn(4, 6))
    with pytest.raises(ValueError, match="per_batch"):
        ifalign(torch.randn(4, 5), torch.randn(4, 5), stats="per_batch")


# -- ComKDLoss ---------------------------------------------------------------------------------------


def _batch(b: int = 4, n: int = 6, d: int = 8):
    q_s = torch.randn(b, n, dtype=torch.float64) * 2
    q_t = torch.randn(b, n, dtype=torch.float64) * 2
    u_s = unit_rows(b, d)
    u_t = unit_rows(b, d) * 0.8 + 0.05
    return q_s, q_t, u_s, u_t


def test_comkd_loss_terms_and_total() -> None:
    torch.manual_seed(9)
    q_s, q_t, u_s, u_t = _batch()
    loss_fn = ComKDLoss(kd_weight=7.0, temperature=2.0, align_weight=0.3)
    out = loss_fn(q_s, q_t, u_s, u_t)
    assert {"loss", "kd", "align"} <= set(out)
    kd = 7.0 * np_kd_kl(q_s.numpy(), q_t.numpy(), 2.0)
    align = np_ifalign(u_s.numpy(), u_t.numpy(), "per_channel")
    assert float(out["kd"]) == pytest.approx(kd, rel=1e-5)
    assert float(out["align"]) == pytest.approx(align, rel=1e-5)
    assert float(out["loss"]) == pytest.approx(kd + 0.3 * align, rel=1e-5)


def test_comkd_loss_defaults_follow_method() -> None:
    torch.manual_seed(10)
    q_s, q_t, u_s, u_t = _batch()
    out = ComKDLoss()(q_s, q_t, u_s, u_t)  # w_kd = 1000, τ = 1, λ_align = 1
    kd = 1000.0 * np_kd_kl(q_s.numpy(), q_t.numpy(), 1.0)
    align = np_ifalign(u_s.numpy(), u_t.numpy(), "per_channel")
    assert float(out["loss"]) == pytest.approx(kd + align, rel=1e-5)


def test_comkd_loss_per_sample_switch() -> None:
    torch.manual_seed(11)
    q_s, q_t, u_s, u_t = _batch()
    out = ComKDLoss(kd_weight=1.0, ifalign_stats="per_sample")(q_s, q_t, u_s, u_t)
    assert float(out["align"]) == pytest.approx(np_ifalign(u_s.numpy(), u_t.numpy(), "per_sample"), rel=1e-5)
    with pytest.raises(ValueError, match="bogus"):
        ComKDLoss(ifalign_stats="bogus")


def test_comkd_loss_without_ifalign_still_reports_align() -> None:
    torch.manual_seed(12)
    q_s, q_t, u_s, u_t = _batch()
    out = ComKDLoss(kd_weight=5.0, align_weight=2.0, use_ifalign=False)(q_s, q_t, u_s, u_t)
    kd = 5.0 * np_kd_kl(q_s.numpy(), q_t.numpy(), 1.0)
    align = np_ifalign(u_s.numpy(), u_t.numpy(), "per_channel")
    assert align > 1e-2
    assert float(out["align"]) == pytest.approx(align, rel=1e-5)
    assert float(out["loss"]) == pytest.approx(kd, rel=1e-5)


def test_comkd_loss_backpropagates_into_student_only() -> None:
    torch.manual_seed(13)
    q_s, q_t, u_s, u_t = (t.requires_grad_(True) for t in _batch())
    ComKDLoss(kd_weight=3.0)(q_s, q_t, u_s, u_t)["loss"].backward()
    assert q_t.grad is None and u_t.grad is None
    assert q_s.grad.abs().max() > 0 and u_s.grad.abs().max() > 0


@pytest.mark.parametrize("method", ["feature-l1", "feature-mse"])
def test_feature_baselines(method: str) -> None:
    torch.manual_seed(14)
    q_s, q_t, u_s, u_t = _batch()
    loss_fn = build_loss(method)
    out = loss_fn(q_s, q_t, u_s, u_t)
    diff = u_s.numpy() - u_t.numpy()
    want = np.abs(diff).mean() if method == "feature-l1" else (diff**2).mean()
    assert float(out["feature"]) == pytest.approx(want, rel=1e-5)
    assert float(out["loss"]) == pytest.approx(want, rel=1e-5)
    assert float(out["kd"]) == 0.0
    # the logit KL is ignored: other teacher logits give the same loss
    out2 = loss_fn(q_s, torch.randn_like(q_t) * 5, u_s, u_t)
    assert float(out2["loss"]) == float(out["loss"])
    # ... while the feature term does react to the features
    out3 = loss_fn(q_s, q_t, u_s, u_t * 0.5)
    assert abs(float(out3["loss"]) - float(out["loss"])) > 1e-4


def test_build_loss_switches_and_overrides() -> None:
    torch.manual_seed(15)
    q_s, q_t, u_s, u_t = _batch()
    kd = np_kd_kl(q_s.numpy(), q_t.numpy(), 1.0)
    align = np_ifalign(u_s.numpy(), u_t.numpy(), "per_channel")
    promptkd = build_loss("promptkd", kd_weight=200.0)(q_s, q_t, u_s, u_t)
    assert float(promptkd["loss"]) == pytest.approx(200.0 * kd, rel=1e-5)
    comkd = build_loss("comkd", kd_weight=200.0)(q_s, q_t, u_s, u_t)
    assert float(comkd["loss"]) == pytest.approx(200.0 * kd + align, rel=1e-5)
    assert build_loss("no_ifalign").use_ifalign is False  # underscores are accepted
    assert method_spec("No-EduAttention")["edu_attention"] is False
    assert method_spec("comkd")["edu_attention"] is True


def test_method_spec_unknown_lists_valid_names() -> None:
    torch.manual_seed(16)
    with pytest.raises(ValueError) as err:
        method_spec("comkd-v2")
    msg = str(err.value)
    assert "comkd-v2" in msg
    names = ["comkd", "promptkd", "no-ifalign", "no-eduattention", "feature-l1", "feature-mse"]
    assert set(names) <= set(METHODS)
    for name in names:
        assert name in msg
    with pytest.raises(ValueError, match="promptkd"):
        build_loss("nonsense")


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_the_textbook_kl_reading_matches_numpy_and_is_promptkds_times_n(tau: float) -> None:
    rng = np.random.default_rng(7)
    q_s, q_t = rng.normal(size=(5, 7)) * 3, rng.normal(size=(5, 7)) * 3
    s, t = torch.tensor(q_s), torch.tensor(q_t)
    got = float(kd_kl(s, t, tau, reduction="textbook"))
    assert got == pytest.approx(np_kd_kl(q_s, q_t, tau, textbook=True), rel=1e-6)
    assert got == pytest.approx(7 * float(kd_kl(s, t, tau)), rel=1e-6)  # kd_weight = N of PromptKD's
    loss = ComKDLoss(kd_weight=1.0, temperature=tau, use_ifalign=False, kd_reduction="textbook")
    u = torch.nn.functional.normalize(torch.randn(5, 4), dim=-1)
    assert float(loss(s, t, u, u)["loss"]) == pytest.approx(got, rel=1e-6)
    with pytest.raises(ValueError, match="reduction must be one of"):
        kd_kl(s, t, tau, reduction="mean")


# -- what IFAlign compares (distill.ifalign_on) ------------------------------------------------
def test_ifalign_pairs_against_numpy() -> None:
    from comkd.losses import ifalign_pair

    g = torch.Generator().manual_seed(3)
    feats = torch.nn.functional.normalize(torch.randn(6, 4, generator=g), dim=-1)
    proj = 2.5 * torch.randn(6, 4, generator=g)
    u_t = torch.nn.functional.normalize(torch.randn(6, 4, generator=g), dim=-1)
    a, t = ifalign_pair(feats, None, u_t, "features")
    assert a is feats and t is u_t
    a, t = ifalign_pair(None, proj, u_t, "projected")
    assert a is proj and t is u_t
    a, t = ifalign_pair(None, proj, u_t, "projected_matched")
    scale = np.linalg.norm(proj.numpy(), axis=1).mean()
    assert a is proj
    np.testing.assert_allclose(t.numpy(), u_t.numpy() * scale, rtol=1e-6)
    with pytest.raises(ValueError, match="projected_matched"):
        ifalign_pair(feats, proj, u_t, "logits")


def test_matched_ifalign_ignores_the_students_scale_and_projected_does_not() -> None:
    """P(f) = k · u_t: the matched reading sees no difference for any k, the plain one a scale gap."""
    from comkd.losses import ifalign, ifalign_pair

    g = torch.Generator().manual_seed(4)
    u_t = torch.nn.functional.normalize(torch.randn(16, 8, generator=g), dim=-1)
    for k in (0.3, 1.0, 7.0):
        proj = (k * u_t).requires_grad_(True)
        matched = ifalign(*ifalign_pair(None, proj, u_t, "projected_matched"))
        plain = ifalign(*ifalign_pair(None, proj, u_t, "projected"))
        assert float(matched) == pytest.approx(0.0, abs=1e-6)
        assert (float(plain) > 1e-3) == (k != 1.0)
        _, target = ifalign_pair(None, proj, u_t, "projected_matched")
        assert not target.requires_grad  # the scale is a constant: no gradient flows through it
