"""Training engine: schedule, data order, gradient accumulation, AMP choice, atomic files,
determinism from one seed, JSONL metrics."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from comkd.config import OptimConfig, load_config
from comkd.engine import loop, sampling, schedule
from comkd.engine.loop import fit
from comkd.engine.sampling import EpochBatchSampler
from comkd.engine.schedule import lr_at
from comkd.engine.utils import amp_context, atomic_torch_save, read_metrics
from support import ToyData, ToyTask

TINY = {
    "teacher": {"model": "comkd-tiny-teacher"},
    "student": {"model": "comkd-tiny-student"},
    "data": {"image_size": 16},
    "progress": False,
}


def _fit_toy(tmp: Path, **kw) -> tuple[ToyTask, loop.FitResult]:
    task_kw = {k: kw.pop(k) for k in ("noise", "nan_at_step") if k in kw}
    optim = OptimConfig(**{"epochs": 3, "batch_size": 8, "lr": 0.05, **kw.pop("optim", {})})
    task = ToyTask(**task_kw)
    res = fit(task, ToyData(), optim, out_dir=tmp, seed=7, device=torch.device("cpu"), progress=False, **kw)
    return task, res


# -- schedule ----------------------------------------------------------------------------------
def test_default_optim_is_the_method_recipe():
    o = OptimConfig()
    assert (o.optimizer, o.lr, o.momentum, o.weight_decay) == ("sgd", 0.005, 0.9, 5e-4)
    assert (o.epochs, o.warmup_epochs, o.warmup_lr, o.batch_size) == (20, 1, 1e-5, 8)
    assert load_config().distill.optim == o


def test_lr_at_sgd_constant_warmup_then_cosine_restarting_per_epoch():
    cfg = OptimConfig(lr=0.005, epochs=20, warmup_epochs=1, warmup_lr=1e-5)
    for step in (0, 3, 99):
        assert lr_at(cfg, 0.005, 0, step, 100) == 1e-5
    for e in range(1, 20):
        # Dassl's WARMUP_RECOUNT: the cosine restarts after the warm-up, cos(pi (e - w) / E)
        want = 0.5 * 0.005 * (1 + math.cos(math.pi * (e - 1) / 20))
        # stepped per epoch: the same value at every step of the epoch
        assert lr_at(cfg, 0.005, e, 0, 100) == pytest.approx(want, rel=1e-12)
        assert lr_at(cfg, 0.005, e, 57, 100) == pytest.approx(want, rel=1e-12)
    assert lr_at(cfg, 0.005, 1, 0, 10) == pytest.approx(0.005)  # the first epoch after warm-up: full lr
    # learning-rate area after warm-up: sum_{k=0}^{E-w-1} (1 + cos(pi k / E)) / 2, against the
    # un-restarted cosine, which loses about 10% of it
    area = sum(lr_at(cfg, 1.0, e, 0, 10) for e in range(1, 20))
    closed = sum(0.5 * (1 + math.cos(math.pi * k / 20)) for k in range(19))
    assert area == pytest.approx(closed, rel=1e-12)
    assert closed / sum(0.5 * (1 + math.cos(math.pi * e / 20)) for e in range(1, 20)) > 1.09
    w3 = OptimConfig(lr=0.01, epochs=10, warmup_epochs=3)
    assert [lr_at(w3, 0.01, e, 0, 5) for e in (3, 4)] == pytest.approx(
        [0.01, 0.005 * (1 + math.cos(math.pi / 10))]
    )
    assert lr_at(cfg, 0.002, 5, 0, 10) == pytest.approx(
        0.4 * lr_at(cfg, 0.005, 5, 0, 10)
    )  # per-group base lr
    no_warm = OptimConfig(lr=0.01, epochs=4, warmup_epochs=0)
    assert lr_at(no_warm, 0.01, 0, 0, 10) == pytest.approx(0.01)


def test_lr_at_adamw_linear_warmup_then_cosine_per_step():
    cfg = OptimConfig(optimizer="adamw", lr=1e-3, epochs=2, warmup_frac=0.1)
    lrs = [lr_at(cfg, 1e-3, e, s, 50) for e in range(2) for s in range(50)]
    warm = 10
    assert lrs[:warm] == pytest.approx([1e-3 * (t + 1) / warm for t in range(warm)])
    assert max(lrs) == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[warm:], lrs[warm + 1 :], strict=False))
    assert lrs[-1] < 1e-5


def test_fit_applies_the_schedule_and_sgd_momentum(tmp_path):
    metrics = loop_metrics(tmp_path)
    optim = {"epochs": 3, "warmup_epochs": 1, "warmup_lr": 1e-5, "lr": 0.05}
    _fit_toy(tmp_path, optim=optim, metrics=metrics, log_every=1)
    cfg = OptimConfig(epochs=3, batch_size=8, lr=0.05)
    steps = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r.get("type") != "epoch"]
    assert len(steps) == 3 * 8
    for r in steps:
        assert r["lr"] == pytest.approx(lr_at(cfg, 0.05, r["epoch"], 0, 8))
    opt = schedule.build_optimizer(cfg, [{"params": [nn.Parameter(torch.zeros(1))]}])
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_the_multi_tensor_update_equals_the_per_tensor_loop_bit_for_bit(name) -> None:
    """build_optimizer asks for ``foreach`` everywhere (faster on a CPU over many small tensors):
    20 steps over a stack of small layers end on exactly the weights of torch's per-tensor loop."""
    cfg = OptimConfig(optimizer=name, lr=0.01, weight_decay=0.05)

    def trained(foreach: bool) -> torch.Tensor:
        torch.manual_seed(0)
        net = nn.Sequential(*[nn.Linear(8, 8) for _ in range(6)])
        groups = [
            {"params": list(net[:3].parameters())},
            {"params": list(net[3:].parameters()), "lr_scale": 0.5},
        ]
        opt = schedule.build_optimizer(cfg, groups)
        assert opt.defaults["foreach"] is True
        if not foreach:  # the same settings through torch's default CPU path
            kind = torch.optim.SGD if name == "sgd" else torch.optim.AdamW
            same = {k: v for k, v in opt.defaults.items() if k != "decoupled_weight_decay"}
            per_tensor = [{**g, "foreach": False} for g in opt.param_groups]  # a group's own wins
            opt = kind(per_tensor, **{**same, "foreach": False})
            assert all(g["foreach"] is False for g in opt.param_groups)
        g = torch.Generator().manual_seed(1)
        for _ in range(20):
            opt.zero_grad()
            net(torch.randn(4, 8, generator=g)).pow(2).mean().backward()
            opt.step()
        return torch.cat([p.detach().flatten() for p in net.parameters()])

    assert torch.equal(trained(True), trained(False))


