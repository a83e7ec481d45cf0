"""Smoke test of the benchmark suite: ``run_bench(quick=True)`` writes every figure as a finite number."""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks import (
    FIGURES,
    FULL,
    PAPER_STUDENT,
    PAPER_TEACHER,
    STAGES,
    WEIGHTS_NOTE,
    deployed_pair,
    finite_figures,
    paper_pair,
    run_bench,
)
from benchmarks.data_path import GPU_STAGE2_IMAGES_PER_S
from benchmarks.deployed import build_pair


@pytest.mark.slow
def test_quick_bench_writes_all_figures(tmp_path):
    res = run_bench(tmp_path / "bench.json", quick=True, device="cpu", threads=1, progress=False)
    on_disk = json.loads((tmp_path / "bench.json").read_text())
    assert on_disk == json.loads(json.dumps(res))
    for key in FIGURES:
        assert isinstance(on_disk[key], (int, float)) and math.isfinite(on_disk[key]), key
    assert set(on_disk["peak_memory_mb"]) == set(STAGES)
    assert set(on_disk["epoch_time_s"]) == {"1x", "2x", "4x"}
    assert finite_figures(on_disk)
    assert all(v > 0 for v in on_disk["epoch_time_s"].values())
    m = on_disk["machine"]
    assert {"platform", "cpu_count", "torch", "open_clip", "device"} <= set(m)
    assert on_disk["quick"] is True and on_disk["flops_ratio_tiny_pair"] > 4
    assert on_disk["weights"] == WEIGHTS_NOTE and "random on purpose" in WEIGHTS_NOTE
    d = on_disk["deployed_student"]  # the deployed student in each runtime, against the eager teacher
    for key in ("latency_ms_b1", "throughput_ips_b64"):
        assert set(d[key]) == {"eager", "torchscript", "onnxruntime", "teacher_eager"}
        assert all(math.isfinite(v) and v > 0 for v in d[key].values()), key
    assert d["weights"] == "none"
    assert set(d["student_teacher_speedup_b64"]) == {"eager", "torchscript", "onnxruntime"}
    assert on_disk["deployed_onnxruntime_vs_eager_b64"] == d["vs_eager_speedup_b64"]["onnxruntime"] > 0
    assert max(d["max_abs_logit_diff_vs_eager"].values()) < 1e-3
    peak = on_disk["matmul_peak"]  # the machine's limit, measured in the same run
    assert peak["fp32_gflops_per_s"] == max(v for k, v in peak["shapes"].items() if k.startswith("fp32")) > 0
    for role in ("teacher", "student"):
        u = on_disk[f"paper_{role}_utilisation"]
        assert u["gflops_per_s"] == pytest.approx(
            on_disk[f"paper_{role}_images_per_s"] * on_disk[f"paper_{role}_gflops_per_image"]
        )
        assert u["mfu"] == pytest.approx(u["gflops_per_s"] / peak["fp32_gflops_per_s"]) and u["mfu"] > 0
    # one section alone, merged into the file: eager images/s by batch, then the limits re-read
    res = run_bench(tmp_path / "bench.json", quick=True, device="cpu", threads=1, only="eager")
    assert set(res["eager_student_images_per_s_by_batch"]) == {"1", "2", "8"}  # QUICK.eager_batches
    assert all(v > 0 for v in res["eager_student_images_per_s_by_batch"].values())
    assert res["eager_student_unchunked_images_per_s"]["8"] > 0 and res["eager_machine"]["device"] == "cpu"
    assert res["onnxruntime_vs_eager_b1"] == pytest.approx(
        res["onnxruntime_student_images_per_s_b1"] / res["eager_student_images_per_s_by_batch"]["1"]
    )
    assert res["comkd_vs_promptkd_step_ratio"] == on_disk["comkd_vs_promptkd_step_ratio"]  # kept
    res = run_bench(tmp_path / "bench.json", quick=True, device="cpu", threads=1, only="limits")
    assert set(res["eager_student_utilisation_by_batch"]) == {"1", "2", "8"}
    assert "eager_student_images_per_s_by_batch" in json.loads((tmp_path / "bench.json").read_text())
    with pytest.raises(ValueError, match="eager, limits"):
        run_bench(tmp_path / "bench.json", quick=True, device="cpu", only="nope")
    dp = on_disk["data_path"]  # shards vs a folder of the same images; streamed epoch memory
    if "skipped" not in dp:
        assert dp["read"]["images"] == 100 and all(v > 0 for v in dp["read"]["images_per_s"].values())
        assert dp["distill_epoch"]["pool_items"] == {"1x": 64, "2x": 128, "4x": 256}
        assert all(math.isfinite(v) for v in dp["distill_epoch"]["peak_mb"].values())
        dec = dp["decode"]
        if "skipped" not in dec:  # PIL vs torchvision's decoder on the same JPEGs, per core
            assert dec["pil_images_per_s_per_core"] > 0 and dec["torchvision_images_per_s_per_core"] > 0
            assert dec["torchvision_vs_pil"] == pytest.approx(
                dec["torchvision_images_per_s_per_core"] / dec["pil_images_per_s_per_core"]
            )
            lo = GPU_STAGE2_IMAGES_PER_S[0]
            assert dec["pil_cores_to_feed_gpu"][0] == pytest.approx(lo / dec["pil_images_per_s_per_core"])


