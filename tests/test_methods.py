"""The recipe table (``comkd.methods``): one spelling, derived choices, resolved defaults, and a
new method added as one table entry plus its loss code."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from typer.testing import CliRunner

from comkd import cli
from comkd.config import ConfigError, load_config, resolve_recipe
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
from conftest import TINY_DISTILL_OPTS


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
    method = Method("toy-anchored", "Toy anchored KD", edu_attention=False, make_task=AnchoredTask)
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