def loop_metrics(tmp: Path):
    from comkd.engine.utils import MetricsLog

    return MetricsLog(tmp / "metrics.jsonl")


# -- data order --------------------------------------------------------------------------------
def test_epoch_batch_sampler_is_deterministic_and_seeded():
    def batches(seed, epoch, start=0):
        s = EpochBatchSampler(50, 8, seed)
        s.set_epoch(epoch, start)
        return list(s)

    a = batches(1, 0)
    assert a == batches(1, 0)
    assert a != batches(1, 1) and a != batches(2, 0)
    assert len(a) == 6 and all(len(b) == 8 for b in a)  # the short last batch is dropped
    flat = [i for b in a for i in b]
    assert len(set(flat)) == 48 and set(flat) <= set(range(50))
    unshuffled = EpochBatchSampler(20, 5, 0, shuffle=False)
    assert list(unshuffled) == [list(range(i, i + 5)) for i in range(0, 20, 5)]


def test_epoch_batch_sampler_resume_skips_exactly_the_seen_batches():
    s = EpochBatchSampler(50, 8, 3)
    s.set_epoch(2)
    full = list(s)
    for k in range(len(full) + 1):
        s.set_epoch(2, start_batch=k)
        assert len(s) == len(full) - k
        assert list(s) == full[k:]


