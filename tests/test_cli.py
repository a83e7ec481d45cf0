"""End-to-end: the `comkd` command line on the embedded digits data (tiny models, few epochs):
its output (progress, --quiet/--verbose), and a full or read-only disk."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from comkd import cli
from comkd.config import load_config
from comkd.engine import stages
from comkd.engine.stages import run_cache_teacher
from support import ToyData, ToyTask, demo_student_file, one_line_error, resave_student, subprocess_env

FAST = [
    "--set",
    "pretrain.optim.epochs=2",
    "--set",
    "teacher_train.optim.epochs=2",
    "--set",
    "distill.optim.epochs=2",
    "--set",
    "progress=false",
]


def test_presets_listed() -> None:
    r = CliRunner().invoke(cli.app, ["presets"])
    assert r.exit_code == 0 and "demo" in r.output.split()


@pytest.mark.slow
def test_demo_end_to_end_writes_results_report_and_a_usable_student(tmp_path) -> None:
    out = tmp_path / "demo"
    r = CliRunner().invoke(cli.app, ["demo", "--out-dir", str(out), *FAST])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    assert set(res) == {"teacher", "student_zeroshot", "promptkd", "comkd", "warnings", "teacher_check"}
    assert isinstance(res.pop("warnings"), list)  # FAST's short stage 0 may leave a model near chance
    check = res.pop("teacher_check")  # the teacher scored against the undistilled student on val
    assert check["metric"] == "hm" and check["margin"] == 3.0 and isinstance(check["ahead"], bool)
    assert check["ahead"] == (check["teacher"] - check["student_zeroshot"] >= 3.0)
    for m, v in res.items():
        assert set(v) == {"base", "novel", "hm"}, m
        assert all(0.0 <= v[k] <= 100.0 for k in v), (m, v)
        b, n = v["base"], v["novel"]
        assert math.isclose(v["hm"], 2 * b * n / (b + n) if b + n else 0.0, rel_tol=1e-9)
    report = (out / "report.md").read_text()
    assert "ComKD-CLIP" in report and "PromptKD" in report and "plots/accuracy.png" in report
    assert (out / "plots" / "accuracy.png").stat().st_size > 0
    assert (out / "plots" / "training_curves.png").stat().st_size > 0
    run = out / "run" / "digits" / "seed1"
    for stage in ("teacher", "promptkd", "comkd"):
        assert (run / stage / "config.yaml").exists() and (run / stage / "metrics.jsonl").exists()
    # finished stages keep their outputs, not their checkpoints (the demo's had taken ~300 MB)
    assert not list(out.rglob("checkpoint*.pt"))
    # the shipped student evaluates on its own (no teacher) to the numbers the demo reported
    r = CliRunner().invoke(
        cli.app,
        [
            "evaluate",
            str(run / "comkd" / "student.safetensors"),
            "--config",
            "demo",
            "--protocol",
            "base2novel",
        ],
    )
    assert r.exit_code == 0, r.output
    ev = json.loads(r.output[r.output.index("{") :])
    assert math.isclose(ev["base"]["acc"], res["comkd"]["base"], abs_tol=1e-6)
    assert math.isclose(ev["novel"]["acc"], res["comkd"]["novel"], abs_tol=1e-6)


def test_unknown_method_is_refused_with_the_allowed_names(tmp_path) -> None:
    r = CliRunner().invoke(cli.app, ["distill", "--method", "kd-magic", "--out-dir", str(tmp_path)])
    assert r.exit_code == 2
    assert "kd-magic" in r.output and "promptkd" in r.output


def test_missing_student_file_is_a_clear_error(tmp_path) -> None:
    r = CliRunner().invoke(cli.app, ["evaluate", str(tmp_path / "nope.safetensors")])
    assert r.exit_code == 1
    assert "nope.safetensors" in r.output


@pytest.mark.slow
def test_cache_teacher_then_distill_without_the_teacher(tmp_path) -> None:
    common = [
        "--config",
        "demo",
        "--set",
        "progress=false",
        "--set",
        "distill.optim.epochs=2",
        "--set",
        "teacher.text_depth=1",
        "--set",
        "teacher.vision_depth=1",
    ]
    r = CliRunner().invoke(cli.app, ["cache-teacher", "--out-dir", str(tmp_path / "cache"), *common])
    assert r.exit_code == 0, r.output
    cache = tmp_path / "cache" / "teacher_cache.bin"
    assert cache.exists()
    r = CliRunner().invoke(
        cli.app,
        [
            "distill",
            "--method",
            "comkd",
            "--teacher-cache",
            str(cache),
            "--out-dir",
            str(tmp_path / "student"),
            *common,
        ],
    )
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "student" / "results.json").read_text())
    assert 0.0 <= res["hm"] <= 100.0
    # another seed means other views: the cache is refused, naming the seed
    r = CliRunner().invoke(
        cli.app,
        ["distill", "--teacher-cache", str(cache), "--seed", "7", "--out-dir", str(tmp_path / "s7"), *common],
    )
    assert r.exit_code == 1 and "seed" in r.output


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["cross", "dg"])
def test_cross_dataset_and_domain_generalisation_protocols_run(tmp_path, protocol) -> None:
    args = [
        "run",
        "--config",
        "demo",
        "--protocol",
        protocol,
        "--source",
        "digits",
        "--dataset",
        "digits",
        "--method",
        "promptkd",
        "--out-dir",
        str(tmp_path),
        "--set",
        "progress=false",
        "--set",
        "pretrain.enabled=false",
        "--set",
        "teacher_train.optim.epochs=1",
        "--set",
        "teacher_train.optim.warmup_epochs=0",
        "--set",
        "distill.optim.epochs=1",
        "--set",
        "distill.optim.warmup_epochs=0",
        "--set",
        "distill.optim.batch_size=32",
    ]
    r = CliRunner().invoke(cli.app, args)
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["protocol"] == protocol
    row = res["datasets"]["digits"]
    assert set(row) == {"teacher", "student_zeroshot", "promptkd"}
    assert all(len(v["acc"]) == 1 and 0 <= v["acc"][0] <= 100 for v in row.values())
    # stage 0 is off, so both towers have random weights: said in results.json and report.md
    said = [w for w in res["warnings"] if "random weights" in w]
    assert (
        len(said) == 2 and "teacher comkd-tiny-teacher" in said[0] and "student comkd-tiny-student" in said[1]
    )
    assert "Warning: these results may say nothing" in (tmp_path / "report.md").read_text()
    # the teacher is prompt-tuned once on the source (all classes), the student on the target
    assert (tmp_path / "digits" / "seed1" / "teacher" / "teacher_prompts.safetensors").exists()
    student_res = json.loads((tmp_path / "digits" / "seed1" / "promptkd" / "results.json").read_text())
    cfg = yaml.safe_load((tmp_path / "digits" / "seed1" / "promptkd" / "config.yaml").read_text())
    assert cfg["distill"]["split"] == {"cross": "train", "dg": "test"}[protocol]  # dg is transductive
    assert student_res["acc"] == row["promptkd"]["acc"][0]


def test_every_option_of_every_command_says_what_it_does() -> None:
    import typer.main

    group = typer.main.get_command(cli.app)
    missing = [
        f"{name} {p.opts[0]}"
        for name, cmd in group.commands.items()
        for p in cmd.params
        if p.param_type_name == "option" and not (p.help or "").strip()
    ]
    assert missing == []
    assert "with --out-dir" in group.commands["evaluate"].help


FOLDER_COMMANDS = {"pretrain", "train-teacher", "distill", "evaluate", "run", "demo", "cache-teacher"}
FILE_COMMANDS = {"bench", "predict", "export", "classes"}


def test_out_names_a_file_and_out_dir_a_folder_in_every_command() -> None:
    import typer.main

    group = typer.main.get_command(cli.app)
    shown = {
        name: {o for p in cmd.params if not getattr(p, "hidden", False) for o in p.opts}
        for name, cmd in group.commands.items()
    }
    assert FOLDER_COMMANDS | FILE_COMMANDS <= set(shown)
    for name in FOLDER_COMMANDS:
        assert "--out-dir" in shown[name] and "--out" not in shown[name], name
    for name in FILE_COMMANDS:
        assert "--out" in shown[name] and "--out-dir" not in shown[name], name
    for name in set(shown) - FOLDER_COMMANDS - FILE_COMMANDS:  # push, presets: neither
        assert not {"--out", "--out-dir"} & shown[name], name


def test_the_old_out_of_a_folder_command_still_works_with_a_note(tmp_path, monkeypatch) -> None:
    seen: dict = {}
    monkeypatch.setattr(
        "comkd.protocols.runner.distill_and_score",
        lambda cfg, m, out, **kw: seen.setdefault("out", str(out)) and {},
    )
    r = CliRunner().invoke(cli.app, ["distill", "--no-evaluate", "--out", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    assert seen["out"] == str(tmp_path / "a") and "--out is now --out-dir" in r.output
    r = CliRunner().invoke(
        cli.app, ["distill", "--out", str(tmp_path / "a"), "--out-dir", str(tmp_path / "b")]
    )
    assert r.exit_code == 2 and "once" in r.output


def test_one_spelling_per_option_across_commands() -> None:
    """No visible option is the plural of another command's (``run --seeds`` beside ``--seed``)."""
    import typer.main

    group = typer.main.get_command(cli.app)
    shown = {o for cmd in group.commands.values() for p in cmd.params if not p.hidden for o in p.opts}
    assert {"--seed", "--method", "--dataset"} <= shown
    assert sorted(o for o in shown if o.endswith("s") and o[:-1] in shown) == []


