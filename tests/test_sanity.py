"""Chance-level and random-tower warnings (comkd.protocols.sanity) and where a run shows them."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from comkd import cli
from comkd.config import load_config
from comkd.protocols.sanity import CHANCE_MARGIN, banner, chance_warnings, random_tower_warnings

REPO = Path(__file__).resolve().parents[1]
CIFAR = Path(os.environ.get("COMKD_SHARED_DATA", REPO.parent / "shared" / "data")) / "cifar10"


def test_chance_warnings_name_the_model_the_figure_and_chance() -> None:
    scores = {"teacher": {"acc": 24.0}, "student": {"acc": [30.0, 20.0]}, "good": {"acc": 60.0}}
    lines = chance_warnings(scores, {"acc": 5}, {"teacher": "teacher T"}, " on the test set")
    # teacher 24 < 20 + 5; the student's mean over seeds 25.0 is not below 25.0; 60 is far above
    assert len(lines) == 1 and lines[0].startswith("teacher T: top-1 24.00% on the test set")
    assert "20.00% with 5 classes" in lines[0] and f"within {CHANCE_MARGIN:g} points" in lines[0]
    b2n = chance_warnings(
        {"t": {"base": [51.0], "novel": [12.0], "hm": [19.0]}}, {"base": 2, "novel": 10}, {}
    )
    assert len(b2n) == 2 and "base-class top-1 51.00%" in b2n[0] and "novel-class top-1 12.00%" in b2n[1]
    assert chance_warnings({"t": {"acc": 0.0}}, {"acc": 1}, {}) == []  # one class: no chance to speak of
    assert banner([]) == [] and banner(["x"])[1] == "> - x"


def test_random_towers_are_named_unless_weights_or_a_stage_0() -> None:
    tiny = {"teacher": {"model": "comkd-tiny-teacher"}, "student": {"model": "comkd-tiny-student"}}
    lines = random_tower_warnings(load_config(None, tiny))
    assert [ln.split(" has ")[0] for ln in lines] == [
        "teacher comkd-tiny-teacher",
        "student comkd-tiny-student",
    ]
    assert random_tower_warnings(load_config(None, {**tiny, "pretrain": {"enabled": True}})) == []
    given = load_config(None, tiny, sets=["teacher.pretrained=w.safetensors"])
    assert [ln.split(" ")[0] for ln in random_tower_warnings(given)] == ["student"]
    assert len(random_tower_warnings(load_config(None, tiny, sets=["student.pretrained=none"]))) == 2


@pytest.mark.skipif(not CIFAR.is_dir(), reason=f"shared data folder {CIFAR} is absent")
def test_a_run_with_random_towers_says_so_in_its_log_report_and_results(tmp_path, caplog) -> None:
    from experiments.own_folder import make_own_folder

    make_own_folder(tmp_path, ["cat", "dog"], pool=8, shots=2, test=4)
    out = tmp_path / "run"
    args = ["run", "--protocol", "full", "--root", str(tmp_path / "my_images"), "--out-dir", str(out)]
    args += [
        "--set",
        f"data.classes_file={tmp_path / 'names.txt'}",
        "--set",
        f"full.test={tmp_path / 'labelled_test'}",
    ]
    args += ["--set", "teacher.model=comkd-tiny-teacher", "--set", "student.model=comkd-tiny-student"]
    args += ["--set", "data.dataset=unlabelled", "--set", "data.image_size=16", "--set", "progress=false"]
    args += ["--set", "distill.optim.epochs=1"]
    args += ["--set", "distill.optim.warmup_epochs=0", "--set", "distill.optim.batch_size=4"]
    with caplog.at_level(logging.WARNING, logger="comkd"):
        r = CliRunner().invoke(cli.app, args)
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    random_lines = [w for w in res["warnings"] if "random weights" in w]
    assert len(random_lines) == 2
    logged = [rec.getMessage() for rec in caplog.records if rec.name == "comkd.protocols.sanity"]
    assert all(w in logged for w in res["warnings"])
    report = (out / "report.md").read_text()
    assert report.index("Warning: these results may say nothing") < report.index("| model |")
    assert all(w in report for w in res["warnings"])
    # the chance lines name each model whose figure is near chance (50% with two classes)
    for w in res["warnings"]:
        if "of chance" in w:
            assert "50.00% with 2 classes" in w
