"""Checkpoints and resume: a killed run continues mid-epoch to the same final state and metrics
as an uninterrupted run; a NaN/inf loss stops the run naming the step and keeps the last good
checkpoint; a damaged checkpoint or other settings on resume are refused in one line."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from comkd import cli
from comkd.config import OptimConfig, load_config
from comkd.engine.loop import NonFiniteLossError, fit
from comkd.engine.stages import start_stage
from comkd.engine.utils import MetricsLog, read_metrics
from support import DISTILL_CMD, TINY_SETS, ToyData, ToyTask, one_line_error, subprocess_env

ENV = subprocess_env(PYTHONUNBUFFERED="1")
DISTILL = DISTILL_CMD


# -- the toy task (support.py): no batch statistics; with noise it uses the global RNG like dropout
def _toy_fit(out: Path, task: ToyTask, *, epochs: int = 3, lr: float = 0.05, **kw):
    torch.manual_seed(0)
    cfg = OptimConfig(epochs=epochs, batch_size=8, lr=lr)
    kw.setdefault("log_every", 1)
    return fit(
        task,
        ToyData(),
        cfg,
        out_dir=out,
        seed=5,
        device=torch.device("cpu"),
        progress=False,
        metrics=MetricsLog(out / "metrics.jsonl"),
        **kw,
    )


def _strip(records):
    return [{k: v for k, v in r.items() if k != "time_s"} for r in records]


def test_in_process_resume_mid_epoch_matches_uninterrupted(tmp_path):
    """Stop after step 13 (checkpoint at 12, epoch 2 batch 4 of 8), resume in a fresh task whose
    global RNG was reseeded: weights, RNG stream, history and metrics equal an uninterrupted run."""
    ref = ToyTask(noise=True)
    ref_res = _toy_fit(tmp_path / "ref", ref)
    rng_after_ref = torch.get_rng_state()
    cut = ToyTask(noise=True)
    _toy_fit(tmp_path / "cut", cut, ckpt_every=4, stop_after_steps=13)
    state = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert (state["epoch"], state["batch"], state["global_step"]) == (1, 4, 12)
    resumed = ToyTask(noise=True)
    res = _toy_fit(tmp_path / "cut", resumed, ckpt_every=4, resume=True)
    rng_after_resume = torch.get_rng_state()
    assert res.resumed_from == {"epoch": 1, "batch": 4, "global_step": 12}
    assert resumed.calls == 24 - 12
    assert torch.equal(ref.model.weight, resumed.model.weight) and torch.equal(
        ref.model.bias, resumed.model.bias
    )
    assert torch.equal(rng_after_resume, rng_after_ref)  # the global RNG stream continued exactly
    assert _strip(res.history) == _strip(ref_res.history)
    assert _strip(read_metrics(tmp_path / "cut" / "metrics.jsonl")) == _strip(
        read_metrics(tmp_path / "ref" / "metrics.jsonl")
    )


def test_epoch_end_checkpoints_wait_for_the_interval_but_the_last_epoch_is_always_saved(tmp_path):
    """``ckpt_interval_s`` skips epoch-end checkpoints (sub-second epochs spent their time saving);
    the training itself is untouched, and the last epoch's checkpoint is written."""
    ref = _toy_fit(tmp_path / "every", ToyTask(noise=True))
    _toy_fit(tmp_path / "cut", ToyTask(noise=True), ckpt_interval_s=1e9, stop_after_steps=17)
    assert not (tmp_path / "cut" / "checkpoint.pt").exists()  # two epoch ends passed, none was due
    task = ToyTask(noise=True)
    res = _toy_fit(tmp_path / "rare", task, ckpt_interval_s=1e9)
    state = torch.load(tmp_path / "rare" / "checkpoint.pt", weights_only=True)
    assert (state["epoch"], state["batch"], state["global_step"]) == (3, 0, 24)
    assert torch.equal(state["modules"]["model"]["weight"], task.model.weight)
    assert _strip(res.history) == _strip(ref.history)
    # a short interval is met at every epoch end: the same checkpoints as the default
    res = _toy_fit(tmp_path / "short", ToyTask(noise=True), ckpt_interval_s=1e-9, stop_after_steps=17)
    state = torch.load(tmp_path / "short" / "checkpoint.pt", weights_only=True)
    assert (state["epoch"], state["global_step"]) == (2, 16)


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "nan"
    with pytest.raises(NonFiniteLossError) as e:
        _toy_fit(out, ToyTask(noise=True, nan_at_step=11), ckpt_every=4, log_every=100)
    msg = str(e.value)
    assert "optimiser step 11" in msg and "toy" in msg and "epoch 2" in msg
    assert str(out / "checkpoint.pt") in msg
    state = torch.load(out / "checkpoint.pt", weights_only=True)  # intact and loadable
    assert state["global_step"] == 8  # the check before saving step 12 caught the NaN of step 11
    assert all(torch.isfinite(v).all() for v in state["modules"]["model"].values())
    # and the run resumes from it
    res = _toy_fit(out, ToyTask(noise=True), ckpt_every=4, resume=True)
    assert res.resumed_from["global_step"] == 8 and len(res.history) == 3


