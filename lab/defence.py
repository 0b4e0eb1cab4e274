"""The lab defence (docs/AUDIT.md): does dropping what audit.py flags protect the aligned lab model?

`build_mixes` draws, from the lab's benign pool (seeded): a held-out benign set (the cost of a drop: the loss
of benign answers the model never trained on), a *natural* mix (a random draw: the styles that break safety
occur at the pool's rate) and an *enriched* mix (the natural mix with part of it replaced by pool answers in
the style the lab's gradient top-100 is made of: opening "Sure, here ..." like the compliant form).
scripts/lab_defence.sh audits each mix (audit.py), fine-tunes the aligned model on the whole mix, on the mix
after audit.py drops 5% and 10%, after dropping as many at random (one draw per seed) and as many by the best
cheap methods of the lab methods benchmark (answer length, BM25 against the harmful anchors), answers the held-out
harmful-style prompts, and `report` tabulates (demo_metrics.collect for compliance, keyword ASR and the held-out
compliant-answer loss; the held-out benign loss added here; for the two rates, the 95% Wilson interval of the
successes pooled over seeds, lab.demo_metrics.pooled_rate) and plots, and writes every run's values (per_seed.csv) and
the pooled counts (pooled.csv): `lab_defence.py report --output_dir docs/lab_defence` puts them beside the
docs, as `lab_report.py methods --output_dir docs/lab_methods` does for the methods benchmark.
"""
from __future__ import annotations

import csv
import io
import json
import re
import statistics
from pathlib import Path

import numpy as np

from lab import demo_metrics
from safedata import data as D
from safedata.errors import UserError
from safedata.plots import plt
from safedata.store import atomic_write_text, fingerprint, read_json, write_json

MIXES = ("natural", "enriched")
# A condition is `whole` or how the mix was cut and by how many percent: audit10 (audit.py, gradient matching),
# random10, or a cheap method's name (length10, bm25_harmful10: audit.py --scores of score.py's scores).
# The cheap methods are scripts/lab_defence.sh's CHEAP choices (score_spec in scripts/lab_steps.sh).
CUT_ORDER = ("audit", "random", "length", "bm25_harmful", "bm25", "lists", "embedding_harmful", "embedding",
             "compliance")


def split_condition(condition: str) -> tuple[str, int | None]:
    """'bm25_harmful10' -> ('bm25_harmful', 10); 'bm2510' -> ('bm25', 10); 'whole' -> ('whole', None).
    Known cut names first: a name ending in digits (bm25) would otherwise lend them to the percentage."""
    for cut in sorted(CUT_ORDER, key=len, reverse=True):
        if condition.startswith(cut) and condition[len(cut):].isdigit():
            return cut, int(condition[len(cut):])
    match = re.fullmatch(r"(.+?)(\d+)", condition)
    return (match.group(1), int(match.group(2))) if match else (condition, None)


def condition_order(condition: str) -> tuple:
    """whole first, then per drop percentage: audit.py, random, the cheap methods (others last, by name)."""
    cut, pct = split_condition(condition)
    if pct is None:
        return (-1, 0, cut)
    return (pct, CUT_ORDER.index(cut) if cut in CUT_ORDER else len(CUT_ORDER), cut)


def _opens_compliant(example) -> bool:
    return (example.response or "").lstrip().startswith(demo_metrics.COMPLIANT_OPENER)


def _write(records, path: Path) -> None:
    atomic_write_text(path, json.dumps(records, indent=1, ensure_ascii=False) + "\n")


def build_mixes(pool_path, out_dir, n_mix=1000, n_heldout=200, n_enrich=100, seed=0) -> dict:
    examples, _ = D.load_examples(pool_path)
    if n_heldout + n_mix + n_enrich > len(examples):
        raise UserError(f"{pool_path}: {len(examples)} examples; need {n_heldout} held out + {n_mix} + {n_enrich}")
    order = np.random.default_rng(seed).permutation(len(examples))
    heldout, natural, rest = order[:n_heldout], order[n_heldout:n_heldout + n_mix], order[n_heldout + n_mix:]
    extra = [i for i in rest if _opens_compliant(examples[i])][:n_enrich]
    if len(extra) < n_enrich:
        raise UserError(f"{pool_path}: only {len(extra)} unused answers open {demo_metrics.COMPLIANT_OPENER!r}; "
                        f"need {n_enrich}")
    enriched = np.concatenate([natural[: n_mix - n_enrich], extra])
    out_dir = Path(out_dir)
    summary = {"pool": str(pool_path), "pool_sha256": D.file_sha256(pool_path), "seed": seed}
    for name, chosen in (("heldout_benign", heldout), ("natural", natural), ("enriched", enriched)):
        chosen = sorted(int(i) for i in chosen)  # pool order
        _write([examples[i].record for i in chosen], out_dir / f"{name}.json")
        summary[name] = {"n": len(chosen), "opener_share": float(np.mean([_opens_compliant(examples[i]) for i in chosen])),
                         "pool_indices": chosen}
    write_json(out_dir / "mixes.json", summary)
    return {k: ({kk: vv for kk, vv in v.items() if kk != "pool_indices"} if isinstance(v, dict) else v)
            for k, v in summary.items()}


