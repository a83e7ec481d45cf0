"""The student file: what it records (``StudentArch``), the older format, the light import; a
damaged student or weight file is a one-line error naming it, and a student is refused on other
classes."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from comkd import cli
from comkd.config import load_config
from comkd.data import DataError
from comkd.engine.evaluation import evaluate_student
from comkd.models import StudentArch, create_student
from comkd.models.io import STUDENT_CONFIG_KEY, STUDENT_DIGEST_KEY, load_student, save_student, student_digest
from support import demo_student_file, one_line_error, resave_student


def _saved(tmp_path, **options):
    torch.manual_seed(0)
    s = create_student("comkd-tiny-student", None, teacher_dim=32, image_size=16, **options)
    s.set_text_features(torch.nn.functional.normalize(torch.randn(3, 32), dim=-1), ["a", "b", "c"])
    path = tmp_path / "student.safetensors"
    save_student(s, path)
    return s, path


def test_import_comkd_load_student_needs_neither_engine_nor_config() -> None:
    code = (
        "import comkd, sys; comkd.load_student; "
        "bad = sorted(m for m in sys.modules if m.startswith(('comkd.engine', 'comkd.config'))); "
        "assert not bad, bad"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_import_comkd_and_the_cli_load_no_torch_until_a_model_is_asked_for() -> None:
    """`comkd --help` / `--version` stay fast: the package's names are imported on first use."""
    code = (
        "import sys, comkd, comkd.cli; heavy = [m for m in ('torch', 'open_clip') if m in sys.modules]; "
        "assert not heavy, heavy; comkd.create_student; assert 'torch' in sys.modules; "
        "assert sorted(comkd.__all__) == sorted(n for n in comkd.__all__ if hasattr(comkd, n))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("edu", [True, False])
def test_the_file_records_the_arch_not_a_method(tmp_path, edu: bool) -> None:
    s, path = _saved(tmp_path, edu_attention=edu, edu_heads=2 if edu else 1, projector="linear")
    with safe_open(str(path), framework="pt") as f:
        c = json.loads(f.metadata()[STUDENT_CONFIG_KEY])
    assert "method" not in c and c == dataclasses.asdict(s.arch)
    assert c["edu_attention"] is edu and c["projector"] == "linear"
    loaded = load_student(path)
    assert loaded.arch == s.arch and (loaded.edu_attention is not None) is edu
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(loaded.eval()(x).logits, s.eval()(x).logits)


@pytest.mark.parametrize(("method", "edu"), [("comkd", True), ("no_ifalign", True), ("promptkd", False)])
def test_a_file_of_the_older_format_still_loads(tmp_path, method: str, edu: bool) -> None:
    """Files written before ``StudentArch`` name the method (and lack the options added later)."""
    s, path = _saved(tmp_path, edu_attention=edu)
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    sd = load_file(str(path))
    c = json.loads(meta[STUDENT_CONFIG_KEY])
    old = {
        k: c[k]
        for k in (
            "model",
            "teacher_dim",
            "vision_tokens",
            "vision_depth",
            "edu_heads",
            "edu_attn_dim",
            "edu_shared_fc",
            "attend",
            "image_size",
            "quick_gelu",
        )
    }
    meta[STUDENT_CONFIG_KEY] = json.dumps({**old, "method": method})
    meta[STUDENT_DIGEST_KEY] = student_digest(sd, meta)
    old_path = tmp_path / "old.safetensors"
    save_file(sd, str(old_path), metadata=meta)
    loaded = load_student(old_path)
    assert loaded.arch == s.arch and loaded.classnames == ["a", "b", "c"]


def test_an_unknown_field_in_the_file_is_refused_naming_it(tmp_path) -> None:
    from comkd.models import ModelError

    _, path = _saved(tmp_path)
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    sd = load_file(str(path))
    meta[STUDENT_CONFIG_KEY] = json.dumps({**json.loads(meta[STUDENT_CONFIG_KEY]), "wings": 2})
    meta[STUDENT_DIGEST_KEY] = student_digest(sd, meta)
    save_file(sd, str(tmp_path / "odd.safetensors"), metadata=meta)
    with pytest.raises(ModelError, match="odd.safetensors.*'wings'"):
        load_student(tmp_path / "odd.safetensors")


def test_create_student_refuses_an_unknown_option_naming_it() -> None:
    from comkd.models import ModelError

    with pytest.raises(ModelError, match="'edu_head'"):
        create_student("comkd-tiny-student", None, teacher_dim=32, edu_head=2)
    assert {f.name for f in dataclasses.fields(StudentArch)} >= {"edu_attention", "scope", "projector"}


def test_the_models_are_built_from_the_config_sections_by_name() -> None:
    from comkd.engine.builders import build_student, build_teacher, student_arch, teacher_arch

    cfg = load_config(
        "demo",
        sets=[
            "teacher.text_ctx=2",
            "teacher.vision_tokens=0",
            "student.edu_heads=2",
            "student.projector=linear",
            "distill.method=promptkd",
            "data.image_size=16",
        ],
    )
    t = build_teacher(cfg, torch.device("cpu"))
    assert t.arch == teacher_arch(cfg) and t.arch.text_ctx == 2 and t.arch.image_size == 16
    assert t.text.ctx.shape[0] == 2  # two learnable context tokens
    assert getattr(t.visual, "prompts", None) is None  # vision_tokens=0: no visual prompts
    s = build_student(cfg, t.embed_dim, torch.device("cpu"))
    want = student_arch(cfg, t.embed_dim)
    assert (want.edu_heads, want.projector, want.edu_attention) == (2, "linear", False)
    assert s.arch == dataclasses.replace(want, vision_depth=s.arch.vision_depth, quick_gelu=False)
    assert s.edu_attention is None and s.preprocess.image_size == 16


def test_the_lazy_public_names_are_exactly_all() -> None:
    import comkd

    assert sorted(comkd._LAZY) == sorted(comkd.__all__)


def test_loading_a_student_file_says_nothing_about_random_weights(tmp_path, caplog) -> None:
    import logging

    _, path = _saved(tmp_path)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load_student(path)
    assert not [r for r in caplog.records if "pretrained weights" in r.getMessage()]
    with caplog.at_level(logging.WARNING):  # a model built without any weights still says so
        create_student("comkd-tiny-student", None, teacher_dim=32, image_size=16)
    assert [r for r in caplog.records if "No pretrained weights loaded" in r.getMessage()]


def _edited(tmp_path, name: str, tensors=None, **meta_edits) -> Path:
    """The saved student with tensors/metadata edited and the digest recomputed (a careful editor)."""
    _, path = _saved(tmp_path)
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    sd = load_file(str(path))
    sd.update(tensors or {})
    meta.update(meta_edits)
    meta[STUDENT_DIGEST_KEY] = student_digest(sd, meta)
    out = tmp_path / name
    save_file(sd, str(out), metadata=meta)
    return out


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (
            {"tensors": {"text_features": torch.full((3, 32), float("nan"))}},
            "tensor 'text_features' holds NaN/inf",
        ),
        ({"comkd.classnames": '"abc"'}, "comkd.classnames must be a non-empty JSON list"),
        ({"comkd.classnames": "[1, 2, 3]"}, "holds 1, not a class name"),
        ({"comkd.classnames": '["a", "a", "c"]'}, "lists ['a'] more than once"),
        ({"comkd.classnames": "[oops"}, "comkd.classnames is not valid JSON"),
    ],
)
def test_a_student_file_with_bad_values_and_a_matching_digest_is_refused(tmp_path, edit, words) -> None:
    from comkd.models import ModelError

    path = _edited(tmp_path, "bad.safetensors", **edit)
    with pytest.raises(ModelError) as err:
        load_student(path)
    assert str(path) in str(err.value) and words in str(err.value) and "\n" not in str(err.value)


