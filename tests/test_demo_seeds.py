"""experiments/demo_seeds.py: the per-seed summary of `comkd demo` runs (no training here)."""

from __future__ import annotations

import pytest

from experiments.demo_seeds import summarise, table


def _run(seed, t, u, p, c):
    return {"seed": seed, "hm": {"teacher": t, "student_zeroshot": u, "promptkd": p, "comkd": c}}


def test_summary_gains_share_of_gap_and_every_seed() -> None:
    runs = [_run(1, 98.0, 90.0, 93.0, 94.0), _run(2, 96.0, 92.0, 94.0, 92.0)]
    s = summarise(runs)
    assert s["teacher_gap"] == pytest.approx(6.0)
    assert s["mean_gain"] == pytest.approx({"promptkd": 2.5, "comkd": 2.0})
    assert s["share_of_gap"]["comkd"] == pytest.approx(2.0 / 6.0)
    assert s["both_above_on_every_seed"] is False  # ComKD ends level with the undistilled on seed 2
    assert s["a_third_of_the_gap"] is True  # 2.0 >= 6.0 / 3 and 2.5 >= 2.0
    runs[1]["hm"]["comkd"] = 92.5
    assert summarise(runs)["both_above_on_every_seed"] is True
    text = table({"runs": runs, "summary": summarise(runs), "split": "val", "config": "demo", "sets": []})
    assert "| 2 | 96.00 | 92.00 | 94.00 | 92.50 | +2.00 | +0.50 |" in text and "every seed: yes" in text


def test_the_teacher_check_rows_of_the_page_come_from_their_json() -> None:
    """docs/demo_seeds.md's (teacher's val lead -> PromptKD's val gain) row of this session's
    machine is read off docs/demo_seeds_val_here.json (the command beside the table wrote it)."""
    import json
    from pathlib import Path

    docs = Path(__file__).resolve().parents[1] / "docs"
    runs = json.loads((docs / "demo_seeds_val_here.json").read_text())["runs"]

    def pair(r: dict) -> str:
        hm = r["hm"]
        lead, gain = hm["teacher"] - hm["student_zeroshot"], hm["promptkd"] - hm["student_zeroshot"]
        return f"{lead:+.2f} → {gain:+.2f}".replace("-", "−")

    row = " | ".join(pair(r) for r in sorted(runs, key=lambda r: r["seed"]))
    page = (docs / "demo_seeds.md").read_text()
    assert f"(2 threads; `docs/demo_seeds_val_here.json`) | {row} |" in page
