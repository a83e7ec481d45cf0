"""The protocols' choices, each against what PromptKD's scripts and docs/method.md say: the
cross-dataset and DG student, stage 0 scored on val, the tables' two HM conventions."""

from __future__ import annotations

import json

import pytest
import yaml

from comkd.config import ConfigError, load_config


# -- the cross-dataset / DG student ------------------------------------------------------
def _fake_stages(monkeypatch, score) -> None:
    """Replace every stage and scoring of the protocols by ``score(cfg)`` (an ``evaluate_*`` result)."""
    from comkd.protocols import report, runner
    from comkd.protocols.protocol import Protocol

    monkeypatch.setattr(Protocol, "pretrain", lambda self, c, out, resume: c)
    monkeypatch.setattr(Protocol, "teacher", lambda self, c, out, resume: (c, "prompted"))
    monkeypatch.setattr(Protocol, "checks_teacher", lambda self, c: False)  # no teacher check (no data)
    monkeypatch.setattr(Protocol, "score_teacher", lambda self, c, splits: [score(c) for _ in splits])
    monkeypatch.setattr(Protocol, "score_zero_shot", lambda self, c, splits: [score(c) for _ in splits])
    monkeypatch.setattr(runner, "distill_and_score", lambda c, m, out, resume: score(c))
    monkeypatch.setattr(runner, "read_metrics", lambda path: [])
    monkeypatch.setattr(report, "write_report", lambda *a, **k: None)


def _record_protocol(monkeypatch, cfg, protocol, datasets):
    """Run ``run_protocol`` with every stage replaced by a recorder of the config it gets."""
    from comkd.protocols import runner

    seen: dict[str, tuple] = {}

    def score(c):
        seen[c.data.dataset] = (c.student.vision_depth, c.distill.kd_weight)
        if protocol != "base2novel":
            return {"acc": 50.0}
        return {"base": {"acc": 50.0}, "novel": {"acc": 40.0}, "hm": 44.4}

    _fake_stages(monkeypatch, score)
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


# -- stage-0 choices do not look at test data ---------------------------------------------
def test_pretrain_is_scored_on_val_where_the_dataset_has_one(tmp_path) -> None:
    from comkd.engine.evaluation import pretrain_eval_split

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
    from comkd.engine.stages import run_pretrain

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
    from comkd.engine.stages import run_pretrain
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


# -- both HM conventions, labelled ------------------------------------------------------
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


# -- the teacher checked before it teaches ---------------------------------------------------
@pytest.mark.parametrize(
    "teacher, student, margin, warns",
    [
        (97.78, 94.55, 2.0, False),
        (92.07, 96.73, 2.0, True),
        (95.0, 94.0, 2.0, True),
        (95.0, 93.0, 2.0, False),
    ],
)
def test_the_teacher_check_line_names_both_scores_and_the_lead(teacher, student, margin, warns) -> None:
    from comkd.protocols.sanity import teacher_ahead_warning

    line = teacher_ahead_warning(teacher, student, margin, "HM", " on digits (seed 5)")
    assert (line is not None) == warns
    if warns:
        lead = f"{teacher - student:+.2f} points"
        assert f"val HM {teacher:.2f}" in line and f"{student:.2f}" in line and lead in line
        assert f"under the {margin:g}-point margin" in line
        assert "on digits (seed 5)" in line and "distill.require_teacher_ahead=true" in line


def _tiny_b2n(tmp_path, *sets: str):
    from comkd.protocols.runner import run_protocol

    cfg = load_config(
        "demo",
        sets=[
            "pretrain.enabled=false",
            "teacher.model=comkd-tiny-teacher",
            "student.model=comkd-tiny-student",
            "data.image_size=16",
            "train_teacher.optim.epochs=1",
            "distill.optim.epochs=1",
            "progress=false",
            *sets,
        ],
    )
    return run_protocol(cfg, tmp_path, methods=["promptkd"])