def test_an_absurd_input_size_in_a_student_file_is_refused_before_building(tmp_path) -> None:
    from comkd.models import ModelError

    _, path = _saved(tmp_path)
    with safe_open(str(path), framework="pt") as f:
        arch = json.loads(f.metadata()[STUDENT_CONFIG_KEY])
    bad = _edited(
        tmp_path, "huge.safetensors", **{STUDENT_CONFIG_KEY: json.dumps({**arch, "image_size": 60000})}
    )
    with pytest.raises(
        ModelError, match=r"huge\.safetensors.*image_size must be an integer in 1\.\.4096, got 60000"
    ):
        load_student(bad)


def _config_edit(**edits):
    """A ``comkd.student_config`` edit: the saved arch with ``edits`` (a value None drops the key)."""

    def edit(meta: dict) -> str:
        arch = {**json.loads(meta[STUDENT_CONFIG_KEY]), **edits}
        return json.dumps({k: v for k, v in arch.items() if v is not None})

    return edit


DEEP = "[" * 30000 + "]" * 30000  # deep enough to exhaust the JSON parser's recursion
CRAFTED_METADATA = {
    "deep class names": ("comkd.classnames", DEEP, "comkd.classnames is nested deeper than 16 levels"),
    "huge class names": (
        "comkd.classnames",
        "[" * 20_000_000 + "]" * 20_000_000,
        "comkd.classnames is 40000000 characters long, more than the 33554432",
    ),
    "deep preprocess": ("comkd.preprocess", DEEP, "comkd.preprocess is nested deeper than 16 levels"),
    "preprocess a list": ("comkd.preprocess", "[1, 2]", "comkd.preprocess"),
    "deep config": (STUDENT_CONFIG_KEY, DEEP, "comkd.student_config is nested deeper than 16 levels"),
    "config a list": (STUDENT_CONFIG_KEY, "[1]", "comkd.student_config must be a JSON object, got list"),
    "prompt tokens": (
        STUDENT_CONFIG_KEY,
        _config_edit(vision_tokens=10**9),
        "comkd.student_config.vision_tokens must be an integer in 0..1024, got 1000000000",
    ),
    "teacher_dim a string": (
        STUDENT_CONFIG_KEY,
        _config_edit(teacher_dim="32"),
        "comkd.student_config.teacher_dim must be an integer in 1..65536, got '32'",
    ),
    "teacher_dim not W's": (
        STUDENT_CONFIG_KEY,
        _config_edit(teacher_dim=60000),
        "its W (text_features) has shape [3, 32], not [classes, 60000]",
    ),
    "heads a bool": (
        STUDENT_CONFIG_KEY,
        _config_edit(edu_heads=True),
        "comkd.student_config.edu_heads must be an integer in 1..1024, got True",
    ),
    "model a number": (
        STUDENT_CONFIG_KEY,
        _config_edit(model=5),
        "comkd.student_config.model must be a string, got 5",
    ),
}


