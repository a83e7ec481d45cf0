"""The recipe table (``comkd.methods``): one spelling, derived choices, resolved defaults, and a
new method added as one table entry plus its loss code; PromptKD's distillation step replayed from
its definition in plain torch."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from typer.testing import CliRunner

from comkd import cli
from comkd.config import ConfigError, load_config
from comkd.config_rules import resolve_recipe
from comkd.engine.tasks import DistillTask
from comkd.losses import build_loss, kd_kl
from comkd.methods import (
    METHODS,
    Method,
    canonical_method,
    method_spec,
    register_method,
    unregister_method,
)
from comkd.protocols.report import LABELS, METHOD_ORDER
from support import TINY_DISTILL_OPTS


class CosineKDLoss(nn.Module):
    """The toy method's loss: w_kd · KL plus a cosine distance between u_s and u_t."""

    def __init__(self, kd_weight: float, cosine_weight: float = 1.0, **_recipe) -> None:
        super().__init__()
        self.kd_weight, self.cosine_weight = kd_weight, cosine_weight

    def forward(self, student_logits, teacher_logits, student_features, teacher_features, **_align):
        kd = self.kd_weight * kd_kl(student_logits, teacher_logits)
        cosine = (1 - F.cosine_similarity(student_features.float(), teacher_features.float(), dim=-1)).mean()
        return {"loss": kd + self.cosine_weight * cosine, "kd": kd, "cosine": cosine}


TOY = Method(
    "toy-cosine", "Toy cosine KD", edu_attention=False, loss={"cosine_weight": 0.5}, make_loss=CosineKDLoss
)


@pytest.fixture
def toy_method():
    register_method(TOY)
    try:
        yield TOY
    finally:
        unregister_method(TOY.name)


def test_one_spelling_for_the_table_and_the_config() -> None:
    assert canonical_method("No_IFAlign") == "no-ifalign"
    assert load_config(sets=["distill.method=no_ifalign"]).distill.method == "no-ifalign"
    assert method_spec("no_ifalign") == method_spec("no-ifalign")
    with pytest.raises(
        ConfigError, match=r"^distill\.method: 'comkd-v2' is not allowed; choose one of comkd, promptkd"
    ):
        load_config(sets=["distill.method=comkd-v2"])


def test_choices_and_labels_come_from_the_table(toy_method) -> None:
    assert load_config(sets=["distill.method=toy-cosine"]).distill.method == "toy-cosine"
    assert METHOD_ORDER[2:8] == [
        "promptkd",
        "comkd",
        "no-ifalign",
        "no-eduattention",
        "feature-l1",
        "feature-mse",
    ]
    assert all(LABELS[m] == METHODS[m].label for m in METHOD_ORDER[2:8])
    r = CliRunner().invoke(cli.app, ["distill", "--help"], terminal_width=400)
    assert "feature-mse" in r.output and "promptkd" in r.output


@pytest.mark.parametrize(("dataset", "want"), [("dtd", 200.0), ("oxford_flowers", 200.0), ("digits", 1000.0)])
def test_resolve_fills_the_per_dataset_kd_weight(dataset: str, want: float) -> None:
    cfg = load_config(sets=[f"data.dataset={dataset}"])
    assert cfg.distill.kd_weight is None
    assert resolve_recipe(cfg).distill.kd_weight == want
    assert cfg.distill.kd_weight is None  # a copy: the caller's config is untouched
    assert (
        resolve_recipe(load_config(sets=[f"data.dataset={dataset}", "distill.kd_weight=7"])).distill.kd_weight
        == 7
    )


def test_a_registered_method_builds_its_loss(toy_method) -> None:
    torch.manual_seed(0)
    q_s, q_t = torch.randn(4, 3), torch.randn(4, 3)
    u_s, u_t = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
    loss = build_loss(
        "toy_cosine",
        kd_weight=10.0,
        temperature=1.0,
        align_weight=1.0,
        ifalign_stats="per_channel",
        feature_weight=1.0,
    )
    assert isinstance(loss, CosineKDLoss) and loss.cosine_weight == 0.5
    out = loss(q_s, q_t, u_s, u_t)
    cos = float((1 - (u_s * u_t).sum(-1)).mean())
    assert float(out["loss"]) == pytest.approx(10.0 * float(kd_kl(q_s, q_t)) + 0.5 * cos, rel=1e-5)


