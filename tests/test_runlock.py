"""One writer per run folder (comkd.runlock): a second run into a folder another live process
writes is refused naming both, a killed run's lock is taken over with a warning, and a finished
run's results are not overwritten without --resume or --overwrite."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from comkd import cli
from comkd.runlock import (
    LOCK_NAME,
    FinishedRunError,
    RunLockError,
    check_fresh,
    holds_lock,
    locked_run,
    run_lock,
)
from support import DISTILL_CMD, subprocess_env

HOLDER = (
    "import sys\n"
    "from comkd.runlock import run_lock\n"
    "with run_lock(sys.argv[1]):\n"
    "    print('held', flush=True)\n"
    "    sys.stdin.read()\n"
)


class _Holder:
    """A child process holding ``folder``'s run lock until ``release``."""

    def __init__(self, folder: Path):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(folder)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=subprocess_env(),
        )
        assert self.proc.stdout.readline().strip() == "held"

    def release(self) -> int:
        self.proc.stdin.close()
        return self.proc.wait(30)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_second_writer_is_refused_naming_the_folder_and_the_holder(tmp_path):
    out = tmp_path / "run"
    holder = _Holder(out)
    try:
        with pytest.raises(RunLockError) as e, run_lock(out):
            pytest.fail("the lock was taken twice")
        msg = str(e.value)
        assert "\n" not in msg and str(out) in msg
        assert f"pid {holder.proc.pid} on {socket.gethostname()}" in msg
        info = json.loads((out / LOCK_NAME).read_text())
        assert info["pid"] == holder.proc.pid and info["host"] == socket.gethostname() and info["started"]
    finally:
        assert holder.release() == 0
    assert not (out / LOCK_NAME).exists()  # released on exit
    with run_lock(out):  # and free again
        assert holds_lock(out)


def test_cli_run_into_a_locked_folder_fails_in_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    holder = _Holder(out)
    try:
        r = CliRunner().invoke(cli.app, ["distill", "--config", "demo", "--out-dir", str(out)])
        assert r.exit_code == 1, r.output
        lines = r.output.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in r.output
        assert str(out) in lines[0] and f"pid {holder.proc.pid}" in lines[0]
        assert sorted(os.listdir(out)) == [LOCK_NAME]  # no config.yaml, no metrics: nothing touched
    finally:
        holder.release()


def test_a_killed_runs_lock_is_named_and_taken_over(tmp_path, caplog):
    out = tmp_path / "run"
    out.mkdir()
    pid = _dead_pid()
    stale = {"pid": pid, "host": socket.gethostname(), "started": "2020-01-01T00:00:00+0000"}
    (out / LOCK_NAME).write_text(json.dumps(stale))
    with caplog.at_level("WARNING", logger="comkd.runlock"), run_lock(out):
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and str(out / LOCK_NAME) in warned[0] and f"pid {pid}" in warned[0]
    assert "no longer exists" in warned[0] and "taking it over" in warned[0]
    assert not (out / LOCK_NAME).exists() and os.listdir(out) == []


def test_a_lock_of_another_host_or_unreadable_lock(tmp_path, monkeypatch, caplog):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "x"}))
    with pytest.raises(RunLockError, match=r"pid 1 on elsewhere"), run_lock(out):
        pass  # its pid cannot be checked from here: refused, never taken over
    (out / LOCK_NAME).write_text("")  # a writer that died between creating and writing it
    monkeypatch.setattr("comkd.runlock._UNREADABLE_GRACE_S", 0.1)
    with caplog.at_level("WARNING", logger="comkd.runlock"), run_lock(out):
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert any("unreadable run lock" in r.getMessage() for r in caplog.records)


def test_the_lock_is_reentrant_within_a_process_and_per_folder(tmp_path):
    out = tmp_path / "run"
    with run_lock(out):
        with run_lock(out):  # a protocol running a stage in its own folder
            pass
        assert holds_lock(out) and (out / LOCK_NAME).exists()  # still held by the outer block
        with run_lock(out / "stage"):  # a nested stage: its own folder, its own lock
            assert (out / "stage" / LOCK_NAME).exists()
        assert not (out / "stage" / LOCK_NAME).exists()
    assert not holds_lock(out) and not (out / LOCK_NAME).exists()


@locked_run(results=("student.safetensors", "results.json"))
def _stage(cfg, out_dir, *, resume=False):
    assert holds_lock(out_dir)
    (Path(out_dir) / "student.safetensors").write_text(str(cfg))
    return cfg