def test_epoch_batch_sampler_slices_each_global_batch_by_rank(monkeypatch):
    ref = EpochBatchSampler(40, 8, 5)
    ref.set_epoch(1)
    glob = list(ref)
    per_rank = []
    for r in range(2):
        monkeypatch.setattr(sampling, "rank", lambda r=r: r)
        monkeypatch.setattr(sampling, "world_size", lambda: 2)
        s = EpochBatchSampler(40, 8, 5)
        s.set_epoch(1)
        per_rank.append(list(s))
    for g, b0, b1 in zip(glob, *per_rank, strict=True):
        assert len(b0) == len(b1) == 4 and b0 + b1 == g
    with pytest.raises(ValueError, match="not divisible by the 2 processes"):
        EpochBatchSampler(40, 7, 5)


# -- gradient accumulation ---------------------------------------------------------------------
def test_grad_accum_equals_the_full_batch_without_batch_statistics(tmp_path):
    """MSE is a per-sample mean: two halves of 4 averaged give the gradient of the batch of 8
    (float64; equal up to the rounding of summing in two parts)."""
    full, _ = _fit_toy(tmp_path / "a", optim={"batch_size": 8, "grad_accum": 1})
    accum, _ = _fit_toy(tmp_path / "b", optim={"batch_size": 4, "grad_accum": 2})
    small, _ = _fit_toy(tmp_path / "c", optim={"batch_size": 4, "grad_accum": 1})
    assert accum.calls == 2 * full.calls
    for p, q, r in zip(
        full.model.parameters(), accum.model.parameters(), small.model.parameters(), strict=True
    ):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
        assert not torch.allclose(p, r)  # a different global batch gives a different model


def _distill_parts(method: str, seed: int):
    from comkd.engine.builders import build_student, build_teacher, make_dataset
    from comkd.engine.tasks import DistillTask, TeacherOutputs
    from comkd.engine.utils import seed_everything
    from comkd.losses import build_loss

    cfg = load_config(overrides={**TINY, "seed": seed, "distill": {"method": method}})
    seed_everything(seed)
    dev = torch.device("cpu")
    teacher = build_teacher(cfg, dev)
    student = build_student(cfg, teacher.embed_dim, dev)
    ds = make_dataset(cfg, "train", student.preprocess, train=True, unlabelled=True)
    w = teacher.class_text_features(ds.full_classnames)
    student.set_text_features(w, ds.full_classnames)
    loss = build_loss(method, kd_weight=1000.0)
    return (
        student,
        ds,
        DistillTask(
            student, TeacherOutputs(teacher, student.preprocess), w, float(teacher.logit_scale), loss
        ),
    )


@pytest.mark.slow
def test_grad_accum_equals_the_full_batch_for_promptkd_with_frozen_batchnorm(tmp_path):
    """The real student with the PromptKD loss (KL, a per-sample mean). The projector's BatchNorm
    normalises with batch statistics in training, so micro-batches of 4 are not batches of 8;
    with its BatchNorm in eval mode nothing depends on the batch, and accumulation is exact up to
    float32 rounding (measured max difference ~1e-7; tolerance 1e-5)."""

    def run(bs: int, ga: int, freeze_bn: bool):
        student, ds, task = _distill_parts("promptkd", seed=4)
        if freeze_bn:
            orig = student.train

            def train(mode=True):
                orig(mode)
                student.projector[1].eval()
                return student

            student.train = train
        optim = OptimConfig(epochs=2, batch_size=bs, grad_accum=ga, lr=0.005)
        fit(
            task,
            ds,
            optim,
            out_dir=tmp_path / f"{bs}{ga}{freeze_bn}",
            seed=4,
            device=torch.device("cpu"),
            progress=False,
            stop_after_steps=70,
        )  # into the second epoch, past the warm-up
        return {k: v.clone() for k, v in student.state_dict().items()}

    full, accum = run(8, 1, True), run(4, 2, True)
    assert full.keys() == accum.keys()
    for k in full:
        torch.testing.assert_close(full[k], accum[k], rtol=1e-5, atol=1e-5, msg=k)
    init, _, _ = _distill_parts("promptkd", seed=4)
    moved = any(not torch.equal(v, full[k]) for k, v in init.state_dict().items() if v.is_floating_point())
    assert moved
    # with BatchNorm in training mode the statistics differ, as they should
    bn_full, bn_accum = run(8, 1, False), run(4, 2, False)
    assert not torch.allclose(bn_full["projector.1.running_mean"], bn_accum["projector.1.running_mean"])