def _tiny_distill(method: str, out):
    """``comkd distill`` of the tiny pair with ``method``, into ``out``."""
    args = ["distill", "--teacher", "comkd-tiny-teacher", "--method", method, "--out-dir", str(out)]
    return CliRunner().invoke(cli.app, [*args, *TINY_DISTILL_OPTS])


def test_a_registered_method_runs_a_tiny_distillation(toy_method, tmp_path) -> None:
    r = _tiny_distill("toy-cosine", tmp_path)
    assert r.exit_code == 0, r.output
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["distill"]["method"] == "toy-cosine" and saved["distill"]["kd_weight"] == 1000.0
    steps = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("cosine" in rec for rec in steps)
    from comkd.models.io import load_student

    assert load_student(tmp_path / "student.safetensors").edu_attention is None  # the entry's switch


def test_unregistering_restores_the_table(toy_method) -> None:
    assert "toy-cosine" in METHODS
    with pytest.raises(ValueError, match="already registered"):
        register_method(TOY)
    unregister_method("toy-cosine")
    assert "toy-cosine" not in METHODS
    register_method(TOY)  # the fixture unregisters it again


class AnchoredTask(DistillTask):
    """A method with its own task and its own input: the toy method's distillation plus an L2 pull
    of the trainable weights toward a snapshot of their values at the start (which DistillTask
    does not hold)."""

    def __init__(self, student, *args, **kwargs) -> None:
        super().__init__(student, *args, **kwargs)
        self.start = [p.detach().clone() for p in student.trainable_parameters()]

    def step(self, batch, epoch: int) -> dict[str, torch.Tensor]:
        terms = super().step(batch, epoch)
        anchor = sum(
            ((p - p0.to(p.device)) ** 2).sum()
            for p, p0 in zip(self.student.trainable_parameters(), self.start, strict=True)
        )
        return {**terms, "loss": terms["loss"] + anchor, "anchor": anchor}


def test_a_method_with_its_own_task_is_a_table_entry_plus_the_task(tmp_path) -> None:
    method = Method("toy-anchored", "Toy anchored KD", edu_attention=False, make_task=AnchoredTask.from_sides)
    register_method(method)
    try:
        r = _tiny_distill("toy_anchored", tmp_path)
    finally:
        unregister_method(method.name)
    assert r.exit_code == 0, r.output
    steps = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    anchors = [rec["anchor"] for rec in steps if "anchor" in rec]
    assert anchors and anchors[0] >= 0.0 and max(anchors) > 0.0  # the task's own term was trained on


def test_run_refuses_an_unknown_method_before_any_stage(tmp_path) -> None:
    r = CliRunner().invoke(
        cli.app,
        [
            "run",
            "--config",
            "demo",
            "--method",
            "promptkd",
            "--method",
            "comkdd",
            "--out-dir",
            str(tmp_path / "r"),
        ],
    )
    assert r.exit_code == 1
    assert "unknown distillation method 'comkdd'; choose one of comkd, promptkd" in r.output
    assert not (tmp_path / "r").exists()  # nothing ran, nothing written


def test_a_method_named_another_way_runs_under_its_table_spelling_and_says_so(tmp_path) -> None:
    args = ["run", "--config", "demo", "--method", "COMKD", "--method", "no_ifalign", "--method", "promptkd"]
    r = CliRunner().invoke(cli.app, [*args, "--dataset", "nonexist", "--out-dir", str(tmp_path / "r")])
    assert "note: method 'COMKD' is read as 'comkd'" in r.output
    assert "note: method 'no_ifalign' is read as 'no-ifalign'" in r.output
    assert "'promptkd' is read" not in r.output  # the table's own spelling passes without a note
    assert r.exit_code == 1 and "unknown dataset 'nonexist'" in r.output  # then the cheap stop


