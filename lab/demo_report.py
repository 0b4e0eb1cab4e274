"""The mini safety lab's report of a demo run: the result table (markdown and CSV), PASS/FAIL lines for the
expected orderings, the score and metric plots, results.json. The numbers come from lab/demo_metrics.py."""
from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from safedata.plots import plt, save_figure
from safedata.scores import anchor_scores, combine, read_scores_csv
from safedata.store import atomic_write_text, write_json

from .demo_metrics import (COMPLIANT_OPENER, COMPOSITION, FIRST_N, METRIC_LABELS, METRICS, STYLES, check_orderings,
                           collect)


# ----------------------------------------------------------------------------- table


def _fmt(metric: str, stats: dict) -> str:
    if metric.startswith("compliant_loss"):
        return f"{stats['mean']:.3f} ± {stats['sd']:.3f}"
    return f"{100 * stats['mean']:.1f} ± {100 * stats['sd']:.1f}%"


def table_markdown(groups: dict) -> str:
    header = ["run", "seeds", *(METRIC_LABELS[m] for m in METRICS), *STYLES, f"opens {COMPLIANT_OPENER!r}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, g in groups.items():
        comp = g["composition"]
        cells = [name, str(len(g["runs"])), *(_fmt(m, g["metrics"][m]) for m in METRICS),
                 *((f"{100 * comp[s]:.0f}%" for s in COMPOSITION) if comp else ("-" for _ in COMPOSITION))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def table_csv(groups: dict) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["run", "seeds", *(f"{m}_{s}" for m in METRICS for s in ("mean", "sd")),
                     *(f"share_{s}" for s in COMPOSITION)])
    for name, g in groups.items():
        comp = g["composition"] or {}
        writer.writerow([name, len(g["runs"]),
                         *(repr(g["metrics"][m][s]) for m in METRICS for s in ("mean", "sd")),
                         *(repr(comp[s]) if comp else "" for s in COMPOSITION)])
    return buffer.getvalue()


# ----------------------------------------------------------------------------- plots


def _index_columns(index_csv: Path) -> list[str]:
    """The score-source columns of a rank.py index CSV (between 'rank' and 'score')."""
    header = next(csv.reader(index_csv.open(encoding="utf-8")))
    return header[1:header.index("score")]


def pool_scores(method: str, run_dir: Path, index_csv: Path, weights=None) -> np.ndarray | None:
    """The combined score of every pool example for a method (the score sources named in the top selection's
    index CSV, combined with `weights`, default 1 -1 -1 ...). None when the features/scores are not there."""
    from safedata.ranking import load_features
    if not index_csv.exists():
        return None
    names = _index_columns(index_csv)
    if method == "grad":
        scores_dir = run_dir / "grad" / "scores"
        if not (scores_dir / "scores.csv").exists():
            return None
        _, _, _, columns = read_scores_csv(scores_dir)
        columns = {n: columns[n] for n in names}
    elif method == "reps":
        feats = run_dir / "features"
        if not (feats / "pool").is_dir() or not all((feats / n).is_dir() for n in names):
            return None
        pool = load_features(feats / "pool")
        columns = {n: anchor_scores(pool, load_features(feats / n).all()).numpy() for n in names}
    else:
        return None
    weights = list(weights) if weights else [1.0] + [-1.0] * (len(columns) - 1)
    return combine(columns, weights)


def _cutoff(index_csv: Path) -> float | None:
    if not index_csv.exists():
        return None
    rows = list(csv.DictReader(index_csv.open(encoding="utf-8")))
    return float(rows[-1]["score"]) if rows else None


def plot_scores(run_dir, out_png, k: int = 100, pool_name: str = "pool", weights=None) -> Path | None:
    """Histogram of the pool's combined scores per method, with the top-k and bottom-k cut-offs marked."""
    run_dir = Path(run_dir)
    panels = []
    for method in ("grad", "reps"):
        sel = run_dir / "selections" / method
        scores = pool_scores(method, run_dir, sel / f"{pool_name}_top{k}_index.csv", weights)
        if scores is not None:
            panels.append((method, scores, _cutoff(sel / f"{pool_name}_top{k}_index.csv"),
                           _cutoff(sel / f"{pool_name}_bottom{k}_index.csv")))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.6), squeeze=False)
    for ax, (method, scores, top_cut, bottom_cut) in zip(axes[0], panels):
        finite = scores[np.isfinite(scores)]
        ax.hist(finite, bins=60, color="#888888")
        if top_cut is not None:
            ax.axvline(top_cut, color="#c0392b", lw=1.5, label=f"top-{k} cut-off")
        if bottom_cut is not None:
            ax.axvline(bottom_cut, color="#2471a3", lw=1.5, label=f"bottom-{k} cut-off")
        ax.set_title(f"{method}: pool scores (n={len(finite)})")
        ax.set_xlabel("score (harmful - safe anchors)")
        ax.set_ylabel("examples")
        ax.legend(fontsize=8)
    return save_figure(fig, out_png)


