"""The experiment's report (lab_real.py report): every evaluated run under RUN_DIR, and the kept result of each run
it lacks, as table.md, per_seed.csv, flags.csv (per-prompt refused flags, no text), results.json and asr.png."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lab.real.kept import Seed, kept_records, stage_seconds
from lab.real.runs import EVAL_SETS, evaluated_run, refused_flags
from lab.real.settings import StudySettings
from safedata.config import option
from safedata.errors import UserError
from safedata.store import atomic_write_text, write_json

log = logging.getLogger(__name__)

CONDITION_ORDER = ("aligned", "grad-top", "grad-bottom", "reps-top", "length-top", "random", "paper-grad-top")
PER_SEED_FIELDS = ("condition", "seed", "advbench_asr", "advbench_n", "over_refusal", "heldout_n", "heldout_loss",
                   "advbench_non_answers_complied")


def _run_row(condition: str, seed: Seed, run: Path) -> dict:
    return {"condition": condition, "seed": seed, **evaluated_run(run)}


def _flag_lines(condition: str, seed: Seed, refused_by_set: dict) -> list[str]:
    """flags.csv lines of one run; refused_by_set: set name -> (index, refused 0/1) pairs."""
    return [f"{condition},{seed},{set_name},{index},{refused}"
            for set_name in EVAL_SETS for index, refused in refused_by_set[set_name]]


def _evaluated_runs(run_dir: Path) -> list[tuple]:
    """(condition, seed, dir) of every evaluated run under RUN_DIR (aligned, ft/CONDITION/seedN); a run whose
    evaluation is under way (AdvBench answered, held-out answers or loss not yet) is named and left out."""
    candidates = [("aligned", "", run_dir / "aligned")]
    for condition_dir in sorted((run_dir / "ft").glob("*")):
        candidates += [(condition_dir.name, int(seed_dir.name[4:]), seed_dir)
                       for seed_dir in sorted(condition_dir.glob("seed*"))]
    runs = []
    for condition, seed, run in candidates:
        if not (run / "advbench_eval" / "summary.json").is_file():
            continue
        if all((run / f).is_file() for f in ("heldout_eval/summary.json", "loss.json")):
            runs.append((condition, seed, run))
        else:
            log.warning("%s: evaluation not complete (held-out answers or loss missing): not reported yet", run)
    return runs


def _order(condition: str, seed: Seed) -> tuple:
    rank = {name: i for i, name in enumerate(CONDITION_ORDER)}
    return rank.get(condition, len(rank)), condition, seed if seed != "" else -1


def collect_runs(run_dir: Path, kept_dir: Path | None = None,
                 settings: StudySettings | None = None) -> tuple[list[dict], list[str]]:
    """Every evaluated run under RUN_DIR as per-seed rows and per-prompt flag lines, and, from KEPT_DIR, the kept
    result of every run RUN_DIR lacks (made with the same SETTINGS; see keep_run)."""
    entries = [(c, s, _run_row(c, s, run), _flag_lines(c, s, {n: refused_flags(run, n) for n in EVAL_SETS}))
               for c, s, run in _evaluated_runs(run_dir)]
    present = {(c, s) for c, s, _, _ in entries}
    for record in kept_records(kept_dir, settings) if kept_dir else []:
        condition, seed = record["condition"], record["seed"]
        if (condition, seed) not in present:
            refused = {n: enumerate(int(flag) for flag in record["refused"][n]) for n in EVAL_SETS}
            entries.append((condition, seed, {"condition": condition, "seed": seed, **record["row"]},
                            _flag_lines(condition, seed, refused)))
    entries.sort(key=lambda e: _order(e[0], e[1]))
    rows = [e[2] for e in entries]
    flags = ["condition,seed,set,index,refused"] + [line for e in entries for line in e[3]]
    return rows, flags

def recount_asr(flags_csv: str) -> dict[tuple[str, str], float]:
    """Keyword ASR per (condition, seed) recounted from per-prompt flags: the share of AdvBench prompts not refused."""
    counts: dict[tuple[str, str], list[int]] = {}
    for line in flags_csv.splitlines()[1:]:
        condition, seed, set_name, _, refused = line.split(",")
        if set_name == "advbench":
            counts.setdefault((condition, seed), []).append(int(refused))
    return {key: 1 - sum(v) / len(v) for key, v in counts.items()}


def _mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def table_markdown(rows: list[dict]) -> str:
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["condition"], []).append(row)
    lines = ["| condition | seeds | AdvBench keyword ASR | per seed | over-refusal (held-out) | held-out loss |",
             "|---|---|---|---|---|---|"]
    for condition, group in groups.items():
        asr = [r["advbench_asr"] for r in group]
        lines.append(f"| {condition} | {len(group)} | {_mean_sd(asr)} | {' / '.join(f'{a:.3f}' for a in asr)} | "
                     f"{_mean_sd([r['over_refusal'] for r in group])} | {_mean_sd([r['heldout_loss'] for r in group])} |")
    return "\n".join(lines) + "\n"


def plot_asr(rows: list[dict], path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    conditions = list(dict.fromkeys(r["condition"] for r in rows))
    fig, ax = plt.subplots(figsize=(1.3 * len(conditions) + 2, 3.6))
    for x, condition in enumerate(conditions):
        values = [100 * r["advbench_asr"] for r in rows if r["condition"] == condition]
        ax.bar(x, np.mean(values), color="#bbbbbb" if condition == "aligned" else "#4477aa", width=0.6)
        ax.scatter([x] * len(values), values, color="black", s=12, zorder=3)
    ax.set_xticks(range(len(conditions)), conditions, rotation=20)
    ax.set_ylabel("AdvBench keyword ASR (%)")
    ax.set_title("SmolLM2-135M-Instruct, aligned, then fine-tuned on 100 benign examples")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


@dataclass(kw_only=True)
class ReportArgs:
    """lab_real.py report."""

    run_dir: str = option(help="WORK of scripts/lab_real.sh")
    output_dir: str = option("docs/real_model", "where the report's files go")
    settings: str = option("", "the run's settings as KEY=VALUE words")
    kept: str | None = option(None, "kept results (keep) to report for the runs RUN_DIR lacks")


def report(run_dir: str | Path, output_dir: str | Path, settings: StudySettings | None = None,
           kept_dir: str | Path | None = None) -> dict:
    """table.md, per_seed.csv, flags.csv, results.json and asr.png of an experiment run (with the kept results of
    KEPT_DIR for the runs RUN_DIR lacks); the ASR of every row is checked against a recount from the flags before
    anything is written."""
    run_dir, out = Path(run_dir), Path(output_dir)
    rows, flags = collect_runs(run_dir, Path(kept_dir) if kept_dir else None, settings)
    if not rows:
        raise UserError(f"{run_dir}: no evaluated run (run the evaluate stage first)")
    flags_csv = "\n".join(flags) + "\n"
    recount = recount_asr(flags_csv)
    for row in rows:
        if abs(recount[(row["condition"], str(row["seed"]))] - row["advbench_asr"]) > 1e-12:
            raise UserError(f"{row['condition']} seed {row['seed']}: summary ASR {row['advbench_asr']} is not the "
                            "recount of its flags")
    out.mkdir(parents=True, exist_ok=True)
    per_seed = "\n".join([",".join(PER_SEED_FIELDS)] + [",".join(str(r[f]) for f in PER_SEED_FIELDS) for r in rows])
    atomic_write_text(out / "per_seed.csv", per_seed + "\n")
    atomic_write_text(out / "flags.csv", flags_csv)
    table = table_markdown(rows)
    atomic_write_text(out / "table.md", table)
    wall = stage_seconds(run_dir / "wall.tsv")
    if kept_dir:      # stages that runs/ no longer records: their kept seconds
        for record in kept_records(Path(kept_dir), settings):
            for name, seconds in record.get("wall_s", {}).items():
                wall.setdefault(name, seconds)
    result = {"settings": settings.as_dict() if settings else {}, "rows": rows, "wall_s": wall}
    write_json(out / "results.json", result)
    plot_asr(rows, out / "asr.png")
    return {"table": table, **result}
