"""New class names after distillation (``comkd classes``): W recomputed by the student's own teacher,
any other teacher refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from comkd import cli, load_student
from comkd.models import ModelError, create_student, create_teacher
from comkd.models.identity import check_teacher, teacher_identity
from comkd.models.io import save_student
from support import TINY_DISTILL_OPTS, write_tiny_teacher

NEW = ["cat", "dog", "bird"]


def _teacher(weights: Path, prompts: Path | None = None):
    return create_teacher(
        "comkd-tiny-teacher", str(weights), prompts=str(prompts) if prompts else None, image_size=16
    )


@pytest.fixture(scope="module")
def distilled(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("classes")
    for s in (0, 1):
        w, p = write_tiny_teacher(d, str(s), s)
        w.rename(d / f"t{s}.safetensors")
        p.rename(d / f"p{s}.safetensors")
    r = CliRunner().invoke(
        cli.app,
        [
            "distill",
            "--teacher",
            "comkd-tiny-teacher",
            "--teacher-pretrained",
            str(d / "t0.safetensors"),
            "--teacher-prompts",
            str(d / "p0.safetensors"),
            "--out-dir",
            str(d / "run"),
            *TINY_DISTILL_OPTS,
        ],
    )
    assert r.exit_code == 0, r.output
    (d / "new.txt").write_text("\n".join(NEW) + "\n")
    return {"dir": d, "student": d / "run" / "student.safetensors"}


def _classes(distilled, weights: str, prompts: str, out: Path, *extra: str):
    d = distilled["dir"]
    return CliRunner().invoke(
        cli.app,
        [
            "classes",
            str(distilled["student"]),
            "--names",
            str(d / "new.txt"),
            "--teacher",
            "comkd-tiny-teacher",
            "--teacher-pretrained",
            str(d / weights),
            "--teacher-prompts",
            str(d / prompts),
            "--out",
            str(out),
            *extra,
        ],
    )


@pytest.mark.slow
def test_student_file_records_its_teacher(distilled) -> None:
    d = distilled["dir"]
    with safe_open(str(distilled["student"]), framework="pt") as f:
        rec = json.loads(f.metadata()["comkd.teacher"])
    source = rec.pop("source")  # how to rebuild it: comkd classes needs nothing else
    assert rec == teacher_identity(_teacher(d / "t0.safetensors", d / "p0.safetensors"))
    assert source["pretrained"] == str(d / "t0.safetensors") and source["prompts"] == str(
        d / "p0.safetensors"
    )
    assert source["arch"]["model"] == "comkd-tiny-teacher" and source["arch"]["image_size"] == 16
    assert (
        rec["model"] == "comkd-tiny-teacher" and rec["image_size"] == 16 and len(rec["weights_sha256"]) == 64
    )


@pytest.mark.slow
def test_classes_recomputes_w_with_the_students_own_teacher(distilled) -> None:
    d = distilled["dir"]
    r = _classes(distilled, "t0.safetensors", "p0.safetensors", d / "new.safetensors")
    assert r.exit_code == 0, r.output
    old, new = load_student(distilled["student"]), load_student(d / "new.safetensors")
    assert new.classnames == NEW and old.classnames != NEW
    w = _teacher(d / "t0.safetensors", d / "p0.safetensors").class_text_features(NEW)
    assert torch.allclose(new.text_features, w, atol=1e-6)
    sd_old, sd_new = old.state_dict(), new.state_dict()
    assert all(torch.equal(sd_old[k], sd_new[k]) for k in sd_old if k != "text_features")  # only W changed
    assert new.teacher_identity == old.teacher_identity
    x = torch.randn(4, 3, 16, 16)
    assert new(x).logits.shape == (4, 3) and {p.classes[0] for p in new.predict(x)} <= set(NEW)


@pytest.mark.slow
def test_classes_from_the_student_file_alone_rebuilds_its_teacher(distilled, tmp_path) -> None:
    d = distilled["dir"]
    out = tmp_path / "alone.safetensors"
    r = CliRunner().invoke(
        cli.app, ["classes", str(distilled["student"]), "--names", str(d / "new.txt"), "--out", str(out)]
    )
    assert r.exit_code == 0, r.output
    w = _teacher(d / "t0.safetensors", d / "p0.safetensors").class_text_features(NEW)
    new = load_student(out)
    assert new.classnames == NEW and torch.allclose(new.text_features, w, atol=1e-6)
    # a recorded file that moved is named, with the flag that replaces it
    s = load_student(distilled["student"])
    s.teacher_identity["source"]["prompts"] = str(tmp_path / "gone.safetensors")
    save_student(s, tmp_path / "moved.safetensors")
    r = CliRunner().invoke(
        cli.app, ["classes", str(tmp_path / "moved.safetensors"), "--names", str(d / "new.txt")]
    )
    assert r.exit_code == 1 and "gone.safetensors" in r.output and "--teacher-prompts" in r.output
    # the recorded prompts replaced by other ones: refused, naming the digest
    r = CliRunner().invoke(
        cli.app,
        ["classes", str(distilled["student"]), "--names", str(d / "new.txt"), "--teacher-prompts"]
        + [str(d / "p1.safetensors"), "--out", str(tmp_path / "bad.safetensors")],
    )
    assert r.exit_code == 1 and "prompts_sha256" in r.output and not (tmp_path / "bad.safetensors").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("weights", "prompts", "field"),
    [
        ("t1.safetensors", "p0.safetensors", "weights_sha256"),
        ("t0.safetensors", "p1.safetensors", "prompts_sha256"),
    ],
)
def test_classes_refuses_another_teacher(distilled, weights, prompts, field) -> None:
    out = distilled["dir"] / f"bad-{field}.safetensors"
    r = _classes(distilled, weights, prompts, out)
    assert (
        r.exit_code == 1
        and field in r.output
        and "another teacher" in r.output
        and "Traceback" not in r.output
    )
    assert not out.exists()


def test_a_student_without_a_teacher_record_needs_force(tmp_path) -> None:
    s = create_student("comkd-tiny-student", None, teacher_dim=128, image_size=16)  # the tiny teacher's size
    s.set_text_features(torch.nn.functional.normalize(torch.randn(2, 128), dim=-1), ["a", "b"])
    save_student(s, tmp_path / "s.safetensors")
    (tmp_path / "n.txt").write_text("x\ny\nz\n")
    args = [
        "classes",
        str(tmp_path / "s.safetensors"),
        "--names",
        str(tmp_path / "n.txt"),
        "--teacher",
        "comkd-tiny-teacher",
        "--set",
        "data.image_size=16",
        "--out",
        str(tmp_path / "o.safetensors"),
    ]
    r = CliRunner().invoke(cli.app, args)
    assert r.exit_code == 1 and "does not record" in r.output and "--force" in r.output
    r = CliRunner().invoke(cli.app, [*args, "--force"])
    assert r.exit_code == 0, r.output
    assert load_student(tmp_path / "o.safetensors").classnames == ["x", "y", "z"]


def test_check_teacher_names_each_differing_field() -> None:
    rec = {"model": "A", "weights_sha256": "1" * 64, "prompts_sha256": "2" * 64, "image_size": 224}
    check_teacher(rec, dict(rec), Path("s.safetensors"))  # the same teacher passes
    with pytest.raises(ModelError, match="model 'A' \\(given: 'B'\\).*image_size"):
        check_teacher(rec, {**rec, "model": "B", "image_size": 336}, Path("s.safetensors"))


@pytest.mark.slow
def test_a_student_distilled_from_a_teacher_cache_records_the_cached_teacher(tmp_path) -> None:
    from comkd.engine.cache_format import read_cache_info

    common = [
        "--config",
        "demo",
        "--set",
        "progress=false",
        "--set",
        "distill.optim.epochs=1",
        "--set",
        "distill.optim.warmup_epochs=0",
        "--set",
        "teacher.text_depth=1",
        "--set",
        "teacher.vision_depth=1",
    ]
    r = CliRunner().invoke(cli.app, ["cache-teacher", "--out-dir", str(tmp_path / "cache"), *common])
    assert r.exit_code == 0, r.output
    cache = tmp_path / "cache" / "teacher_cache.bin"
    r = CliRunner().invoke(
        cli.app,
        [
            "distill",
            "--teacher-cache",
            str(cache),
            "--out-dir",
            str(tmp_path / "s"),
            "--no-evaluate",
            *common,
        ],
    )
    assert r.exit_code == 0, r.output
    rec = load_student(tmp_path / "s" / "student.safetensors").teacher_identity
    head = read_cache_info(cache).header["teacher"]
    assert rec.pop("source")["arch"]["text_depth"] == 1  # the config's teacher (the cache holds its outputs)
    assert rec == {
        "model": head["model"],
        "weights_sha256": head["weights_sha256"],
        "prompts_sha256": head["prompts_sha256"],
        "image_size": head["preprocess"]["image_size"],
    }
    (tmp_path / "n.txt").write_text("zero\none\n")
    r = CliRunner().invoke(
        cli.app,
        [
            "classes",
            str(tmp_path / "s" / "student.safetensors"),
            "--names",
            str(tmp_path / "n.txt"),
            "--out",
            str(tmp_path / "n.safetensors"),
            *common,
        ],
    )
    assert r.exit_code == 0, r.output  # the same (seeded) teacher is recognised


@pytest.mark.slow
def test_the_python_student_speaks_clip_and_takes_new_classes(distilled) -> None:
    d = distilled["dir"]
    s = load_student(distilled["student"]).eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        emb = s.encode_image(x)
        assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
        torch.testing.assert_close(s.logit_scale * emb @ s.text_features.t(), s(x).logits)
        assert torch.allclose(torch.nn.functional.normalize(s.encode_image(x, normalize=False), dim=-1), emb)
    s.set_classes(NEW, _teacher(d / "t0.safetensors", d / "p0.safetensors"))
    w = _teacher(d / "t0.safetensors", d / "p0.safetensors").class_text_features(NEW)
    assert s.classnames == NEW and torch.allclose(s.text_features, w, atol=1e-6)
    with pytest.raises(ModelError, match="prompts_sha256"):
        s.set_classes(["x", "y"], _teacher(d / "t0.safetensors", d / "p1.safetensors"))
    assert s.classnames == NEW  # a refused teacher changes nothing
