"""Sharing a student through the Hugging Face Hub: ``comkd push`` (tested up to the call into
huggingface_hub, with a stub API), and ``hf-hub:ORG/NAME`` loaded offline from a cache laid out as
huggingface_hub lays it out (``models--ORG--NAME/{blobs,refs,snapshots}``), in Python and in
``comkd predict``."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from comkd import cli
from comkd.models import ModelError, load_student, save_student
from comkd.models.hub import parse_hub_ref
from support import subprocess_env, write_tiny_student

CLASSES = ["cat", "dog", "ship"]
TEACHER = {
    "model": "comkd-tiny-teacher",
    "weights_sha256": "ab" * 32,
    "prompts_sha256": "cd" * 32,
    "image_size": 16,
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished run's folder: student file, results.json and config.yaml as distill writes them."""
    d = tmp_path_factory.mktemp("run")
    s = load_student(write_tiny_student(d / "student.safetensors", CLASSES))
    s.teacher_identity = dict(TEACHER)
    save_student(s, d / "student.safetensors")
    results = {
        "protocol": "base2novel",
        "dataset": "digits",
        "base": {"acc": 91.234, "classes": 2, "images": 10},
        "novel": {"acc": 80.0, "classes": 1, "images": 5},
        "hm": 85.2541,
    }
    (d / "results.json").write_text(json.dumps(results))
    config = {"protocol": "base2novel", "data": {"dataset": "digits"}}
    config["distill"] = {
        "method": "comkd",
        "recipe": "recommended",
        "kd_weight": 1000.0,
        "optim": {"lr": 0.001},
    }
    (d / "config.yaml").write_text(yaml.safe_dump(config))
    return d


class StubApi:
    """Records what ``push_student`` hands to huggingface_hub and keeps a copy of the folder."""

    def __init__(self, keep: Path) -> None:
        self.keep, self.calls = keep, []

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))

    def upload_folder(self, **kw):
        self.calls.append(("upload_folder", kw["repo_id"], kw))
        shutil.copytree(kw["folder_path"], self.keep)
        return "https://huggingface.co/org/tiny/commit/0"


def _card_header(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_push_uploads_the_student_and_a_model_card_with_the_runs_scores(
    run_dir, tmp_path, monkeypatch
) -> None:
    import tempfile

    from comkd.deploy.hub import push_student

    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    api = StubApi(tmp_path / "sent")
    info = push_student(run_dir / "student.safetensors", "org/tiny", license="mit", private=True, api=api)
    assert [c[0] for c in api.calls] == ["create_repo", "upload_folder"]
    assert api.calls[0][1] == "org/tiny" and api.calls[0][2]["private"] is True
    assert api.calls[1][2]["repo_type"] == "model"
    assert info["uploaded"] and info["files"] == ["README.md", "student.safetensors"]
    sent = tmp_path / "sent"
    assert (sent / "student.safetensors").read_bytes() == (run_dir / "student.safetensors").read_bytes()
    card = (sent / "README.md").read_text()
    head = _card_header(card)
    assert head["license"] == "mit" and head["library_name"] == "comkd" and head["datasets"] == ["digits"]
    assert {"comkd", "clip", "knowledge-distillation"} <= set(head["tags"])
    metrics = head["model-index"][0]["results"][0]["metrics"]
    assert [(m["name"], m["value"]) for m in metrics] == [
        ("base-class accuracy", 91.23),
        ("novel-class accuracy", 80.0),
        ("harmonic mean", 85.25),
    ]
    assert TEACHER["weights_sha256"] in card and TEACHER["prompts_sha256"] in card
    assert "`distill.recipe`: `recommended`" in card and 'load_student("hf-hub:org/tiny")' in card
    assert list((tmp_path / "tmp").iterdir()) == []  # the staging folder is gone


def test_push_without_results_claims_no_scores_and_dry_run_uploads_nothing(run_dir, tmp_path) -> None:
    d = tmp_path / "bare"
    d.mkdir()
    shutil.copyfile(run_dir / "student.safetensors", d / "student.safetensors")
    r = CliRunner().invoke(
        cli.app, ["push", str(d / "student.safetensors"), "org/bare", "--dry-run", str(tmp_path / "out")]
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["uploaded"] is False
    card = (tmp_path / "out" / "README.md").read_text()
    assert "model-index" not in _card_header(card) and "no scores are claimed" in card


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["org"], "is not a hub student id"),
        (["org/tiny", "--results", "nowhere.json"], "--results nowhere.json not found"),
        (["org/tiny", "--onnx", "nowhere.onnx"], "--onnx nowhere.onnx not found"),
    ],
)
def test_push_refuses_bad_input_in_one_line(run_dir, args, words) -> None:
    r = CliRunner().invoke(cli.app, ["push", str(run_dir / "student.safetensors"), *args])
    assert r.exit_code == 1 and words in r.output and "Traceback" not in r.output