@pytest.fixture
def no_weight_init(monkeypatch):
    """Skip the random initialisation of weights (the slow part of building ViT-L/14 on a CPU):
    every module is still built, with uninitialised tensors; only shapes are checked."""
    for name in ("normal_", "uniform_", "kaiming_uniform_", "trunc_normal_", "xavier_uniform_"):
        monkeypatch.setattr(torch.nn.init, name, lambda t, *a, **k: t)


def test_full_bench_builds_the_paper_pair(no_weight_init):
    """The full bench's model building (paper-pair inference and the deployed student), at the
    full sizes: the paper pair has open_clip tags, so random weights must be asked for by name."""
    assert FULL.deploy_paper and deployed_pair(FULL) == (PAPER_TEACHER, PAPER_STUDENT, FULL.paper_image_size)
    teacher, student, w = build_pair(*deployed_pair(FULL), FULL.paper_classes)
    assert teacher.embed_dim == 768 and teacher.preprocess.image_size == FULL.paper_image_size
    assert student.text_features.shape == (FULL.paper_classes, 768) and w.shape == (FULL.paper_classes, 768)
    assert not teacher.training and not student.training
    del teacher, student, w
    teacher, student, _ = paper_pair(FULL)
    assert student.preprocess.image_size == teacher.preprocess.image_size == FULL.paper_image_size


def test_gemm_shapes_are_a_vit_blocks_and_the_timer_counts_two_flops_per_mac(monkeypatch) -> None:
    from benchmarks import limits

    assert limits.gemm_shapes(768, 201, 8) == [(1608, 768, 3072), (1608, 3072, 768), (1608, 768, 2304)]
    assert limits.paper_towers(224) == {"vit_l14": (1024, 257), "vit_b16": (768, 201)}
    # perf_counter: the start, the loop's checks after 2 and 3 matmuls, the end: 3 matmuls in 2 s
    ticks = iter([0.0, 0.0, 2.0, 2.0])
    monkeypatch.setattr(limits.time, "perf_counter", lambda: next(ticks))
    assert limits.time_gemm(10, 20, 30, torch.float32, torch.device("cpu"), min_s=1.0) == pytest.approx(
        2 * 10 * 20 * 30 * 3 / 2.0 / 1e9
    )


def test_limits_section_reads_each_figure_against_the_peak(monkeypatch) -> None:
    from benchmarks import limits

    monkeypatch.setattr(limits, "matmul_peak", lambda *a, **k: {"fp32_gflops_per_s": 100.0, "shapes": {}})
    res = {
        "paper_teacher_images_per_s": 0.5,
        "paper_teacher_gflops_per_image": 100.0,
        "paper_student_images_per_s": 2.0,
        "paper_student_gflops_per_image": 20.0,
        "deployed_student": {
            "student": "ViT-B-16",
            "batch": 64,
            "latency_ms_b1": {"eager": 500.0, "onnxruntime": 250.0, "teacher_eager": 9.0},
            "throughput_ips_b64": {"eager": 1.0, "teacher_eager": 9.0},
        },
    }
    out = limits.limits_section(res, torch.device("cpu"), 1, 224, 0.0)
    assert out["paper_teacher_utilisation"] == {"gflops_per_s": 50.0, "mfu": 0.5}
    assert out["paper_student_utilisation"] == {"gflops_per_s": 40.0, "mfu": 0.4}
    dep = out["deployed_student_utilisation"]
    assert set(dep) == {"eager b1", "onnxruntime b1", "eager b64"}
    assert dep["eager b1"]["gflops_per_s"] == pytest.approx(40.0) and dep["onnxruntime b1"][
        "mfu"
    ] == pytest.approx(0.8)
    assert dep["eager b64"]["mfu"] == pytest.approx(0.2)


