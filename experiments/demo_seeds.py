"""``comkd demo`` over seeds: does distillation pay on every seed, and how much of the teacher gap
does it close? Runs the demo once per seed (each in its own process, ``OMP_NUM_THREADS`` as set),
reads each ``results.json`` and writes a JSON record and a Markdown table.

    python -m experiments.demo_seeds --seeds 1 2 3 4 5 --split test --out runs/demo_seeds \\
        --json docs/demo_seeds.json --md docs/demo_seeds.md

``--split val`` scores on the digits validation split (for choosing settings; the demo preset's
choices were made there); ``--split test`` is what the README reports. ``--set KEY=VALUE`` passes
overrides to every run (a variant)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROWS = [
    ("teacher", "teacher"),
    ("student_zeroshot", "undistilled"),
    ("promptkd", "PromptKD"),
    ("comkd", "ComKD"),
]


def run_seed(seed: int, split: str, out: Path, config: str, sets: list[str]) -> dict:
    """One demo run (reused when its results.json exists); its HM per model and its wall time."""
    res_path = out / f"seed{seed}" / "results.json"
    t0 = time.perf_counter()
    if not res_path.exists():
        cmd = [
            sys.executable,
            "-m",
            "comkd.cli",
            "demo",
            "--config",
            config,
            "--out-dir",
            str(out / f"seed{seed}"),
        ]
        for s in [f"seed={seed}", f"eval_split={split}", "progress=false", *sets]:
            cmd += ["--set", s]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=os.environ.copy())
    res = json.loads(res_path.read_text())
    return {"seed": seed, "hm": {k: res[k]["hm"] for k, _ in ROWS}, "seconds": time.perf_counter() - t0}


def summarise(runs: list[dict]) -> dict:
    """Per seed and on average: each student's gain over the undistilled one and its share of the
    teacher gap; whether both students gained on every seed and closed a third of the gap on average."""
    n = len(runs)
    mean = {k: sum(r["hm"][k] for r in runs) / n for k, _ in ROWS}
    gap = mean["teacher"] - mean["student_zeroshot"]
    gains = {m: mean[m] - mean["student_zeroshot"] for m in ("promptkd", "comkd")}
    every = all(r["hm"][m] > r["hm"]["student_zeroshot"] for r in runs for m in ("promptkd", "comkd"))
    return {
        "mean_hm": mean,
        "teacher_gap": gap,
        "mean_gain": gains,
        "share_of_gap": {m: g / gap if gap > 0 else float("nan") for m, g in gains.items()},
        "both_above_on_every_seed": every,
        "a_third_of_the_gap": all(g >= gap / 3 for g in gains.values()),
    }


def table(record: dict) -> str:
    runs, s = record["runs"], record["summary"]
    head = "| seed | " + " | ".join(label for _, label in ROWS) + " | PromptKD gain | ComKD gain |"
    lines = [head, "|---" * (len(ROWS) + 3) + "|"]
    for r in runs:
        h = r["hm"]
        cells = [f"{h[k]:.2f}" for k, _ in ROWS]
        gains = [f"{h[m] - h['student_zeroshot']:+.2f}" for m in ("promptkd", "comkd")]
        lines.append(f"| {r['seed']} | " + " | ".join(cells + gains) + " |")
    m = s["mean_hm"]
    cells = [f"**{m[k]:.2f}**" for k, _ in ROWS] + [
        f"**{s['mean_gain'][x]:+.2f}**" for x in ("promptkd", "comkd")
    ]
    lines.append("| mean | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"HM on the digits {record['split']} split, {len(runs)} seeds, `comkd demo --config {record['config']}`"
        + (f" with {' '.join('--set ' + x for x in record['sets'])}" if record["sets"] else "")
        + f". Teacher gap {s['teacher_gap']:.2f} HM points; share of it closed on average: PromptKD "
        f"{100 * s['share_of_gap']['promptkd']:.0f}%, ComKD {100 * s['share_of_gap']['comkd']:.0f}%. Both "
        f"distilled students above the undistilled one on every seed: {'yes' if s['both_above_on_every_seed'] else 'no'}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    ap.add_argument("--split", choices=["val", "test"], default="val")
    ap.add_argument("--config", default="demo")
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--out", type=Path, default=Path("runs/demo_seeds"))
    ap.add_argument("--json", type=Path)
    ap.add_argument("--md", type=Path)
    a = ap.parse_args(argv)
    runs = [run_seed(s, a.split, a.out, a.config, a.sets) for s in a.seeds]
    record = {"config": a.config, "sets": a.sets, "split": a.split, "runs": runs, "summary": summarise(runs)}
    text = table(record)
    print(text)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(record, indent=2) + "\n")
    if a.md:
        a.md.parent.mkdir(parents=True, exist_ok=True)
        a.md.write_text("# `comkd demo` over seeds\n\n" + text)
    return record


if __name__ == "__main__":
    main()