# -- AMP ---------------------------------------------------------------------------------------
def test_amp_is_off_on_cpu_by_default():
    ctx, scaler = amp_context(torch.device("cpu"), "auto")
    with ctx:
        assert not torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    assert scaler is False
    assert amp_context(torch.device("cpu"), "off")[1] is False
    ctx, _ = amp_context(torch.device("cpu"), "on")  # explicit opt-in: bf16 autocast
    with ctx:
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


# -- atomic checkpoint files -------------------------------------------------------------------
def test_atomic_torch_save_roundtrip(tmp_path):
    p = tmp_path / "sub" / "ck.pt"
    atomic_torch_save({"a": torch.arange(3)}, p)
    assert torch.equal(torch.load(p)["a"], torch.arange(3))
    assert os.listdir(p.parent) == ["ck.pt"]


def test_atomic_writes_are_as_readable_as_the_umask_makes_any_file(tmp_path):
    """safetensors creates its files owner-only (0600); a student file is an output like any other."""
    from safetensors.torch import save_file

    from comkd.fileio import atomic_path

    plain = tmp_path / "plain.txt"
    plain.write_text("x")  # under this process's umask, as comkd's writes are
    with atomic_path(tmp_path / "s.safetensors") as tmp:
        save_file({"w": torch.ones(2)}, str(tmp))
        assert os.stat(tmp).st_mode & 0o077 == 0  # what safetensors itself leaves: owner-only
    assert os.stat(tmp_path / "s.safetensors").st_mode & 0o777 == os.stat(plain).st_mode & 0o777


def test_atomic_torch_save_failure_leaves_no_partial_file(tmp_path, monkeypatch):
    p = tmp_path / "checkpoint.pt"
    atomic_torch_save({"good": torch.ones(4)}, p)
    before = p.read_bytes()

    real_save = torch.save

    def dying_save(obj, f, *a, **kw):  # a crash halfway through writing (disk full, ...)
        real_save({"partial": torch.zeros(1000)}, f)
        raise OSError("simulated failure mid-write")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError, match="mid-write"):
        atomic_torch_save({"new": torch.zeros(4)}, p)
    monkeypatch.undo()
    with pytest.raises(Exception):  # noqa: B017 - unpicklable object: the pickler itself fails
        atomic_torch_save({"fn": lambda: 0}, p)
    assert p.read_bytes() == before  # the previous checkpoint is untouched
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt"]  # and no temp file is left behind
    assert torch.equal(torch.load(p)["good"], torch.ones(4))


