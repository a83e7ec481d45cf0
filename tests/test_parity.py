"""Paper parity (items 3-10): each reading checked against an independent computation
(open_clip's own tag metadata, PromptKD's scripts, docs/method.md's formulas)."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
import yaml
from typer.testing import CliRunner

from comkd import cli
from comkd.config import ConfigError, load_config, save_config
from comkd.models import ModelError, load_clip, uses_quick_gelu
from comkd.models import backbones as B


# -- item 3: a pretrained tag's activation -------------------------------------------------------
@pytest.mark.parametrize("model", ["ViT-L-14", "ViT-B-16"])
def test_openai_tags_need_quick_gelu_in_open_clips_own_metadata(model) -> None:
    assert open_clip.get_pretrained_cfg(model, "openai")["quick_gelu"] is True
    assert B.tag_quick_gelu(model, "openai")
    assert not B.tag_quick_gelu(model, "laion2b_s34b_b88k" if model == "ViT-B-16" else "laion2b_s32b_b82k")


def _build_without_download(monkeypatch) -> list:
    """open_clip.create_model builds the architecture it is asked for but loads no weights."""
    calls = []
    real = open_clip.create_model

    def create(name, pretrained=None, **kw):
        calls.append((name, pretrained, kw))
        return real(name, pretrained=None, **kw)

    monkeypatch.setattr(B.open_clip, "create_model", create)
    return calls


@pytest.mark.parametrize("tag", ["openai", "laion2b_s34b_b79k"])
def test_a_pretrained_tag_builds_the_activation_its_weights_need(monkeypatch, tag) -> None:
    calls = _build_without_download(monkeypatch)
    loaded = load_clip("ViT-B-32", tag)
    want = bool(open_clip.get_pretrained_cfg("ViT-B-32", tag).get("quick_gelu", False))
    assert calls[0][1] == tag
    assert uses_quick_gelu(loaded.model) is want  # QuickGELU modules in the built towers
    assert bool(loaded.config.get("quick_gelu", False)) is want  # recorded in saved weights' metadata


def test_a_student_file_records_the_activation_in_effect(tmp_path) -> None:
    from comkd.engine.pipeline import build_student
    from comkd.models.io import load_student, save_student

    cfg = load_config("demo", sets=["student.quick_gelu=true"])
    student = build_student(cfg, 32, "cpu")
    cfg.student.quick_gelu = False  # the config no longer says so; the file must still know
    save_student(student, tmp_path / "s.safetensors")
    assert uses_quick_gelu(load_student(tmp_path / "s.safetensors").visual)


# -- item 4: random weights only when asked for in so many words ---------------------------------
def test_a_known_architecture_without_weights_is_refused() -> None:
    with pytest.raises(ModelError) as err:
        load_clip("ViT-B-16", None)
    msg = str(err.value)
    assert "ViT-B-16" in msg and "'none'" in msg and "openai" in msg and "\n" not in msg


def test_random_weights_on_request_and_tiny_models_from_scratch(monkeypatch) -> None:
    calls = _build_without_download(monkeypatch)
    loaded = load_clip("ViT-B-32", "none")
    assert calls[-1][1] is None and not uses_quick_gelu(loaded.model)
    assert load_clip("comkd-tiny-student", None).model is not None  # no pretrained tags: fine


def test_none_is_a_value_for_pretrained_in_yaml_sets_and_flags(tmp_path) -> None:
    y = tmp_path / "c.yaml"
    y.write_text("teacher: {pretrained: none}\nstudent: {pretrained: None}\n")
    cfg = load_config(str(y))
    assert (cfg.teacher.pretrained, cfg.student.pretrained) == ("none", "none")
    assert load_config(sets=["student.pretrained=none"]).student.pretrained == "none"
    assert load_config(overrides={"teacher": {"pretrained": "none"}}).teacher.pretrained == "none"
    assert load_config(sets=["student.pretrained=null"]).student.pretrained is None  # YAML null: unset
    save_config(cfg, tmp_path / "saved.yaml")
    assert yaml.safe_load((tmp_path / "saved.yaml").read_text())["teacher"]["pretrained"] == "none"
    assert load_config(str(tmp_path / "saved.yaml")).teacher.pretrained == "none"


def test_cli_refuses_the_paper_teacher_without_weights(tmp_path) -> None:
    r = CliRunner().invoke(cli.app, ["train-teacher", "--out-dir", str(tmp_path), "--set", "progress=false"])
    assert r.exit_code == 1
    assert "ViT-L-14" in r.output and "none" in r.output and "Traceback" not in r.output


# -- item 5: the cross-dataset / DG student ------------------------------------------------------
def _record_protocol(monkeypatch, cfg, protocol, datasets):
    """Run ``run_protocol`` with every stage replaced by a recorder of the config it gets."""
    from comkd.protocols import report, runner

    seen: dict[str, tuple] = {}

    def distill(c, method, out, resume):
        seen[c.data.dataset] = (c.student.vision_depth, c.distill.kd_weight)
        return (
            {"acc": 50.0}
            if protocol != "base2novel"
            else {"base": {"acc": 50.0}, "novel": {"acc": 40.0}, "hm": 44.4}
        )

    monkeypatch.setattr(runner, "_pretrain_if_enabled", lambda c, root, resume: c)
    monkeypatch.setattr(runner, "_teacher_stage", lambda c, out, resume: c)
    monkeypatch.setattr(runner, "_distill_and_eval", distill)
    monkeypatch.setattr(runner, "read_metrics", lambda path: [])
    monkeypatch.setattr(runner.P, "build_teacher", lambda c, device: None)
    monkeypatch.setattr(runner.P, "evaluate_teacher", lambda c, t, split: distill(c, "teacher", None, False))
    monkeypatch.setattr(
        runner.P, "evaluate_clip_zero_shot", lambda c, role, split: distill(c, "zs", None, False)
    )
    monkeypatch.setattr(report, "write_report", lambda *a, **k: None)
    cfg.protocol = protocol
    runner.run_protocol(cfg, cfg.output_dir, datasets=datasets, methods=["comkd"], source="imagenet")
    return seen


@pytest.mark.parametrize("protocol", ["cross", "dg"])
def test_cross_and_dg_use_promptkds_cross_dataset_student(monkeypatch, tmp_path, protocol) -> None:
    # PromptKD's cross-dataset scripts: prompt depth 3 and w_kd 1000 for every target, including
    # the three whose base-to-novel weight is 200
    cfg = load_config(sets=[f"output_dir={tmp_path}"])
    seen = _record_protocol(monkeypatch, cfg, protocol, ["fgvc_aircraft", "oxford_flowers", "dtd", "eurosat"])
    assert seen == {d: (3, 1000.0) for d in ("fgvc_aircraft", "oxford_flowers", "dtd", "eurosat")}
    assert cfg.student.vision_depth is None and cfg.distill.kd_weight is None  # the caller's cfg untouched


def test_cross_keeps_what_the_user_set(monkeypatch, tmp_path) -> None:
    cfg = load_config(sets=[f"output_dir={tmp_path}", "student.vision_depth=5", "distill.kd_weight=50"])
    assert _record_protocol(monkeypatch, cfg, "cross", ["dtd"]) == {"dtd": (5, 50.0)}


def test_base2novel_keeps_the_per_dataset_recipe(monkeypatch, tmp_path) -> None:
    from comkd.methods import paper_kd_weight

    cfg = load_config(sets=[f"output_dir={tmp_path}", "data.dataset=dtd"])
    assert _record_protocol(monkeypatch, cfg, "base2novel", ["dtd"]) == {"dtd": (None, None)}
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["hm_of_means"]["dtd"]["comkd"] == pytest.approx(2 * 50 * 40 / 90)  # item 7: the paper's HM
    assert paper_kd_weight("dtd") == 200.0 and paper_kd_weight("eurosat") == 1000.0


# -- item 9: settings that would silently do nothing -----------------------------------------------
def test_select_promptkd_is_refused_without_an_evaluation_set(tmp_path) -> None:
    r = CliRunner().invoke(
        cli.app,
        ["distill", "--config", "demo", "--set", "distill.select=promptkd", "--out-dir", str(tmp_path / "d")],
    )
    assert r.exit_code == 1 and "distill.select" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "d").exists()  # refused before anything is written


def test_protocol_all_is_not_accepted() -> None:
    from comkd.config import ConfigError

    with pytest.raises(ConfigError, match="protocol: 'all' is not allowed"):
        load_config(sets=["protocol=all"])
    r = CliRunner().invoke(cli.app, ["run", "--protocol", "all"])
    assert r.exit_code == 2 and "protocol" in r.output and "KeyError" not in r.output


# -- item 10: stage-0 choices do not look at test data ---------------------------------------------
def test_pretrain_is_scored_on_val_where_the_dataset_has_one(tmp_path) -> None:
    from comkd.engine.pipeline import pretrain_eval_split

    assert load_config().pretrain.eval_split is None
    assert pretrain_eval_split(load_config("demo")) == "val"  # digits: pretrain/train/val/test
    assert pretrain_eval_split(load_config("demo", sets=["pretrain.eval_split=test"])) == "test"
    for c in "ab":  # an image folder split without a val share
        (tmp_path / c).mkdir()
        for i in range(4):
            (tmp_path / c / f"{i}.png").write_bytes(b"")
    cfg = load_config(
        sets=["data.dataset=imagefolder", f"data.root={tmp_path}", "data.fractions=[0.5,0.5,0,0]"]
    )
    assert pretrain_eval_split(cfg) == "test"
    cfg.data.fractions = [0.25, 0.25, 0.25, 0.25]
    assert pretrain_eval_split(cfg) == "val"


@pytest.mark.slow
def test_pretrain_reports_the_split_it_was_scored_on(tmp_path) -> None:
    from comkd.engine.pipeline import run_pretrain

    cfg = load_config(
        "demo", sets=["pretrain.optim.epochs=1", "pretrain.optim.warmup_epochs=0", "progress=false"]
    )
    res = run_pretrain(cfg, tmp_path, which=("student",))
    assert res["student"]["eval_split"] == "val"
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["pretrain"]["eval_split"] is None


@pytest.mark.slow
def test_pretrain_student_shots_give_the_student_fewer_labelled_images(tmp_path) -> None:
    from comkd.engine.builders import make_dataset
    from comkd.engine.pipeline import run_pretrain
    from comkd.models.backbones import load_clip

    sets = ["pretrain.optim.epochs=1", "pretrain.optim.warmup_epochs=0", "pretrain.optim.batch_size=8"]
    cfg = load_config("demo", sets=[*sets, "progress=false", "pretrain.student_shots=3"])
    full = load_config("demo", sets=sets)
    spec = load_clip(cfg.student.model, image_size=cfg.data.image_size).preprocess
    whole = make_dataset(full, full.pretrain.split, spec, train=True)
    res = run_pretrain(cfg, tmp_path, which=("student",))
    assert res["student"]["pool_images"] == 3 * len(whole.classnames) < len(whole)
    few = make_dataset(cfg, cfg.pretrain.split, spec, train=True, shots=3)
    labels = list(few.labels)
    assert sorted(labels.count(c) for c in set(labels)) == [3] * len(whole.classnames)
    with pytest.raises(ConfigError, match="pretrain.student_shots: must be >= 1"):
        load_config("demo", sets=["pretrain.student_shots=0"])


# -- item 7: both HM conventions, labelled ------------------------------------------------------
def test_tables_report_the_papers_hm_of_means_next_to_the_mean_per_seed_hm(tmp_path) -> None:
    from comkd.protocols.report import (
        HM_OF_MEANS,
        HM_PER_SEED,
        average_base2novel,
        results_table,
        write_report,
    )

    hm = [2 * b * n / (b + n) for b, n in ((90.0, 50.0), (50.0, 90.0))]  # 64.29 each seed
    row = {"base": [90.0, 50.0], "novel": [50.0, 90.0], "hm": hm}
    table = {"dtd": {"comkd": row}, "eurosat": {"comkd": {"base": [80.0], "novel": [60.0], "hm": [960 / 14]}}}
    md = results_table(table)
    line = next(x for x in md.splitlines() if x.startswith("| ComKD-CLIP") and "70.00" in x)
    assert line.split(" | ")[3:5] == ["70.00", "64.29 ± 0.00 |"]  # paper HM(70, 70), then the per-seed mean
    assert HM_OF_MEANS in md and HM_PER_SEED in md
    avg = average_base2novel(table)["comkd"]
    assert avg["hm"] == pytest.approx(2 * 75 * 65 / 140)  # HM of the averaged base and novel
    assert avg["hm_per_seed"] == pytest.approx((hm[0] + 960 / 14) / 2)
    results = {"protocol": "base2novel", "seeds": [1, 2], "datasets": table, "average": {"comkd": avg}}
    report = write_report(results, tmp_path).read_text()
    assert (
        "(paper)" in report
        and f"{avg['hm_per_seed']:.2f}" in report
        and "HM(mean base, mean novel)" in report
    )


# -- item 8: PromptSRC's text regulariser target ------------------------------------------------
def test_promptsrc_templates_are_shipped() -> None:
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    from comkd.data import promptsrc_templates

    t = promptsrc_templates()
    assert len(t) == len(set(t)) == 60  # PromptSRC's IMAGENET_TEMPLATES
    assert t[0] == "a photo of a {}." and t[-1] == "itap of the {}."
    assert set(t) <= {f("{}") for f in OPENAI_IMAGENET_TEMPLATES}  # all from CLIP's 80 ImageNet prompts


def test_frozen_text_target_is_the_normalised_mean_of_unnormalised_features() -> None:
    import torch
    import torch.nn.functional as F

    from comkd.models import create_teacher

    torch.manual_seed(0)
    teacher = create_teacher("comkd-tiny-teacher").eval()
    names, templates = ["cat", "dog", "ship"], ["a photo of a {}.", "a sketch of the {}.", "itap of the {}."]
    tok = open_clip.get_tokenizer("comkd-tiny-teacher")
    with torch.no_grad():  # open_clip's own frozen text tower, not comkd's prompted encoder
        raw = torch.stack(
            [teacher.clip.encode_text(tok([t.format(c) for c in names])).float() for t in templates]
        )
    want = F.normalize(raw.mean(0), dim=-1)
    got = teacher.encode_templates(names, templates)
    assert torch.allclose(got, want, atol=1e-5)
    one_template_each = F.normalize(F.normalize(raw, dim=-1).mean(0), dim=-1)
    assert not torch.allclose(got, one_template_each, atol=1e-5)  # the old reading is a different target


@pytest.mark.parametrize("choice", ["promptsrc", "dataset"])
def test_stage1_regularises_towards_promptsrc_templates_by_default(monkeypatch, tmp_path, choice) -> None:
    from comkd.data import promptsrc_templates
    from comkd.data.builtin import DIGITS_TEMPLATE
    from comkd.engine import pipeline as P
    from comkd.engine import stages

    seen = {}

    class Stop(Exception):
        pass

    def task(teacher, classnames, templates, *a):
        seen["templates"] = list(templates)
        raise Stop

    monkeypatch.setattr(stages, "TeacherPromptTask", task)
    assert load_config().teacher_train.text_templates == "promptsrc"
    cfg = load_config("demo", sets=[f"teacher_train.text_templates={choice}"])
    with pytest.raises(Stop):
        P.run_train_teacher(cfg, tmp_path)
    assert seen["templates"] == (promptsrc_templates() if choice == "promptsrc" else [DIGITS_TEMPLATE])


def test_cross_depth_is_capped_at_a_small_towers_layers() -> None:
    from comkd.protocols.runner import protocol_recipe

    tiny = protocol_recipe(load_config("demo"), "cross")  # comkd-tiny-student has 2 layers
    assert (tiny.student.vision_depth, tiny.distill.kd_weight) == (2, 1000.0)
    assert protocol_recipe(load_config(), "dg").student.vision_depth == 3  # ViT-B-16: 12 layers


# -- PromptKD's distillation step, replayed from its definition ----------------------------------
def test_promptkd_steps_replayed_in_plain_torch_match_comkd_distill(tmp_path, one_thread) -> None:
    """PromptKD's stage 2 written out from its definition, in plain torch, against
    ``comkd distill --method promptkd --recipe paper`` on the tiny pair: two optimiser steps (so
    the momentum acts), the same images in the same order. Logits from each side's own scale;
    loss = KD_WEIGHT · kl_div(log_softmax(q_s/T), softmax(q_t/T), 'sum') · T² / numel; SGD with
    momentum 0.9 and weight decay 5e-4 on the prompts and the projector. The run's logged losses
    and its saved weights must match to 1e-6; the same replay with another reduction, weight or
    optimiser is shown to miss by far more, so the comparison has the power to catch them."""
    import torch.nn.functional as F
    from safetensors.torch import load_file

    from comkd.engine import pipeline as P
    from comkd.engine.sampling import EpochBatchSampler
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
    teacher = P.build_teacher(cfg, device)
    student = P.build_student(cfg, teacher.embed_dim, device)
    ds = P.make_dataset(cfg, d.split, student.preprocess, train=True, unlabelled=True, augment=d.augment)
    w = teacher.class_text_features(ds.full_classnames).detach()
    s_t = float(teacher.logit_scale)
    batch = len(ds) // 2
    sampler = EpochBatchSampler(len(ds), batch, cfg.seed)
    sampler.set_epoch(0)
    ds.set_epoch(0)
    batches = [torch.stack([ds[i][0] for i in idx]) for idx in sampler]
    assert len(batches) == 2
    teacher_out = P.TeacherOutputs(teacher, student.preprocess)
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

    def replay(reduction: str = "sum", kd_weight: float = 1000.0, momentum: float = 0.9):
        student.load_state_dict(start)
        names = [n for n, p in student.named_parameters() if p.requires_grad]
        assert names and all(n.startswith(("visual.prompts", "projector.")) for n in names), names
        params = [p for p in student.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=0.005, momentum=momentum, weight_decay=5e-4)
        student.train()
        losses = []
        for x, ut in zip(batches, u_t, strict=True):
            q_t = s_t * ut @ w.t()
            u_s = F.normalize(student.projector(student.visual(x)), dim=-1)
            q_s = student.logit_scale * u_s @ w.t()
            T = 1.0
            kl = F.kl_div(F.log_softmax(q_s / T, dim=1), F.softmax(q_t / T, dim=1), reduction=reduction)
            loss = kd_weight * (kl * T * T / q_s.numel() if reduction == "sum" else kl)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        running = [losses[0], (losses[0] + losses[1]) / 2]  # the log holds the epoch's running mean
        return running, {k: v.detach().clone() for k, v in student.state_dict().items()}

    losses, sd = replay()
    assert d.temperature == 1.0
    # one thread (the fixture): float32 sums split over threads come in another order, and w_kd =
    # 1000 scales that rounding up past 1e-6 within two steps
    assert logged == pytest.approx(losses, rel=1e-6, abs=1e-6)
    trained = [k for k in sd if k.startswith(("visual.prompts", "projector."))]
    assert any(float((sd[k].float() - start[k].float()).abs().max()) > 1e-4 for k in trained)  # it moved
    for k in trained:
        torch.testing.assert_close(run_sd[k], sd[k], atol=1e-6, rtol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    # the power of the comparison: another reduction, weight or optimiser misses by far more than 1e-6
    for other in (dict(reduction="batchmean"), dict(kd_weight=200.0), dict(momentum=0.0)):
        o_losses, o_sd = replay(**other)
        gap = max(float((run_sd[k].float() - o_sd[k].float()).abs().max()) for k in trained)
        assert gap > 1e-5 or abs(o_losses[1] - logged[1]) > 1e-3, other