def test_run_takes_the_old_plural_names_with_a_note(tmp_path, monkeypatch) -> None:
    seen: dict = {}

    def fake_run(cfg, out, **kw):
        seen.update(kw)
        (Path(out) / "report.md").parent.mkdir(parents=True, exist_ok=True)
        (Path(out) / "report.md").write_text("table\n")
        return {}

    monkeypatch.setattr("comkd.protocols.runner.run_protocol", fake_run)
    base = ["run", "--config", "demo", "--out-dir", str(tmp_path / "r")]
    r = CliRunner().invoke(cli.app, [*base, "--seed", "1", "--seed", "2", "--method", "comkd"])
    assert r.exit_code == 0, r.output
    assert seen["seeds"] == [1, 2] and seen["methods"] == ["comkd"]
    r = CliRunner().invoke(cli.app, [*base, "--seeds", "3", "--methods", "promptkd"])
    assert r.exit_code == 0, r.output
    assert seen["seeds"] == [3] and seen["methods"] == ["promptkd"]
    assert "--seeds is now --seed" in r.output and "--methods is now --method" in r.output
    r = CliRunner().invoke(cli.app, [*base, "--seed", "1", "--seeds", "2"])
    assert r.exit_code == 2 and "once" in r.output


def test_a_full_disk_says_so_and_prints_the_results_it_could_not_write(tmp_path, monkeypatch) -> None:
    import errno

    from comkd.data.builtin import load_digits_splits

    path, _ = demo_student_file(tmp_path, load_digits_splits().classnames)

    def full(p, obj):
        raise OSError(errno.ENOSPC, "No space left on device", str(p))

    monkeypatch.setattr("comkd.engine.utils.write_json", full)
    r = CliRunner().invoke(
        cli.app, ["evaluate", str(path), "--config", "demo", "--out-dir", str(tmp_path / "ev")]
    )
    one_line_error(r, "disk full", "results.json")
    printed = json.loads(r.output[r.output.index("{") : r.output.rindex("}") + 1])
    assert set(printed) >= {"base", "novel", "hm"}  # the work is not lost