# -- determinism and metrics of a real (tiny) distillation -------------------------------------
@pytest.mark.slow
def test_one_seed_gives_identical_runs_and_jsonl_metrics(tmp_path):
    from comkd.engine.distill import run_distill

    def run(name: str, seed: int):
        cfg = load_config(
            overrides={
                **TINY,
                "seed": seed,
                "log_every": 5,
                "distill": {"optim": {"epochs": 2, "batch_size": 32}},
            }
        )
        run_distill(cfg, tmp_path / name)
        from safetensors.torch import load_file

        return load_file(str(tmp_path / name / "student.safetensors")), read_metrics(
            tmp_path / name / "metrics.jsonl"
        )

    a, ma = run("a", 3)
    b, mb = run("b", 3)
    c, _ = run("c", 4)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if k != "text_features")

    strip = [{k: v for k, v in r.items() if k != "time_s"} for r in ma]
    assert strip == [{k: v for k, v in r.items() if k != "time_s"} for r in mb]
    epochs = [r for r in ma if r.get("type") == "epoch"]
    steps = [r for r in ma if r.get("type") != "epoch"]
    assert [r["epoch"] for r in epochs] == [0, 1]
    assert [r["step"] for r in steps] == [5, 10, 15, 20, 25, 30]  # 16 steps an epoch (539 // 32)
    for r in ma:
        assert r["stage"] == "distill" and {"loss", "kd", "align", "step", "epoch"} <= r.keys()
        assert all(math.isfinite(v) for v in r.values() if isinstance(v, float))
    assert steps[0]["lr"] == 1e-5 and steps[-1]["lr"] == pytest.approx(
        0.5 * 0.005 * (1 + math.cos(math.pi * (1 - 1) / 2))  # the cosine restarts after warm-up
    )
    assert (tmp_path / "a" / "config.yaml").is_file() and (tmp_path / "a" / "checkpoint.pt").is_file()


def test_edu_attention_learns_at_a_scaled_rate_through_the_whole_schedule():
    from comkd.config import OptimConfig
    from comkd.engine.schedule import build_optimizer, lr_at
    from comkd.engine.tasks import DistillTask
    from comkd.losses import build_loss
    from comkd.models import create_student

    s = create_student("comkd-tiny-student", teacher_dim=32, image_size=16)
    task = DistillTask(s, None, torch.zeros(3, 32), 10.0, build_loss("comkd"), edu_lr_scale=0.01)
    cfg = OptimConfig()
    opt = build_optimizer(cfg, task.parameter_groups())
    rest, edu = opt.param_groups
    assert {id(p) for p in edu["params"]} == {id(p) for p in s.edu_attention.parameters()}
    assert len(rest["params"]) + len(edu["params"]) == len(s.trainable_parameters())
    assert edu["base_lr"] == pytest.approx(cfg.lr * 0.01) and rest["base_lr"] == pytest.approx(cfg.lr)
    for epoch in (0, 1, 7):
        ratio = lr_at(cfg, edu["base_lr"], epoch, 0, 10) / lr_at(cfg, rest["base_lr"], epoch, 0, 10)
        assert ratio == pytest.approx(0.01)
    # scale 1.0 keeps PromptKD's single group
    assert len(DistillTask(s, None, torch.zeros(3, 32), 10.0, build_loss("comkd")).parameter_groups()) == 1


def test_a_redirected_run_logs_one_line_per_epoch_and_a_heartbeat(tmp_path, monkeypatch, capsys):
    """stderr is not a terminal under pytest: no bar, one line per epoch (and one a minute inside
    an epoch: the interval set to 0 here, so every batch but an epoch's last gets one)."""
    monkeypatch.setattr(loop, "LINE_EVERY_S", 0.0)
    cfg = OptimConfig(optimizer="adamw", lr=1e-2, epochs=2, batch_size=4, warmup_epochs=0)
    kw = {"out_dir": tmp_path, "seed": 0, "device": torch.device("cpu")}
    fit(ToyTask(), ToyData(12), cfg, **kw, progress=True)
    lines = capsys.readouterr().err.splitlines()
    epochs = [ln for ln in lines if ln.startswith("toy epoch") and " batch " not in ln]
    beats = [ln for ln in lines if " batch " in ln]
    assert [ln.split(":")[0] for ln in epochs] == ["toy epoch 1/2", "toy epoch 2/2"]
    assert all("loss " in ln and "lr " in ln and "images/s" in ln and "elapsed" in ln for ln in epochs)
    assert "left" in epochs[0] and "left" not in epochs[1]  # the stage's time left, while any is
    assert lines[0] == f"== toy: 2 epochs of 3 steps (batch 4) -> {tmp_path}"  # the stage's header
    assert [ln.split(":")[0] for ln in beats] == [
        f"toy epoch {e}/2 batch {b}/3" for e in (1, 2) for b in (1, 2)
    ]
    fit(ToyTask(), ToyData(12), cfg, **{**kw, "out_dir": tmp_path / "quiet"}, progress=False)
    assert capsys.readouterr().err == ""  # --quiet / progress=false: nothing