# -- PromptKD's distillation step, replayed from its definition ----------------------------------
def test_promptkd_steps_replayed_in_plain_torch_match_comkd_distill(tmp_path, one_thread) -> None:
    """PromptKD's stage 2 written out from its definition, in plain torch, against
    ``comkd distill --method promptkd --recipe paper`` on the tiny pair: two optimiser steps (so
    the momentum acts), the same images in the same order. Logits from each side's own scale;
    loss = KD_WEIGHT · kl_div(log_softmax(q_s/T), softmax(q_t/T), 'sum') · T² / numel; SGD with
    momentum 0.9 and weight decay 5e-4 on the prompts and the projector. The run's logged losses
    and its saved weights must match a float64 replay to float32's error; the same replay with another reduction, weight or
    optimiser is shown to miss by far more, so the comparison has the power to catch them."""
    import torch.nn.functional as F
    from safetensors.torch import load_file

    from comkd.engine.builders import build_student, build_teacher, make_dataset
    from comkd.engine.sampling import EpochBatchSampler
    from comkd.engine.tasks import TeacherOutputs
    from comkd.engine.utils import seed_everything

    sets = ["data.image_size=16", "distill.optim.epochs=1", "distill.optim.warmup_epochs=0", "progress=false"]
    sets += ["log_every=1", "teacher.model=comkd-tiny-teacher", "student.model=comkd-tiny-student"]
    sets += ["distill.method=promptkd", "distill.recipe=paper"]
    cfg = load_config(sets=sets)
    d = cfg.distill
    assert (d.optim.optimizer, d.optim.lr, d.optim.momentum, d.optim.weight_decay) == (
        "sgd",
        0.005,
        0.9,
        5e-4,
    )

    # the pair, the images and the order, as the run draws them (the models are not the subject here)
    seed_everything(cfg.seed)
    device = torch.device("cpu")
    teacher = build_teacher(cfg, device)
    student = build_student(cfg, teacher.embed_dim, device)
    ds = make_dataset(cfg, d.split, student.preprocess, train=True, unlabelled=True, augment=d.augment)
    w = teacher.class_text_features(ds.full_classnames).detach()
    s_t = float(teacher.logit_scale)
    batch = len(ds) // 2
    sampler = EpochBatchSampler(len(ds), batch, cfg.seed)
    sampler.set_epoch(0)
    ds.set_epoch(0)
    batches = [torch.stack([ds[i][0] for i in idx]) for idx in sampler]
    assert len(batches) == 2
    teacher_out = TeacherOutputs(teacher, student.preprocess)
    u_t = [teacher_out(x, None, 0).detach() for x in batches]

    r = CliRunner().invoke(
        cli.app,
        [
            "distill",
            "--out-dir",
            str(tmp_path / "run"),
            "--no-evaluate",
            "--set",
            f"distill.optim.batch_size={batch}",
        ]
        + [a for s in sets for a in ("--set", s)],
    )
    assert r.exit_code == 0, r.output
    logged = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [
        rec["loss"] for rec in logged if rec.get("stage") == "distill" and "lr" in rec and "type" not in rec
    ]
    run_sd = load_file(str(tmp_path / "run" / "student.safetensors"))
    start = {k: v.detach().clone() for k, v in student.state_dict().items()}

    def replay(reduction="sum", kd_weight=1000.0, momentum=0.9, dtype=torch.float32):
        student.to(dtype).load_state_dict(start)
        names = [n for n, p in student.named_parameters() if p.requires_grad]
        assert names and all(n.startswith(("visual.prompts", "projector.")) for n in names), names
        params = [p for p in student.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=0.005, momentum=momentum, weight_decay=5e-4)
        student.train()
        losses = []
        for x, ut in zip(batches, u_t, strict=True):
            wd, ut = w.to(dtype), ut.to(dtype)
            q_t = s_t * ut @ wd.t()
            u_s = F.normalize(student.projector(student.visual(x.to(dtype))), dim=-1)
            q_s = student.logit_scale * u_s @ wd.t()
            T = 1.0
            kl = F.kl_div(F.log_softmax(q_s / T, dim=1), F.softmax(q_t / T, dim=1), reduction=reduction)
            loss = kd_weight * (kl * T * T / q_s.numel() if reduction == "sum" else kl)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        running = [losses[0], (losses[0] + losses[1]) / 2]  # the log holds the epoch's running mean
        return running, {k: v.detach().double().clone() for k, v in student.state_dict().items()}

    assert d.temperature == 1.0
    # The reference is the replay in float64; the run and a float32 replay are each compared with it.
    # Error analysis: a float32 sum of n terms is off by up to (n - 1)u relatively (u = 2^-24), and
    # the order of the sums depends on the CPU and its threads. Two SGD steps of lr x kd_weight = 5
    # amplify that: against float64, measured here at 1, 2 and 4 threads, the float32 losses are off
    # by 0.07-9.2e-6 (relative) and the weights, which move by up to 2.0, by 0.6-1.8e-4 (absolute).
    # A fixed 1e-6 between two float32 orders sat at that edge and failed on another CPU of this
    # kind. The tolerances are 5x and more above the worst measured; every wrong reading below,
    # computed in float64 (so its miss is the same on every machine), misses by at least 10x them.
    LOSS_RTOL, W_ATOL = 5e-5, 1e-3
    ref_losses, ref_sd = replay(dtype=torch.float64)
    f32_losses, f32_sd = replay()
    student.float()
    trained = [k for k in ref_sd if k.startswith(("visual.prompts", "projector."))]
    assert any(float((ref_sd[k] - start[k].double()).abs().max()) > 1e-2 for k in trained)  # it moved
    for losses, sd in ((logged, run_sd), (f32_losses, f32_sd)):  # the run, and this process's order
        assert losses == pytest.approx(ref_losses, rel=LOSS_RTOL)
        for k in trained:
            gap = float((sd[k].double() - ref_sd[k]).abs().max())
            assert gap < W_ATOL, (k, gap)
    # the power of the comparison: another reduction or weight misses the losses, and another
    # optimiser (no momentum: the same losses, other weights) misses the weights
    for other in (dict(reduction="batchmean"), dict(kd_weight=200.0), dict(momentum=0.0)):
        o_losses, o_sd = replay(dtype=torch.float64, **other)
        loss_miss = max(abs(a - b) / abs(b) for a, b in zip(o_losses, ref_losses, strict=True))
        w_miss = max(float((ref_sd[k] - o_sd[k]).abs().max()) for k in trained)
        assert loss_miss > 10 * LOSS_RTOL or w_miss > 10 * W_ATOL, (other, loss_miss, w_miss)