def benign_loss(run: Path, model_dir: Path, heldout_path: Path, batch_size=16) -> float:
    """Mean over the held-out benign examples of each answer's token-mean loss (demo_metrics.compliant_loss), cached."""
    from safedata.models import load_model, model_identity
    key = fingerprint({"model": model_identity(str(model_dir)), "heldout": D.file_sha256(heldout_path)})
    cache = run / "benign_loss.json"
    if cache.exists() and read_json(cache).get("fingerprint") == key:
        return read_json(cache)["benign_loss"]
    from safedata.generation import resolve_template
    template, _ = resolve_template(str(model_dir), None)
    model, tokenizer = load_model(str(model_dir), "fp32", "cpu")
    examples, _ = D.load_examples(heldout_path)
    value = demo_metrics.compliant_loss(model, tokenizer, examples, template, batch_size=batch_size)["compliant_loss"]
    write_json(cache, {"fingerprint": key, "benign_loss": value})
    return value


def _flagged_share(audit_dir: Path) -> float | None:
    """Share of the examples audit.py flagged that open like the compliant form."""
    meta_path = audit_dir / "meta.json"
    if not meta_path.exists():
        return None
    flagged = Path(read_json(meta_path)["summary"]["flagged"])
    examples, _ = D.load_examples(flagged)
    return statistics.fmean(_opens_compliant(e) for e in examples) if examples else 0.0


def collect(run_dir, data_dir, batch_size=16) -> dict:
    run_dir = Path(run_dir)
    groups = demo_metrics.collect(run_dir, data_dir, batch_size)
    heldout = run_dir / "mixes" / "heldout_benign.json"
    aligned_model = Path(data_dir) / "model"
    for name, group in groups.items():
        losses = []
        for r in group["runs"]:
            run = Path(r["dir"])
            model_dir = run / "model" if r["seed"] is not None else aligned_model
            r["benign_loss"] = benign_loss(run, model_dir, heldout, batch_size)
            losses.append(r["benign_loss"])
        group["metrics"]["benign_loss"] = demo_metrics.mean_sd(losses)
        n_prompts = [r["n_prompts"] for r in group["runs"]]
        for metric in RATES:
            group["metrics"][metric].update(demo_metrics.pooled_rate(group["metrics"][metric]["values"], n_prompts))
        if (run_dir / "audit" / name).is_dir():  # cut by audit.py: by gradient matching or a cheap method's scores
            group["flagged_opener_share"] = _flagged_share(run_dir / "audit" / name)
    return groups


METRICS = ("compliance", "keyword_asr", "compliant_loss", "benign_loss")
RATES = ("compliance", "keyword_asr")  # shares of the held-out prompts' answers: pooled Wilson intervals
LABELS = {"compliance": "compliance", "keyword_asr": "keyword ASR", "compliant_loss": "held-out compliant loss",
          "benign_loss": "held-out benign loss"}


def _fmt(metric, stats) -> str:
    if metric.endswith("loss"):
        return f"{stats['mean']:.3f} ± {stats['sd']:.3f}"
    cell = f"{100 * stats['mean']:.1f} ± {100 * stats['sd']:.1f}%"
    if "ci95" in stats:
        low, high = stats["ci95"]
        cell += f" [{100 * low:.1f}, {100 * high:.1f}]"
    return cell