def test_a_terminal_keeps_a_header_and_a_line_per_epoch_beside_its_bar(tmp_path, monkeypatch, capsys):
    """On a terminal the bar is transient: the header and the epoch lines (no heartbeat) stay."""
    monkeypatch.setattr(loop, "show_progress", lambda enabled: bool(enabled))  # the loop's line choice
    monkeypatch.setattr("comkd.engine.utils.show_progress", lambda enabled: bool(enabled))  # the bar's
    monkeypatch.setattr(loop, "LINE_EVERY_S", 0.0)
    cfg = OptimConfig(optimizer="adamw", lr=1e-2, epochs=2, batch_size=4, warmup_epochs=0)
    fit(ToyTask(), ToyData(12), cfg, out_dir=tmp_path, seed=0, device=torch.device("cpu"), progress=True)
    err = capsys.readouterr().err
    assert "it/s" in err or "s/it" in err  # the bar was drawn
    lines = [ln for ln in err.splitlines() if ln.startswith(("==", "toy epoch"))]
    assert [ln.split(":")[0] for ln in lines] == ["== toy", "toy epoch 1/2", "toy epoch 2/2"]


def test_a_run_plan_prices_later_parts_by_the_kinds_already_timed(tmp_path, monkeypatch, capsys):
    """The overall estimate in a stage's header: each later part at the mean time of the parts of
    its kind that trained (a fake clock); untimed kinds counted, not guessed; read-back parts
    (nothing trained) advance the plan without being timed."""
    from comkd.engine import runplan

    now = [0.0]
    monkeypatch.setattr(runplan.time, "perf_counter", lambda: now[0])
    with runplan.run_plan(["pretrain", "teacher", "distill", "teacher", "distill"]) as plan:
        with runplan.plan_part("pretrain"):  # resumed: read back, no stage trained
            now[0] += 5.0
        with runplan.plan_part("teacher"):
            assert runplan.plan_note() == "part 2 of 5, run 5s elapsed; 3 more parts, not yet timed"
            now[0] += 60.0
        with runplan.plan_part("distill"):
            assert runplan.plan_note() == (
                "part 3 of 5, run 1m05s elapsed; after this part about 1m00s (+1 part not yet timed)"
            )
            now[0] += 100.0
        with runplan.plan_part("teacher"):
            assert runplan.plan_note().endswith("; after this part about 1m40s")
            now[0] += 80.0  # the teacher's mean becomes 70 s
        assert plan.timed == {"teacher": [60.0, 80.0], "distill": [100.0]}
        with runplan.plan_part("distill"):
            assert runplan.plan_note() == "part 5 of 5, run 4m05s elapsed; the last part"
    assert runplan.plan_note() == ""  # no plan outside a run
    monkeypatch.undo()  # the real clock again
    # fit's header carries the note of the part it trains in
    cfg = OptimConfig(optimizer="adamw", lr=1e-2, epochs=1, batch_size=4, warmup_epochs=0)
    with runplan.run_plan(["distill", "distill"]), runplan.plan_part("distill"):
        fit(ToyTask(), ToyData(8), cfg, out_dir=tmp_path, seed=0, device=torch.device("cpu"), progress=True)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("== toy: 1 epochs") and lines[1].strip().startswith("part 1 of 2, run ")