def test_finished_results_are_kept_without_resume_or_overwrite(tmp_path):
    out = tmp_path / "run"
    _stage(1, out)
    with pytest.raises(FinishedRunError) as e:
        _stage(2, out)
    assert str(e.value) == (
        f"{out} holds a finished run (student.safetensors); rerun with --resume to continue it, "
        "--overwrite to replace it, or choose another --out-dir"
    )
    assert (out / "student.safetensors").read_text() == "1"
    assert _stage(3, out, resume=True) == 3
    assert _stage(4, out, overwrite=True) == 4
    with run_lock(tmp_path, overwrite=True):  # allowed by an enclosing run, in its folder and below
        assert _stage(5, out) == 5
    with pytest.raises(FinishedRunError):
        check_fresh(out, ("student.safetensors",))  # the permission ended with that block
    assert not holds_lock(out) and not (out / LOCK_NAME).exists()


def test_stage_runners_refuse_to_overwrite_a_finished_run(tmp_path):
    """The real runners: refused before anything in the folder is touched."""
    from comkd.config import load_config
    from comkd.engine.distill import run_distill
    from comkd.engine.stages import run_pretrain, run_train_teacher

    cfg = load_config("demo")
    for name, run in (
        ("student.safetensors", run_distill),
        ("teacher_prompts.safetensors", run_train_teacher),
        ("student_clip.safetensors", run_pretrain),
    ):
        out = tmp_path / name
        out.mkdir()
        (out / name).write_bytes(b"a finished run's result")
        with pytest.raises(FinishedRunError, match=f"holds a finished run \\({name}\\)"):
            run(cfg, out)
        assert sorted(os.listdir(out)) == [name]


def test_cli_refuses_to_overwrite_a_finished_run_in_one_line(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    finished = ["results.json", "student.safetensors", "teacher_prompts.safetensors"]
    for name in finished:
        (out / name).write_bytes(b"the first run's " + name.encode())
    for cmd in ("distill", "train-teacher", "pretrain", "run", "demo"):
        r = CliRunner().invoke(cli.app, [cmd, "--config", "demo", "--out-dir", str(out)])
        assert r.exit_code == 1, (cmd, r.output)
        assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output, r.output
        assert f"{out} holds a finished run" in r.output and "--overwrite" in r.output
    assert sorted(os.listdir(out)) == finished  # nothing written, nothing removed
    assert all((out / n).read_bytes() == b"the first run's " + n.encode() for n in finished)


@pytest.mark.slow
def test_two_distillations_into_one_folder_the_second_is_refused(tmp_path):
    """The probe: two `comkd distill` into the same --out; the second is refused while the first
    runs, and nothing of the first is touched."""
    out = tmp_path / "run"
    env = subprocess_env()
    first = subprocess.Popen(
        [*DISTILL_CMD, "--epochs", "30", "--out-dir", str(out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        while not (out / "metrics.jsonl").exists():  # the first is training
            assert first.poll() is None and time.time() < deadline, "the first run did not start"
            time.sleep(0.2)
        config_before = (out / "config.yaml").read_text()
        second = subprocess.run(
            [*DISTILL_CMD, "--seed", "4", "--out-dir", str(out)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert first.poll() is None, "the first run ended before the second tried"
        assert second.returncode == 1 and "Traceback" not in second.stderr
        err = second.stderr.strip().splitlines()[-1]
        assert str(out) in err and f"pid {first.pid}" in err, second.stderr
        assert (out / "config.yaml").read_text() == config_before  # still the first run's (seed 3)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    # killed: its lock is stale, and a --resume takes it over (checked in-process, no training)
    with run_lock(out):
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()


@pytest.mark.parametrize("kind", ["folder", "fifo", "symlink"])
def test_a_lock_path_that_is_not_a_file_is_one_line_naming_it_and_left_alone(tmp_path, kind):
    out = tmp_path / "run"
    out.mkdir()
    lock = out / LOCK_NAME
    if kind == "folder":
        lock.mkdir()
        (lock / "keep.txt").write_text("mine")
    elif kind == "fifo":
        os.mkfifo(lock)  # reading it would block for ever
    else:
        (tmp_path / "elsewhere.json").write_text(
            json.dumps({"pid": _dead_pid(), "host": socket.gethostname()})
        )
        lock.symlink_to(tmp_path / "elsewhere.json")
    said = {"folder": "a folder", "fifo": "a special file", "symlink": "a symbolic link"}[kind]
    with pytest.raises(RunLockError) as e, run_lock(out):
        pytest.fail("the lock was taken over")
    assert str(e.value).startswith(f"{lock}: the run lock's path is {said}") and "\n" not in str(e.value)
    r = CliRunner().invoke(cli.app, ["distill", "--config", "demo", "--out-dir", str(out)])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {lock}: the run lock's path is {said}"), r.output
    assert sorted(os.listdir(out)) == [LOCK_NAME]  # nothing moved aside, nothing written
    if kind == "folder":
        assert (lock / "keep.txt").read_text() == "mine"