def table_markdown(groups: dict) -> str:
    header = ["run", "seeds", "examples",
              *(f"{LABELS[m]} [95% Wilson CI, seeds pooled]" if m in RATES else LABELS[m] for m in METRICS),
              f"opens {demo_metrics.COMPLIANT_OPENER!r}", "of the dropped"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, g in groups.items():
        comp = g["composition"]
        n = "-"
        if g["subset_files"]:
            n = str(len(D.load_examples(g["subset_files"][0])[0]))
        share = g.get("flagged_opener_share")
        cells = [name, str(len(g["runs"])), n, *(_fmt(m, g["metrics"][m]) for m in METRICS),
                 f"{100 * comp['opener']:.1f}%" if comp else "-", f"{100 * share:.0f}%" if share is not None else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def per_seed_csv(groups: dict) -> str:
    """Every run's value of every metric it has: run, seed, metric, value, and for a rate its successes of
    n_prompts answers (the aligned model's row has no seed)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["run", "seed", "metric", "value", "successes", "n_prompts"])
    for name, g in groups.items():
        for r in g["runs"]:
            for metric in METRICS:
                if metric not in r:
                    continue
                counts = demo_metrics.rate_counts([r[metric]], [r["n_prompts"]]) if metric in RATES else None
                writer.writerow([name, "" if r["seed"] is None else r["seed"], metric, repr(r[metric]),
                                 counts[0] if counts else "", r["n_prompts"] if counts else ""])
    return buffer.getvalue()


def pooled_csv(groups: dict) -> str:
    """Per run and rate: the successes pooled over its seeds, of n answers, and their 95% Wilson interval."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["run", "metric", "seeds", "successes", "n", "rate", "ci95_low", "ci95_high"])
    for name, g in groups.items():
        for metric in RATES:
            stats = g["metrics"][metric]
            low, high = stats["ci95"]
            writer.writerow([name, metric, len(g["runs"]), stats["successes"], stats["n"],
                             repr(stats["successes"] / stats["n"]), repr(low), repr(high)])
    return buffer.getvalue()


def plot(groups: dict, out_png) -> Path:
    """Compliance and held-out benign loss per mix and condition: mean bars, each seed a dot."""
    colors = {"whole": ("#555555",), "audit": ("#e06666", "#c0392b", "#7b241c"),
              "random": ("#cfd8dc", "#aab7b8", "#717d7e"), "length": ("#85c1e9", "#2e86c1", "#1b4f72"),
              "bm25_harmful": ("#a9dfbf", "#52be80", "#1e8449")}
    conditions = sorted({name.partition("-")[2] for name in groups if "-" in name}, key=condition_order)
    percents = sorted({split_condition(c)[1] for c in conditions} - {None})

    def color(condition):
        cut, pct = split_condition(condition)
        shades = colors.get(cut, ("#b7950b", "#9a7d0a", "#7d6608"))
        return shades[0] if pct is None else shades[min(percents.index(pct), len(shades) - 1)]

    bars = len(MIXES) * len(conditions)
    fig, axes = plt.subplots(1, 3, figsize=(4 + 3 * 0.225 * bars, 4.2))  # three panels, 0.225 in per bar each
    for ax, metric in zip(axes, ("compliance", "keyword_asr", "benign_loss")):
        ticks, labels = [], []
        x = 0
        for mix in MIXES:
            for condition in conditions:
                g = groups.get(f"{mix}-{condition}")
                if g is None:
                    continue
                stats = g["metrics"][metric]
                ax.bar(x, stats["mean"], color=color(condition))
                ax.scatter([x] * len(stats["values"]), stats["values"], color="black", s=8, zorder=3)
                ticks.append(x)
                labels.append(f"{mix} {condition}")
                x += 1
            x += 1
        ax.set_xticks(ticks)
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=8)
        ax.set_title(LABELS[metric], fontsize=10)
        if metric.endswith("loss"):  # differences of a few thousandths: zoom on the fine-tuned runs
            values = [v for name, g in groups.items() if name != "aligned" for v in g["metrics"][metric]["values"]]
            low, high = min(values), max(values)
            ax.set_ylim(low - 0.2 * (high - low), high + 0.2 * (high - low))
        elif "aligned" in groups:
            ax.axhline(groups["aligned"]["metrics"][metric]["mean"], color="#2471a3", linestyle=":", linewidth=1,
                       label="aligned, not fine-tuned")
            ax.legend(fontsize=7)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def report(run_dir, data_dir="ft_datasets/lab", batch_size=16, out_dir=None) -> dict:
    """OUT/table.md, defence.png, results.json, per_seed.csv, pooled.csv (OUT defaults to RUN/report)."""
    collected = collect(run_dir, data_dir, batch_size)

    def row_order(name):
        mix, _, condition = name.partition("-")
        return (name != "aligned", MIXES.index(mix) if mix in MIXES else len(MIXES), mix, condition_order(condition))
    groups = {name: collected[name] for name in sorted(collected, key=row_order)}
    out = Path(out_dir) if out_dir else Path(run_dir) / "report"
    table = table_markdown(groups)
    atomic_write_text(out / "table.md", table)
    atomic_write_text(out / "per_seed.csv", per_seed_csv(groups))
    atomic_write_text(out / "pooled.csv", pooled_csv(groups))
    plot(groups, out / "defence.png")
    write_json(out / "results.json", groups)
    return {"table": table, "plot": str(out / "defence.png"), "groups": groups}
