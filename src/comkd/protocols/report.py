"""Reports: a markdown table (mean ± std over seeds) and plots, from a protocol's results.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..engine.utils import atomic_write_text
from ..methods import METHODS, report_order
from ..stats import harmonic_mean, mean_std
from .sanity import banner

# rows that are not distillation methods, then the method table's order and labels; a run folded in
# as ``LABEL+VARIANT`` (results_page._merge_variants) adds ``<method>_<variant>`` rows, listed last
_BASELINES = {"teacher": "Teacher (prompted)", "student_zeroshot": "Student, undistilled (zero-shot)"}
_VARIANTS = {"paper": "paper reading"}
METHOD_ORDER = [*_BASELINES, *report_order(), *(f"{m}_{v}" for v in _VARIANTS for m in report_order())]
LABELS = {
    **_BASELINES,
    **{m.name: m.label for m in METHODS.values()},
    **{f"{m.name}_{v}": f"{m.label} ({text})" for v, text in _VARIANTS.items() for m in METHODS.values()},
}


def _fmt(xs: list[float]) -> str:
    m, sd = mean_std(xs)
    return f"{m:.2f} ± {sd:.2f}" if len(xs) > 1 else f"{m:.2f}"


def _ordered(methods) -> list[str]:
    return [m for m in METHOD_ORDER if m in methods] + sorted(m for m in methods if m not in METHOD_ORDER)


def hm_of_means(row: dict[str, list[float]]) -> float:
    """The paper's HM: the harmonic mean of the mean base and the mean novel accuracy over seeds
    (not the mean of the per-seed HMs, which is never larger)."""
    return harmonic_mean(mean_std(row["base"])[0], mean_std(row["novel"])[0])


HM_OF_MEANS = "HM of mean base, novel (paper)"
HM_PER_SEED = "mean of per-seed HMs"


def results_table(datasets: dict[str, dict]) -> str:
    """Markdown table, one block per dataset; columns base/novel and both HMs, labelled (the
    paper's HM of the means and the mean of per-seed HMs), or accuracy."""
    lines = []
    for ds, methods in datasets.items():
        keys = [k for k in ("base", "novel", "hm", "acc") if k in next(iter(methods.values()))]
        n = len(next(iter(next(iter(methods.values())).values())))
        both = {"base", "novel", "hm"} <= set(keys)
        heads = [k for k in keys if k != "hm"] + ([HM_OF_MEANS, HM_PER_SEED] if both else [])
        lines += [
            f"### {ds} ({n} seed{'s' if n != 1 else ''})",
            "",
            "| method | " + " | ".join(heads) + " |",
            "|---|" + "---|" * len(heads),
        ]
        for m in _ordered(methods):
            cells = [_fmt(methods[m][k]) for k in keys if k != "hm"]
            if both:
                cells += [f"{hm_of_means(methods[m]):.2f}", _fmt(methods[m]["hm"])]
            lines.append(f"| {LABELS.get(m, m)} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_accuracy(datasets: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 3.8), squeeze=False)
    for ax, (ds, methods) in zip(axes[0], datasets.items(), strict=True):
        ms = _ordered(methods)
        keys = [k for k in ("base", "novel", "hm", "acc") if k in methods[ms[0]]]
        width = 0.8 / len(ms)
        for i, m in enumerate(ms):
            stats = [mean_std(methods[m][k]) for k in keys]
            xs = [j + (i - (len(ms) - 1) / 2) * width for j in range(len(keys))]
            ax.bar(
                xs,
                [s[0] for s in stats],
                width,
                yerr=[s[1] for s in stats],
                capsize=2,
                label=LABELS.get(m, m),
            )
        ax.set_xticks(range(len(keys)), [k.upper() if k == "hm" else k for k in keys])
        ax.set_ylabel("accuracy (%)")
        ax.set_title(ds)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(curves: dict[str, dict[str, list[list[dict]]]], path: Path) -> bool:
    """Per-epoch KD term, align term and α of each distillation method (first seed)."""
    rows = [(ds, m, runs[0]) for ds, ms in curves.items() for m, runs in ms.items() if runs and runs[0]]
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    terms = ["kd", "align", "alpha"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    for ax, term in zip(axes, terms, strict=True):
        for i, (ds, m, recs) in enumerate(rows):
            xs = [r["epoch"] + 1 for r in recs if term in r]
            ys = [r[term] for r in recs if term in r]
            if xs:  # one colour per run in every panel, so the single legend fits them all
                ax.plot(xs, ys, marker="o", ms=3, label=f"{ds}/{m}", color=f"C{i % 10}")
        ax.set_title({"kd": "KD term (w_kd · KL)", "align": "IFAlign term", "alpha": "EduAttention α"}[term])
        ax.set_xlabel("epoch")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(
    results: dict[str, Any],
    out: str | Path,
    curves: dict | None = None,
    title: str | None = None,
    preamble: str = "",
) -> Path:
    """``out/report.md`` + ``out/plots/accuracy.png`` (+ ``training_curves.png``)."""
    out = Path(out)
    plot_accuracy(results["datasets"], out / "plots" / "accuracy.png")
    has_curves = plot_curves(curves or {}, out / "plots" / "training_curves.png")
    sel = results.get("selection", "last")
    lines = [
        f"# {title or 'comkd results: ' + results['protocol']}",
        "",
        *banner(results.get("warnings", [])),
    ]
    if preamble:
        lines += [preamble, ""]
    lines += [
        f"Protocol `{results['protocol']}`, seeds {results.get('seeds')}, checkpoint selection `{sel}`"
        + (" (PromptKD's: picks the epoch by test accuracy; for parity only)" if sel == "promptkd" else "")
        + ". Accuracies in percent, mean ± std over seeds. "
        + f'"{HM_OF_MEANS}" is the paper\'s convention, HM(mean base, mean novel); '
        + f'"{HM_PER_SEED}" averages each seed\'s HM.' * (results["protocol"] == "base2novel"),
        "",
        results_table(results["datasets"]),
    ]
    if "average" in results:
        lines += [
            "### Average over datasets",
            "",
            f"| method | base | novel | HM of the averaged base, novel (paper) | {HM_PER_SEED} |",
            "|---|---|---|---|---|",
        ]
        for m in _ordered(results["average"]):
            a = results["average"][m]
            per_seed = f"{a['hm_per_seed']:.2f}" if "hm_per_seed" in a else "n/a"
            lines.append(
                f"| {LABELS.get(m, m)} | {a['base']:.2f} | {a['novel']:.2f} | {a['hm']:.2f} | {per_seed} |"
            )
        lines.append("")
    lines += ["![accuracy](plots/accuracy.png)", ""]
    if has_curves:
        lines += ["![training curves](plots/training_curves.png)", ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path