def test_write_json_refuses_non_finite_numbers_naming_the_key(tmp_path):
    from comkd.engine.utils import write_json

    path = tmp_path / "results.json"
    path.write_text('{"earlier": 1}\n')
    for obj, key, value in (
        ({"alpha": float("nan")}, "alpha", "nan"),
        (
            {"datasets": {"digits": {"comkd": {"hm": [50.0, float("inf")]}}}},
            "datasets.digits.comkd.hm[1]",
            "inf",
        ),
        ([1.0, {"x": -float("inf")}], "[1].x", "-inf"),
    ):
        with pytest.raises(ValueError) as e:
            write_json(path, obj)
        assert str(e.value) == (
            f"{path}: not written: {key} is {value}, not a finite number (the run diverged or read "
            "damaged weights)"
        )
        assert path.read_text() == '{"earlier": 1}\n'  # the file as it was
    write_json(path, {"acc": 12.5, "n": 3, "none": None})
    assert path.read_text().startswith('{\n  "acc": 12.5')


def test_cli_result_with_nan_is_one_line_naming_the_file_and_key(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from comkd import cli
    from comkd.protocols.protocol import Protocol

    def fake_run_distill(cfg, out_dir, resume=False, **kw):
        info = dict.fromkeys(("alpha", "selected_epoch", "train_images", "trainable_params", "step0"))
        return {**info, "student": str(tmp_path / "student.safetensors")}

    monkeypatch.setattr("comkd.protocols.runner.run_distill", fake_run_distill)
    monkeypatch.setattr("comkd.protocols.runner.load_student", lambda path, device: None)
    monkeypatch.setattr(
        Protocol, "score_student", lambda self, c, s, split: {"acc": float("nan"), "classes": 10}
    )
    out = tmp_path / "run"
    r = CliRunner().invoke(cli.app, ["distill", "--config", "demo", "--out-dir", str(out)])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), r.output
    assert str(out / "results.json") in lines[0] and "acc is nan" in lines[0]
    assert not (out / "results.json").exists()


@pytest.mark.parametrize(
    ("per", "rule", "base", "world", "images", "factor"),
    [
        ("global", "none", 0, 8, 16, 1.0),  # today's meaning: the batch is global, the lr as given
        ("rank", "none", 0, 8, 128, 1.0),
        ("rank", "linear", 0, 8, 128, 8.0),  # lr set for 16 images (batch_size x grad_accum)
        ("rank", "sqrt", 0, 8, 128, 8**0.5),
        ("global", "linear", 256, 1, 16, 16 / 256),  # timm's --lr-base-size 256
        ("rank", "sqrt", 32, 4, 64, 2**0.5),
        ("rank", "linear", 0, 1, 16, 1.0),  # one process: nothing moves
    ],
)
def test_the_global_batch_and_the_lr_rule(per, rule, base, world, images, factor):
    """``global_batch`` and ``lr_factor`` (``config_rules``) against the rule written out here:
    images = batch_size x grad_accum (x processes for ``batch_per: rank``), lr x (images / base)
    or its square root, base 0 meaning batch_size x grad_accum."""
    from comkd.config import OptimConfig
    from comkd.config_rules import global_batch, lr_factor

    o = OptimConfig(batch_size=8, grad_accum=2, batch_per=per, lr_scaling=rule, lr_base_batch=base)
    assert global_batch(o, world) == images
    assert lr_factor(o, world) == pytest.approx(factor, rel=1e-12)


