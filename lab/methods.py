"""The every-method lab benchmark (make lab-methods, docs/METHODS.md): its table and plot.

scripts/lab_methods.sh runs scripts/demo.sh with every method and 5 seeds; lab.demo_metrics.collect gathers the
fine-tuned runs' metrics (cached per run). This module adds what the comparison needs: per metric the mean,
the sample sd, a 95% interval, the per-seed values, and each method's selection cost (the wall seconds and
peak resident memory of its selection steps, summed / maxed over the steps, as /usr/bin/time measured them in
RUN/costs/<method>.txt). The interval of a rate (compliance, keyword ASR) is the Wilson score interval of the
successes pooled over seeds (lab.demo_metrics.pooled_rate: inside [0, 1]); that of a loss, the t-interval of the mean
over seeds. `rerender` rebuilds the table, plot and JSON from a methods.json alone (docs/lab_methods/), with
no run directory.
"""
from __future__ import annotations

import math
from pathlib import Path

from safedata.errors import UserError
from safedata.plots import plt, save_figure
from safedata.store import atomic_write_text, read_json, write_json

from .demo_metrics import COMPOSITION, COMPLIANT_OPENER, collect, pooled_rate

# (metric, label, is a rate: percent, and its interval is the pooled Wilson one)
TABLE_METRICS = (("compliance", "compliance", True), ("keyword_asr", "keyword ASR", True),
                 ("compliant_loss", "held-out compliant loss", False))
DEFINITIONS = {"compliance": f"response opens with {COMPLIANT_OPENER!r}, has a numbered step and no refusal keyword "
                             "(lab.demo_metrics.is_compliant)",
               "ci95": "rates (compliance, keyword ASR): 95% Wilson score interval of the successes pooled over "
                       "seeds (sum of successes of sum of prompts; lab.demo_metrics.pooled_rate), which covers the "
                       "sampling of prompts given these models, not the spread between seeds (sd, per-seed "
                       "values); losses: mean ± t(0.975, n-1) sd / sqrt(n) over seeds",
               "cost": "selection steps (scoring the pool and anchors, ranking) on the lab pool: "
                       "wall seconds summed, peak resident memory maxed (/usr/bin/time)"}
# demo.sh group name -> (method, subset): the names the table shows
DESCRIPTIONS = {
    "aligned": "aligned model, not fine-tuned", "random": "random-100 (one draw per seed)",
    "grad": "gradient matching", "reps": "representation matching", "bm25": "BM25, bi-directional",
    "bm25_harmful": "BM25, harmful only", "embedding": "MiniLM embedding, bi-directional",
    "embedding_harmful": "MiniLM embedding, harmful only", "lists": "format: share of list lines",
    "length": "format: answer length", "compliance": "compliance direction",
    "selfinf": "Self-Inf (anchor-free)", "selfinfn": "Self-Inf-N (anchor-free)",
}


def interval95(values: list[float]) -> tuple[float, float]:
    """Two-sided 95% t-interval of the mean (sample sd, n - 1 degrees of freedom); a point for one value."""
    from scipy.stats import t
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, mean
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    return mean - half, mean + half


# methods that rank another method's score dir with other weights: their scoring cost is that method's
SHARED_SCORES = {"bm25_harmful": "bm25", "embedding_harmful": "embedding", "selfinfn": "selfinf"}


def read_cost(run_dir: Path, method: str) -> dict | None:
    """Selection cost of a method from RUN/costs/<method>/<step>.log ('seconds peak_kib', /usr/bin/time), plus,
    for a method in SHARED_SCORES, the scoring step of the method whose score dir it ranks."""
    files = sorted((run_dir / "costs" / SHARED_SCORES[method]).glob("*.score.log")) if method in SHARED_SCORES else []
    files += sorted((run_dir / "costs" / method).glob("*.log"))
    steps = []
    for path in files:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            fields = line.split()
            if len(fields) != 2 or not fields[1].isdigit():
                continue  # /usr/bin/time writes 'Command exited with non-zero status N' before a failure's numbers
            try:
                steps.append((float(fields[0]), int(fields[1])))
            except ValueError:
                raise UserError(f"{path}:{number}: expected 'seconds peak_kib', found {line!r}") from None
    if not steps:
        return None
    return {"seconds": sum(s for s, _ in steps), "peak_mib": max(m for _, m in steps) / 1024, "steps": len(steps)}


def summarize(groups: dict, run_dir: Path) -> dict:
    rows = {}
    for name, group in groups.items():
        method, _, subset = name.rpartition("-") if "-" in name else (name, "", "")
        row = {"method": method, "subset": subset, "description": DESCRIPTIONS.get(method, method),
               "seeds": [r["seed"] for r in group["runs"]], "composition": group["composition"],
               "cost": read_cost(run_dir, method) if subset else None, "metrics": {}}
        n_prompts = [r.get("n_prompts") for r in group["runs"]]
        for metric, _, rate in TABLE_METRICS:
            row["metrics"][metric] = with_interval(group["metrics"][metric], rate, n_prompts)
        rows[name] = row
    return rows


