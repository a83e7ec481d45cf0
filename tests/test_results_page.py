"""The results page (docs/results.md) from a small synthetic results.json (+ curves.json)."""

from __future__ import annotations

import json
import statistics

import numpy as np
import pytest
from typer.testing import CliRunner

from experiments import results_page as tool
from experiments.results_page import write_results_page
from support import one_line_error

METHODS = ["teacher", "student_zeroshot", "promptkd", "comkd", "no-ifalign", "no-eduattention"]


def _hm(b: float, n: float) -> float:
    return 2 * b * n / (b + n)


def _synthetic(drop: dict[str, list[str]] | None = None) -> dict:
    drop = drop or {}
    out: dict = {}
    for d, off in (("cifar10", 0.0), ("dtd10", -20.0)):
        out[d] = {}
        for i, m in enumerate(METHODS):
            if m in drop.get(d, []):
                continue
            base = [60.0 + off + i + s * 1.5 for s in range(3)]
            novel = [50.0 + off + i - s * 0.7 for s in range(3)]
            out[d][m] = {
                "base": base,
                "novel": novel,
                "hm": [_hm(b, n) for b, n in zip(base, novel, strict=True)],
            }
    return out


def _curves() -> dict:
    recs = [{"epoch": e, "kd": 10.0 - e, "align": 0.1, "alpha": 0.01 * e, "loss": 10.1 - e} for e in range(3)]
    return {
        "curves": {"cifar10": {"comkd": [recs, recs, recs], "promptkd": [[{"epoch": 0, "kd": 9.0}]] * 3}},
        "setup": {},
        "attention": {},
    }


def test_page_shows_independently_computed_mean_and_std(tmp_path) -> None:
    res = _synthetic()
    (tmp_path / "results.json").write_text(json.dumps(res))
    page = write_results_page(tmp_path / "results.json", tmp_path / "results.md").read_text()
    for d, table in res.items():
        for m, v in table.items():
            for k in ("base", "novel", "hm"):
                cell = f"{statistics.mean(v[k]):.2f} ± {statistics.stdev(v[k]):.2f}"
                assert cell in page, (d, m, k, cell)
    assert (
        "python -m experiments.results_page page" in page.splitlines()[2]
    )  # the regenerating command is at the top
    assert "### cifar10 (3 seeds)" in page and "### dtd10 (3 seeds)" in page
    assert (tmp_path / "plots" / "accuracy.png").stat().st_size > 0
    assert not (tmp_path / "plots" / "training_curves.png").exists()  # no curves.json: no curve plot
    # the analysis compares ComKD with PromptKD from the same numbers
    hm_c, hm_p = (
        statistics.mean(res["cifar10"]["comkd"]["hm"]),
        statistics.mean(res["cifar10"]["promptkd"]["hm"]),
    )
    assert f"ComKD-CLIP HM {hm_c:.2f} vs PromptKD {hm_p:.2f}" in page


def test_curves_plot_alpha_and_analysis_from_curves_json(tmp_path) -> None:
    (tmp_path / "results.json").write_text(json.dumps(_synthetic()))
    (tmp_path / "curves.json").write_text(json.dumps(_curves()))
    (tmp_path / "analysis.md").write_text("### Hand-written notes\n\nProse only.\n")
    page = write_results_page(tmp_path / "results.json", tmp_path / "out" / "results.md").read_text()
    assert (tmp_path / "out" / "plots" / "training_curves.png").stat().st_size > 0
    assert "plots/training_curves.png" in page
    assert "0.000, 0.020, 0.020" not in page and "0.020, 0.020, 0.020" in page  # final α per seed
    assert "Hand-written notes" in page
    supp = {"title": "plain α rate", "note": "An earlier run.", "results": {"cifar10": _synthetic()["dtd10"]}}
    (tmp_path / "supplement.json").write_text(json.dumps(supp))
    page = write_results_page(tmp_path / "results.json", tmp_path / "out" / "results.md").read_text()
    tail = page.split("## Supplement: plain α rate")[1]
    hm = supp["results"]["cifar10"]["comkd"]["hm"]
    assert f"{statistics.mean(hm):.2f} ± {statistics.stdev(hm):.2f}" in tail and "An earlier run." in tail