def test_a_batch_per_process_splits_and_one_image_a_process_with_batchnorm_is_refused():
    from comkd.config import ConfigError, load_config
    from comkd.config_rules import check_batches_split

    cfg = load_config("demo_paper")  # the paper's reading: the projector's BatchNorm trains
    with pytest.raises(
        ConfigError,
        match=r"^distill\.optim\.batch_size: 8 images a step .*optim\.batch_per=rank makes it per process",
    ):
        check_batches_split(cfg, ("distill",), 3)
    cfg.distill.optim.batch_per = "rank"
    check_batches_split(cfg, ("distill",), 3)  # 8 a process, 24 a step
    cfg.distill.optim.batch_per = "global"
    with pytest.raises(
        ConfigError, match=r"^distill\.optim\.batch_size: 1 image a process .*projector_bn: train"
    ):
        check_batches_split(cfg, ("distill",), 8)  # the GPU preset's 8 over 8 GPUs
    check_batches_split(load_config("demo"), ("distill",), 8)  # frozen BatchNorm: 1 image a process is fine


def test_a_batch_that_does_not_split_over_the_ranks_is_refused_before_any_rank_waits(tmp_path, monkeypatch):
    """Under torchrun (WORLD_SIZE set) a global batch the ranks cannot share is one line naming the
    key, as soon as the config is read: before any heavy import, weights or process group. `comkd
    run` checks every stage it will run, a stage command its own; a stage checks again itself."""
    from typer.testing import CliRunner

    from comkd import cli
    from comkd.config import ConfigError, load_config
    from comkd.engine import stages

    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setattr(stages, "init_distributed", lambda: (_ for _ in ()).throw(AssertionError("joined")))
    r = CliRunner().invoke(cli.app, ["run", "--config", "demo", "--out-dir", str(tmp_path / "run")])
    assert r.exit_code == 2 and "pretrain.optim.batch_size: 64 images a step" in r.output, r.output
    assert "3 processes" in r.output and not (tmp_path / "run").exists()
    r = CliRunner().invoke(
        cli.app, ["distill", "--config", "demo", "--no-evaluate", "--out-dir", str(tmp_path / "d")]
    )
    assert r.exit_code == 2 and "distill.optim.batch_size: 8 images a step" in r.output, r.output
    with pytest.raises(ConfigError, match=r"^distill\.optim\.batch_size: 8 images"):  # the stage's own check
        stages.start_stage(load_config("demo"), tmp_path / "s", resume=False, stage="distill")
    monkeypatch.setenv("WORLD_SIZE", "4")  # 64, 8 and 8 all split over 4
    from comkd.config_rules import check_batches_split

    check_batches_split(load_config("demo"), ("pretrain", "train_teacher", "distill"), 4)


def test_persistent_workers_see_every_epoch_and_train_as_fresh_ones(tmp_path):
    """``data.persistent_workers``: one loader for the stage whose 2 workers live across epochs;
    each item carries its epoch, so the batches (which move with the epoch, like augmented views)
    and the trained weights equal those of workers forked anew every epoch."""
    from comkd.config import OptimConfig
    from comkd.engine.loop import fit
    from support import EpochToyData, ToyTask

    runs = {}
    for persistent in (False, True):
        task = ToyTask()
        seen: list[float] = []
        step = task.step

        def recording(batch, epoch, step=step, seen=seen):
            seen.append(float(batch[0][:, 0].sum()))
            return step(batch, epoch)

        task.step = recording
        optim = OptimConfig(epochs=3, batch_size=8, lr=0.01, warmup_epochs=0)
        fit(
            task,
            EpochToyData(),
            optim,
            out_dir=tmp_path / str(persistent),
            seed=1,
            device=torch.device("cpu"),
            progress=False,
            num_workers=2,
            persistent_workers=persistent,
        )
        runs[persistent] = (seen, task.model.weight.detach().clone())
    assert runs[True][0] == runs[False][0] and torch.equal(runs[True][1], runs[False][1])
    per_epoch = len(runs[True][0]) // 3
    first, last = sum(runs[True][0][:per_epoch]), sum(runs[True][0][-per_epoch:])
    assert last - first == pytest.approx(2 * 8 * per_epoch, rel=1e-6)  # the third epoch's items are x + 2
