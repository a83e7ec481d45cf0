"""Own data: a folder of unlabelled real images + a class-names file, ``--protocol full``, and the
student's predictions scored against ``evaluate`` (CIFAR-10 images under ../shared/data)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from comkd import cli, load_student
from comkd.config import load_config
from comkd.data import DataError, build_dataset
from comkd.data.dataset import ImageDataset
from comkd.data.records import Datum
from comkd.models import create_teacher
from comkd.protocols.full import ZERO_SHOT_PROMPT, confusion_matrix, per_class_accuracy, zero_shot_teacher
from support import run_model

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("COMKD_SHARED_DATA", REPO.parent / "shared" / "data"))
CIFAR = SHARED / "cifar10"
needs_shared = pytest.mark.skipif(not CIFAR.is_dir(), reason=f"shared data folder {CIFAR} is absent")
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def make_pool(root: Path, ids: range, nested: bool = True) -> Path:
    """A flat (or nested) folder of symlinks to CIFAR-10 test images, no class in any name."""
    root.mkdir(parents=True, exist_ok=True)
    k = 0
    for c in CLASSES:
        for i in ids:
            d = root / (f"part{k % 3}" if nested else "")
            d.mkdir(exist_ok=True)
            os.symlink(CIFAR / "test" / c / f"{i:04d}.jpg", d / f"img{k:05d}.jpg")
            k += 1
    return root


def make_labelled(root: Path, ids: range, classes=CLASSES) -> Path:
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in ids:
            os.symlink(
                CIFAR / "test" / (c if c in CLASSES else "cat") / f"{i:04d}.jpg", root / c / f"{i:04d}.jpg"
            )
    return root


@pytest.fixture()
def names_file(tmp_path) -> Path:
    f = tmp_path / "names.txt"
    f.write_text("\n".join(CLASSES) + "\n")
    return f


@needs_shared
def test_unlabelled_folder_is_read_recursively_with_the_names_file(tmp_path, names_file) -> None:
    pool = make_pool(tmp_path / "pool", range(100, 103))
    (pool / "part0" / "readme.md").write_text("not an image")
    ds = build_dataset("unlabelled", str(pool), "train", unlabelled=True, classes_file=str(names_file))
    assert len(ds) == 30 and ds.classnames == CLASSES and ds.full_classnames == CLASSES
    assert {ds[i][1] for i in range(len(ds))} == {-1}
    assert all(p.startswith(str(pool)) for p in (d.path for d in ds.data))
    with pytest.raises(DataError, match="class-names file"):
        build_dataset("unlabelled", str(pool), "train", unlabelled=True)
    with pytest.raises(DataError, match="is empty"):  # nothing to evaluate on
        build_dataset("unlabelled", str(pool), "test", classes_file=str(names_file))
    (tmp_path / "dup.txt").write_text("cat\ndog\ncat\n")
    with pytest.raises(DataError, match="more than once"):
        build_dataset(
            "unlabelled", str(pool), "train", unlabelled=True, classes_file=str(tmp_path / "dup.txt")
        )


def test_an_unknown_label_is_only_accepted_for_unlabelled_data() -> None:
    d = [Datum("digits://0", -1, "")]
    assert ImageDataset(d, ["a", "b"], unlabelled=True)[0][1] == -1
    with pytest.raises(DataError, match="outside the class list"):
        ImageDataset(d, ["a", "b"])


def test_zero_shot_teacher_is_the_plain_clip_prompt() -> None:
    cfg = zero_shot_teacher(load_config(None, {"teacher": {"model": "comkd-tiny-teacher"}}))
    torch.manual_seed(0)
    t = cfg.teacher
    teacher = create_teacher(
        t.model,
        None,
        text_ctx=t.text_ctx,
        text_depth=t.text_depth,
        ctx_init=t.ctx_init,
        vision_tokens=t.vision_tokens,
        image_size=16,
    )
    w = teacher.class_text_features(CLASSES)
    plain = teacher.encode_templates(CLASSES, [ZERO_SHOT_PROMPT + " {}."])
    assert torch.allclose(w, plain, atol=1e-5)
    assert teacher.prompt_parameters()[0] is teacher.text.ctx and getattr(teacher.visual, "n_tokens", 0) == 0


def test_confusion_matrix_and_per_class_accuracy() -> None:
    preds, labels = torch.tensor([0, 1, 1, 2, 0]), torch.tensor([0, 1, 2, 2, 2])
    cm = confusion_matrix(preds, labels, 4)
    assert cm.tolist() == [[1, 0, 0, 0], [0, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]]
    assert per_class_accuracy(cm, ["a", "b", "c", "d"]) == {
        "a": 100.0,
        "b": 100.0,
        "c": pytest.approx(100 / 3),
    }


def test_paper_pair_preset_for_own_data() -> None:
    cfg = load_config("full_vitl14_vitb16", sets=["data.root=/data/mine", "data.classes_file=names.txt"])
    assert cfg.protocol == "full" and cfg.data.dataset == "unlabelled"
    assert (cfg.teacher.model, cfg.teacher.pretrained, cfg.teacher.quick_gelu) == ("ViT-L-14", "openai", True)
    assert (cfg.student.model, cfg.student.pretrained, cfg.student.quick_gelu) == ("ViT-B-16", "openai", True)
    assert cfg.teacher_train.subsample == "all" and cfg.data.image_size == 224


TINY = [
    "--set",
    "teacher.model=comkd-tiny-teacher",
    "--set",
    "student.model=comkd-tiny-student",
    "--set",
    "data.image_size=16",
    "--set",
    "data.num_shots=2",
    "--set",
    "teacher_train.optim.epochs=1",
    "--set",
    "teacher_train.optim.warmup_epochs=0",
    "--set",
    "distill.optim.epochs=1",
    "--set",
    "distill.optim.warmup_epochs=0",
    "--set",
    "progress=false",
    "--set",
    "data.dataset=unlabelled",
]


@needs_shared
def test_own_test_classes_must_match_the_names(tmp_path, names_file) -> None:
    pool = make_pool(tmp_path / "pool", range(100, 101))
    test = make_labelled(tmp_path / "test", range(0, 1), classes=[*CLASSES, "zebra"])
    r = CliRunner().invoke(
        cli.app,
        [
            "run",
            "--protocol",
            "full",
            "--root",
            str(pool),
            "--out-dir",
            str(tmp_path / "o"),
            "--set",
            f"data.classes_file={names_file}",
            "--set",
            f"full.test={test}",
            *TINY,
        ],
    )
    assert r.exit_code == 1 and "zebra" in r.output and "Traceback" not in r.output


@pytest.mark.slow
@needs_shared
def test_unlabelled_folder_to_full_protocol_to_predictions_that_score_as_evaluate(
    tmp_path, names_file
) -> None:
    pool = make_pool(tmp_path / "pool", range(100, 110), nested=False)  # 100 unlabelled images, flat
    test = make_labelled(tmp_path / "test", range(0, 12))  # 120 labelled test images
    out = tmp_path / "run"
    r = CliRunner().invoke(
        cli.app,
        [
            "run",
            "--protocol",
            "full",
            "--root",
            str(pool),
            "--out-dir",
            str(out),
            "--method",
            "comkd",
            "--set",
            f"data.classes_file={names_file}",
            "--set",
            f"full.shots={CIFAR / 'train_subset'}",
            "--set",
            f"full.test={test}",
            *TINY,
        ],
    )
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    assert res["protocol"] == "full" and res["classes"] == CLASSES and res["teacher_mode"] == "prompted"
    m = run_model(res, "comkd")
    assert m["train_images"] == 100 and m["images"] == 120
    assert (out / "teacher" / "teacher_prompts.safetensors").exists()
    assert (out / m["confusion_plot"]).stat().st_size > 0 and "confusion_comkd.png" in (
        out / "report.md"
    ).read_text()
    assert sum(map(sum, m["confusion"])) == 120 and set(m["per_class"]) == set(CLASSES)
    # the student's predictions on the test images score what the run and `evaluate` report
    student = m["student"]
    r = CliRunner().invoke(
        cli.app,
        ["predict", student, str(test), "--out", str(tmp_path / "p.csv"), "--no-progress", "--top-k", "1"],
    )
    assert r.exit_code == 0, r.output
    with open(tmp_path / "p.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 120
    hits = [Path(row["path"]).parent.name == row["class_1"] for row in rows]
    acc = 100.0 * sum(hits) / len(hits)
    assert acc == pytest.approx(m["acc"], abs=1e-5)  # accuracy() averages in float32
    per_class = {
        c: 100.0
        * sum(h for h, row in zip(hits, rows, strict=True) if Path(row["path"]).parent.name == c)
        / 12
        for c in CLASSES
    }
    assert per_class == pytest.approx(m["per_class"])
    r = CliRunner().invoke(cli.app, ["evaluate", student, "--config", str(out / "config.yaml")])
    assert r.exit_code == 0, r.output
    ev = json.loads(r.output[r.output.index("{") :])
    assert ev["protocol"] == "full" and ev["images"] == 120 and ev["acc"] == pytest.approx(acc, abs=1e-5)
    # stage 2 rerun from the config it saved scores on the run's full.test, as the run did (it used
    # to train, then fail on the unlabelled pool, leaving a student that blocked the rerun)
    again = tmp_path / "again"
    r = CliRunner().invoke(
        cli.app, ["distill", "--config", str(out / "comkd" / "config.yaml"), "--out-dir", str(again)]
    )
    assert r.exit_code == 0, r.output
    rerun = json.loads((again / "results.json").read_text())
    assert rerun["images"] == 120 and rerun["acc"] == pytest.approx(m["acc"], abs=1e-5)


@needs_shared
def test_distill_that_cannot_be_scored_stops_before_training(tmp_path, names_file) -> None:
    """Unlabelled data to score on is one line before any weights load or any step trains; an
    own-data config with no labelled test set trains, says it is not scored, and writes no score."""
    pool = make_pool(tmp_path / "pool", range(100, 102))
    args = ["distill", "--root", str(pool), "--set", f"data.classes_file={names_file}", *TINY]
    r = CliRunner().invoke(cli.app, [*args, "--out-dir", str(tmp_path / "o")])
    assert r.exit_code == 1 and "no test split to score the student on" in r.output, r.output
    assert not (tmp_path / "o").exists()  # nothing trained, nothing written
    r = CliRunner().invoke(cli.app, [*args, "--out-dir", str(tmp_path / "f"), "--set", "protocol=full"])
    assert r.exit_code == 0 and "the student is not scored" in r.output, r.output
    assert (tmp_path / "f" / "student.safetensors").exists()
    done = json.loads((tmp_path / "f" / "results.json").read_text())  # what trained, no score
    assert done["student"] and "acc" not in done and "split" not in done


@pytest.mark.slow
@needs_shared
def test_full_protocol_without_labels_uses_the_teacher_zero_shot(tmp_path, names_file) -> None:
    pool = make_pool(tmp_path / "pool", range(100, 104))
    out = tmp_path / "run"
    r = CliRunner().invoke(
        cli.app,
        [
            "run",
            "--protocol",
            "full",
            "--root",
            str(pool),
            "--out-dir",
            str(out),
            "--set",
            f"data.classes_file={names_file}",
            *TINY,
        ],
    )
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    assert res["teacher_mode"] == "zero-shot" and res["test"] is None and not (out / "teacher").exists()
    assert run_model(res, "comkd")["train_images"] == 40 and "acc" not in run_model(res, "comkd")
    assert Path(run_model(res, "comkd")["student"]).is_file()
    assert "no accuracy" in (out / "report.md").read_text()
    # new class names later, from the run's own config (the zero-shot teacher is checked and accepted)
    (tmp_path / "new.txt").write_text("cat\ndog\n")
    r = CliRunner().invoke(
        cli.app,
        [
            "classes",
            run_model(res, "comkd")["student"],
            "--names",
            str(tmp_path / "new.txt"),
            "--config",
            str(out / "comkd" / "config.yaml"),
            "--out",
            str(tmp_path / "n.safetensors"),
        ],
    )
    assert r.exit_code == 0, r.output
    assert load_student(tmp_path / "n.safetensors").classnames == ["cat", "dog"]


@needs_shared
def test_labelled_shots_and_test_sets_may_be_csv_files(tmp_path, names_file) -> None:
    from comkd.engine.builders import make_dataset
    from comkd.models import PreprocessSpec
    from comkd.protocols.full import class_names, eval_config

    rows = ["path,classname"] + [
        f"{CIFAR / 'test' / c / f'{i:04d}.jpg'},{c}" for c in CLASSES for i in range(3)
    ]
    (tmp_path / "test.csv").write_text("\n".join(rows) + "\n")
    pool = make_pool(tmp_path / "pool", range(100, 101))
    cfg = load_config(
        None,
        {
            "protocol": "full",
            "data": {"dataset": "unlabelled", "root": str(pool), "classes_file": str(names_file)},
            "full": {"test": str(tmp_path / "test.csv")},
        },
    )
    ecfg = eval_config(cfg)
    assert ecfg.data.dataset == "csv" and class_names(ecfg) == class_names(cfg) == CLASSES
    ds = make_dataset(ecfg, "test", PreprocessSpec(16, (0.5,) * 3, (0.5,) * 3), train=False)
    assert len(ds) == 30 and sorted(set(ds.labels)) == list(range(10))  # every row is a test image
    cfg.full.test = str(tmp_path / "nothing.txt")
    with pytest.raises(DataError, match="full.test"):
        eval_config(cfg)


@pytest.mark.slow
def test_full_protocol_on_a_labelled_dataset_uses_its_own_shots_and_test_split(tmp_path) -> None:
    out = tmp_path / "run"
    args = [
        "run",
        "--protocol",
        "full",
        "--config",
        "demo",
        "--out-dir",
        str(out),
        *TINY,
        "--set",
        "data.dataset=digits",
        "--set",
        "pretrain.optim.epochs=2",  # what is checked is the protocol's splits, not the towers' skill
    ]
    r = CliRunner().invoke(cli.app, args)
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    assert (
        res["teacher_mode"] == "prompted" and len(res["classes"]) == 10
    )  # all ten digits, no base/novel halves
    cfg = yaml.safe_load((out / "teacher" / "config.yaml").read_text())
    assert cfg["train_teacher"]["subsample"] == "all"
    m = run_model(res, "comkd")
    assert set(m["per_class"]) == set(res["classes"]) and 0 <= m["acc"] <= 100
    assert {"acc", "per_class"} <= set(run_model(res, "teacher")) and 0 <= run_model(res, "student_zeroshot")[
        "acc"
    ] <= 100
    # the report names the chance level and the test-set size, and has a confusion matrix per model
    report = (out / "report.md").read_text()
    (size,) = res["test_size"].values()
    n = size["all"]["images"]
    assert size["all"]["classes"] == 10 and n == run_model(res, "teacher")["images"] == m["images"] > 0
    assert "| Chance level (100 / classes) | 10.00 |" in report
    assert f"Scored on the `test` split: all classes: {n} images of 10 classes, chance 10.00%." in report
    for who in ("teacher", "student_zeroshot", "comkd"):
        assert (
            out / "plots" / f"confusion_{who}.png"
        ).stat().st_size > 0 and f"confusion_{who}.png" in report
    assert sum(map(sum, run_model(res, "student_zeroshot")["confusion"])) == n
    # the undistilled student is scored as `evaluate_clip_zero_shot` scores it (same accuracy)
    from comkd.engine.evaluation import evaluate_clip_zero_shot
    from comkd.protocols.full import eval_config

    stage = eval_config(load_config(str(out / "comkd" / "config.yaml")))
    zs = evaluate_clip_zero_shot(stage, "student")
    assert (
        run_model(res, "student_zeroshot")["acc"] == pytest.approx(zs["acc"], abs=1e-4) and zs["images"] == n
    )


@pytest.mark.slow
@needs_shared
def test_the_full_protocol_runs_the_seed_it_is_given(tmp_path, names_file) -> None:
    from safetensors.torch import load_file

    pool = make_pool(tmp_path / "pool", range(100, 104))
    base = [
        "run",
        "--protocol",
        "full",
        "--root",
        str(pool),
        "--set",
        f"data.classes_file={names_file}",
        *TINY,
    ]
    students = {}
    for seed in (1, 3):
        out = tmp_path / f"seed{seed}"
        r = CliRunner().invoke(cli.app, [*base, "--out-dir", str(out), "--seed", str(seed)])
        assert r.exit_code == 0, r.output
        assert yaml.safe_load((out / "config.yaml").read_text())["seed"] == seed
        assert json.loads((out / "results.json").read_text())["seeds"] == [seed]
        students[seed] = load_file(str(out / "comkd" / "student.safetensors"))
    differ = [k for k in students[1] if not torch.equal(students[1][k], students[3][k])]
    assert differ, "seed 3 trained the same student as seed 1"
    # resuming the finished run with another test set (or seed) is refused before any row is read
    out = tmp_path / "seed3"
    before = (out / "results.json").read_text()
    test = make_labelled(tmp_path / "test", range(0, 1))
    for change in (["--seed", "3", "--set", f"full.test={test}"], ["--seed", "4"]):
        r = CliRunner().invoke(cli.app, [*base, "--out-dir", str(out), "--resume", *change])
        assert r.exit_code == 1 and "--resume: " in r.output and "Traceback" not in r.output, r.output
        assert ("full.test is" if "--set" in change else "seed is 4 now") in r.output
        assert (out / "results.json").read_text() == before
        assert yaml.safe_load((out / "config.yaml").read_text())["full"]["test"] is None  # not rewritten
    r = CliRunner().invoke(cli.app, [*base, "--out-dir", str(out), "--resume", "--seed", "3"])
    assert r.exit_code == 0, r.output  # the same settings resume (nothing left to do)
    r = CliRunner().invoke(cli.app, [*base, "--out-dir", str(tmp_path / "two"), "--seed", "1", "--seed", "2"])
    assert r.exit_code == 1 and "the full protocol runs one seed per run folder, got 2 (1, 2)" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "two" / "comkd").exists()
