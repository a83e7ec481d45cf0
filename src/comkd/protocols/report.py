"""Reports: a markdown table (mean ± std over seeds) and plots, from a protocol's results.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..fileio import atomic_write_text
from ..methods import METHODS, report_order
from ..stats import harmonic_mean, mean_std
from .sanity import banner

# rows that are not distillation methods, then the method table's order and labels; a run folded in
# as ``LABEL+VARIANT`` (results_page._merge_variants) adds ``<method>_<variant>`` rows, listed last
_BASELINES = {"teacher": "Teacher (prompted)", "student_zeroshot": "Student, undistilled (zero-shot)"}
_VARIANTS = {"paper": "paper equations, project schedule"}
METHOD_ORDER = [*_BASELINES, *report_order(), *(f"{m}_{v}" for v in _VARIANTS for m in report_order())]
LABELS = {
    **_BASELINES,
    **{m.name: m.label for m in METHODS.values()},
    **{f"{m.name}_{v}": f"{m.label} ({text})" for v, text in _VARIANTS.items() for m in METHODS.values()},
}


def subplots(*args: Any, **kwargs: Any) -> Any:
    """``matplotlib.pyplot.subplots`` on the file-only Agg backend: ``(fig, axes)``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save_figure(fig: Any, path: Path) -> None:
    """Write ``fig`` to ``path`` (110 dpi; its folder made) and close it."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
PART_NAMES = {"base": "base classes", "novel": "novel classes", "all": "all classes"}


def chance_level(classes: int) -> float:
    """Top-1 accuracy (%) of a uniform guess over ``classes`` classes."""
    return 100.0 / classes


def size_line(sizes: dict[str, dict[str, int]] | None, split: str = "test") -> str:
    """One sentence: per scored part (base, novel, all) the images scored and the chance level
    (100 / its classes); says so when the run did not record them."""
    parts = [
        f"{PART_NAMES.get(k, k)}: {v['images']} images of {v['classes']} class{'es' * (v['classes'] != 1)}, "
        f"chance {chance_level(v['classes']):.2f}%"
        for k, v in (sizes or {}).items()
        if v.get("classes") and v.get("images")
    ]
    if not parts:
        return f"Test-set size and chance level: not recorded (split `{split}`)."
    return f"Scored on the `{split}` split: " + "; ".join(parts) + "."


def _chance_cells(keys: list[str], sizes: dict[str, dict[str, int]], both: bool) -> list[str] | None:
    """The table's chance row (100 / classes of each part; the HM columns: HM of the two), or
    None when a part's class count is unknown."""
    n = {k: (sizes.get("all" if k == "acc" else k) or {}).get("classes") for k in keys if k != "hm"}
    if not all(n.values()):
        return None
    cells = {k: chance_level(c) for k, c in n.items()}
    out = [f"{cells[k]:.2f}" for k in keys if k != "hm"]
    if both:
        hm = harmonic_mean(cells["base"], cells["novel"])
        out += [f"{hm:.2f}", f"{hm:.2f}"]
    return out


def results_table(
    datasets: dict[str, dict], test_size: dict[str, dict] | None = None, split: str = "test"
) -> str:
    """Markdown table, one block per dataset: base/novel and both HMs (labelled), or accuracy. With
    ``test_size`` (dataset -> part -> ``{"classes", "images"}``, a run's results.json) each block
    also has a chance-level row and a line naming the images scored per part."""
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
        if test_size is not None:
            sizes = test_size.get(ds) or {}
            chance = _chance_cells(keys, sizes, both)
            if chance:
                lines.append("| Chance level (100 / classes) | " + " | ".join(chance) + " |")
            lines += ["", size_line(sizes, split)]
        lines.append("")
    return "\n".join(lines)


def _zoomed_limits(values: list[float], pad: float = 2.0) -> tuple[float, float]:
    """Y limits around ``values`` (whole points, ``pad`` either side), so a one-point difference
    shows; the axis then does not start at 0, which the plot's label says."""
    import math

    lo, hi = min(values), max(values)
    return max(0.0, math.floor(lo - pad)), min(100.0, math.ceil(hi + pad))


def _ticks_every(ax, span: float) -> None:
    """Major ticks every 1, 2 or 5 points so that about 5-12 gridlines cover ``span``."""
    from matplotlib.ticker import MultipleLocator

    step = next((s for s in (1, 2, 5, 10) if span / s <= 12), 20)
    ax.yaxis.set_major_locator(MultipleLocator(step))
    ax.grid(axis="y", alpha=0.3)


def legend_below(fig, ax, rows: int) -> None:
    """One legend for all panels (``ax``'s entries), below them, never over a bar or a line."""
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.06 * rows, 1, 1))