def test_hub_ids_are_parsed_strictly() -> None:
    assert parse_hub_ref("hf-hub:org/name") == ("org/name", None)
    assert parse_hub_ref("hf-hub:org/name@v1.0") == ("org/name", "v1.0")
    for bad in ("hf-hub:org", "hf-hub:org/na/me", "hf-hub:../x", "hf-hub:org/--x"):
        with pytest.raises(ModelError, match="not a hub student id"):
            parse_hub_ref(bad)


def _lay_out_cache(cache: Path, repo_id: str, files: dict[str, Path]) -> None:
    """A hub cache as huggingface_hub writes it: blobs by content hash, a snapshot of symlinks to
    them, refs/main naming the snapshot."""
    org, name = repo_id.split("/")
    root = cache / f"models--{org}--{name}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    (root / "blobs").mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    for fname, src in files.items():
        blob = hashlib.sha256(src.read_bytes()).hexdigest()
        shutil.copyfile(src, root / "blobs" / blob)
        (snap / fname).symlink_to(Path("..") / ".." / "blobs" / blob)


@pytest.fixture(scope="module")
def hub_cache(run_dir, tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("hf_cache")
    _lay_out_cache(
        cache,
        "org/tiny",
        {"student.safetensors": run_dir / "student.safetensors"},
    )
    return cache


def _offline(cache: Path) -> dict[str, str]:
    return subprocess_env(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), HF_HOME=str(cache.parent / "hf_home"))


