"""Write an agreement study (compare_rankings.py): the rows of agreement.compare as JSON, CSV, a table and a plot."""
from __future__ import annotations

import csv
import io
from pathlib import Path

from ..plots import plt, save_figure
from ..store import atomic_write_text, write_json
from .agreement import METRICS, compare

HEADER = ("method", "reference", "top-100 ∩ ref. top", "top-100 ∩ ref. bottom", "ref. top in top 1%",
          "ref. top in top 10%", "mean pct ref. top", "mean pct ref. bottom", "AUC top vs bottom", "seconds",
          "peak MiB")


def _cells(row: dict) -> list[str]:
    cost = row.get("cost") or {}
    return [row["method"], row["reference"], str(row["overlap_top"]), str(row["overlap_bottom"]), str(row["top1"]),
            str(row["top10"]), f"{row['pct_top']:.1f}", f"{row['pct_bottom']:.1f}", f"{row['auc']:.3f}",
            f"{cost['seconds']:.1f}" if cost else "-", f"{cost['peak_rss_mib']:.0f}" if cost else "-"]


def table_markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def table_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["method", "reference", "n_pool", *METRICS, "seconds", "peak_rss_mib"])
    for row in rows:
        cost = row.get("cost") or {}
        writer.writerow([row["method"], row["reference"], row["n_pool"], *(row[m] for m in METRICS),
                         cost.get("seconds", ""), cost.get("peak_rss_mib", "")])
    return buffer.getvalue()


def plot(rows: list[dict], out_png, title: str = "") -> Path:
    """AUC (reference top vs bottom) and reference-top hits in the method's top 10%, per method and reference."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    references = list(dict.fromkeys(r["reference"] for r in rows))
    by = {(r["method"], r["reference"]): r for r in rows}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / len(references)
    for ax, metric, label, chance in ((axes[0], "auc", "AUC: reference top vs bottom", 0.5),
                                      (axes[1], "top10", "reference top-100 in the method's top 10%", 10)):
        for j, reference in enumerate(references):
            values = [by[(m, reference)][metric] if (m, reference) in by else 0 for m in methods]
            ax.bar([i + j * width for i in range(len(methods))], values, width, label=reference)
        ax.axhline(chance, color="black", lw=1, ls="--", label="random ranking (expected)")
        ax.set_xticks([i + width * (len(references) - 1) / 2 for i in range(len(methods))])
        ax.set_xticklabels(methods, rotation=35, ha="right", fontsize=8)
        ax.set_title(f"{title}: {label}" if title else label, fontsize=10)
        ax.legend(fontsize=7)
    return save_figure(fig, out_png)


def write_study(data_path, methods, references, output_dir, title="") -> str:
    rows = compare(data_path, methods, references)
    output_dir = Path(output_dir)
    table = table_markdown(rows)
    write_json(output_dir / "agreement.json", rows)
    atomic_write_text(output_dir / "agreement.csv", table_csv(rows))
    atomic_write_text(output_dir / "agreement.md", table)
    plot(rows, output_dir / "agreement.png", title)
    return table
