"""The README's own-data commands, run as written on five CIFAR-10 classes laid out as a user's
folder (experiments/own_folder.py), so the README cannot drift from the CLI. (Every other command of
the README and docs/ is checked by tests/test_docs_commands.py.)"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from comkd import cli, load_student
from experiments.own_folder import CHECK_CLASSES, CIFAR, make_own_folder
from support import run_model

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "<!-- docs-test: run-by tests/test_readme.py"  # tests/test_docs_commands.py reads it too


def readme_commands(text: str, marker: str = MARKER) -> list[list[str]]:
    """The ``comkd`` command lines of the fenced block after ``marker`` (continuations joined)."""
    after = text[text.index(marker) :]
    block = re.search(r"```bash\n(.*?)```", after, re.S)
    assert block is not None, "no ```bash block after the marker"
    joined = block.group(1).replace("\\\n", " ")
    lines = [ln.strip() for ln in joined.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    return [shlex.split(ln) for ln in lines]


def test_readme_commands_are_parsed_as_written() -> None:
    text = (
        "intro\n" + MARKER + " x -->\n```bash\n# a comment\ncomkd run --a b \\\n    --c 'd e'\ncomkd x\n```\n"
    )
    assert readme_commands(text) == [["comkd", "run", "--a", "b", "--c", "d e"], ["comkd", "x"]]
    cmds = readme_commands(README.read_text())
    assert [c[:2] for c in cmds] == [
        ["comkd", "run"],
        ["comkd", "predict"],
        ["comkd", "export"],
        ["comkd", "predict"],
        ["comkd", "classes"],
    ]
    assert "own_tiny" in cmds[0]


@pytest.mark.slow
@pytest.mark.skipif(not CIFAR.is_dir(), reason=f"shared data folder {CIFAR} is absent")
def test_the_readme_own_data_commands_run_as_written(tmp_path, monkeypatch) -> None:
    pytest.importorskip("onnxruntime")
    make_own_folder(
        tmp_path
    )  # my_images/ (500), names.txt, labelled_few/ (16/class), labelled_test/ (40/class)
    monkeypatch.chdir(tmp_path)
    for argv in readme_commands(README.read_text()):
        assert argv[0] == "comkd"
        r = CliRunner().invoke(cli.app, argv[1:])
        assert r.exit_code == 0, f"{shlex.join(argv)}\n{r.output}"
        assert "Traceback" not in r.output
    res = json.loads(Path("runs/mine/results.json").read_text())
    # every model clear of chance (no warning: each more than 5 points above 20%); how far above, and
    # what distillation gains here, the README reports as measured (a few points: tiny CLIPs from scratch)
    assert res["teacher_mode"] == "prompted" and res["warnings"] == [], res["warnings"]
    chance = 100.0 / len(CHECK_CLASSES)
    assert min(run_model(res, "teacher")["acc"], run_model(res, "comkd")["acc"]) > chance + 5
    assert run_model(res, "comkd")["images"] == 200 and run_model(res, "comkd")["train_images"] == 500
    rows = Path("preds.csv").read_text().splitlines()
    assert len(rows) == 1 + len(CHECK_CLASSES)  # header + one row per photo
    assert len(Path("preds.jsonl").read_text().splitlines()) == len(CHECK_CLASSES)
    new = load_student("runs/mine/student_new.safetensors")
    assert new.classnames == Path("new_names.txt").read_text().split()
    # the README's Python snippet, as written, on that run's student (two photos as a.jpg, b.jpg)
    import shutil

    photos = sorted(Path("photos").iterdir())
    shutil.copyfile(photos[0], "a.jpg")
    shutil.copyfile(photos[1], "b.jpg")
    snippet = re.search(r"## In Python\n\n```python\n(.*?)```", README.read_text(), re.S)
    assert snippet is not None, "no ```python block under '## In Python'"
    scope: dict = {}
    exec(compile(snippet.group(1), "README.md", "exec"), scope)
    assert [p.path for p in scope["preds"]] == ["a.jpg", "b.jpg"] and len(scope["preds"][0].classes) == 3
    assert scope["emb"].shape == (1, scope["student"].text_features.shape[1])


def test_the_readme_and_usage_figures_are_the_committed_thread_measurements() -> None:
    """The demo and own_tiny figures README.md and docs/usage.md quote, per thread count, are those
    of docs/thread_figures_here.json (the runs behind them), so a rerun that changes them changes
    the page too."""
    figures = json.loads((README.parent / "docs" / "thread_figures_here.json").read_text())
    readme = " ".join(README.read_text().split())
    usage = " ".join((README.parent / "docs" / "usage.md").read_text().split())
    demo = figures["demo_hm"]
    t2 = demo["threads_2"]
    assert (
        f"teacher HM {t2['teacher']:.2f}, undistilled student {t2['student_zeroshot']:.2f}, "
        f"PromptKD {t2['promptkd']:.2f}, ComKD-CLIP {t2['comkd']:.2f}" in readme
    )
    for t in (1, 4):
        row = demo[f"threads_{t}"]
        quoted = " / ".join(f"{row[k]:.2f}" for k in ("teacher", "student_zeroshot", "promptkd", "comkd"))
        assert f"{quoted} with `--threads {t}`" in readme
    paper = figures["demo_paper_hm_threads_2"]
    assert f"PromptKD {paper['promptkd']:.2f}, ComKD-CLIP {paper['comkd']:.2f}" in readme
    own = figures["own_tiny_top1"]
    o2 = own["threads_2"]
    assert (
        f"teacher {o2['teacher']:.1f}, undistilled {o2['student_zeroshot']:.1f}, ComKD {o2['comkd']:.1f}"
        in usage
    )
    real = figures["own_real_top1"]["threads_2"]
    assert (
        f"teacher {real['teacher']:.1f}, undistilled student {real['student_zeroshot']:.1f}, "
        f"ComKD {real['comkd']:.1f} (chance 20) in {real['wall_s']} s" in readme
    )
    for t, said in ((1, "`--threads 1` gave"), (4, "`--threads 4`")):
        row = own[f"threads_{t}"]
        assert f"{said} {row['teacher']:.1f} / {row['student_zeroshot']:.1f} / {row['comkd']:.1f}" in usage