def test_missing_methods_are_reported_not_fatal(tmp_path) -> None:
    res = _synthetic(drop={"dtd10": ["no-ifalign", "no-eduattention"], "cifar10": ["comkd"]})
    (tmp_path / "results.json").write_text(json.dumps(res))
    r = CliRunner().invoke(
        tool.app,
        ["page", "--results", str(tmp_path / "results.json"), "--out", str(tmp_path / "page.md")],
    )
    assert r.exit_code == 0, r.output
    page = (tmp_path / "page.md").read_text()
    assert "Not run" in page and "dtd10: no-ifalign, no-eduattention" in page and "cifar10: comkd" in page
    assert "ComKD w/o IFAlign" in page  # still shown for cifar10
    assert (tmp_path / "plots" / "accuracy.png").exists()
    # the average table only uses methods present on every dataset
    avg = page.split("### Average over datasets")[1].split("![")[0]
    assert "PromptKD" in avg and "ComKD-CLIP |" not in avg and "w/o IFAlign" not in avg


def test_runner_results_json_is_accepted(tmp_path) -> None:
    res = {"protocol": "base2novel", "selection": "last", "seeds": [1, 2, 3], "datasets": _synthetic()}
    (tmp_path / "results.json").write_text(json.dumps(res))
    page = write_results_page(tmp_path / "results.json", tmp_path / "r.md").read_text()
    assert "### dtd10 (3 seeds)" in page