@pytest.mark.slow
def test_a_teacher_behind_its_student_on_val_is_named_and_can_stop_the_run(tmp_path, one_thread) -> None:
    # random tiny towers: the margin decides; 100 points is a lead no teacher has, -100 any has
    res = _tiny_b2n(tmp_path / "warn", "distill.teacher_margin=100")
    check = res["teacher_check"]["digits"]["1"]
    assert check["metric"] == "hm" and check["ahead"] is False and check["margin"] == 100
    assert 0 <= check["teacher"] <= 100 and 0 <= check["student_zeroshot"] <= 100
    line = next(
        w for w in res["warnings"] if w.startswith("teacher not clearly ahead of its student on digits")
    )
    assert f"val HM {check['teacher']:.2f}" in line
    assert json.loads((tmp_path / "warn" / "results.json").read_text())["warnings"] == res["warnings"]
    assert line in (tmp_path / "warn" / "report.md").read_text()
    assert (tmp_path / "warn" / "digits" / "seed1" / "promptkd" / "student.safetensors").exists()
    # each finished stage's checkpoints are gone (resume reads its outputs), unless kept on request
    assert not list((tmp_path / "warn").rglob("checkpoint*.pt"))

    res = _tiny_b2n(tmp_path / "quiet", "distill.teacher_margin=-100", "keep_checkpoints=true")
    assert res["teacher_check"]["digits"]["1"]["ahead"] is True
    kept = {p.parent.name for p in (tmp_path / "quiet").rglob("checkpoint.pt")}
    assert kept == {"teacher", "promptkd"}
    assert not any(w.startswith("teacher not clearly ahead") for w in res["warnings"])

    from comkd.protocols.sanity import TeacherNotAheadError

    stop = tmp_path / "stop"
    with pytest.raises(
        TeacherNotAheadError, match=r"stopped before stage 2 \(distill.require_teacher_ahead\)"
    ):
        _tiny_b2n(stop, "distill.teacher_margin=100", "distill.require_teacher_ahead=true")
    assert (stop / "digits" / "seed1" / "teacher" / "teacher_prompts.safetensors").exists()  # kept
    assert not (stop / "digits" / "seed1" / "promptkd").exists()  # stage 2 never started


# -- the paper's base-to-novel preset: the teacher never sees a novel class (issue 34) ---------
def test_the_b2n_preset_is_the_paper_pair_with_promptkds_teacher_on_base_classes() -> None:
    """PromptKD's configs/trainers/PromptSRC/vit_l14_c2_ep20_batch8_4+4ctx.yaml on the base classes
    (value by value), its ViT-B/16 student's 20 epochs at batch 8, the per-dataset w_kd."""
    from comkd.config import list_presets, to_dict

    assert "b2n_vitl14_vitb16" in list_presets()
    cfg = load_config("b2n_vitl14_vitb16")
    assert (cfg.protocol, cfg.train_teacher.subsample) == ("base2novel", "base")
    assert (cfg.teacher.model, cfg.teacher.pretrained, cfg.teacher.quick_gelu) == ("ViT-L-14", "openai", True)
    assert (cfg.student.model, cfg.student.pretrained, cfg.student.quick_gelu) == ("ViT-B-16", "openai", True)
    assert (cfg.data.num_shots, cfg.data.image_size) == (16, 224)
    tt = cfg.train_teacher  # PromptKD's PromptSRC recipe: test_teacher_prompts.py, both presets
    assert tt.kl_weight == 1.0
    assert (cfg.teacher.text_ctx, cfg.teacher.vision_tokens, cfg.teacher.ctx_init) == (4, 4, "a photo of a")
    # the own-data preset's teacher recipe, but for the classes it learns on
    full = to_dict(load_config("full_vitl14_vitb16"))["train_teacher"]
    assert {**to_dict(cfg)["train_teacher"], "subsample": "all"} == full
    d = cfg.distill
    assert (d.recipe, d.method, d.optim.epochs, d.optim.batch_size) == ("recommended", "comkd", 20, 8)
    assert d.kd_weight is None  # PromptKD's per-dataset w_kd: 200 for dtd, 1000 for eurosat
    from comkd.config_rules import resolve_recipe

    assert (
        resolve_recipe(load_config("b2n_vitl14_vitb16", sets=["data.dataset=dtd"])).distill.kd_weight == 200
    )