def test_a_read_only_output_folder_is_one_line(tmp_path, monkeypatch) -> None:
    import errno

    def read_only(cfg, p):
        raise OSError(errno.EROFS, "Read-only file system", str(p))

    monkeypatch.setattr(stages, "save_config", read_only)
    r = CliRunner().invoke(cli.app, ["train-teacher", "--config", "demo", "--out-dir", str(tmp_path / "ro")])
    one_line_error(r, "read-only", "config.yaml")


# -- output ------------------------------------------------------------------------------
def test_no_progress_bars_when_stderr_is_not_a_terminal(tmp_path, capsys, monkeypatch) -> None:
    import sys

    from comkd.config import OptimConfig
    from comkd.engine import loop
    from comkd.engine.utils import progress_bar

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
    bar = progress_bar(3, "toy", True)
    assert bar is not None
    bar.close()
    assert progress_bar(3, "toy", False) is None


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
    run_cache_teacher(cfg, tmp_path, views=1)
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

    src, _ = demo_student_file(tmp_path, load_digits_splits().classnames)
    old = tmp_path / "old.safetensors"  # a file from before the digest: loads with a warning
    resave_student(src, old, keep_digest=False)
    env = subprocess_env()
    base = [sys.executable, "-m", "comkd.cli", "evaluate", str(old), "--config", "demo"]
    loud = subprocess.run(base, capture_output=True, text=True, env=env, timeout=300)
    quiet = subprocess.run([*base, "--quiet"], capture_output=True, text=True, env=env, timeout=300)
    assert loud.returncode == quiet.returncode == 0, loud.stderr + quiet.stderr
    assert "no comkd.sha256 digest" in loud.stderr and "WARNING" in loud.stderr
    assert "WARNING" not in quiet.stderr and '"hm"' in quiet.stdout


