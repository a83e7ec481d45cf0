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
from support import TINY_DISTILL_OPTS, one_line_error, resave_student, write_tiny_student, write_tiny_teacher

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


# -- a crafted or mistaken teacher record: one line naming the file and the field, nothing built ---
_ARCH = {
    "model": "comkd-tiny-teacher",
    "text_ctx": 4,
    "text_depth": None,
    "ctx_init": "a photo of a",
    "vision_tokens": 4,
    "vision_depth": None,
    "image_size": 16,
    "quick_gelu": None,
}
_RECORD = {
    "model": "comkd-tiny-teacher",
    "weights_sha256": "0" * 64,
    "prompts_sha256": "0" * 64,
    "image_size": 16,
    "source": {"pretrained": None, "prompts": None, "arch": _ARCH},
}


def _source(**edits) -> str:
    return json.dumps({**_RECORD, "source": {**_RECORD["source"], **edits}})


def _arch(**edits) -> str:
    return _source(arch={**_ARCH, **edits})


@pytest.mark.parametrize(
    ("record", "words"),
    [
        ("[1, 2]", "comkd.teacher must be a JSON object, got list"),
        ('"a teacher"', "comkd.teacher must be a JSON object, got str"),
        (json.dumps({**_RECORD, "image_size": "16"}), "comkd.teacher.image_size must be an integer"),
        (
            json.dumps({k: v for k, v in _RECORD.items() if k != "model"}),
            "comkd.teacher has no field 'model'",
        ),
        (json.dumps({**_RECORD, "source": [1]}), "comkd.teacher.source must be a JSON object, got list"),
        (_source(arch="model text_ctx"), "comkd.teacher.source.arch must be a JSON object, got str"),
        (_source(arch=["model"]), "comkd.teacher.source.arch must be a JSON object, got list"),
        (_arch(text_ctx="4"), "comkd.teacher.source.arch.text_ctx must be an integer in 0..1024, got '4'"),
        (_arch(text_ctx=-3), "comkd.teacher.source.arch.text_ctx must be an integer in 0..1024, got -3"),
        # ~5 GB of context for the tiny teacher (more for a real one): refused before anything is built
        (_arch(text_ctx=10**9), "comkd.teacher.source.arch.text_ctx must be an integer in 0..1024"),
        (_arch(vision_tokens=10**9), "comkd.teacher.source.arch.vision_tokens must be an integer in 0..1024"),
        (_arch(image_size=10**9), "comkd.teacher.source.arch.image_size must be an integer in 1..4096"),
        (_arch(model=5), "comkd.teacher.source.arch.model must be a string, got 5"),
        (_arch(ctx_init=[1]), "comkd.teacher.source.arch.ctx_init must be a string"),
        (_arch(layers=12), "comkd.teacher.source.arch has an unknown field 'layers'"),
        (_source(pretrained="hf-hub:org/clip"), "comkd.teacher.source.pretrained must be an open_clip tag"),
        (_source(prompts="hf-hub:org/prompts"), "comkd.teacher.source.prompts must be a local prompts file"),
        (_source(pretrained=["a"]), "comkd.teacher.source.pretrained must be a string, got ['a']"),
        ("[" * 30000 + "]" * 30000, "comkd.teacher is nested deeper than 16 levels"),
        ("[" * 100000 + "]" * 100000, "comkd.teacher is 200000 characters long, more than the 65536"),
    ],
)
def test_a_crafted_teacher_record_is_one_line_before_anything_is_built(
    tmp_path, monkeypatch, record, words
) -> None:
    from comkd.models.teacher import Teacher

    src = write_tiny_student(tmp_path / "s.safetensors", ["a", "b"])
    bad = tmp_path / "crafted.safetensors"
    resave_student(src, bad, meta_edit=lambda m: {"comkd.teacher": record})
    (tmp_path / "names.txt").write_text("x\ny\n")

    def never(*a, **k):
        raise AssertionError("a teacher was built from a record that does not pass")

    monkeypatch.setattr(Teacher, "build", classmethod(never))
    out = tmp_path / "new.safetensors"
    r = CliRunner().invoke(
        cli.app, ["classes", str(bad), "--names", str(tmp_path / "names.txt"), "--out", str(out)]
    )
    one_line_error(r, "crafted.safetensors", words)
    assert not out.exists()


def test_a_recorded_teacher_that_cannot_be_rebuilt_names_the_file_and_the_record(tmp_path) -> None:
    src = write_tiny_student(tmp_path / "s.safetensors", ["a", "b"])
    bad = tmp_path / "moved.safetensors"
    record = _arch(model=str(tmp_path / "gone" / "teacher.json"))
    resave_student(src, bad, meta_edit=lambda m: {"comkd.teacher": record})
    (tmp_path / "names.txt").write_text("x\ny\n")
    r = CliRunner().invoke(cli.app, ["classes", str(bad), "--names", str(tmp_path / "names.txt")])
    one_line_error(r, "moved.safetensors", "comkd.teacher.source", "teacher.json")


def test_a_text_context_longer_than_the_text_towers_is_refused_naming_both() -> None:
    # the tiny teacher's text tower holds 16 tokens: start, end and a class name leave 13
    assert create_teacher("comkd-tiny-teacher", text_ctx=13, image_size=16).text.n_ctx == 13
    with pytest.raises(ModelError, match=r"text context of 14 tokens .* context of 16 tokens \(at most 13"):
        create_teacher("comkd-tiny-teacher", text_ctx=14, image_size=16)
    with pytest.raises(ModelError, match=r"text prompt tokens and depth must be >= 0, got n_ctx=-1"):
        create_teacher("comkd-tiny-teacher", text_ctx=-1, image_size=16)