def test_the_gpu_check_runs_in_its_quick_form_and_writes_every_key(tmp_path) -> None:
    """``comkd bench --profile gpu --quick`` on the CPU: every section's keys as on a GPU (bf16 and
    CUDA memory null here), rates positive, utilisation against the measured peak."""
    from typer.testing import CliRunner

    from benchmarks.gpu_check import GPU_QUICK, PRECISIONS, SECTIONS
    from comkd import cli

    out = tmp_path / "gpu.json"
    r = CliRunner().invoke(
        cli.app, ["bench", "--profile", "gpu", "--quick", "--device", "cpu", "--out", str(out)]
    )
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert set(SECTIONS) <= set(res) and res["quick"] is True and res["machine"]["device"] == "cpu"
    peak = res["matmul_peak"]["fp32_gflops_per_s"]
    for sec in ("teacher_forward", "distill_online", "distill_cached"):
        assert set(PRECISIONS) <= set(res[sec]) and res[sec]["bf16"] is None
        fp = res[sec]["fp32"]
        assert fp["images_per_s"] > 0 and fp["peak_memory_mb"] is None
        assert fp["mfu"] == pytest.approx(fp["gflops_per_s"] / peak)
    assert "skipped" in res["distill_online"]["compiled"] and res["distill_online"]["compiled_bf16"] is None
    assert set(res["stage1_step_s"]) == {str(n) for n in GPU_QUICK.classes}
    assert all(v["seconds"] > 0 for v in res["stage1_step_s"].values())
    fits = res["fit"]  # the loop itself, at the preset's batch and a full one
    assert (
        fits["preset_batch"]["batch"] == GPU_QUICK.preset_batch
        and fits["full_batch"]["batch"] == GPU_QUICK.batch
    )
    assert fits["preset_batch"]["images_per_s"] > 0 and fits["full_batch"]["steps_timed"] == GPU_QUICK.steps
    assert "skipped" in fits["full_batch_switches"]
    assert res["failed"] == [] and list(res["section_wall_s"]) == list(SECTIONS)
    r = CliRunner().invoke(cli.app, ["bench", "--profile", "tpu", "--out", str(out)])
    assert r.exit_code == 2 and "--profile" in r.output