def test_two_teachers_target_is_the_mean_of_their_probabilities_against_numpy() -> None:
    """The two-teacher method's KD target: τ · log p̄ with p̄ the mean of softmax(s_k u_k W_kᵀ / τ),
    each teacher with its own W and s; the KL against it equals the KL against p̄ (NumPy)."""
    import numpy as np

    from comkd.engine.tasks import TeacherSide
    from comkd.engine.two_teachers import TwoTeachersTask

    g = torch.Generator().manual_seed(3)
    b, n, tau = 5, 4, 2.0
    u = [F.normalize(torch.randn(b, d, generator=g), dim=-1) for d in (8, 6)]  # two feature widths
    w = [F.normalize(torch.randn(n, d, generator=g), dim=-1) for d in (8, 6)]
    scales = (30.0, 12.5)
    sides = [TeacherSide(lambda x, i, e, k=k: u[k], w[k], scales[k], {"model": f"t{k}"}) for k in (0, 1)]
    loss = build_loss("two-teachers", kd_weight=1.0, temperature=tau)
    task = TwoTeachersTask.from_sides(None, sides, loss)
    images, idx = torch.zeros(b, 3, 2, 2), torch.arange(b)
    target = task.teacher_logits(images, idx, 0, sides[0].outputs(images, idx, 0))

    def softmax(z):
        z = z - z.max(-1, keepdims=True)
        return np.exp(z) / np.exp(z).sum(-1, keepdims=True)

    q = [scales[k] * u[k].double().numpy() @ w[k].double().numpy().T for k in (0, 1)]
    p_bar = (softmax(q[0] / tau) + softmax(q[1] / tau)) / 2
    assert np.allclose(softmax(target.double().numpy() / tau), p_bar, atol=1e-6)
    s = torch.randn(b, n, generator=g)
    log_q = np.log(softmax(s.double().numpy() / tau))
    want = (p_bar * (np.log(p_bar) - log_q)).sum() * tau**2 / (b * n)  # PromptKD's reduction
    assert float(kd_kl(s, target, tau)) == pytest.approx(want, rel=1e-5)
    # one side: the target is that teacher's own logits (up to a constant per row)
    one = TwoTeachersTask.from_sides(None, sides[:1], loss).teacher_logits(images, idx, 0, u[0])
    assert np.allclose(softmax(one.double().numpy() / tau), softmax(q[0] / tau), atol=1e-6)


