"""The settings that make distillation pay (docs/method.md, "Extensions"), each against an independent
NumPy computation: cosine EduAttention with a bounded gate, the ridge warm start of the projector,
IFAlign on the projector output, the frozen-BN projector, and the student's training scope."""

from __future__ import annotations

import copy
import math
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from comkd.engine.tasks import DistillTask
from comkd.losses import ComKDLoss, ifalign
from comkd.models import EduAttention, create_student, create_teacher
from comkd.models.backbones import TINY_STUDENT, TINY_TEACHER
from comkd.models.io import load_student
from comkd.models.projector import LinearProjector, Projector, fit_projector, ridge, ridge_from_sums

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on one thread


def np_norm(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_cosine_edu(u: np.ndarray, w: np.ndarray, mod: EduAttention) -> tuple[np.ndarray, np.ndarray]:
    """f_e = u + tanh(α) · norm(FC_o(softmax(τ · norm(Q) norm(K)ᵀ) V)), one head; returns (f_e, attn)."""

    def lin(x, fc):
        return x @ fc.weight.detach().double().numpy().T + fc.bias.detach().double().numpy()

    q, k, v = lin(u, mod.fc_q), lin(w, mod.fc_k), lin(w, mod.fc_v)
    tau = math.exp(float(mod.log_temperature.detach()))
    scores = tau * np_norm(q) @ np_norm(k).T
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    att = p @ v
    return u + math.tanh(float(mod.alpha.detach())) * np_norm(att), p


def separable(n: int = 6, d: int = 16, b: int = 12, seed: int = 0, noise: float = 0.3):
    """Unit class vectors and unit image features near their class (like CLIP features)."""
    g = torch.Generator().manual_seed(seed)
    w = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    y = torch.arange(b) % n
    u = F.normalize(w[y] + noise * torch.randn(b, d, generator=g, dtype=torch.float64) / math.sqrt(d), dim=-1)
    return u, w, y


def test_cosine_edu_attention_matches_numpy() -> None:
    torch.manual_seed(0)
    mod = EduAttention(16, mode="cosine", init_temperature=30.0).double()
    with torch.no_grad():  # move away from the identity init so the check covers the general case
        for fc in (mod.fc_q, mod.fc_k, mod.fc_v):
            fc.weight.add_(0.1 * torch.randn_like(fc.weight))
            fc.bias.add_(0.1 * torch.randn_like(fc.bias))
        mod.alpha.fill_(0.8)
    u, w, _ = separable()
    want, p = np_cosine_edu(u.numpy(), w.numpy(), mod)
    np.testing.assert_allclose(mod(u, w).detach().numpy(), want, rtol=1e-9, atol=1e-12)
    _, attn = mod.attend(u, w)
    np.testing.assert_allclose(attn[:, 0].detach().numpy(), p, rtol=1e-9, atol=1e-12)


def test_cosine_attention_attends_at_init_and_paper_reading_does_not() -> None:
    torch.manual_seed(1)
    u, w, y = separable()
    cos = EduAttention(16, mode="cosine", init_temperature=100.0).double()
    # identity init: the attention is the student's own class posterior softmax(s · u·Wᵀ)
    _, attn = cos.attend(u, w)
    np.testing.assert_allclose(
        attn[:, 0].detach().numpy(), torch.softmax(100.0 * u @ w.t(), -1).numpy(), rtol=1e-9, atol=1e-12
    )
    ent = float((-(attn * attn.clamp_min(1e-300).log()).sum(-1) / math.log(len(w))).mean().detach())
    assert ent < 0.2
    assert (attn[:, 0].argmax(-1) == y).float().mean() == 1.0
    paper = EduAttention(16, mode="paper").double()
    _, attn_p = paper.attend(u, w)
    ent_p = float((-(attn_p * attn_p.log()).sum(-1) / math.log(len(w))).mean().detach())
    assert ent_p > 0.99  # the plain reading's uniform softmax


def test_cosine_gate_is_bounded_and_alpha_zero_is_promptkd() -> None:
    torch.manual_seed(2)
    u, w, _ = separable()
    mod = EduAttention(16, mode="cosine").double()
    assert torch.equal(mod(u, w), u)  # α = 0: exactly u_s, step 0 is PromptKD
    with torch.no_grad():
        mod.alpha.fill_(1e6)  # any α: |f_e − u_s| ≤ 1
    assert float((mod(u, w) - u).norm(dim=-1).max().detach()) <= 1.0 + 1e-9


def test_cosine_fc_q_k_get_gradient_once_alpha_moves() -> None:
    torch.manual_seed(3)
    u, w, y = separable(d=128, noise=1.0)
    grads = {}
    for mode in ("cosine", "paper"):
        torch.manual_seed(3)
        mod = EduAttention(128, mode=mode, init_temperature=10.0).double()
        with torch.no_grad():
            mod.alpha.fill_(0.5)
        logits = 10.0 * F.normalize(mod(u, w), dim=-1) @ w.t()
        F.cross_entropy(logits, y).backward()
        grads[mode] = (float(mod.fc_q.weight.grad.norm()), float(mod.fc_v.weight.grad.norm()))
    q_cos, v_cos = grads["cosine"]
    q_pap, v_pap = grads["paper"]
    # FC_q's gradient relative to FC_v's: non-negligible with cosine scores, and over 10x the
    # plain reading's (whose scores u·w/√C barely depend on FC_q)
    assert q_cos / v_cos > 0.03
    assert q_cos / v_cos > 10 * (q_pap / v_pap)


def test_ridge_matches_numpy_least_squares() -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(50, 6, generator=g, dtype=torch.float64) * 3 + 1
    y = torch.randn(50, 4, generator=g, dtype=torch.float64)
    lam = 0.05
    a, b = ridge(x, y, lam)
    # independent: the augmented normal equations with the bias column unpenalised
    xn, yn = x.numpy(), y.numpy()
    xc = xn - xn.mean(0)
    reg = lam * np.mean(np.diag(xc.T @ xc))
    xa = np.hstack([xn, np.ones((50, 1))])
    pen = reg * np.eye(7)
    pen[6, 6] = 0.0
    sol = np.linalg.solve(xa.T @ xa + pen, xa.T @ yn)
    np.testing.assert_allclose(a.numpy(), sol[:6].T, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(b.numpy(), sol[6], rtol=1e-8, atol=1e-10)


def test_fit_projector_recovers_a_linear_map_and_fits_the_mlp_head() -> None:
    torch.manual_seed(5)
    x = torch.randn(400, 8)
    true = torch.randn(12, 8)
    y = x @ true.t() + 0.5
    lin = LinearProjector(8, 12)
    fit_projector(lin, x, y, lam=1e-8)
    torch.testing.assert_close(lin(x), y, atol=1e-3, rtol=1e-3)
    mlp = Projector(8, 12)
    before = float(((mlp.eval()(x) - y) ** 2).mean())
    fit_projector(mlp, x, y, lam=1e-4)
    z = mlp[0](x)
    torch.testing.assert_close(mlp[1].running_mean, z.mean(0))  # BN set to its input's statistics
    torch.testing.assert_close(mlp[1].running_var, z.var(0))
    with torch.no_grad():
        hidden = torch.relu((z - z.mean(0)) / torch.sqrt(z.var(0) + mlp[1].eps) * mlp[1].weight + mlp[1].bias)
        a, b = ridge(hidden, y, 1e-4)
        torch.testing.assert_close(mlp.eval()(x), (hidden.double() @ a.t() + b).float(), atol=1e-4, rtol=1e-4)
    after = float(((mlp.eval()(x) - y) ** 2).mean())
    assert after < 0.5 * before


def test_ridge_from_sums_matches_ridge_on_the_rows() -> None:
    """The fit torchrun ranks make from their summed rows (Σx, Σy, Σxxᵀ, Σxyᵀ) is ``ridge`` on all
    the rows (checked against ``ridge``, itself checked against NumPy above)."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(60, 5, generator=g, dtype=torch.float64) * 2 + 3  # off-centre: the n·x̄x̄ᵀ term matters
    y = torch.randn(60, 3, generator=g, dtype=torch.float64) - 1
    a, b = ridge(x, y, 0.02)
    a2, b2 = ridge_from_sums(60.0, x.sum(0), y.sum(0), x.t() @ x, x.t() @ y, 0.02)
    torch.testing.assert_close(a2, a, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(b2, b, rtol=1e-9, atol=1e-11)


def _thread_all_reduce(n: int):
    """``n`` all-reduce functions (one per simulated rank, each run in its own thread) that return
    the sum of the ``n`` tensors given to the same call, as torch.distributed's would."""
    slots: list[torch.Tensor | None] = [None] * n
    meet = threading.Barrier(n)

    def for_rank(r: int):
        def all_reduce(t: torch.Tensor) -> torch.Tensor:
            slots[r] = t
            meet.wait()
            total = sum(slots[1:], slots[0])
            meet.wait()  # every rank has read the slots before the next call fills them
            return total

        return all_reduce

    return [for_rank(r) for r in range(n)]


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_fit_projector_over_ranks_equals_one_process(kind: str) -> None:
    """Three simulated ranks, each with its strided share of the rows and an all-reduce of their
    sums, set the projector (BatchNorm statistics included) as one process with every row does,
    and all three alike."""
    torch.manual_seed(8)
    x = torch.randn(97, 8) * 1.5 + 0.7
    y = x @ torch.randn(12, 8).t() + 0.1 * torch.randn(97, 12)
    torch.manual_seed(9)
    one = (LinearProjector if kind == "linear" else Projector)(8, 12)
    ranks = [copy.deepcopy(one) for _ in range(3)]
    fit_projector(one, x, y, lam=1e-3)
    reducers = _thread_all_reduce(3)
    threads = [
        threading.Thread(target=fit_projector, args=(p, x[r::3], y[r::3], 1e-3, reducers[r]))
        for r, p in enumerate(ranks)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    want = one.state_dict()
    for p in ranks:
        for name, v in p.state_dict().items():
            torch.testing.assert_close(v.float(), want[name].float(), rtol=1e-4, atol=1e-5, msg=name)
            torch.testing.assert_close(v, ranks[0].state_dict()[name], rtol=0, atol=0)
    assert not torch.equal(ranks[0].state_dict()[list(want)[-1]], torch.zeros_like(want[list(want)[-1]]))


def test_ifalign_on_projected_features_and_frozen_bn_and_full_scope() -> None:
    torch.manual_seed(6)
    teacher = create_teacher(TINY_TEACHER)
    names = ["a", "b", "c"]
    w = teacher.class_text_features(names)
    s = create_student(
        TINY_STUDENT, teacher_dim=teacher.embed_dim, projector_bn="frozen", scope="full", edu_mode="cosine"
    )
    s.set_text_features(w, names)
    s.train()
    assert not s.projector[1].training  # BN frozen in training mode
    x = torch.randn(4, 3, 32, 32)
    out = s(x)
    torch.testing.assert_close(out.features, F.normalize(out.projected, dim=-1))
    u_t = F.normalize(torch.randn(4, teacher.embed_dim), dim=-1)
    loss = ComKDLoss(kd_weight=1.0, align_weight=1.0)
    terms = loss(out.logits, out.logits.detach(), out.features, u_t, align_features=out.projected)
    torch.testing.assert_close(terms["align"], ifalign(out.projected, u_t))
    assert not torch.allclose(terms["align"], ifalign(out.features, u_t))
    # scope full: the tower's own weights are trainable, in their own group at tower_lr_scale
    task = DistillTask(s, None, w, 100.0, loss, edu_lr_scale=0.5, tower_lr_scale=0.1)
    groups = task.parameter_groups()
    tower_ids = {id(p) for p in s.visual.visual.parameters()}
    assert tower_ids and {id(p) for p in groups[2]["params"]} == tower_ids and groups[2]["lr_scale"] == 0.1
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in s.edu_attention.parameters()}
    assert id(s.visual.prompts) in {id(p) for p in groups[0]["params"]}
    assert sum(len(g["params"]) for g in groups) == len(s.trainable_parameters())
    prompts_only = create_student(TINY_STUDENT, teacher_dim=teacher.embed_dim)
    assert prompts_only.tower_parameters() == []


@pytest.mark.slow
def test_distill_with_ridge_warm_start_step0_and_saved_settings(tmp_path) -> None:
    from comkd.config import load_config
    from comkd.engine.builders import build_student, build_teacher, make_dataset
    from comkd.engine.distill import run_distill
    from comkd.engine.tasks import TeacherOutputs
    from comkd.models.projector import fit_projector as fit

    cfg = load_config(
        "demo",
        sets=[
            "pretrain.enabled=false",
            "distill.optim.epochs=1",
            "distill.optim.batch_size=32",
            "progress=false",
            "teacher.text_depth=1",
            "distill.optim.warmup_epochs=0",
            "teacher.vision_depth=1",
            "student.scope=prompts",  # not the demo preset's: the file must record what was run
        ],
    )
    assert cfg.distill.projector_init == "ridge" and cfg.student.projector_bn == "frozen"
    seen = {}

    def step0(student):  # called before and after the warm start
        seen["head"] = student.projector[-1].weight.detach().clone()
        seen["bn_mean"] = student.projector[1].running_mean.detach().clone()
        seen["calls"] = seen.get("calls", 0) + 1
        return {"hm": float(seen["calls"])}

    torch.manual_seed(0)
    info = run_distill(cfg, tmp_path / "run", step0_fn=step0)
    assert info["step0"] == {"hm": 2.0, "random_init": {"hm": 1.0}}
    # independent: the same features and teacher targets, fitted again from a fresh projector
    from comkd.engine.utils import seed_everything

    seed_everything(cfg.seed)  # as run_distill does, so the fresh models get the same random init
    device = torch.device("cpu")
    teacher = build_teacher(cfg, device)
    student = build_student(cfg, teacher.embed_dim, device)
    ds = make_dataset(
        cfg, cfg.distill.split, student.preprocess, train=True, unlabelled=True, augment=cfg.distill.augment
    )
    ds.set_epoch(0)
    xs = torch.stack([ds[i][0] for i in range(len(ds))])
    with torch.no_grad():
        f = student.visual(xs)
        u_t = TeacherOutputs(teacher, student.preprocess)(xs, None, 0)
    fit(student.projector, f, u_t, cfg.distill.ridge_lambda)
    torch.testing.assert_close(seen["bn_mean"], student.projector[1].running_mean)
    torch.testing.assert_close(seen["head"], student.projector[-1].weight, atol=1e-4, rtol=1e-4)
    loaded = load_student(info["student"])
    assert (
        loaded.edu_attention.mode == "cosine"
        and loaded.projector_bn == "frozen"
        and loaded.scope == "prompts"
    )
    # frozen BN: training never moved the running statistics the warm start set
    torch.testing.assert_close(loaded.projector[1].running_mean, seen["bn_mean"])