def test_load_student_from_the_hub_offline_predicts_as_the_local_file(run_dir, hub_cache, tmp_path) -> None:
    img = tmp_path / "x.png"
    Image.new("RGB", (20, 20), (10, 200, 30)).save(img)
    code = (
        "import json, comkd; s = comkd.load_student('hf-hub:org/tiny'); "
        f"p = s.predict({str(img)!r}, top_k=3)[0]; print(json.dumps([s.classnames, p.classes, p.probs]))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], env=_offline(hub_cache), capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    names, classes, probs = json.loads(r.stdout.strip().splitlines()[-1])
    local = load_student(run_dir / "student.safetensors").predict(img, top_k=3)[0]
    assert names == CLASSES and classes == local.classes
    assert probs == pytest.approx(local.probs, abs=1e-6)
    assert "initialized randomly" not in r.stderr  # a loaded student prints no stray warning


def test_comkd_predict_takes_a_hub_id_offline_and_names_a_missing_one(run_dir, hub_cache, tmp_path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, c in enumerate([(250, 0, 0), (0, 0, 250)]):
        Image.new("RGB", (24, 24), c).save(photos / f"{i}.png")
    env = _offline(hub_cache)
    comkd = [sys.executable, "-m", "comkd"]
    out = tmp_path / "hub.csv"
    r = subprocess.run(
        [*comkd, "predict", "hf-hub:org/tiny", str(photos), "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    local = tmp_path / "local.csv"
    r2 = subprocess.run(
        [*comkd, "predict", str(run_dir / "student.safetensors"), str(photos), "--out", str(local)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r2.returncode == 0, r2.stderr
    rows = list(csv.reader(out.open()))
    assert len(rows) == 3 and rows == list(csv.reader(local.open()))
    r3 = subprocess.run(
        [*comkd, "predict", "hf-hub:org/absent", str(photos)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (
        r3.returncode == 1
        and "not in the local Hugging Face cache" in r3.stderr
        and "Traceback" not in r3.stderr
    )


# -- push: bad input is one line, and nothing of the user's is overwritten -------------------------
def _folder_listing(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.mark.parametrize(
    ("where", "words"),
    [
        ("own", ["the student's own folder"]),
        ("file", ["a-file is a file, not a folder"]),
        ("under_file", ["a-file is a file, not a folder"]),
    ],
)
def test_push_dry_run_into_a_folder_it_cannot_use_is_one_line(run_dir, tmp_path, where, words) -> None:
    from support import one_line_error

    (tmp_path / "a-file").write_text("keep")
    target = {"own": run_dir, "file": tmp_path / "a-file", "under_file": tmp_path / "a-file" / "sub"}[where]
    before = _folder_listing(run_dir)
    r = CliRunner().invoke(
        cli.app, ["push", str(run_dir / "student.safetensors"), "org/t", "--dry-run", str(target)]
    )
    one_line_error(r, "--dry-run", str(target), *words)
    assert _folder_listing(run_dir) == before and (tmp_path / "a-file").read_text() == "keep"


def test_push_dry_run_never_overwrites_the_users_readme(run_dir, tmp_path) -> None:
    from support import one_line_error

    d = tmp_path / "out"
    d.mkdir()
    (d / "README.md").write_text("my own notes")
    r = CliRunner().invoke(
        cli.app, ["push", str(run_dir / "student.safetensors"), "org/t", "--dry-run", str(d)]
    )
    one_line_error(r, "--dry-run", str(d), "not empty", "README.md")
    assert _folder_listing(d) == {"README.md": b"my own notes"}


@pytest.mark.parametrize(
    ("name", "content", "words"),
    [
        ("results.json", "5", ["results.json", "holds a number"]),
        ("results.json", "[1, 2]", ["results.json", "holds a list"]),
        ("results.json", '{"hm": 3, "base": 5}', ["results.json", "'base' is a number"]),
        ("results.json", '{"acc": "high"}', ["results.json", "'acc' is text"]),
        ("results.json", '{"hm": 3, "novel": {"acc": [1]}}', ["results.json", "'novel.acc' is a list"]),
        ("config.yaml", "5\n", ["config.yaml", "holds a number"]),
        ("config.yaml", "distill: 5\n", ["config.yaml", "'distill' is a number"]),
        ("config.yaml", "data: [1]\n", ["config.yaml", "'data' is a list"]),
        ("config.yaml", "distill: {optim: 3}\n", ["config.yaml", "'distill.optim' is a number"]),
    ],
)
def test_push_names_a_run_file_of_the_wrong_shape(run_dir, tmp_path, name, content, words) -> None:
    from support import one_line_error

    d = tmp_path / "run"
    d.mkdir()
    shutil.copyfile(run_dir / "student.safetensors", d / "student.safetensors")
    (d / name).write_text(content)
    r = CliRunner().invoke(
        cli.app, ["push", str(d / "student.safetensors"), "org/t", "--dry-run", str(tmp_path / "out")]
    )
    one_line_error(r, *words)


# -- the model card: huggingface_hub's ModelCard, read back with its own loader --------------------
def _own_run(root: Path, student: Path) -> Path:
    """A ``comkd run --protocol full`` folder as it is written: OUT/results.json (teacher,
    undistilled student, methods), OUT/comkd/ the stage (student, its results.json and config.yaml)."""
    stage = root / "comkd"
    stage.mkdir(parents=True)
    shutil.copyfile(student, stage / "student.safetensors")
    config = {
        "seed": 1,
        "protocol": "full",
        "data": {"dataset": "unlabelled", "root": "/home/alice/private/photos"},
        "full": {"test": "/home/alice/private/labelled_test/", "shots": None},
        "teacher": {"model": "comkd-tiny-teacher", "pretrained": "openai"},
        "student": {"model": "comkd-tiny-student"},
        "distill": {"method": "comkd", "recipe": "recommended", "optim": {"lr": 0.001}},
    }
    for d in (root, stage):
        (d / "config.yaml").write_text(yaml.safe_dump(config))
    own = {"method": "comkd", "student": str(stage / "student.safetensors"), "acc": 70.0, "images": 30}
    (stage / "results.json").write_text(json.dumps({**own, "per_class": {}, "confusion": []}))
    run = {
        "protocol": "full",
        "seed": 1,
        "classes": CLASSES,
        "teacher_mode": "prompted",
        "test": config["full"]["test"],
        "teacher": {"acc": 80.0, "images": 30, "per_class": {}},
        "student_zeroshot": {"acc": 45.0},
        "methods": {"comkd": own, "promptkd": {**own, "method": "promptkd", "acc": 65.0}},
        "test_size": {"all": {"classes": 3, "images": 30}},
        "warnings": [],
    }
    (root / "results.json").write_text(json.dumps(run))
    return stage / "student.safetensors"


def test_push_dry_run_of_a_run_folder_writes_a_card_huggingface_hub_loads(run_dir, tmp_path) -> None:
    from huggingface_hub import EvalResult, ModelCard

    student = _own_run(tmp_path / "own", run_dir / "student.safetensors")
    out = tmp_path / "out"
    r = CliRunner().invoke(
        cli.app, ["push", str(student), "org/own", "--license", "mit", "--dry-run", str(out)]
    )
    assert r.exit_code == 0, r.output
    card = ModelCard.load(out / "README.md")
    meta = card.data.to_dict()
    assert meta["library_name"] == "comkd" and meta["license"] == "mit"
    assert meta["pipeline_tag"] == "image-classification"
    assert {"knowledge-distillation", "clip", "comkd", "image-classification"} <= set(meta["tags"])
    # the data as the user named it (folder names, no local path), never the loader "unlabelled"
    assert meta["datasets"] == ["photos", "labelled_test"]
    assert meta["model-index"][0]["name"] == "own"
    assert card.data.eval_results == [
        EvalResult(
            task_type="image-classification",
            task_name="Image Classification",
            dataset_type="labelled_test",
            dataset_name="labelled_test",
            dataset_split="test",
            metric_type="accuracy",
            metric_name="top-1 accuracy",
            metric_value=70.0,
        )
    ]  # the student's own score only: the teacher's and the baseline's are not claimed for it
    text = card.text
    assert "/home/alice" not in str(card)
    assert "3 classes, in the order of its outputs: `cat`, `dog`, `ship`." in text
    assert "every image of `photos` (`data.dataset: unlabelled`)" in text
    assert "| teacher `comkd-tiny-teacher` (prompted) | 80.00 |" in text
    assert "| student CLIP `comkd-tiny-student` undistilled (zero-shot, its own text tower) | 45.00 |" in text
    assert "| **this student** (distilled with `comkd`) | 70.00 |" in text
    assert "| chance level (100 / classes) | 33.33 |" in text and "30 images of 3 classes" in text
    assert "not on PyPI" in text and "`pip install -e .` in a checkout" in text
    assert "comkd predict hf-hub:org/own photos/" in text
    assert 'student = comkd.load_student("hf-hub:org/own")' in text and "student.predict([" in text


def test_the_card_of_a_base2novel_student_takes_its_seed_and_the_runs_baselines(run_dir, tmp_path) -> None:
    from huggingface_hub import ModelCard

    stage = tmp_path / "b2n" / "digits" / "seed2" / "comkd"
    stage.mkdir(parents=True)
    for f in ("student.safetensors", "results.json"):
        shutil.copyfile(run_dir / f, stage / f)
    (stage / "config.yaml").write_text(
        yaml.safe_dump(
            {
                "seed": 2,
                "protocol": "base2novel",
                "data": {"dataset": "digits"},
                "distill": {"method": "comkd"},
            }
        )
    )
    seeds = {
        "teacher": {"base": [95.0, 96.0], "novel": [85.0, 86.0], "hm": [89.7, 90.8]},
        "student_zeroshot": {"base": [50.0, 50.0], "novel": [40.0, 40.0], "hm": [44.4, 44.4]},
        "comkd": {"base": [90.0, 91.234], "novel": [79.0, 80.0], "hm": [84.1, 85.2541]},
    }
    run = {"protocol": "base2novel", "seeds": [1, 2], "datasets": {"digits": seeds}}
    (tmp_path / "b2n" / "results.json").write_text(json.dumps(run))
    r = CliRunner().invoke(
        cli.app, ["push", str(stage / "student.safetensors"), "org/b", "--dry-run", str(tmp_path / "o")]
    )
    assert r.exit_code == 0, r.output
    card = ModelCard.load(tmp_path / "o" / "README.md")
    assert [(e.metric_name, e.metric_value) for e in card.data.eval_results] == [
        ("base-class accuracy", 91.23),
        ("novel-class accuracy", 80.0),
        ("harmonic mean", 85.25),
    ]
    assert {e.dataset_name for e in card.data.eval_results} == {"digits"}
    text = card.text
    assert "seed 2 of the run's 2" in text
    assert "| teacher `comkd-tiny-teacher` | 96.00 | 86.00 | 90.80 |" in text  # seed 2's, not seed 1's
    assert "undistilled (zero-shot, its own text tower) | 50.00 | 40.00 | 44.40 |" in text
    assert "| chance level (100 / classes) | 50.00 | 100.00 | 66.67 |" in text
    assert "base classes: 10 images of 2 classes; novel classes: 5 images of 1 class." in text

    # comkd demo's flat results.json given with --results: the same rows, from that file alone
    demo = {m: {"base": v["base"][0], "novel": v["novel"][0], "hm": v["hm"][0]} for m, v in seeds.items()}
    (tmp_path / "demo.json").write_text(json.dumps({**demo, "warnings": [], "teacher_check": None}))
    r = CliRunner().invoke(
        cli.app,
        [
            "push",
            str(stage / "student.safetensors"),
            "org/d",
            "--results",
            str(tmp_path / "demo.json"),
            "--dry-run",
            str(tmp_path / "d"),
        ],
    )
    assert r.exit_code == 0, r.output
    card = ModelCard.load(tmp_path / "d" / "README.md")
    assert [e.metric_value for e in card.data.eval_results] == [90.0, 79.0, 84.1]
    assert "| teacher `comkd-tiny-teacher` | 95.00 | 85.00 | 89.70 |" in card.text


def test_the_card_lists_many_classes_by_the_first_hundred_and_a_count() -> None:
    from types import SimpleNamespace

    from comkd.deploy.card import model_card

    names = [f"class{i}" for i in range(250)]
    student = SimpleNamespace(
        classnames=names, edu_attention=None, arch=SimpleNamespace(model="m"), teacher_identity=None
    )
    text = model_card(student, "org/many").text
    assert "250 classes" in text and "`class99`, ... and 150 more" in text and "`class100`" not in text
    assert "no scores are claimed" in text


def test_the_cards_python_snippet_runs_as_written(run_dir, hub_cache, tmp_path) -> None:
    import re

    out = tmp_path / "card"
    r = CliRunner().invoke(
        cli.app, ["push", str(run_dir / "student.safetensors"), "org/tiny", "--dry-run", str(out)]
    )
    assert r.exit_code == 0, r.output
    snippet = re.search(r"```python\n(.*?)```", (out / "README.md").read_text(), re.S).group(1)
    work = tmp_path / "work"
    work.mkdir()
    for name in re.findall(r'"(photo\d\.jpg)"', snippet):
        Image.new("RGB", (20, 20), (200, 10, 30)).save(work / name)
    r = subprocess.run(
        [sys.executable, "-c", snippet],
        cwd=work,
        env=_offline(hub_cache),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 2 and all(any(c in line for c in CLASSES) for line in lines)