@pytest.mark.parametrize(
    ("config", "protocol", "sets", "given"),
    [
        ("full_vitl14_vitb16", "base2novel", [], "all"),  # the own-data preset's teacher: all classes
        (None, "base2novel", ["train_teacher.subsample=all"], "all"),
        ("demo", None, ["train_teacher.subsample=all"], "all"),  # the preset's protocol
        ("b2n_vitl14_vitb16", "cross", [], "base"),
        (None, "dg", ["train_teacher.subsample=base"], "base"),
        ("own_tiny", None, ["train_teacher.subsample=base"], "base"),  # protocol full
    ],
)
def test_a_teacher_on_other_classes_than_the_protocols_is_refused_in_one_line(
    tmp_path, config, protocol, sets, given
) -> None:
    from typer.testing import CliRunner

    from comkd import cli

    run_protocol = protocol or load_config(config).protocol
    need = "base" if run_protocol == "base2novel" else "all"
    out = tmp_path / "run"
    common = (["--config", config] if config else []) + [a for s in sets for a in ("--set", s)]
    r = CliRunner().invoke(
        cli.app, ["run", *common, *(["--protocol", protocol] if protocol else []), "--out-dir", str(out)]
    )
    assert r.exit_code == 2, r.output
    (line,) = r.output.strip().splitlines()
    assert line.startswith(
        f"config error: train_teacher.subsample: {given!r} contradicts protocol {run_protocol}, whose teacher"
    )
    assert f"set train_teacher.subsample={need} or leave it unset" in line
    assert ("--config b2n_vitl14_vitb16" in line) == (need == "base")
    assert not out.exists()  # nothing ran, not even the run folder
    # stage 1 on its own is held to the same rule (train-teacher takes the protocol through --set)
    r = CliRunner().invoke(
        cli.app,
        [
            "train-teacher",
            *common,
            *(["--set", f"protocol={protocol}"] if protocol else []),
            "--out-dir",
            str(out),
        ],
    )
    assert r.exit_code == 2 and r.output.strip().splitlines() == [line], r.output
    assert not out.exists()


def test_the_python_api_refuses_it_too_before_any_stage(monkeypatch, tmp_path) -> None:
    from comkd.protocols import runner
    from comkd.protocols.protocol import Protocol

    def never(*a, **k):
        raise AssertionError("a stage ran")

    for name in ("pretrain", "teacher"):
        monkeypatch.setattr(Protocol, name, never)
    monkeypatch.setattr(runner, "distill_and_score", never)
    cfg = load_config(sets=[f"output_dir={tmp_path}"])
    cfg.train_teacher.subsample = "all"  # set after validation: run_protocol checks again
    with pytest.raises(ConfigError, match=r"^train_teacher.subsample: 'all' contradicts protocol base2novel"):
        runner.run_protocol(cfg, tmp_path / "b2n", methods=["comkd"])
    cfg = load_config("own_tiny")
    cfg.train_teacher.subsample = "base"
    with pytest.raises(ConfigError, match=r"^train_teacher.subsample: 'base' contradicts protocol full"):
        runner.run_protocol(cfg, tmp_path / "full", methods=["comkd"])
    assert not (tmp_path / "b2n").exists() and not (tmp_path / "full").exists()


@pytest.mark.parametrize(("protocol", "classes"), [("base2novel", "base"), ("cross", "all"), ("dg", "all")])
def test_unset_the_teacher_learns_on_the_protocols_classes_and_results_say_which(
    monkeypatch, tmp_path, protocol, classes
) -> None:
    from comkd.config_rules import resolve_recipe

    cfg = load_config(sets=[f"output_dir={tmp_path}"], overrides={"protocol": protocol})
    assert cfg.train_teacher.subsample is None  # unset: the protocol's
    assert resolve_recipe(cfg).train_teacher.subsample == classes  # what a stage's config.yaml records
    cfg = load_config(sets=[f"output_dir={tmp_path}"])
    _record_protocol(monkeypatch, cfg, protocol, ["dtd"])
    assert json.loads((tmp_path / "results.json").read_text())["teacher_classes"] == classes
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["train_teacher"]["subsample"] == classes


def test_stage_one_on_its_own_learns_on_the_protocols_classes(one_thread) -> None:
    from comkd.engine.builders import make_dataset
    from comkd.models.backbones import load_clip

    cfg = load_config("demo", sets=["data.image_size=16"])
    spec = load_clip(cfg.teacher.model, image_size=16).preprocess
    ds = make_dataset(cfg, "train", spec, train=True, subsample=cfg.train_teacher.subsample, few_shot=True)
    assert ds.classnames == ds.full_classnames[:5] and set(ds.labels) == set(range(5))
    cfg.protocol = "cross"
    ds = make_dataset(cfg, "train", spec, train=True, subsample=cfg.train_teacher.subsample, few_shot=True)
    assert ds.classnames == ds.full_classnames and len(ds.classnames) == 10