def plot_accuracy(datasets: dict[str, dict], path: Path) -> None:
    """Bars of mean accuracy (± std over seeds) per split and method, one panel per dataset; each
    panel's y-axis spans its own values (not from 0), with 1-, 2- or 5-point gridlines."""
    fig, axes = subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4.4), squeeze=False)
    rows = 1
    for ax, (ds, methods) in zip(axes[0], datasets.items(), strict=True):
        ms = _ordered(methods)
        rows = max(rows, (len(ms) + 3) // 4)
        keys = [k for k in ("base", "novel", "hm", "acc") if k in methods[ms[0]]]
        width = 0.8 / len(ms)
        tops, bottoms = [], []
        for i, m in enumerate(ms):
            means, sds = zip(*(mean_std(methods[m][k]) for k in keys), strict=True)
            xs = [j + (i - (len(ms) - 1) / 2) * width for j in range(len(keys))]
            ax.bar(xs, means, width, yerr=sds, capsize=2, label=LABELS.get(m, m), color=f"C{i % 10}")
            tops += [a + d for a, d in zip(means, sds, strict=True)]
            bottoms += [a - d for a, d in zip(means, sds, strict=True)]
        lo, hi = _zoomed_limits(bottoms + tops)
        ax.set_ylim(lo, hi)
        _ticks_every(ax, hi - lo)
        ax.set_xticks(range(len(keys)), [k.upper() if k == "hm" else k for k in keys])
        ax.set_ylabel("accuracy (%)" + (f", axis from {lo:.0f}" if lo > 0 else ""))
        ax.set_title(ds)
    legend_below(fig, axes[0][0], rows)
    save_figure(fig, path)


def gap_shares(methods: dict[str, dict], key: str) -> dict[str, list[float]]:
    """Per distillation method, the share (%) of the teacher gap it closes on each paired seed:
    ``100 (m - undistilled) / (teacher - undistilled)`` on ``key`` (a seed whose gap is not
    positive is left out: there is nothing to close)."""
    t, u = methods["teacher"][key], methods["student_zeroshot"][key]
    return {
        m: [100.0 * (v - b) / (a - b) for v, a, b in zip(methods[m][key], t, u, strict=True) if a - b > 0]
        for m in _ordered(methods)
        if m not in _BASELINES
    }


def plot_gap_share(datasets: dict[str, dict], path: Path) -> bool:
    """One figure: per dataset, the share of the teacher gap each method closes (HM, or accuracy),
    mean ± std over seeds, with 0% (the undistilled student) and 100% (the teacher) drawn."""
    panels = {
        ds: gap_shares(ms, "hm" if "hm" in ms["teacher"] else "acc")
        for ds, ms in datasets.items()
        if "teacher" in ms and "student_zeroshot" in ms
    }
    panels = {ds: v for ds, v in panels.items() if any(v.values())}
    if not panels:
        return False
    fig, axes = subplots(1, len(panels), figsize=(5.0 * len(panels), 3.8), squeeze=False)
    for ax, (ds, shares) in zip(axes[0], panels.items(), strict=True):
        ms = [m for m, v in shares.items() if v]
        means, sds = zip(*(mean_std(shares[m]) for m in ms), strict=True)
        colors = [f"C{_ordered(datasets[ds]).index(m) % 10}" for m in ms]
        ax.barh(range(len(ms)), means, xerr=sds, capsize=2, color=colors)
        ax.set_yticks(range(len(ms)), [LABELS.get(m, m) for m in ms], fontsize=7)
        ax.invert_yaxis()
        for x, text in ((0, "undistilled"), (100, "teacher")):
            ax.axvline(x, color="grey", lw=0.8, ls="--")
            ax.text(x, -0.7, text, fontsize=6, ha="center", color="grey")
        ax.set_xlabel("teacher gap closed (%)")
        ax.set_title(f"{ds}: mean ± std over seeds", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
    return True


def plot_curves(curves: dict[str, dict[str, list[list[dict]]]], path: Path) -> bool:
    """Per-epoch KD term, align term and α of each distillation method (first seed)."""
    rows = [(ds, m, runs[0]) for ds, ms in curves.items() for m, runs in ms.items() if runs and runs[0]]
    if not rows:
        return False
    fig, axes = subplots(1, 3, figsize=(13, 3.5))
    for ax, term in zip(axes, ["kd", "align", "alpha"], strict=True):
        for i, (ds, m, recs) in enumerate(rows):
            xs = [r["epoch"] + 1 for r in recs if term in r]
            ys = [r[term] for r in recs if term in r]
            if xs:  # one colour per run in every panel, so the single legend fits them all
                ax.plot(xs, ys, marker="o", ms=3, label=f"{ds}/{m}", color=f"C{i % 10}")
        ax.set_title({"kd": "KD term (w_kd · KL)", "align": "IFAlign term", "alpha": "EduAttention α"}[term])
        ax.set_xlabel("epoch")
    legend_below(fig, axes[0], (len(rows) + 3) // 4)
    save_figure(fig, path)
    return True


def write_report(
    results: dict[str, Any],
    out: str | Path,
    curves: dict | None = None,
    title: str | None = None,
    preamble: str = "",
) -> Path:
    """``out/report.md`` + ``out/plots/accuracy.png`` (+ ``gap_share.png``, ``training_curves.png``)."""
    out = Path(out)
    plot_accuracy(results["datasets"], out / "plots" / "accuracy.png")
    has_gap = plot_gap_share(results["datasets"], out / "plots" / "gap_share.png")
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
        results_table(results["datasets"], results.get("test_size", {}), results.get("split") or "test"),
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
    if has_gap:
        lines += ["![share of the teacher gap closed](plots/gap_share.png)", ""]
    if has_curves:
        lines += ["![training curves](plots/training_curves.png)", ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def average_base2novel(table: dict) -> dict:
    """Across datasets: mean base and novel accuracy, the HM of those means (``hm``, the paper's),
    and the mean over datasets of the mean per-seed HM (``hm_per_seed``)."""
    out: dict[str, dict] = {}
    methods = set.intersection(*(set(v) for v in table.values()))
    for m in sorted(methods):
        base, novel, per_seed = (
            sum(mean_std(table[d][m][k])[0] for d in table) / len(table) for k in ("base", "novel", "hm")
        )
        out[m] = {"base": base, "novel": novel, "hm": harmonic_mean(base, novel), "hm_per_seed": per_seed}
    return out