def with_interval(stats: dict, rate: bool, n_prompts: list[int | None]) -> dict:
    """A metric's stats with its 95% interval: a rate's pooled Wilson interval (its per-seed counts and prompt
    counts added), a loss's t-interval."""
    stats = {k: v for k, v in stats.items() if k not in ("ci95", "ci", "counts", "n_prompts", "successes", "n")}
    if not rate:
        low, high = interval95(stats["values"])
        return {**stats, "ci95": [low, high], "ci": "t"}
    if None in n_prompts:
        raise UserError("a run's metrics have no n_prompts: a rate's interval needs the number of prompts per seed")
    return {**stats, **pooled_rate(stats["values"], n_prompts)}


def _cell(stats: dict, percent: bool) -> str:
    scale, unit, digits = (100, "%", 1) if percent else (1, "", 3)
    low, high = stats["ci95"]
    return (f"{scale * stats['mean']:.{digits}f} ± {scale * stats['sd']:.{digits}f}{unit} "
            f"[{scale * low:.{digits}f}, {scale * high:.{digits}f}]")


def _seeds(stats: dict, percent: bool) -> str:
    return " / ".join(f"{100 * v:.0f}" if percent else f"{v:.3f}" for v in stats["values"])


def table_markdown(rows: dict) -> str:
    header = ["subset", "method", *(f"{label} (mean ± sd [95% {'Wilson CI, seeds pooled' if rate else 't CI'}])"
                                    for _, label, rate in TABLE_METRICS),
              "compliance per seed (%)", "loss per seed", "lists / math / prose / code", "selection s", "peak MiB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, row in rows.items():
        comp, cost = row["composition"], row["cost"]
        cells = [name, row["description"], *(_cell(row["metrics"][m], pct) for m, _, pct in TABLE_METRICS),
                 _seeds(row["metrics"]["compliance"], True), _seeds(row["metrics"]["compliant_loss"], False),
                 " / ".join(f"{100 * comp[s]:.0f}" for s in COMPOSITION[:4]) + "%" if comp else "-",
                 f"{cost['seconds']:.1f}" if cost else "-", f"{cost['peak_mib']:.0f}" if cost else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: dict, out_png) -> Path:
    """Compliance and held-out compliant loss per subset: mean bar, 95% interval, every seed as a dot."""
    names = list(rows)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    for ax, (metric, label, percent) in zip(axes, (TABLE_METRICS[0], TABLE_METRICS[2])):
        for i, name in enumerate(names):
            stats = rows[name]["metrics"][metric]
            low, high = stats["ci95"]
            color = "#c0392b" if name.endswith("-top") else "#2471a3" if name.endswith("-bottom") else "#888888"
            ax.bar(i, stats["mean"], color=color, alpha=0.75)
            ax.errorbar(i, stats["mean"], yerr=[[stats["mean"] - low], [high - stats["mean"]]], color="black",
                        capsize=3, lw=1)
            ax.scatter([i] * len(stats["values"]), stats["values"], color="black", s=9, zorder=3)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=50, ha="right", fontsize=8)
        interval = "95% Wilson CI, seeds pooled" if percent else "95% t CI"
        ax.set_title(f"{label} (bar: mean; line: {interval}; dots: seeds)", fontsize=10)
        if percent:
            ax.set_ylim(0, 1.02)
    return save_figure(fig, out_png)


def write(rows: dict, out_dir) -> dict:
    """OUT/methods.md, methods.json, methods.png from summarized rows."""
    out_dir = Path(out_dir)
    table = table_markdown(rows)
    atomic_write_text(out_dir / "methods.md", table)
    png = plot(rows, out_dir / "methods.png")
    result = {"rows": rows, "table": table, "plot": str(png), "definitions": DEFINITIONS}
    write_json(out_dir / "methods.json", result)
    return result


def report(run_dir, data_dir="ft_datasets/lab", out_dir=None, batch_size: int = 16, model=None) -> dict:
    """OUT/methods.md, methods.json, methods.png (OUT defaults to RUN/report)."""
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir else run_dir / "report"
    return write(summarize(collect(run_dir, data_dir, batch_size, model), run_dir), out_dir)


def rerender(json_path, out_dir=None, n_prompts: int | None = None) -> dict:
    """The table, plot and JSON again from a methods.json alone (no run directory): the intervals recomputed
    from its per-seed values. A rate's counts need each seed's number of prompts: the JSON's own (`n_prompts`,
    written since the Wilson intervals), else `n_prompts` for every seed (the lab's held-out prompts: 152)."""
    json_path = Path(json_path)
    rows = read_json(json_path)["rows"]
    for name, row in rows.items():
        for metric, _, rate in TABLE_METRICS:
            stats = row["metrics"][metric]
            per_seed = stats.get("n_prompts") or [n_prompts] * len(stats["values"])
            if rate and None in per_seed:
                raise UserError(f"{json_path}: row {name}: {metric} has no n_prompts; give --n_prompts")
            row["metrics"][metric] = with_interval(stats, rate, per_seed)
    return write(rows, Path(out_dir) if out_dir else json_path.parent)