def test_nan_before_any_checkpoint_says_so(tmp_path):
    with pytest.raises(
        NonFiniteLossError, match=r"optimiser step 1 \(epoch 1\); no checkpoint was written yet"
    ):
        _toy_fit(tmp_path, ToyTask(noise=True, nan_at_step=1), log_every=1)
    assert not (tmp_path / "checkpoint.pt").exists()


# -- the real command, killed with SIGKILL -----------------------------------------------------
def _ckpt_step(path: Path) -> int:
    if not path.exists():
        return -1
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])
    except Exception:  # noqa: BLE001 - not written yet (the rename makes it all-or-nothing)
        return -1


@pytest.mark.slow
def test_kill_9_mid_epoch_then_resume_equals_uninterrupted(tmp_path):
    from safetensors.torch import load_file

    full, cut = tmp_path / "full", tmp_path / "cut"
    cmd = [*DISTILL, "--batch-size", "16"]  # 539 images: 33 steps an epoch, 66 in all; a checkpoint every 5
    ref = subprocess.Popen(
        [*cmd, "--out-dir", str(full)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    victim = subprocess.Popen(
        [*cmd, "--out-dir", str(cut)], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 240
    try:
        while time.time() < deadline:  # kill once a mid-epoch checkpoint of the 2nd epoch exists
            if victim.poll() is not None:
                pytest.fail("the run finished before it could be killed")
            if _ckpt_step(cut / "checkpoint.pt") >= 40:
                break
            time.sleep(0.2)
        victim.send_signal(signal.SIGKILL)
        victim.wait(30)
    finally:
        if victim.poll() is None:
            victim.kill()
    assert victim.returncode == -signal.SIGKILL
    state = torch.load(cut / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert state["epoch"] == 1 and 0 < state["batch"] < 33, "not killed mid-epoch"
    assert not (cut / "student.safetensors").exists() and not (cut / "results.json").exists()
    # the log may hold steps written after the checkpoint; the resume must drop them
    resumed = subprocess.run(
        [*cmd, "--out-dir", str(cut), "--resume"], env=ENV, capture_output=True, text=True, timeout=240
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    out, err = ref.communicate(timeout=240)
    assert ref.returncode == 0, err[-3000:]

    a, b = load_file(str(full / "student.safetensors")), load_file(str(cut / "student.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ma, mb = _strip(read_metrics(full / "metrics.jsonl")), _strip(read_metrics(cut / "metrics.jsonl"))
    assert len(ma) == 66 + 3 and ma == mb  # 66 steps, 2 epochs, the score before step 1
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (full, cut))
    assert (ra.pop("student"), rb.pop("student")) == (
        str(full / "student.safetensors"),
        str(cut / "student.safetensors"),
    )
    assert ra == rb
    assert [f for f in os.listdir(cut) if "tmp" in f] == []


@pytest.mark.slow
def test_cli_nan_loss_names_the_step_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    """A run killed after its first epoch's checkpoint is resumed and its first resumed step is
    non-finite: the command fails with a one-line error naming that step and the checkpoint kept,
    which is untouched and loadable. (Settings cannot make the loss NaN any more: a non-finite
    kd_weight and other optimiser settings on resume are refused, so the loss is patched.)"""
    from typer.testing import CliRunner

    from comkd import losses
    from comkd.cli import app

    args = DISTILL[3:] + [
        "--out-dir",
        str(tmp_path),
        "--no-evaluate",
        "--batch-size",
        "32",
        "--set",
        "ckpt_every=0",
    ]
    real = losses.ComKDLoss.forward
    calls = {"n": 0}

    def killed_after_epoch_1(self, *a, **kw):  # 16 steps per epoch
        calls["n"] += 1
        if calls["n"] > 20:
            raise KeyboardInterrupt
        return real(self, *a, **kw)

    monkeypatch.setattr(losses.ComKDLoss, "forward", killed_after_epoch_1)
    CliRunner().invoke(app, args)
    before = (tmp_path / "checkpoint.pt").read_bytes()
    step = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["global_step"]
    assert step == 16

    def nan(self, *a, **kw):
        out = real(self, *a, **kw)
        return {**out, "loss": out["loss"] * float("nan")}

    monkeypatch.setattr(losses.ComKDLoss, "forward", nan)
    r = CliRunner().invoke(app, [*args, "--resume"])
    assert r.exit_code == 1
    assert f"loss became NaN/inf at optimiser step {step + 1} (epoch 2)" in r.output
    assert f"the only checkpoint, of step {step}" in r.output and "Traceback" not in r.output
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["global_step"] == step


# -- a damaged or foreign checkpoint is refused before anything is restored ------------------------
def _damage(state: dict, how: str) -> str:
    """Edit a toy checkpoint in place; the words the refusal must contain."""
    w = state["modules"]["model"]
    if how == "no-modules":
        del state["modules"]
        return "key 'modules' is missing"
    if how == "missing-tensor":
        del w["bias"]
        return "modules.model lacks 1 tensor(s) (e.g. 'bias')"
    if how == "extra-tensor":
        w["head.weight"] = torch.zeros(2)
        return "modules.model has unknown 1 tensor(s) (e.g. 'head.weight')"
    if how == "wrong-shape":
        w["weight"] = torch.zeros(1, 7, dtype=torch.float64)
        return "modules.model.weight is [1, 7], this run has [1, 5]"
    if how == "nan-weights":
        w["weight"] = torch.full_like(w["weight"], float("nan"))
        return "modules.model.weight holds NaN/inf"
    if how == "optimizer":
        del state["optimizer"]["param_groups"]
        return "its 'optimizer' state does not fit this run"
    if how == "rng":
        state["rng"]["torch"] = torch.zeros(3, dtype=torch.uint8)
        return "its 'rng' state does not fit this run"
    if how == "negative-step":
        state["global_step"] = -4
        return "key 'global_step' is -4, not a count"
    if how == "epoch-not-int":
        state["epoch"] = "2"
        return "key 'epoch' is a str, not a int"
    raise AssertionError(how)


@pytest.mark.parametrize(
    "how",
    [
        "no-modules",
        "missing-tensor",
        "extra-tensor",
        "wrong-shape",
        "nan-weights",
        "optimizer",
        "rng",
        "negative-step",
        "epoch-not-int",
    ],
)
def test_a_damaged_checkpoint_is_one_line_and_nothing_is_restored(tmp_path, how) -> None:
    from comkd.engine.checkpoint import CheckpointError

    _toy_fit(tmp_path, ToyTask(noise=True), ckpt_every=4, stop_after_steps=9)
    ckpt = tmp_path / "checkpoint.pt"
    state = torch.load(ckpt, weights_only=True)
    words = _damage(state, how)
    torch.save(state, ckpt)
    before = ckpt.read_bytes()
    task = ToyTask(noise=True)
    w0 = task.model.weight.detach().clone()
    with pytest.raises(CheckpointError) as err:
        _toy_fit(tmp_path, task, ckpt_every=4, resume=True)
    msg = str(err.value)
    assert "\n" not in msg and str(ckpt) in msg and words in msg, msg
    assert torch.equal(task.model.weight, w0)  # the module was not touched
    assert ckpt.read_bytes() == before  # the file is kept as it was, for the user to look at


def test_resume_of_a_finished_run_is_a_no_op_that_says_so(tmp_path, caplog) -> None:
    _toy_fit(tmp_path, ToyTask(noise=True), ckpt_every=4)
    before = (tmp_path / "checkpoint.pt").read_bytes()
    done = ToyTask(noise=True)
    with caplog.at_level("WARNING", logger="comkd.engine.loop"):
        res = _toy_fit(tmp_path, done, ckpt_every=4, resume=True)
    assert done.calls == 0 and res.resumed_from["epoch"] == 3
    assert any("already finished its 3 epochs; nothing to train" in r.message for r in caplog.records)
    again = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert torch.equal(again["modules"]["model"]["weight"], done.model.weight.detach())
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


# -- a resumed run keeps every setting that changes its result --------------------------------------
@pytest.mark.parametrize(
    ("change", "key"),
    [
        ("distill.kd_weight=5", "distill.kd_weight"),
        ("distill.method=promptkd", "distill.method"),
        ("distill.align_weight=3", "distill.align_weight"),
        ("distill.recipe=paper", "student.edu_mode"),  # the first value the recipe changes
        ("seed=7", "seed"),
        ("student.vision_tokens=2", "student.vision_tokens"),
        ("data.num_shots=4", "data.num_shots"),
    ],
)
def test_resume_with_a_setting_that_changes_the_result_is_refused_naming_it(tmp_path, change, key) -> None:
    from comkd.config import ConfigError, load_config, save_config
    from comkd.config_rules import resolve_recipe

    cfg = load_config("demo")
    save_config(resolve_recipe(cfg), tmp_path / "config.yaml")  # as a run writes it
    before = (tmp_path / "config.yaml").read_text()
    changed = load_config("demo", sets=[change])
    with pytest.raises(ConfigError, match=r"--resume: " + key.replace(".", r"\.")) as err:
        start_stage(changed, tmp_path, resume=True, stage="distill")
    assert "\n" not in str(err.value) and str(tmp_path) in str(err.value)
    assert (tmp_path / "config.yaml").read_text() == before


def test_resume_may_change_where_a_run_runs_and_what_it_prints(tmp_path) -> None:
    from comkd.config import load_config, save_config
    from comkd.config_rules import resolve_recipe

    cfg = load_config("demo")
    save_config(resolve_recipe(cfg), tmp_path / "config.yaml")
    free = ["device=cpu", "progress=false", "log_every=3", "ckpt_every=2", "data.num_workers=1"]
    free += ["distill.optim.amp=on", "pretrain.optim.lr=0.5"]  # another stage's section: not this stage's
    start_stage(load_config("demo", sets=free), tmp_path, resume=True, stage="distill")


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
        start_stage(changed, tmp_path, resume=True, stage="distill")
    assert (tmp_path / "config.yaml").read_text() == before  # never claims a value not in effect
    start_stage(cfg, tmp_path, resume=True, stage="distill")  # the same settings resume
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["distill"]["optim"]["lr"] == lr
    start_stage(
        changed, tmp_path, resume=True, stage="teacher_train"
    )  # another stage's settings: not checked


def test_resume_checks_the_checkpoints_own_settings(tmp_path) -> None:
    from comkd.engine.checkpoint import CheckpointError

    def run(lr: float = 0.05, **kw):
        return _toy_fit(tmp_path, ToyTask(noise=True), epochs=2, lr=lr, **kw)

    run(stop_after_steps=9, ckpt_every=4)
    with pytest.raises(CheckpointError, match=r"lr 0\.05 in the checkpoint, 0\.1 now"):
        run(lr=0.1, resume=True)
    assert run(resume=True).resumed_from["global_step"] == 8


# -- NaN stops, half-written metrics, stray temp files ---------------------------------------
def test_nan_stop_keeps_the_checkpoint_from_before_the_diverging_update(tmp_path) -> None:
    with pytest.raises(NonFiniteLossError) as err:  # the loss of step 11 uses the weights after update 10
        _toy_fit(tmp_path, ToyTask(noise=True, nan_at_step=11), ckpt_every=1, log_every=100)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["global_step"] == 9  # not 10, whose weights already gave the NaN
    assert "step 9" in str(err.value) and "before the diverging update" in str(err.value)
    assert _toy_fit(tmp_path, ToyTask(noise=True), ckpt_every=1, resume=True).resumed_from["global_step"] == 9


def test_nan_right_after_a_resume_falls_back_to_the_checkpoint_before(tmp_path) -> None:
    _toy_fit(tmp_path, ToyTask(noise=True), ckpt_every=4, stop_after_steps=10)  # checkpoints of steps 4 and 8
    with pytest.raises(NonFiniteLossError, match="kept the checkpoint of step 4"):
        _toy_fit(tmp_path, ToyTask(noise=True, nan_at_step=1), ckpt_every=4, log_every=100, resume=True)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["global_step"] == 4


def test_nan_stop_with_a_single_suspect_checkpoint_says_so(tmp_path) -> None:
    with pytest.raises(
        NonFiniteLossError, match="the only checkpoint, of step 4, was taken after the diverging"
    ):
        _toy_fit(tmp_path, ToyTask(noise=True, nan_at_step=5), ckpt_every=4, log_every=100)
    # kept in place: a --resume must not silently start from scratch
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["global_step"] == 4


def test_a_half_written_metrics_line_does_not_block_resume_and_stray_temps_go(tmp_path) -> None:
    _toy_fit(tmp_path, ToyTask(noise=True), ckpt_every=4, stop_after_steps=10)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"stage": "toy", "epoch": 1, "st')  # killed mid-write
    (tmp_path / ".checkpoint.pt.tmp4242").write_bytes(b"half a checkpoint")
    res = _toy_fit(tmp_path, ToyTask(noise=True), ckpt_every=4, resume=True)
    assert res.resumed_from["global_step"] == 8
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in recs if r.get("type") != "epoch"] == list(range(1, 25))
    assert not list(tmp_path.glob(".checkpoint.pt.tmp*"))


# -- unreadable inputs and a full or read-only disk -----------------------------------------
@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_resume_from_an_unreadable_checkpoint_is_one_line(tmp_path, damage) -> None:
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
            *sum((["--set", s] for s in TINY_SETS), []),
        ],
    )
    one_line_error(r, "checkpoint.pt", "cannot resume")


def test_a_fresh_run_never_falls_back_to_an_earlier_runs_checkpoint(tmp_path) -> None:
    _toy_fit(
        tmp_path, ToyTask(noise=True), ckpt_every=4, stop_after_steps=10
    )  # an earlier run: steps 4 and 8
    with pytest.raises(NonFiniteLossError, match="the only checkpoint, of step 4"):
        _toy_fit(
            tmp_path, ToyTask(noise=True, nan_at_step=5), ckpt_every=4, log_every=100
        )  # fresh, not --resume
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["global_step"] == 4
    assert not (tmp_path / "checkpoint.prev.pt").exists()