@pytest.mark.parametrize("case", sorted(CRAFTED_METADATA))
def test_crafted_student_metadata_is_one_line_naming_the_file_and_key(tmp_path, case) -> None:
    from PIL import Image

    key, value, words = CRAFTED_METADATA[case]
    _, src = _saved(tmp_path)
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
    bad = _edited(tmp_path, "crafted.safetensors", **{key: value(meta) if callable(value) else value})
    img = tmp_path / "img.png"
    Image.new("RGB", (20, 20), (10, 200, 30)).save(img)
    out = tmp_path / "p.csv"
    r = CliRunner().invoke(cli.app, ["predict", str(bad), str(img), "--out", str(out), "--no-progress"])
    one_line_error(r, "crafted.safetensors", words)
    assert not out.exists()


def test_duplicate_class_names_are_found_in_linear_time() -> None:
    from comkd.models.io import check_classnames

    names = [f"c{i}" for i in range(200_000)]
    assert check_classnames(names, "w") is names  # quadratic counting would take minutes
    with pytest.raises(ValueError, match=r"w lists \['c7'\] more than once"):
        check_classnames([*names, "c7"], "w")


def test_a_student_with_nan_weights_is_not_written(tmp_path) -> None:
    from comkd.models import ModelError

    s, path = _saved(tmp_path)
    before = path.read_bytes()
    with torch.no_grad():
        next(p for p in s.parameters() if p.requires_grad).fill_(float("inf"))
    with pytest.raises(ModelError, match=r"not writing .*student\.safetensors: tensor .* holds NaN/inf"):
        save_student(s, path)
    assert path.read_bytes() == before  # the earlier file is kept


# -- a student evaluated on other classes ---------------------------------------------
@pytest.mark.parametrize("names", [[f"class {i}" for i in range(10)], [str(i) for i in range(5)]])
def test_student_on_a_dataset_with_other_classes_is_refused(tmp_path, names) -> None:
    path, cfg = demo_student_file(tmp_path, names)
    student = load_student(path)
    with pytest.raises(DataError) as err:
        evaluate_student(cfg, student)
    msg = str(err.value)
    assert repr(names[0]) in msg and "'digits'" in msg and f"stores {len(names)} classes" in msg
    r = CliRunner().invoke(cli.app, ["evaluate", str(path), "--config", "demo"])
    one_line_error(r, repr(names[0]), "digits")