# -- mistakes on the command line: one line, before any work ----------------------------------------
@pytest.fixture
def no_models(monkeypatch):
    """Building or loading any model fails loudly: an option error must come before it."""

    def build(*a, **k):
        raise AssertionError("a model was built before the options were checked")

    for where in ("comkd.models.teacher", "comkd.models.student"):
        monkeypatch.setattr(f"{where}.load_arch", build)
    monkeypatch.setattr("comkd.models.io.load_student", build)


@pytest.mark.parametrize("command", ["distill", "evaluate", "run"])
@pytest.mark.parametrize("under", [False, True])
def test_an_out_dir_that_is_a_file_is_one_line_before_any_work(tmp_path, no_models, command, under) -> None:
    taken = tmp_path / "results.txt"
    taken.write_text("keep")
    out = taken / "sub" if under else taken
    args = [command, *(["student.safetensors"] if command == "evaluate" else []), "--config", "demo"]
    r = CliRunner().invoke(cli.app, [*args, "--out-dir", str(out)])
    one_line_error(r, "--out-dir", str(out), f"{taken} is a file", code=2)
    assert taken.read_text() == "keep"


def test_an_export_out_that_is_a_folder_is_one_line_before_any_work(tmp_path, monkeypatch) -> None:
    from comkd.deploy import export
    from support import write_tiny_student

    student = write_tiny_student(tmp_path / "student.safetensors", ["a", "b"])
    monkeypatch.setattr(export, "export_student", lambda *a, **k: pytest.fail("the export ran"))
    (tmp_path / "exports").mkdir()
    r = CliRunner().invoke(
        cli.app, ["export", str(student), "--format", "onnx", "--out", str(tmp_path / "exports")]
    )
    one_line_error(r, "--out", str(tmp_path / "exports"), "is a folder, not a file", code=2)
    assert list((tmp_path / "exports").iterdir()) == []


@pytest.mark.parametrize("item", ["distill.optim.lr=[1,", "seed=a: b: c", "seed='x", "a: b: c"])
def test_a_malformed_set_value_is_one_line_naming_the_item(tmp_path, no_models, item) -> None:
    r = CliRunner().invoke(cli.app, ["distill", "--set", item, "--out-dir", str(tmp_path / "o")])
    one_line_error(r, "--set", item, code=2)
    assert len(r.output.strip().splitlines()) == 1 and "^" not in r.output