@pytest.mark.slow
def test_the_b2n_preset_trains_the_teacher_on_base_classes_only(monkeypatch, tmp_path, one_thread) -> None:
    from typer.testing import CliRunner

    from comkd import cli
    from comkd.engine import stages

    seen: list[dict] = []
    make = stages.make_dataset

    def spy(cfg, split, spec, **kw):
        ds = make(cfg, split, spec, **kw)
        if kw.get("few_shot"):  # stage 1's labelled shots
            names, every = list(ds.classnames), list(ds.full_classnames)
            seen.append(
                {"subsample": kw.get("subsample"), "classes": names, "all": every, "labels": set(ds.labels)}
            )
        return ds

    monkeypatch.setattr(stages, "make_dataset", spy)
    tiny = [
        "teacher.model=comkd-tiny-teacher",
        "student.model=comkd-tiny-student",
        "teacher.pretrained=none",
        "student.pretrained=none",
        "data.dataset=digits",
        "data.image_size=16",
        "data.num_workers=0",
        "train_teacher.optim.epochs=1",
        "distill.optim.epochs=1",
        "progress=false",
    ]
    out = tmp_path / "b2n"
    args = ["run", "--config", "b2n_vitl14_vitb16", "--protocol", "base2novel", "--method", "comkd"]
    args += [a for s in tiny for a in ("--set", s)] + ["--out-dir", str(out)]
    r = CliRunner().invoke(cli.app, args)
    assert r.exit_code == 0, r.output
    assert len(seen) == 1, seen  # one teacher: one dataset, one seed
    (t,) = seen
    assert t["subsample"] == "base" and len(t["all"]) == 10
    assert t["classes"] == t["all"][:5]  # the first half of the sorted labels, relabelled from 0
    assert t["labels"] == set(range(5))
    res = json.loads((out / "results.json").read_text())
    assert res["protocol"] == "base2novel" and res["teacher_classes"] == "base"
    saved = yaml.safe_load((out / "digits" / "seed1" / "teacher" / "config.yaml").read_text())
    assert saved["train_teacher"]["subsample"] == "base"
    row = res["datasets"]["digits"]["comkd"]
    assert len(row["novel"]) == 1 and 0 <= row["novel"][0] <= 100