def test_collect_reads_run_folders_into_page_format(tmp_path) -> None:
    from comkd.config import load_config, save_config
    from experiments.results_collect import collect_runs

    run = tmp_path / "run"
    save_config(load_config("demo"), run / "config.yaml")
    table = _synthetic()["cifar10"]
    (run / "results.json").write_text(
        json.dumps(
            {"protocol": "base2novel", "selection": "last", "seeds": [1, 2, 3], "datasets": {"digits": table}}
        )
    )
    for s in (1, 2, 3):
        for m in METHODS[2:]:
            d = run / "digits" / f"seed{s}" / m
            d.mkdir(parents=True)
            recs = [
                {"stage": "distill", "epoch": 0, "step": 5, "kd": 1.0},
                {
                    "stage": "distill",
                    "type": "epoch",
                    "epoch": 0,
                    "kd": 2.0,
                    "align": 0.5,
                    "alpha": 0.1 * s,
                    "time_s": 3.0,
                },
            ]
            (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    (run / "wall_time.json").write_text(json.dumps({"seconds": 120}))
    res, extra = collect_runs(
        {"digits16": run},
        tmp_path / "docs" / "results.json",
        tmp_path / "docs" / "curves.json",
        attention=False,
    )
    assert res == {"digits16": table}
    assert json.loads((tmp_path / "docs" / "results.json").read_text()) == res
    assert extra["curves"]["digits16"]["comkd"][2] == [
        {"epoch": 0, "kd": 2.0, "align": 0.5, "alpha": 0.30000000000000004, "time_s": 3.0}
    ]
    setup = extra["setup"]["digits16"]
    assert (
        setup["splits"]["test"] > 0
        and setup["wall_time_s"] == 120
        and setup["distill"]["seconds"]["comkd"] == [3.0] * 3
    )
    page = write_results_page(
        tmp_path / "docs" / "results.json", tmp_path / "docs" / "results.md"
    ).read_text()
    assert "2.0 min" in page and "comkd-tiny-teacher" in page


def test_page_keeps_dated_earlier_results_and_shows_val_sweeps_and_step0(tmp_path) -> None:
    import pytest

    res = tmp_path / "results.json"
    table = _synthetic()
    table["cifar10"]["teacher"]["hm"] = [90.0, 91.0, 92.0]  # a teacher above the undistilled student
    res.write_text(json.dumps(table))
    curves = _curves()
    curves["step0"] = {"cifar10": {"comkd": [{"hm": 56.0, "random_init": {"hm": 20.0}}] * 3}}
    (tmp_path / "curves.json").write_text(json.dumps(curves))
    old = _synthetic()
    old["cifar10"]["promptkd"]["hm"] = [11.11, 22.22, 33.33]
    (tmp_path / "results_2026-11.json").write_text(json.dumps(old))
    sweep = {
        "preset": "demo",
        "split": "val",
        "seeds": [1, 2],
        "chosen": "b",
        "variants": {
            v: {
                "sets": sets,
                **{m: [x, x + 2.0] for m in ("teacher", "student_zeroshot", "promptkd", "comkd")},
            }
            for v, sets, x in (("a", [], 70.0), ("b", ["distill.optim.lr=0.1"], 80.0))
        },
    }
    (tmp_path / "sweep_demo.json").write_text(json.dumps(sweep))
    page = write_results_page(res, tmp_path / "results.md").read_text()
    assert "## Earlier results (2026-11)" in page and "22.22" not in page.split("## Earlier results")[0]
    assert f"{statistics.mean([11.11, 22.22, 33.33]):.2f}" in page.split("## Earlier results")[1]
    assert "| b (chosen) | `distill.optim.lr=0.1` | 81.00 ± 1.41 |" in page
    assert "argmax = prediction" not in page  # no attention column when no variant measured it
    sweep["variants"]["b"]["comkd_attention_val"] = {
        "entropy": [0.25, 0.35],
        "argmax_is_prediction": [90.0, 80.0],
    }
    (tmp_path / "sweep_demo.json").write_text(json.dumps(sweep))
    page = write_results_page(res, tmp_path / "results.md").read_text()
    assert "| 81.00 ± 1.41 | 0.30 / 85% |" in page and "| 71.00 ± 1.41 | not measured |" in page
    assert "Chosen: the variant with the best mean ComKD-CLIP val HM (`b`)" in page
    sweep["criterion"] = "the best mean prompted-teacher val HM"
    (tmp_path / "sweep_demo.json").write_text(json.dumps(sweep))
    assert (
        "with the best mean prompted-teacher val HM (`b`)"
        in write_results_page(res, tmp_path / "r.md").read_text()
    )
    # step 0: teacher HM and undistilled HM of cifar10 from the synthetic table give the gap share
    t = statistics.mean(table["cifar10"]["teacher"]["hm"])
    s = statistics.mean(_synthetic()["cifar10"]["student_zeroshot"]["hm"])
    assert f"random-init projector 20.00 ({100 * (20.0 - s) / (t - s):.0f}% of the gap)" in page
    assert f"after the ridge warm start 56.00 ({100 * (56.0 - s) / (t - s):.0f}% of the gap)" in page
    sweep["split"] = "test"
    (tmp_path / "sweep_demo.json").write_text(json.dumps(sweep))
    with pytest.raises(ValueError, match="val split"):
        write_results_page(res, tmp_path / "results.md")


def test_a_variant_run_is_folded_into_its_base_label():
    from experiments.results_collect import _merge_variants

    ref = {"teacher": {"hm": [70.0]}, "student_zeroshot": {"hm": [50.0]}}
    results = {"c": {**ref, "comkd": {"hm": [60.0]}}, "c+paper": {**ref, "comkd": {"hm": [55.0]}}}
    extra = {
        "curves": {"c": {"comkd": [1]}, "c+paper": {"comkd": [2]}},
        "steps": {},
        "attention": {},
        "step0": {"c+paper": {"comkd": [3]}},
        "setup": {"c": {"distill": {"lr": 1}}, "c+paper": {"distill": {"lr": 2}}},
    }
    _merge_variants(results, extra)
    assert list(results) == ["c"] and results["c"]["comkd_paper"] == {"hm": [55.0]}
    assert results["c"]["comkd"] == {"hm": [60.0]} and "teacher_paper" not in results["c"]
    assert extra["curves"] == {"c": {"comkd": [1], "comkd_paper": [2]}}
    assert extra["step0"] == {"c": {"comkd_paper": [3]}}
    assert extra["setup"]["c"]["distill_paper"] == {"lr": 2} and "c+paper" not in extra["setup"]
    bad = {"c": {**ref}, "c+paper": {"teacher": {"hm": [71.0]}, "student_zeroshot": {"hm": [50.0]}}}
    with pytest.raises(ValueError, match="teacher differs"):
        _merge_variants(bad, {"setup": {}})


def test_the_setup_table_counts_a_stage0_subset_by_its_images_per_class():
    from experiments.results_page import _pretrain_images

    s = {"pretrain_splits": {"teacher": "train", "student": "train"}, "splits": {"train": 600}}
    assert _pretrain_images(s, "student") == "600 images"  # a run folder from before the key
    s |= {"pretrain_images": {"teacher": 600, "student": 160}, "pretrain_shots": {"student": 16}}
    assert _pretrain_images(s, "teacher") == "600 images"
    assert _pretrain_images(s, "student") == "160 of 600 images, 16 per class"


def test_the_first_screen_states_the_paired_interval_and_a_verdict_that_follows_it() -> None:
    from experiments.results_page import glance_section

    def row(*hm):
        return {"base": list(hm), "novel": list(hm), "hm": list(hm)}

    results = {
        "level": {
            "teacher": row(60.0, 61.0, 62.0),
            "student_zeroshot": row(50.0, 50.0, 50.0),
            "promptkd": row(57.0, 57.2, 56.8),
            "comkd": row(57.1, 57.0, 57.0),  # differences +0.1, -0.2, +0.2
            "promptkd_paper": row(52.0, 52.0, 52.0),
            "comkd_paper": row(52.5, 52.6, 52.4),  # +0.5 ± 0.1 against the same reading
        },
        "gain": {
            "teacher": row(60.0, 60.0, 60.0),
            "student_zeroshot": row(50.0, 50.0, 50.0),
            "promptkd": row(55.0, 56.0, 57.0),
            "comkd": row(56.0, 57.1, 57.9),  # +1.0, +1.1, +0.9
        },
    }
    text = "\n".join(glance_section(results))
    d = np.array([0.1, -0.2, 0.2])
    half = 4.303 * d.std(ddof=1) / np.sqrt(3)  # t(0.975, 2) from a printed table
    assert f"{d.mean():+.2f} [{d.mean() - half:+.2f}, {d.mean() + half:+.2f}]" in text
    assert "no measurable difference" in text and "a measurable gain" in text
    # the share of the gap: (57.03 - 50) / (61 - 50) = 64%
    assert "| ComKD-CLIP | 57.03 | 64% |" in text
    # paper-reading rows are compared with PromptKD in the same reading (+0.50, not -4.5)
    paper_line = next(
        ln for ln in text.splitlines() if ln.startswith("| ComKD-CLIP (paper equations, project schedule)")
    )
    assert "+0.50 [" in paper_line


def test_gap_shares_per_paired_seed_and_the_plots_that_show_one_point() -> None:
    from comkd.protocols.report import _zoomed_limits, gap_shares

    methods = {
        "teacher": {"hm": [60.0, 50.0, 40.0]},
        "student_zeroshot": {"hm": [50.0, 45.0, 41.0]},  # seed 3: no gap, left out
        "comkd": {"hm": [55.0, 49.0, 39.0]},
    }
    shares = gap_shares(methods, "hm")
    assert shares == {"comkd": pytest.approx([50.0, 80.0])}  # (55-50)/(60-50), (49-45)/(50-45)
    lo, hi = _zoomed_limits([49.3, 61.1])
    assert (lo, hi) == (47.0, 64.0)  # whole points, 2 either side: a 1-point gap is 1/17 of the axis
    assert _zoomed_limits([0.5, 99.5]) == (0.0, 100.0)


def test_the_page_has_a_gap_share_figure_and_no_legend_over_the_bars(tmp_path) -> None:
    import matplotlib.image as mpimg

    from comkd.protocols.report import plot_accuracy, plot_gap_share

    res = {
        "ds": {
            "teacher": {"acc": [60.0, 61.0]},
            "student_zeroshot": {"acc": [50.0, 50.0]},
            "promptkd": {"acc": [55.0, 56.0]},
            "comkd": {"acc": [56.0, 56.0]},
        }
    }
    assert plot_gap_share(res, tmp_path / "gap.png") and mpimg.imread(tmp_path / "gap.png").size > 0
    assert not plot_gap_share({"ds": {"comkd": {"acc": [1.0]}}}, tmp_path / "none.png")
    import matplotlib.pyplot as plt

    seen = {}
    real = plt.Figure.savefig

    def spy(fig, *a, **kw):
        ax = fig.axes[0]
        seen["ylim"], seen["ax_legend"], seen["fig_legends"] = ax.get_ylim(), ax.get_legend(), fig.legends
        return real(fig, *a, **kw)

    plt.Figure.savefig = spy
    try:
        plot_accuracy(res, tmp_path / "acc.png")
    finally:
        plt.Figure.savefig = real
    assert seen["ylim"][0] > 40 and seen["ylim"][1] < 70  # zoomed: not from 0
    assert seen["ax_legend"] is None and len(seen["fig_legends"]) == 1  # one legend, outside the panels


def test_paired_seeds_and_headroom_sections_read_their_files(tmp_path) -> None:
    from experiments.results_page import paired_seeds_section

    row = lambda hm: {"base": hm, "novel": hm, "hm": hm}  # noqa: E731
    table = {
        "teacher": row([60.0] * 4),
        "student_zeroshot": row([50.0] * 4),
        "promptkd": row([57.0, 56.0, 58.0, 57.0]),
        "comkd": row([57.1, 56.2, 57.9, 57.2]),
    }
    seeds = tmp_path / "paired_seeds.json"
    seeds.write_text(json.dumps({"cifar10_wds": table}))
    summary = {
        k: {
            f"{m}{sd}": v
            for m in ("kd_pool_reduction_pct", "kd_val_reduction_pct", "hm_change")
            for sd, v in (("", 1.5), ("_sd", 0.25))
        }
        for k in ("cosine gate", "class bias")
    }
    head = tmp_path / "headroom.json"
    head.write_text(json.dumps({"seeds": {"1": {}, "2": {}}, "steps": 400, "lr": 0.01, "summary": summary}))
    text = "\n".join(paired_seeds_section(seeds, head))
    assert "ComKD − PromptKD over 4 paired seeds (cifar10_wds)" in text
    # paired differences +0.1, +0.2, -0.1, +0.2: mean +0.10, interval from the t quantile with 3 dof
    diffs = [0.1, 0.2, -0.1, 0.2]
    m, s = sum(diffs) / 4, (sum((d - 0.1) ** 2 for d in diffs) / 3) ** 0.5
    half = 3.182446305284263 * s / 2
    assert f"+{m:.2f} [{m - half:+.2f}, {m + half:+.2f}]" in text
    assert "| cosine gate | +1.50 ± 0.25% | +1.50 ± 0.25% | +1.50 ± 0.25 |" in text and "2 seeds" in text
    assert paired_seeds_section(tmp_path / "absent.json", tmp_path / "absent2.json") == []


def test_the_real_towers_section_reads_its_file_and_says_when_the_teacher_does_not_lead(tmp_path) -> None:
    from experiments.results_page import real_towers_section

    row = lambda b, n: {"base": b, "novel": n, "hm": [2 * x * y / (x + y) for x, y in zip(b, n, strict=True)]}  # noqa: E731
    real = tmp_path / "results_real.json"
    real.write_text(
        json.dumps(
            {
                "cifar10_real": {
                    "teacher": row([50.0, 52.0, 51.0], [70.0, 71.0, 72.0]),
                    "student_zeroshot": row([70.0, 69.0, 71.0], [45.0, 47.0, 46.0]),
                    "promptkd": row([64.0, 65.0, 63.0], [80.0, 79.0, 81.0]),
                    "comkd": row([64.5, 65.0, 63.5], [80.0, 79.5, 81.0]),
                },
                "dtd10_real": {
                    "teacher": row([35.0] * 3, [20.0] * 3),
                    "student_zeroshot": row([60.0] * 3, [30.0] * 3),
                    "promptkd": row([40.0] * 3, [22.0] * 3),
                },
            }
        )
    )
    text = "\n".join(real_towers_section(real))
    assert text.startswith("## Real pretrained towers") and "bash experiments/run_real_evidence.sh" in text
    hm = lambda b, n: 2 * b * n / (b + n)  # noqa: E731
    t = sum(hm(b, n) for b, n in ((50, 70), (52, 71), (51, 72))) / 3
    u = sum(hm(b, n) for b, n in ((70, 45), (69, 47), (71, 46))) / 3
    assert f"**cifar10_real** (test HM, mean over 3 paired seeds; teacher gap {t - u:.2f})" in text
    assert "### dtd10_real (3 seeds)" in text  # the base/novel table, as the tiny regime's
    dtd = text[text.index("**dtd10_real**") :]
    assert "| — |" in dtd.split("\n\n")[1]  # the teacher does not lead: no share of a gap
    assert "Student, undistilled (ridge on the teacher's shots)" in text and "Control" not in text
    # the control: the teacher's own tower as the student, beside the smaller one and the teacher
    own = {"base": [63.0, 64.0, 65.0], "novel": [80.0, 80.0, 81.0], "hm": [70.5, 71.0, 72.1]}
    real.with_name("real_selfdistil.json").write_text(json.dumps({"cifar10_real": own}))
    text = "\n".join(real_towers_section(real))
    sd = (sum((x - 71.2) ** 2 for x in own["hm"]) / 2) ** 0.5
    assert (
        f"test HM 71.20 ± {sd:.2f} (base 64.00, novel 80.33)" in text and f"{t:.2f} for the teacher" in text
    )
    assert "it is self-training" in text  # 15 points over the teacher, within 2 of the smaller student
    own["hm"] = [56.0, 56.0, 56.0]
    real.with_name("real_selfdistil.json").write_text(json.dumps({"cifar10_real": own}))
    assert "self-training" not in "\n".join(real_towers_section(real))
    assert real_towers_section(tmp_path / "absent.json") == []


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
    one_line_error(r, "res.json", words)


@pytest.mark.parametrize(
    ("content", "words"), [("{oops", "not valid JSON"), ('{"protocol": "cross"}', "run1")]
)
def test_collect_on_bad_input_is_one_line_naming_the_folder(tmp_path, content, words) -> None:
    (tmp_path / "run1").mkdir()
    (tmp_path / "run1" / "results.json").write_text(content)
    from experiments import results_page as tool

    r = CliRunner().invoke(tool.app, ["collect", f"a={tmp_path / 'run1'}", "--out", str(tmp_path / "o.json")])
    one_line_error(r, "run1", words)


def test_the_committed_page_is_what_its_json_files_give(tmp_path) -> None:
    """docs/results.md, regenerated from the JSON files committed beside it (and docs/analysis.md,
    docs/history/), is the committed page to the letter: no figure on it is typed in or stale."""
    import shutil
    from pathlib import Path

    from experiments.results_page import write_results_page

    docs = Path(__file__).resolve().parents[1] / "docs"
    for f in [*docs.glob("*.json"), docs / "analysis.md"]:
        shutil.copy(f, tmp_path / f.name)
    if (docs / "history").is_dir():
        shutil.copytree(docs / "history", tmp_path / "history")
    page = write_results_page(tmp_path / "results.json", tmp_path / "results.md").read_text()
    assert page == (docs / "results.md").read_text()