def test_student_on_its_own_classes_still_evaluates(tmp_path) -> None:
    from comkd.data.builtin import load_digits_splits

    names = load_digits_splits().classnames
    path, cfg = demo_student_file(tmp_path, names)
    res = evaluate_student(cfg, load_student(path), halves=True)
    assert 0 <= res["base"]["acc"] <= 100 and 0 <= res["novel"]["acc"] <= 100


# -- damaged student and weight files -----------------------------------------------
def _flip_last_bit(src, dst):
    b = bytearray(src.read_bytes())
    b[-3] ^= 0x01  # inside the last tensor's data
    dst.write_bytes(bytes(b))


def _edit_heads(meta):
    c = json.loads(meta["comkd.student_config"])
    c["edu_heads"] = 2
    return {"comkd.student_config": json.dumps(c)}


DAMAGED_STUDENTS = {
    "flipped bit": (lambda s, d: _flip_last_bit(s, d), "corrupt or was edited"),
    "edited metadata": (lambda s, d: resave_student(s, d, meta_edit=_edit_heads), "corrupt or was edited"),
    "missing tensor, no digest": (
        lambda s, d: resave_student(s, d, drop=("visual.visual.proj",), keep_digest=False),
        "does not rebuild",
    ),
    "missing W, no digest": (
        lambda s, d: resave_student(s, d, drop=("text_features",), keep_digest=False),
        "text_features",
    ),
    "truncated": (lambda s, d: d.write_bytes(s.read_bytes()[: s.stat().st_size // 2]), "not a readable"),
    "empty": (lambda s, d: d.write_bytes(b""), "not a readable"),
    "not safetensors": (lambda s, d: d.write_text("student = 'hello'\n"), "not a readable"),
}


@pytest.mark.parametrize("case", sorted(DAMAGED_STUDENTS))
def test_a_damaged_student_file_is_one_line_naming_it(tmp_path, case) -> None:
    from comkd.data.builtin import load_digits_splits

    src, _ = demo_student_file(tmp_path, load_digits_splits().classnames)
    make, words = DAMAGED_STUDENTS[case]
    bad = tmp_path / "bad_student.safetensors"
    make(src, bad)
    r = CliRunner().invoke(cli.app, ["evaluate", str(bad), "--config", "demo"])
    one_line_error(r, "bad_student.safetensors", words)


def test_an_intact_student_file_verifies(tmp_path) -> None:
    from safetensors import safe_open

    from comkd.data.builtin import load_digits_splits

    src, _ = demo_student_file(tmp_path, load_digits_splits().classnames)
    with safe_open(str(src), framework="pt") as f:
        assert len(f.metadata()[STUDENT_DIGEST_KEY]) == 64
    assert load_student(src).classnames == load_digits_splits().classnames


def _weights_with_edited_metadata(path) -> None:
    from comkd.models import create_teacher, load_clip, save_clip_weights

    save_clip_weights(
        create_teacher("comkd-tiny-teacher").clip,
        path,
        "comkd-tiny-teacher",
        load_clip("comkd-tiny-teacher").config,
    )
    resave_student(path, path, meta_edit=lambda m: {"comkd.embed_dim": "sixty-four"})


@pytest.mark.parametrize(
    "content", [b"", b"not a weight file", b'\x10\x00\x00\x00\x00\x00\x00\x00{"a":', None]
)
def test_a_damaged_weight_file_is_one_line_naming_it(tmp_path, content) -> None:
    bad = tmp_path / "teacher_bad.safetensors"
    if content is None:  # edited metadata
        _weights_with_edited_metadata(bad)
    else:
        bad.write_bytes(content)
    r = CliRunner().invoke(
        cli.app,
        [
            "train-teacher",
            "--config",
            "demo",
            "--teacher-pretrained",
            str(bad),
            "--out-dir",
            str(tmp_path / "t"),
            "--set",
            "progress=false",
        ],
    )
    one_line_error(r, "teacher_bad.safetensors")
