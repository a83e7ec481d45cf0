"""Inputs that used to give a silently wrong result or a traceback: each
must now be a one-line error naming the file, key or value at fault, or be handled safely."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from comkd import cli
from comkd.config import load_config
from comkd.data import DataError
from comkd.engine import pipeline as P
from comkd.engine import stages
from comkd.models.io import STUDENT_DIGEST_KEY, load_student, save_student
from conftest import subprocess_env

TINY = ["progress=false", "data.image_size=16"]


def _one_line_error(r, *names: str, code: int = 1) -> None:
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output
    err = [x for x in r.output.splitlines() if x.startswith(("error:", "config error:"))]
    assert err, r.output
    for n in names:
        assert n in err[0], (n, err[0])


# -- item 12: a student evaluated on other classes ---------------------------------------------
def _student_file(tmp_path, names: list[str]):
    cfg = load_config("demo")
    student = P.build_student(cfg, 32, "cpu")
    student.set_text_features(torch.nn.functional.normalize(torch.randn(len(names), 32), dim=-1), names)
    path = tmp_path / "student.safetensors"
    save_student(student, path)
    return path, cfg


@pytest.mark.parametrize("names", [[f"class {i}" for i in range(10)], [str(i) for i in range(5)]])
def test_student_on_a_dataset_with_other_classes_is_refused(tmp_path, names) -> None:
    path, cfg = _student_file(tmp_path, names)
    student = load_student(path)
    with pytest.raises(DataError) as err:
        P.evaluate_student(cfg, student)
    msg = str(err.value)
    assert repr(names[0]) in msg and "'digits'" in msg and f"stores {len(names)} classes" in msg
    r = CliRunner().invoke(cli.app, ["evaluate", str(path), "--config", "demo"])
    _one_line_error(r, repr(names[0]), "digits")


def test_student_on_its_own_classes_still_evaluates(tmp_path) -> None:
    from comkd.data.builtin import load_digits_splits

    names = load_digits_splits().classnames
    path, cfg = _student_file(tmp_path, names)
    res = P.evaluate_student(cfg, load_student(path))
    assert 0 <= res["base"]["acc"] <= 100 and 0 <= res["novel"]["acc"] <= 100


# -- item 13: a teacher cache from other teacher files --------------------------------------------
def test_teacher_cache_from_other_teacher_weights_or_prompts_is_refused(tmp_path, tiny_teacher_files) -> None:
    from comkd.engine.cache_format import StaleCacheError, read_cache_info

    f = tiny_teacher_files
    sets = [*TINY, "distill.optim.epochs=1", "distill.optim.warmup_epochs=0"]
    cfg = load_config(
        "demo", sets=[*sets, f"teacher.pretrained={f['weights_a']}", f"teacher.prompts={f['prompts_a']}"]
    )
    info = P.run_cache_teacher(cfg, tmp_path / "cache", views=1)
    header = read_cache_info(info["cache"]).header
    assert header["teacher_files"]["teacher.pretrained"].startswith("sha256:")
    for key, other in (("teacher.pretrained", f["weights_b"]), ("teacher.prompts", f["prompts_b"])):
        bad = load_config(
            "demo",
            sets=[
                *sets,
                f"teacher.pretrained={f['weights_a']}",
                f"teacher.prompts={f['prompts_a']}",
                f"{key}={other}",
                f"distill.teacher_cache={info['cache']}",
            ],
        )
        with pytest.raises(StaleCacheError) as err:
            P.run_distill(bad, tmp_path / key)
        assert key in str(err.value)
        assert ("teacher.prompts" if key == "teacher.pretrained" else "teacher.pretrained") not in str(
            err.value
        )
    # the same files under another path are the same teacher: accepted
    copy = tmp_path / "moved.safetensors"
    copy.write_bytes(f["prompts_a"].read_bytes())
    ok = load_config(
        "demo",
        sets=[
            *sets,
            f"teacher.pretrained={f['weights_a']}",
            f"teacher.prompts={copy}",
            f"distill.teacher_cache={info['cache']}",
        ],
    )
    assert P.run_distill(ok, tmp_path / "ok")["train_images"] > 0


# -- items 16, 17: damaged student and weight files -----------------------------------------------
def _resave(src, dst, drop=(), meta_edit=None, keep_digest=True):
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
    sd = {k: v for k, v in load_file(str(src)).items() if k not in drop}
    if meta_edit:
        meta.update(meta_edit(meta))
    if not keep_digest:
        meta.pop(STUDENT_DIGEST_KEY)
    save_file(sd, str(dst), metadata=meta)


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
    "edited metadata": (lambda s, d: _resave(s, d, meta_edit=_edit_heads), "corrupt or was edited"),
    "missing tensor, no digest": (
        lambda s, d: _resave(s, d, drop=("visual.visual.proj",), keep_digest=False),
        "does not rebuild",
    ),
    "missing W, no digest": (
        lambda s, d: _resave(s, d, drop=("text_features",), keep_digest=False),
        "text_features",
    ),
    "truncated": (lambda s, d: d.write_bytes(s.read_bytes()[: s.stat().st_size // 2]), "not a readable"),
    "empty": (lambda s, d: d.write_bytes(b""), "not a readable"),
    "not safetensors": (lambda s, d: d.write_text("student = 'hello'\n"), "not a readable"),
}


@pytest.mark.parametrize("case", sorted(DAMAGED_STUDENTS))
def test_a_damaged_student_file_is_one_line_naming_it(tmp_path, case) -> None:
    from comkd.data.builtin import load_digits_splits

    src, _ = _student_file(tmp_path, load_digits_splits().classnames)
    make, words = DAMAGED_STUDENTS[case]
    bad = tmp_path / "bad_student.safetensors"
    make(src, bad)
    r = CliRunner().invoke(cli.app, ["evaluate", str(bad), "--config", "demo"])
    _one_line_error(r, "bad_student.safetensors", words)


def test_an_intact_student_file_verifies(tmp_path) -> None:
    from safetensors import safe_open

    from comkd.data.builtin import load_digits_splits

    src, _ = _student_file(tmp_path, load_digits_splits().classnames)
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
    _resave(path, path, meta_edit=lambda m: {"comkd.embed_dim": "sixty-four"})


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
    _one_line_error(r, "teacher_bad.safetensors")


# -- item 14: labels that would build phantom classes, and one-class data ------------------------
def _csv(tmp_path, labels, names_file=None, images=False):
    lines = ["path,label"] + [f"img{i}.png,{y}" for i, y in enumerate(labels)]
    if images:
        from PIL import Image

        for i in range(len(labels)):
            Image.new("RGB", (8, 8), (40 * i % 255, 0, 0)).save(tmp_path / f"img{i}.png")
    p = tmp_path / "labels.csv"
    p.write_text("\n".join(lines) + "\n")
    if names_file is not None:
        (tmp_path / "classnames.txt").write_text("\n".join(names_file) + "\n")
    return p


@pytest.mark.parametrize(
    ("labels", "words"),
    [
        ([0, 1, 2, 3, 99] * 3, ["labels.csv", "without gaps", "95 label(s)", "largest label 99"]),
        ([0, 2, 3] * 3, ["labels.csv", "without gaps", "[1]"]),
    ],
)
def test_csv_labels_with_gaps_or_one_class_are_refused(tmp_path, labels, words) -> None:
    from comkd.data import load_splits

    with pytest.raises(DataError) as err:
        load_splits("csv", str(_csv(tmp_path, labels)))
    for w in words:
        assert w in str(err.value), (w, str(err.value))


@pytest.mark.parametrize(
    ("labels", "subsample", "words"),
    [([0] * 6, "all", "has 1 class"), ([0, 1] * 6, "base", "'base' classes")],
)
def test_one_class_is_refused_up_front(tmp_path, labels, subsample, words) -> None:
    cfg = load_config("demo", sets=["data.dataset=csv", f"data.root={_csv(tmp_path, labels, images=True)}"])
    spec = P.build_student(cfg, 32, "cpu").preprocess
    with pytest.raises(DataError) as err:
        P.make_dataset(cfg, "train", spec, train=True, subsample=subsample, few_shot=subsample == "base")
    assert words in str(err.value) and "labels.csv" in str(err.value) and "at least 2" in str(err.value)


def test_csv_with_a_class_file_drops_empty_classes_with_a_warning(tmp_path, caplog) -> None:
    from comkd.data import load_splits

    path = _csv(tmp_path, [0, 2] * 10, names_file=["apple", "banana", "cherry"])
    with caplog.at_level("WARNING"):
        s = load_splits("csv", str(path))
    assert s.classnames == ["apple", "cherry"]
    assert {d.label for d in s.train + s.val + s.test} == {0, 1}
    assert {d.classname for d in s.train if d.label == 1} == {"cherry"}
    assert "banana" in caplog.text and "dropped" in caplog.text


def test_cli_names_the_csv_with_a_phantom_label(tmp_path) -> None:
    path = _csv(tmp_path, [0, 1, 2, 3, 99] * 3)
    r = CliRunner().invoke(
        cli.app,
        [
            "train-teacher",
            "--config",
            "demo",
            "--dataset",
            "csv",
            "--root",
            str(path),
            "--out-dir",
            str(tmp_path / "t"),
            "--set",
            "progress=false",
        ],
    )
    _one_line_error(r, "labels.csv", "99")


# -- item 15: settings that make training silently wrong -------------------------------------------
@pytest.mark.parametrize(
    ("setting", "key"),
    [
        ("distill.optim.grad_clip=0", "distill.optim.grad_clip"),
        ("train_teacher.optim.grad_clip=-1", "train_teacher.optim.grad_clip"),
        ("distill.kd_weight=0", "distill.kd_weight"),
        ("distill.kd_weight=-5", "distill.kd_weight"),
        ("distill.temperature=0", "distill.temperature"),
        ("distill.align_weight=-1", "distill.align_weight"),
        ("log_every=0", "log_every"),
        ("ckpt_interval_s=-1", "ckpt_interval_s"),
        ("ckpt_interval_s=.nan", "ckpt_interval_s"),
        ("distill.optim.lr=.inf", "distill.optim.lr"),
        ("distill.optim.lr=.nan", "distill.optim.lr"),
        ("pretrain.optim.lr=1e39", "pretrain.optim.lr"),
        ("device=foo", "device"),
    ],
)
def test_settings_that_train_silently_wrong_are_refused(setting, key) -> None:
    from comkd.config import ConfigError

    with pytest.raises(ConfigError) as err:
        load_config(sets=[setting])
    assert str(err.value).startswith(key + ":")
    r = CliRunner().invoke(cli.app, ["distill", "--set", setting])
    _one_line_error(r, key, code=2)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["pretrain", "--config", "demo", "--which", "teachers"], ["--which", "teachers"]),
        (["cache-teacher", "--config", "demo", "--views", "0"], ["--views", "0"]),
        (["cache-teacher", "--config", "demo", "--dtype", "float8"], ["--dtype", "float8"]),
        (["distill", "--config", "demo", "--device", "foo"], ["device", "foo"]),
    ],
)
def test_bad_command_line_values_are_refused(tmp_path, args, words) -> None:
    r = CliRunner().invoke(cli.app, [*args, "--out-dir", str(tmp_path / "o")])
    _one_line_error(r, *words, code=2)
    assert not (tmp_path / "o").exists()


def test_resume_with_other_optimiser_settings_is_refused(tmp_path) -> None:
    import yaml

    from comkd.config import ConfigError, save_config

    cfg = load_config("demo")
    save_config(cfg, tmp_path / "config.yaml")
    before = (tmp_path / "config.yaml").read_text()
    changed = load_config("demo", sets=["distill.optim.lr=0.05"])
    lr = cfg.distill.optim.lr
    assert lr != 0.05
    with pytest.raises(
        ConfigError, match=rf"distill\.optim\.lr is 0\.05 now .* started with {re.escape(str(lr))};"
    ):
        P.start_stage(changed, tmp_path, resume=True, stage="distill")
    assert (tmp_path / "config.yaml").read_text() == before  # never claims a value not in effect
    P.start_stage(cfg, tmp_path, resume=True, stage="distill")  # the same settings resume
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["distill"]["optim"]["lr"] == lr
    P.start_stage(
        changed, tmp_path, resume=True, stage="teacher_train"
    )  # another stage's settings: not checked


def test_resume_checks_the_checkpoints_own_settings(tmp_path) -> None:
    from comkd.config import OptimConfig
    from comkd.engine.checkpoint import CheckpointError
    from comkd.engine.loop import fit
    from conftest import ToyData, ToyTask

    def run(**kw):
        cfg = OptimConfig(epochs=2, batch_size=8, lr=kw.pop("lr", 0.05))
        return fit(
            ToyTask(noise=True),
            ToyData(),
            cfg,
            out_dir=tmp_path,
            seed=5,
            device=torch.device("cpu"),
            progress=False,
            **kw,
        )

    run(stop_after_steps=9, ckpt_every=4)
    with pytest.raises(CheckpointError, match=r"lr 0\.05 in the checkpoint, 0\.1 now"):
        run(lr=0.1, resume=True)
    assert run(resume=True).resumed_from["global_step"] == 8


# -- item 18: NaN stops, half-written metrics, stray temp files ---------------------------------------
def test_nan_stop_keeps_the_checkpoint_from_before_the_diverging_update(tmp_path) -> None:
    from comkd.engine.loop import NonFiniteLossError
    from conftest import ToyTask
    from test_resume import _toy_fit

    with pytest.raises(NonFiniteLossError) as err:  # the loss of step 11 uses the weights after update 10
        _toy_fit(tmp_path, ToyTask(noise=True, nan_at_step=11), ckpt_every=1, log_every=100)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["global_step"] == 9  # not 10, whose weights already gave the NaN
    assert "step 9" in str(err.value) and "before the diverging update" in str(err.value)
    assert _toy_fit(tmp_path, ToyTask(noise=True), ckpt_every=1, resume=True).resumed_from["global_step"] == 9


def test_nan_right_after_a_resume_falls_back_to_the_checkpoint_before(tmp_path) -> None:
    from comkd.engine.loop import NonFiniteLossError
    from conftest import ToyTask
    from test_resume import _toy_fit

    _toy_fit(tmp_path, ToyTask(noise=True), ckpt_every=4, stop_after_steps=10)  # checkpoints of steps 4 and 8
    with pytest.raises(NonFiniteLossError, match="kept the checkpoint of step 4"):
        _toy_fit(tmp_path, ToyTask(noise=True, nan_at_step=1), ckpt_every=4, log_every=100, resume=True)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["global_step"] == 4


def test_nan_stop_with_a_single_suspect_checkpoint_says_so(tmp_path) -> None:
    from comkd.engine.loop import NonFiniteLossError
    from conftest import ToyTask
    from test_resume import _toy_fit

    with pytest.raises(
        NonFiniteLossError, match="the only checkpoint, of step 4, was taken after the diverging"
    ):
        _toy_fit(tmp_path, ToyTask(noise=True, nan_at_step=5), ckpt_every=4, log_every=100)
    # kept in place: a --resume must not silently start from scratch
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["global_step"] == 4


def test_a_half_written_metrics_line_does_not_block_resume_and_stray_temps_go(tmp_path) -> None:
    from comkd.engine.utils import read_metrics
    from conftest import ToyTask
    from test_resume import _toy_fit

    _toy_fit(tmp_path, ToyTask(noise=True), ckpt_every=4, stop_after_steps=10)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"stage": "toy", "epoch": 1, "st')  # killed mid-write
    (tmp_path / ".checkpoint.pt.tmp4242").write_bytes(b"half a checkpoint")
    res = _toy_fit(tmp_path, ToyTask(noise=True), ckpt_every=4, resume=True)
    assert res.resumed_from["global_step"] == 8
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in recs if r.get("type") != "epoch"] == list(range(1, 25))
    assert not list(tmp_path.glob(".checkpoint.pt.tmp*"))


# -- item 17: unreadable inputs and a full or read-only disk -----------------------------------------
def test_a_yaml_parse_error_names_the_file_and_line(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("distill:\n  optim: {lr: 0.1\nseed: 2\n")
    r = CliRunner().invoke(cli.app, ["distill", "--config", str(bad)])
    _one_line_error(r, "bad.yaml", "line 3", "not valid YAML", code=2)


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ('{"dtd": ', "not valid JSON"),
        ("[1, 2]", "expected {dataset"),
        ('{"dtd": {"comkd": {"base": "x"}}}', "not the expected content"),
        (None, "not found"),
    ],
)
def test_results_page_on_bad_input_is_one_line_naming_the_file(tmp_path, content, words) -> None:
    path = tmp_path / "res.json"
    if content is not None:
        path.write_text(content)
    from experiments import results_page as tool

    r = CliRunner().invoke(tool.app, ["page", "--results", str(path), "--out", str(tmp_path / "p.md")])
    _one_line_error(r, "res.json", words)


@pytest.mark.parametrize(
    ("content", "words"), [("{oops", "not valid JSON"), ('{"protocol": "cross"}', "run1")]
)
def test_collect_on_bad_input_is_one_line_naming_the_folder(tmp_path, content, words) -> None:
    (tmp_path / "run1").mkdir()
    (tmp_path / "run1" / "results.json").write_text(content)
    from experiments import results_page as tool

    r = CliRunner().invoke(tool.app, ["collect", f"a={tmp_path / 'run1'}", "--out", str(tmp_path / "o.json")])
    _one_line_error(r, "run1", words)


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_resume_from_an_unreadable_checkpoint_is_one_line(tmp_path, damage) -> None:
    from conftest import ToyTask
    from test_resume import _toy_fit

    _toy_fit(tmp_path / "toy", ToyTask(noise=True), ckpt_every=4, stop_after_steps=5)
    good = (tmp_path / "toy" / "checkpoint.pt").read_bytes()
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"" if damage == "empty" else good[: len(good) // 2])
    r = CliRunner().invoke(
        cli.app,
        [
            "distill",
            "--config",
            "demo",
            "--resume",
            "--out-dir",
            str(out),
            *sum((["--set", s] for s in TINY), []),
        ],
    )
    _one_line_error(r, "checkpoint.pt", "cannot resume")


def test_a_full_disk_says_so_and_prints_the_results_it_could_not_write(tmp_path, monkeypatch) -> None:
    import errno

    from comkd.data.builtin import load_digits_splits

    path, _ = _student_file(tmp_path, load_digits_splits().classnames)

    def full(p, obj):
        raise OSError(errno.ENOSPC, "No space left on device", str(p))

    monkeypatch.setattr(P, "write_json", full)
    r = CliRunner().invoke(
        cli.app, ["evaluate", str(path), "--config", "demo", "--out-dir", str(tmp_path / "ev")]
    )
    _one_line_error(r, "disk full", "results.json")
    printed = json.loads(r.output[r.output.index("{") : r.output.rindex("}") + 1])
    assert set(printed) >= {"base", "novel", "hm"}  # the work is not lost


def test_a_read_only_output_folder_is_one_line(tmp_path, monkeypatch) -> None:
    import errno

    def read_only(cfg, p):
        raise OSError(errno.EROFS, "Read-only file system", str(p))

    monkeypatch.setattr(stages, "save_config", read_only)
    r = CliRunner().invoke(cli.app, ["train-teacher", "--config", "demo", "--out-dir", str(tmp_path / "ro")])
    _one_line_error(r, "read-only", "config.yaml")


# -- item 19: output ------------------------------------------------------------------------------
def test_no_progress_bars_when_stderr_is_not_a_terminal(tmp_path, capsys, monkeypatch) -> None:
    import sys

    from comkd.config import OptimConfig
    from comkd.engine import loop
    from conftest import ToyData, ToyTask

    cfg = OptimConfig(epochs=3, batch_size=8, lr=0.05)
    res = loop.fit(
        ToyTask(noise=True),
        ToyData(),
        cfg,
        out_dir=tmp_path,
        seed=5,
        device=torch.device("cpu"),
        progress=True,
    )
    assert len(res.history) == 3
    err = capsys.readouterr().err
    assert "\r" not in err and "toy 1/3" not in err  # a redirected log gets no bar redraws
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    bar = loop._progress(3, "toy", True)
    assert bar is not None
    bar.close()
    assert loop._progress(3, "toy", False) is None


@pytest.mark.parametrize("progress", [False, True])
def test_cache_teacher_honours_progress(tmp_path, monkeypatch, progress) -> None:
    import sys

    from comkd.engine import cache_build

    seen = {}

    def build(*a, **kw):
        seen.update(kw)
        return tmp_path / "c.bin"

    monkeypatch.setattr(cache_build, "build_teacher_cache", build)
    monkeypatch.setattr(
        sys.stderr, "isatty", lambda: True, raising=False
    )  # a terminal: only the setting decides
    cfg = load_config("demo", sets=[f"progress={str(progress).lower()}", "data.image_size=16"])
    P.run_cache_teacher(cfg, tmp_path, views=1)
    assert seen["progress"] is progress


def test_every_command_has_quiet_verbose_and_the_cli_a_version() -> None:
    import comkd

    names = [c.name or c.callback.__name__.replace("_", "-") for c in cli.app.registered_commands]
    assert len(names) >= 11
    for name in names:
        r = CliRunner().invoke(cli.app, [name, "--help"])
        assert r.exit_code == 0 and "--quiet" in r.output and "--verbose" in r.output, name
    r = CliRunner().invoke(cli.app, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"comkd {comkd.__version__}"


@pytest.mark.slow
def test_quiet_hides_warnings_and_default_shows_them(tmp_path) -> None:
    import subprocess
    import sys

    from comkd.data.builtin import load_digits_splits

    src, _ = _student_file(tmp_path, load_digits_splits().classnames)
    old = tmp_path / "old.safetensors"  # a file from before the digest: loads with a warning
    _resave(src, old, keep_digest=False)
    env = subprocess_env()
    base = [sys.executable, "-m", "comkd.cli", "evaluate", str(old), "--config", "demo"]
    loud = subprocess.run(base, capture_output=True, text=True, env=env, timeout=300)
    quiet = subprocess.run([*base, "--quiet"], capture_output=True, text=True, env=env, timeout=300)
    assert loud.returncode == quiet.returncode == 0, loud.stderr + quiet.stderr
    assert "no comkd.sha256 digest" in loud.stderr and "WARNING" in loud.stderr
    assert "WARNING" not in quiet.stderr and '"hm"' in quiet.stdout


def test_a_fresh_run_never_falls_back_to_an_earlier_runs_checkpoint(tmp_path) -> None:
    from comkd.engine.loop import NonFiniteLossError
    from conftest import ToyTask
    from test_resume import _toy_fit

    _toy_fit(
        tmp_path, ToyTask(noise=True), ckpt_every=4, stop_after_steps=10
    )  # an earlier run: steps 4 and 8
    with pytest.raises(NonFiniteLossError, match="the only checkpoint, of step 4"):
        _toy_fit(
            tmp_path, ToyTask(noise=True, nan_at_step=5), ckpt_every=4, log_every=100
        )  # fresh, not --resume
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["global_step"] == 4
    assert not (tmp_path / "checkpoint.prev.pt").exists()