def test_the_two_teacher_method_runs_end_to_end_from_two_differently_seeded_teachers(
    tmp_path, tiny_teacher_files, one_thread
) -> None:
    """A method owning two teacher sides, added as one module and one table entry: selectable as
    --method, refused in one line without its second teacher, and its student records both."""
    from comkd.models.io import load_student

    f = tiny_teacher_files
    first = ["--teacher-pretrained", str(f["weights_a"]), "--teacher-prompts", str(f["prompts_a"])]
    second = f"distill.extra_teachers=[{{model: comkd-tiny-teacher, pretrained: {f['weights_b']}, prompts: {f['prompts_b']}}}]"
    r = CliRunner().invoke(
        cli.app,
        ["distill", "--teacher", "comkd-tiny-teacher", "--method", "two-teachers", *first,
         "--out-dir", str(tmp_path / "none"), *TINY_DISTILL_OPTS],
    )  # fmt: skip
    assert r.exit_code == 2 and "distils from 2 teachers" in r.output and "extra_teachers" in r.output, (
        r.output
    )
    assert not (tmp_path / "none").exists()  # refused before anything was written
    outs = {}
    for method, extra in (("two-teachers", ["--set", second]), ("promptkd", [])):
        out = tmp_path / method
        r = CliRunner().invoke(
            cli.app,
            ["distill", "--teacher", "comkd-tiny-teacher", "--method", method, *first, *extra,
             "--out-dir", str(out), *TINY_DISTILL_OPTS],
        )  # fmt: skip
        assert r.exit_code == 0, r.output
        outs[method] = load_student(out / "student.safetensors")
    both = outs["two-teachers"].teacher_identities
    assert both is not None and len(both) == 2 and both[0] == outs["two-teachers"].teacher_identity
    assert both[0]["prompts_sha256"] != both[1]["prompts_sha256"]  # two different teachers recorded
    assert outs["promptkd"].teacher_identities is None  # one teacher: today's file format
    assert outs["promptkd"].teacher_identity == both[0]
    # same seed, data and first teacher: only the second teacher's half of the target differs
    a, b = (outs[m].state_dict() for m in ("two-teachers", "promptkd"))
    assert torch.equal(a["text_features"], b["text_features"])  # W is the first teacher's
    assert any(not torch.equal(a[k], b[k]) for k in a if k != "text_features")
    assert LABELS["two-teachers"] == "PromptKD, two teachers"
    saved = yaml.safe_load((tmp_path / "two-teachers" / "config.yaml").read_text())
    assert saved["distill"]["extra_teachers"][0]["prompts"] == str(f["prompts_b"])


def test_a_run_with_a_method_of_two_teachers_and_one_teacher_is_refused_before_any_stage(tmp_path) -> None:
    r = CliRunner().invoke(
        cli.app,
        ["run", "--config", "demo", "--method", "promptkd", "--method", "two-teachers", "--out-dir", str(tmp_path / "r")],
    )  # fmt: skip
    assert r.exit_code != 0 and "method 'two-teachers' distils from 2 teachers" in r.output, r.output
    assert not (tmp_path / "r").exists()
    # a single-teacher method beside the extra teachers of another is not refused by the config
    cfg = load_config(sets=["distill.extra_teachers=[{model: comkd-tiny-teacher}]"])
    assert cfg.distill.method == "comkd" and len(cfg.distill.extra_teachers) == 1