# -- each table names the chance level and the test-set size ------------------------------------
def test_a_protocol_report_names_the_chance_level_and_test_size_of_each_part(monkeypatch, tmp_path) -> None:
    from comkd.protocols import report, runner

    def scored(c):  # an evaluate_* result: 4 base classes (40 images), 2 novel (30 images)
        return {
            "base": {"acc": 60.0, "classes": 4, "images": 40},
            "novel": {"acc": 50.0, "classes": 2, "images": 30},
            "hm": 2 * 60 * 50 / 110,
        }

    write_report = report.write_report
    _fake_stages(monkeypatch, scored)
    monkeypatch.setattr(report, "write_report", write_report)
    cfg = load_config(sets=[f"output_dir={tmp_path}", "data.dataset=dtd"])
    runner.run_protocol(cfg, tmp_path, datasets=["dtd"], methods=["comkd"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["test_size"] == {
        "dtd": {"base": {"classes": 4, "images": 40}, "novel": {"classes": 2, "images": 30}}
    }
    report = (tmp_path / "report.md").read_text()
    # base 100/4, novel 100/2; both HM columns: HM(25, 50)
    assert "| Chance level (100 / classes) | 25.00 | 50.00 | 33.33 | 33.33 |" in report
    assert (
        "Scored on the `test` split: base classes: 40 images of 4 classes, chance 25.00%; "
        "novel classes: 30 images of 2 classes, chance 50.00%." in report
    )


def test_an_accuracy_table_names_chance_and_size_and_an_old_run_says_they_are_not_recorded(tmp_path) -> None:
    from comkd.protocols.report import results_table, write_report

    table = {"eurosat": {"teacher": {"acc": [80.0]}, "comkd": {"acc": [70.0]}}}
    sizes = {"eurosat": {"all": {"classes": 10, "images": 8100}}}
    md = results_table(table, sizes, "val")
    assert "| Chance level (100 / classes) | 10.00 |" in md
    assert "Scored on the `val` split: all classes: 8100 images of 10 classes, chance 10.00%." in md
    assert "Chance" not in results_table(table)  # the results page's tables: unchanged
    old = write_report({"protocol": "cross", "seeds": [1], "datasets": table}, tmp_path).read_text()
    assert "Test-set size and chance level: not recorded (split `test`)." in old


def test_every_protocol_is_one_entry_of_the_table_the_config_and_the_teacher_classes() -> None:
    from comkd.choices import Protocol, values
    from comkd.config_rules import TEACHER_CLASSES
    from comkd.protocols.runner import PROTOCOLS

    assert set(PROTOCOLS) == set(values(Protocol)) == set(TEACHER_CLASSES)
    assert all(p.name == name for name, p in PROTOCOLS.items())
    assert [n for n, p in PROTOCOLS.items() if p.halves] == ["base2novel"]  # scored on base and novel


def test_an_image_only_students_undistilled_head_is_ridge_on_the_teachers_shots(one_thread) -> None:
    """Base-to-novel with a ``timm:`` student (no text tower of its own): the undistilled row is its
    tower with the projection A that the teacher's own shots give (stage 1's: base classes,
    ``num_shots`` each, the run seed), A = Yᵀ X (XᵀX + λ' I)⁻¹ with Y the teacher's W of each shot's
    class and λ' = ridge_lambda x mean diag XᵀX, checked against NumPy on the same features; it is
    then scored on base and novel against the teacher's W, as the distilled student is."""
    import numpy as np
    import torch

    from comkd.engine.builders import load_role_clip, make_dataset
    from comkd.protocols.protocol import Base2Novel, image_only

    cfg = load_config(
        "demo",
        sets=[
            "pretrain.enabled=false",
            "teacher.model=comkd-tiny-teacher",
            "student.model=timm:test_efficientnet",
            "student.vision_tokens=0",
            "data.image_size=32",
            "data.num_shots=4",
            "pretrain.ridge_lambda=0.5",
            "progress=false",
        ],
    )
    assert image_only(cfg)
    proto, device = Base2Novel(), torch.device("cpu")
    loaded = load_role_clip(cfg, "student", device)
    teacher, a = proto.undistilled_head(cfg, loaded, device)

    shots = make_dataset(cfg, "train", loaded.preprocess, train=False, subsample="base", few_shot=True)
    assert len(shots.classnames) == 5 and len(shots) == 5 * 4  # the base half, 4 shots each
    with torch.no_grad():
        x = np.stack([loaded.model(img[None])[0].double().numpy() for img, _, _ in shots])
        w = teacher.class_text_features(shots.full_classnames)[shots.class_indices].double().numpy()
    y = w[[int(label) for _, label, _ in shots]]
    gram = x.T @ x
    ref = np.linalg.solve(gram + 0.5 * np.mean(np.diag(gram)) * np.eye(len(gram)), x.T @ y).T  # [E, D]
    assert a.shape == ref.shape
    np.testing.assert_allclose(a.double().numpy(), ref, rtol=1e-3, atol=1e-5)

    (res,) = proto.score_zero_shot(cfg, ("test",))
    assert (res["base"]["classes"], res["novel"]["classes"]) == (5, 5)
    assert all(0 <= res[h]["acc"] <= 100 for h in ("base", "novel")) and res["hm"] >= 0


def test_cross_and_dg_fit_an_image_only_students_undistilled_head_on_the_source_shots() -> None:
    """Under cross/dg the teacher learnt on the source dataset: the undistilled projection of an
    image-only student is fitted on those shots, never on a target's labels."""
    from comkd.data import DataError
    from comkd.models import PreprocessSpec
    from comkd.protocols.protocol import Protocol, Transfer

    spec = PreprocessSpec(16, (0.5,) * 3, (0.5,) * 3)
    source = load_config("demo", sets=["data.num_shots=2", "progress=false"])
    proto = Transfer("cross", ["dtd"])
    with pytest.raises(ValueError, match="before any target"):
        proto.shots(source, spec)
    tcfg = proto.target(source, "dtd")
    assert tcfg.data.dataset == "dtd"
    shots = proto.shots(tcfg, spec)  # no DTD images needed: the shots are the source's
    assert shots.name == "digits" and len(shots) == 2 * len(shots.classnames)
    with pytest.raises(DataError):  # the target's own train split is another dataset
        Protocol().shots(tcfg, spec)