@pytest.mark.parametrize("fail_at", [1, 2])
@pytest.mark.parametrize("error", ["enforce", "enospc"])
def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(
    tmp_path, monkeypatch, fail_at, error
) -> None:
    """torch.save on a full disk fails mid-file (``[enforce fail at inline_container.cc] ...
    unexpected pos``) or with ENOSPC: one line naming the file; the last checkpoint stays whole."""
    import errno

    from comkd.engine import utils as engine_utils
    from support import TINY_MODEL_ARGS

    real_save, saved = torch.save, []

    def save(obj, f, *a, **k):
        if len(saved) + 1 == fail_at:
            if error == "enospc":
                raise OSError(errno.ENOSPC, "No space left on device")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4416 vs 4314")
        saved.append(obj["global_step"])
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(engine_utils.torch, "save", save)
    out = tmp_path / "d"
    opts = [
        "--set",
        "distill.optim.epochs=1",
        "--set",
        "distill.optim.warmup_epochs=0",
        "--set",
        "ckpt_every=2",
    ]
    r = CliRunner().invoke(
        cli.app, ["distill", *TINY_MODEL_ARGS, *opts, "--no-evaluate", "--out-dir", str(out)]
    )
    ckpt = out / "checkpoint.pt"
    one_line_error(r, "disk full while writing", str(ckpt))
    if fail_at == 1:
        assert "no checkpoint was written yet" in r.output and not ckpt.exists()
    else:
        assert f"the previous checkpoint {ckpt} is kept" in r.output and "--resume" in r.output
        monkeypatch.undo()
        assert torch.load(ckpt, weights_only=True)["global_step"] == saved[-1] == 2  # whole, loadable
    assert not list(out.glob(".checkpoint*.tmp*"))  # no half-written temp left behind


def test_evaluate_keeps_a_runs_results_and_replaces_only_its_own(tmp_path) -> None:
    from comkd.data.builtin import load_digits_splits

    path, _ = demo_student_file(tmp_path, load_digits_splits().classnames)
    run = tmp_path / "run"
    run.mkdir()
    mine = {"teacher": {"hm": 97.97}, "methods": {"comkd": {"hm": 93.5}}, "warnings": []}
    (run / "results.json").write_text(json.dumps(mine))
    args = ["evaluate", str(path), "--out-dir", str(run)]
    r = CliRunner().invoke(cli.app, args)
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert f"{run / 'results.json'} holds a run's results" in r.output and "--overwrite" in r.output
    assert json.loads((run / "results.json").read_text()) == mine  # kept, byte for byte in content
    fresh = tmp_path / "fresh"
    for _ in range(2):  # into a new folder, then over its own earlier record
        r = CliRunner().invoke(cli.app, [*args[:-1], str(fresh)])
        assert r.exit_code == 0, r.output
        held = json.loads((fresh / "results.json").read_text())
        assert held["command"] == "evaluate" and 0 <= held["hm"] <= 100
    r = CliRunner().invoke(cli.app, [*args, "--overwrite"])
    assert r.exit_code == 0, r.output
    assert json.loads((run / "results.json").read_text())["command"] == "evaluate"
    assert not (run / ".comkd.lock").exists()  # the lock was held and released


@pytest.mark.parametrize("command", ["run", "demo"])
def test_the_training_commands_take_threads(tmp_path, monkeypatch, command) -> None:
    import torch

    seen = {}

    def fake(cfg, out, **kw):
        seen["threads"] = torch.get_num_threads()
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "report.md").write_text("table\n")
        return {}

    monkeypatch.setattr("comkd.protocols.runner.run_protocol", fake)
    monkeypatch.setattr("comkd.protocols.demo.run_demo", fake)
    before = torch.get_num_threads()
    try:
        r = CliRunner().invoke(cli.app, [command, "--threads", "1", "--out-dir", str(tmp_path / "r")])
        assert r.exit_code == 0, r.output
        assert seen["threads"] == 1
        r = CliRunner().invoke(cli.app, [command, "--threads", "0", "--out-dir", str(tmp_path / "s")])
        assert r.exit_code == 2 and "--threads: must be a positive number of threads, got 0" in r.output
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    "args, key",
    [
        (["--root", "/nonexistent/dtd", "--dataset", "dtd"], "data.root /nonexistent/dtd"),
        (["--set", "data.split_file=/nonexistent/split.json"], "data.split_file /nonexistent/split.json"),
        (["--set", "full.test=/nonexistent/test"], "full.test /nonexistent/test"),
        (["--teacher-prompts", "/nonexistent/p.safetensors"], "teacher.prompts /nonexistent/p.safetensors"),
        (
            [
                "--method",
                "two-teachers",
                "--set",
                "distill.extra_teachers=[{model: ViT-L-14, prompts: /no/p2}]",
            ],
            "distill.extra_teachers[0].prompts /no/p2",
        ),
    ],
)
def test_a_missing_input_path_stops_before_any_weights_are_fetched(tmp_path, monkeypatch, args, key) -> None:
    import open_clip

    def no_download(*a, **k):
        raise AssertionError("weights were fetched before the paths were checked")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", no_download)
    monkeypatch.setattr(open_clip, "create_model", no_download)
    big = ["--teacher", "ViT-L-14", "--teacher-pretrained", "openai", "--student", "ViT-B-16"]
    r = CliRunner().invoke(cli.app, ["distill", *big, *args, "--out-dir", str(tmp_path / "d")])
    assert r.exit_code == 2 and f"config error: {key}: no such file or folder" in r.output, r.output
    assert "Traceback" not in r.output and not (tmp_path / "d").exists()