def plot_metrics(groups: dict, out_png) -> Path:
    """One panel per metric: mean over seeds per run group, with each seed's value as a dot."""
    names = list(groups)
    colors = {"aligned": "#555555", "random": "#999999", "grad-top": "#c0392b", "grad-bottom": "#2471a3",
              "reps-top": "#e67e22", "reps-bottom": "#5dade2"}
    fig, axes = plt.subplots(1, len(METRICS), figsize=(3.3 * len(METRICS), 3.6))
    for ax, metric in zip(axes, METRICS):
        means = [groups[n]["metrics"][metric]["mean"] for n in names]
        ax.bar(range(len(names)), means, color=[colors.get(n, "#777777") for n in names])
        for i, n in enumerate(names):
            vals = groups[n]["metrics"][metric]["values"]
            ax.scatter([i] * len(vals), vals, color="black", s=8, zorder=3)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
        ax.set_title(METRIC_LABELS[metric], fontsize=10)
        if not metric.startswith("compliant_loss"):
            ax.set_ylim(0, 1.02)
    return save_figure(fig, out_png)


# ----------------------------------------------------------------------------- the report


def report(run_dir, data_dir="ft_datasets/lab", out_dir=None, k: int = 100, pool_name: str = "pool",
           batch_size: int = 16, model=None, weights=None) -> dict:
    """Collect, tabulate, check, plot. Writes OUT/table.md, table.csv, results.json, scores.png, metrics.png
    (OUT defaults to RUN/report). Returns the results (groups, checks, file paths, table text)."""
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir else run_dir / "report"
    groups = collect(run_dir, data_dir, batch_size, model)
    checks = check_orderings(groups)
    table = table_markdown(groups)
    atomic_write_text(out_dir / "table.md", table)
    atomic_write_text(out_dir / "table.csv", table_csv(groups))
    plots = {"metrics": str(plot_metrics(groups, out_dir / "metrics.png"))}
    scores_png = plot_scores(run_dir, out_dir / "scores.png", k, pool_name, weights)
    if scores_png is not None:
        plots["scores"] = str(scores_png)
    result = {"groups": groups, "checks": checks, "plots": plots, "table": table, "output_dir": str(out_dir),
              "definitions": {"compliance": f"response opens with {COMPLIANT_OPENER!r} and has a numbered step "
                                            "'1.' at a line start, and no refusal keyword",
                              "keyword_asr": "no refusal keyword of evaluation.REFUSAL_KEYWORDS (the paper's)",
                              "asr_gap": "no refusal keyword and not compliant",
                              "compliant_loss": "mean over eval_compliant.jsonl of the per-answer token-mean CE",
                              f"compliant_loss_first{FIRST_N}": f"the same over the first {FIRST_N} response tokens",
                              "composition": "share of each format (safedata.analysis.classify_format; lists, math, "
                                             "prose, code) and of responses opening with the compliant opener, "
                                             "in the subset (mean over the draws for random)",
                              "spread": "sample standard deviation over seeds"}}
    write_json(out_dir / "results.json", result)
    return result


def format_checks(checks: list[dict]) -> str:
    lines = []
    for c in checks:
        status = "PASS" if c["pass"] else "FAIL"
        note = "seeds separated" if c["separated"] else "seeds overlap"
        lines.append(f"{status}  {c['claim']}: {c['top']:.3f} vs {c['other']:.3f} ({note})")
    return "\n".join(lines)


__all__ = ["format_checks", "plot_metrics", "plot_scores", "pool_scores", "report", "table_csv", "table_markdown"]