def test_the_gpu_check_writes_each_section_as_it_ends_and_records_a_failing_one(
    tmp_path, monkeypatch
) -> None:
    """A section that raises is recorded and skipped, the others are in the file; the file is
    rewritten after every section (a run killed mid-way keeps what finished); with no --out the
    check writes into $OUT, and refuses to start without either."""
    from typer.testing import CliRunner

    import benchmarks.gpu_check as gc
    import benchmarks.report as report
    from comkd import cli

    seen: list[set[str]] = []

    real = report.write_json

    def recording(path, res):
        seen.append(set(res))
        real(path, res)

    monkeypatch.setattr(report, "write_json", recording)
    monkeypatch.setattr(gc._Context, "teacher_forward", lambda self: 1 / 0)
    monkeypatch.setattr(gc._Context, "fit", lambda self: {"stubbed": True})  # keep the test short
    monkeypatch.setenv("OUT", str(tmp_path))
    r = CliRunner().invoke(cli.app, ["bench", "--profile", "gpu", "--quick", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert res["failed"] == ["teacher_forward"] and res["teacher_forward"]["error"].startswith(
        "ZeroDivisionError"
    )
    assert res["distill_online"]["fp32"]["images_per_s"] > 0 and res["stage1_step_s"]
    assert len(seen) == len(gc.SECTIONS) and all(gc.SECTIONS[i] in seen[i] for i in range(len(seen)))
    assert not any(gc.SECTIONS[i + 1] in seen[i] for i in range(len(seen) - 1))  # one section more each time
    monkeypatch.delenv("OUT")
    r = CliRunner().invoke(cli.app, ["bench", "--profile", "gpu", "--quick", "--device", "cpu"])
    assert r.exit_code == 2 and "--out" in r.output and "$OUT" in r.output


# -- bad options: one line, before any work ------------------------------------------------------
@pytest.fixture
def no_bench_work(monkeypatch):
    """Every entry into the bench's work fails loudly: an option error must come before it."""
    import benchmarks.limits as limits
    import benchmarks.run as run_mod

    def work(*a, **k):
        raise AssertionError("the bench started work before checking its options")

    for mod, name in ((run_mod, "_run_sections"), (run_mod, "_only_data"), (limits, "matmul_peak")):
        monkeypatch.setattr(mod, name, work)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--only", "bogus"], ["--only", "'bogus'", "eager, limits"]),
        (["--threads", "-1"], ["--threads", "-1"]),
        (["--device", "bogus"], ["--device", "'bogus'"]),
        (["--shards", "{tmp}/nowhere-{{000..001}}.tar"], ["--shards", "nowhere-000.tar"]),
        (["--out", "{tmp}/a-file/bench.json"], ["--out", "a-file is a file"]),
        (["--only", "eager", "--out", "{tmp}/a-file"], ["--out", "a-file", "not a bench JSON"]),
        (["--profile", "gpu", "--only", "eager"], ["--only", "--profile gpu"]),
    ],
)
def test_bench_refuses_a_bad_option_in_one_line_before_any_work(tmp_path, no_bench_work, args, words) -> None:
    from typer.testing import CliRunner

    from comkd import cli
    from support import one_line_error

    (tmp_path / "a-file").write_text("not json")
    args = [a.format(tmp=tmp_path) for a in args]
    r = CliRunner().invoke(cli.app, ["bench", "--quick", "--out", str(tmp_path / "b.json"), *args])
    one_line_error(r, *words, code=2)
    assert (tmp_path / "a-file").read_text() == "not json" and not (tmp_path / "b.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize(
    "args", [["--device", "cuda"], ["--profile", "gpu"], ["--profile", "gpu", "--device", "cpu"]]
)
def test_bench_without_a_gpu_says_so_for_cuda_and_the_full_gpu_check(tmp_path, no_bench_work, args) -> None:
    """The full GPU check refuses a machine without a GPU (its --quick form runs anywhere, above)."""
    from typer.testing import CliRunner

    from comkd import cli
    from support import one_line_error

    r = CliRunner().invoke(cli.app, ["bench", "--out", str(tmp_path / "g.json"), *args])
    one_line_error(r, "CUDA" if "--device" in args and "gpu" not in args else "no GPU is available", code=2)
    assert not (tmp_path / "g.json").exists()


def test_bench_out_with_any_name_writes_that_file(tmp_path, monkeypatch) -> None:
    """``--out r/bench7.txt`` writes r/bench7.txt (not a folder of that name); an existing folder
    gets bench.json."""
    from typer.testing import CliRunner

    import benchmarks.run as run_mod
    from comkd import cli

    monkeypatch.setattr(
        run_mod, "limits_section", lambda prev, *a: {"matmul_peak": {"fp32_gflops_per_s": 1.0}}
    )
    args = ["bench", "--only", "limits", "--quick", "--device", "cpu"]
    r = CliRunner().invoke(cli.app, [*args, "--out", str(tmp_path / "r" / "bench7.txt")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "r" / "bench7.txt").read_text())["matmul_peak"]["fp32_gflops_per_s"] == 1.0
    r = CliRunner().invoke(cli.app, [*args, "--out", str(tmp_path / "r")])
    assert r.exit_code == 0, r.output
    assert "matmul_peak" in json.loads((tmp_path / "r" / "bench.json").read_text())


def test_the_benchmarks_are_not_in_the_package_and_comkd_bench_says_where_they_run(tmp_path, monkeypatch):
    """The benchmark code sits beside the package (a user's install holds none of it); outside a
    checkout ``comkd bench`` is one line naming what to do, exit 2, before any work."""
    from pathlib import Path

    from typer.testing import CliRunner

    import comkd
    from comkd import cli
    from comkd.cli import deploy

    package = Path(comkd.__file__).resolve().parent
    assert not (package / "bench").exists() and not (package / "deploy" / "bench.py").exists()
    monkeypatch.setattr(deploy, "__file__", str(tmp_path / "site" / "comkd" / "cli" / "deploy.py"))
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(cli.app, ["bench", "--quick", "--out", str(tmp_path / "b.json")])
    assert r.exit_code == 2 and "not installed with the package" in r.output, r.output
    assert not (tmp_path / "b.json").exists()