def test_a_relative_split_file_is_looked_for_in_the_dataset_folder(tmp_path) -> None:
    """``data.split_file`` relative to the dataset's folder (the DTD presets' ``split_coop_subset.json``)
    passes the early path check; the loader then names the path it tried when it is missing."""
    from comkd.cli.common import _check_input_paths
    from comkd.config import RunConfig
    from comkd.data import DataError, build_dataset

    (tmp_path / "images").mkdir()
    cfg = RunConfig()
    cfg.data.dataset, cfg.data.root, cfg.data.split_file = "dtd", str(tmp_path), "split_mine.json"
    _check_input_paths(cfg)  # no exit: the file is the loader's to find
    with pytest.raises(DataError, match=r"split file not found: .*split_mine\.json"):
        build_dataset("dtd", str(tmp_path), "train", None, split_file="split_mine.json")


def _config_flags() -> dict[str, set[str]]:
    """Every config field that carries a flag: ``--flag`` -> the dotted keys it may set."""
    import dataclasses
    import typing

    from comkd.config import RunConfig

    found: dict[str, set[str]] = {}

    def walk(cls, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], f"{prefix}{f.name}.")
            elif "help" in f.metadata:
                name = "--" + (f.metadata.get("flag") or f.name).replace("_", "-")
                found.setdefault(name, set()).add(prefix + f.name)

    walk(RunConfig, "")
    return found


INFERENCE_BATCH = {("predict", "--batch-size"), ("export", "--batch-size")}


def test_every_flag_of_a_config_key_comes_from_its_field() -> None:
    """A command names keys; the flag, its type and help are the field's (with the key it sets), so
    no command declares a flag of a config key by hand, and one flag means one thing everywhere."""
    import inspect

    import typer.main

    from comkd.cli import train

    flags = _config_flags()
    assert {"--teacher", "--epochs", "--method", "--seed", "--device", "--root"} <= set(flags)
    group = typer.main.get_command(cli.app)
    seen = 0
    for name, cmd in group.commands.items():
        for p in cmd.params:
            # predict's and export's images per inference pass: no training stage's batch
            for opt in (o for o in p.opts if o in flags and (name, o) not in INFERENCE_BATCH):
                keys = [k for k in flags[opt] if f"({k})" in (p.help or "")]
                assert keys, f"{name} {opt}: not the config field's flag ({p.help!r})"
                seen += 1
    assert seen > 60
    # distill takes the config keys by name: its own parameters are the Call and --evaluate
    assert list(inspect.signature(train.distill.__wrapped__).parameters) == ["call", "evaluate"]
    epochs = {n: p.help for n, c in group.commands.items() for p in c.params if "--epochs" in p.opts}
    assert epochs == {  # one flag, each command's own stage key
        n: f"This stage's epochs ({s}.optim.epochs)."
        for n, s in (("pretrain", "pretrain"), ("train-teacher", "train_teacher"), ("distill", "distill"))
    }
