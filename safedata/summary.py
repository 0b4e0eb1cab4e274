"""Run folders -> the table a person reads: keyword ASR in % per seed, mean ± sd over seeds, beside the base model's.

A run folder is what finetune_evaluation.slurm writes for one SAVE_NAME: `seed<N>/evaluation/summary.json` per seed
(evaluate.py's; `keyword_asr` is a share, 0-1, reported here x 100) and `job.json` (`write_job_record`: the model,
the template, the subset's and the prompts' sha256, the seeds, and where the base model's evaluation is, relative
to the run folder so that moving OUTPUT_ROOT keeps it valid). `summarize` gathers one or more run folders into
`summary.json` (`rows`: one per run folder), `table.md`, `table.csv` and `asr.png` (one dot per seed, a bar at the
mean, the base model as a line across its row's bar).

A seed folder without `evaluation/summary.json` (a job still running, or one that failed) is never dropped silently:
its row lists it in `seeds_missing` and the table says how many; a run folder with no finished seed is refused.
Seeds fine-tuned with other settings (another learning rate, subset, base model: their finetune_meta.json) are
refused too, since a mean over them would mix two experiments.

The base model's control (`prepare_base`): the job answers the prompts once with the base model and keeps the
answers under OUTPUT_ROOT/base/<key>/, where the key is what generation's own fingerprint is made of (model,
template, the prompts' sha256, every generation flag, the shard count), with the model named by its content (a
local directory by its name and the hash `models.model_identity` gives it, not its path), so a later job on the
same model, prompts and settings finds and reuses it.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import logging
import math
import os
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

from . import data as D
from . import plots
from .config import add_options, from_args, option
from .errors import InputError, UserError
from .evaluation import SUMMARY_FILE, EvaluateArgs
from .generation import GenerationArgs
from .models import FINETUNE_META, model_identity
from .store import atomic_write_text, fingerprint, now, read_json, write_json
from .templates import choose_template

log = logging.getLogger(__name__)

JOB_FILE = "job.json"               # in a run folder: what finetune_evaluation.slurm ran, and where its base is
KEY_FILE = "key.json"               # in OUTPUT_ROOT/base/<key>/: what the key identifies
SEED_DIR = re.compile(r"seed(\d+)")
EVALUATION = "evaluation"
OUTPUTS = ("summary.json", "table.md", "table.csv", "asr.png")
# Generation flags that say where, not what: left out of the base model's key.
NOT_IN_KEY = ("model_name", "data_path", "output_dir", "overwrite", "shard", "template")
NOT_IN_JUDGE_KEY = ("responses", "output_dir", "model")


@dataclass(kw_only=True)
class SummaryArgs:
    """summarize.py's settings (its flags are generated from these fields; the run folders are its positional
    arguments)."""

    run_dirs: list[str] = option(help="run folders ($OUTPUT_ROOT/$SAVE_NAME of finetune_evaluation.slurm), each "
                                      "with seed*/evaluation/summary.json; one table row each", cli=False)
    output_dir: str | None = option(None, "where summary.json, table.md, table.csv and asr.png go (default: "
                                          "RUN_DIR/summary for one run folder; required for several)")


# ----------------------------------------------------------------------------- reading run folders


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_evaluation(path: Path) -> dict:
    """An evaluate.py summary.json, checked: `keyword_asr` a share in [0, 1], `n` a positive count."""
    summary = read_json(path)
    if not isinstance(summary, dict):
        raise InputError(path, None, None, "not a JSON object (evaluate.py's summary.json)")
    if not _number(summary.get("keyword_asr")) or not 0 <= summary["keyword_asr"] <= 1:
        raise InputError(path, None, "keyword_asr", f"{summary.get('keyword_asr')!r} is not a share between 0 and 1")
    n = summary.get("n")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise InputError(path, None, "n", f"{n!r} is not a positive number of prompts")
    return summary


def seed_dirs(run_dir: Path) -> dict[int, Path]:
    """seed<N> folders of a run folder, by N."""
    return {int(m.group(1)): p for p in run_dir.iterdir() if p.is_dir() and (m := SEED_DIR.fullmatch(p.name))}


def read_job(run_dir: Path) -> dict | None:
    path = run_dir / JOB_FILE
    if not path.exists():
        return None
    job = read_json(path)
    if not isinstance(job, dict):
        raise InputError(path, None, None, "not a JSON object (finetune_evaluation.slurm's job.json)")
    base = job.get("base")
    if base is not None and not (isinstance(base, dict) and isinstance(base.get("evaluation"), str)):
        raise InputError(path, None, "base", "must be null or an object with 'evaluation' (a folder, relative to "
                                             "the run folder)")
    seeds = job.get("seeds", [])
    if not (isinstance(seeds, list) and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        raise InputError(path, None, "seeds", f"{seeds!r} is not a list of seed numbers")
    return job


def _settings(meta: dict) -> dict | None:
    settings = meta.get("settings")
    if not isinstance(settings, dict):
        return None
    flags = {k: v for k, v in (settings.get("flags") or {}).items() if k != "seed"}
    return {**{k: v for k, v in settings.items() if k != "flags"}, **{f"flag {k}": v for k, v in flags.items()}}


def _check_same_settings(run_dir: Path, seeds: dict[int, Path]) -> None:
    """Seeds of one row must be fine-tuned alike (their finetune_meta.json's settings, the seed aside)."""
    first = None
    for seed, folder in sorted(seeds.items()):
        path = folder / "model" / FINETUNE_META
        if not path.exists():
            continue
        settings = _settings(read_json(path))
        if settings is None:
            continue
        if first is None:
            first = (seed, settings)
            continue
        differ = sorted(k for k in set(first[1]) | set(settings) if first[1].get(k) != settings.get(k))
        if differ:
            key = differ[0]
            raise UserError(f"{run_dir}: seed{first[0]} and seed{seed} were fine-tuned with other settings ({key}: "
                            f"{first[1].get(key)!r} vs {settings.get(key)!r}); a mean over them mixes two "
                            "experiments: move the odd seeds to another run folder")


def _mean_sd(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def gather_row(run_dir, name: str | None = None) -> dict:
    """One table row for a run folder (see the module's docstring for what is refused)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run folder")
    job = read_job(run_dir)
    folders = seed_dirs(run_dir)
    finished = {s: f for s, f in folders.items() if (f / EVALUATION / SUMMARY_FILE).exists()}
    missing = sorted((set(folders) | set(job["seeds"] if job else ())) - set(finished))
    if not finished:
        raise UserError(f"{run_dir}: no finished seed (no seed*/{EVALUATION}/{SUMMARY_FILE}"
                        + (f"; seeds {', '.join(map(str, missing))} unfinished" if missing else "")
                        + "); run finetune_evaluation.slurm for it first")
    if missing:
        log.warning("%s: seed(s) %s have no %s/%s (running, or failed): left out of the mean, listed as missing",
                    run_dir, ", ".join(map(str, missing)), EVALUATION, SUMMARY_FILE)
    _check_same_settings(run_dir, finished)
    seeds = sorted(finished)
    evaluations = {s: read_evaluation(finished[s] / EVALUATION / SUMMARY_FILE) for s in seeds}
    counts = {s: e["n"] for s, e in evaluations.items()}
    if len(set(counts.values())) > 1:
        raise UserError(f"{run_dir}: seeds answered different numbers of prompts "
                        f"({', '.join(f'seed{s}: {n}' for s, n in counts.items())}); rerun the odd ones")
    asr = [100 * evaluations[s]["keyword_asr"] for s in seeds]
    mean, sd = _mean_sd(asr)
    base_pct, base_dir = None, None
    if job and job.get("base"):
        base_dir = Path(job["base"]["evaluation"])
        base_dir = base_dir if base_dir.is_absolute() else run_dir / base_dir
        base_file = base_dir / SUMMARY_FILE
        if not base_file.exists():
            raise UserError(f"{run_dir / JOB_FILE}: its base model's evaluation {base_file} is missing (moved "
                            "without the run folder? OUTPUT_ROOT/base/ must move with it); rerun the job to "
                            "answer the prompts with the base model again")
        base = read_evaluation(base_file)
        if base["n"] != counts[seeds[0]]:
            raise UserError(f"{base_file}: the base model answered {base['n']} prompts, {run_dir}'s seeds "
                            f"{counts[seeds[0]]}; not the same prompts")
        base_pct = 100 * base["keyword_asr"]
    finetune_meta = finished[seeds[0]] / "model" / FINETUNE_META
    meta = read_json(finetune_meta) if finetune_meta.exists() else {}
    return {"name": name or (job or {}).get("save_name") or run_dir.name, "run_dir": str(run_dir),
            "seeds": seeds, "asr_pct": asr, "asr_pct_mean": mean, "asr_pct_sd": sd, "base_asr_pct": base_pct,
            "n_prompts": counts[seeds[0]], "seeds_missing": missing,
            "model": (job or {}).get("model") or meta.get("base_model_name"),
            "template": (job or {}).get("template") or meta.get("template"),
            "base_evaluation": str(base_dir) if base_dir else None}


# ----------------------------------------------------------------------------- the outputs


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def mean_sd_text(row: dict) -> str:
    return _pct(row["asr_pct_mean"]) + ("" if row["asr_pct_sd"] is None else f" ± {row['asr_pct_sd']:.1f}")


def markdown_table(rows: list[dict]) -> str:
    lines = ["| run | keyword ASR % (mean ± sd) | per seed | base model % | seeds | prompts | missing seeds |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        per_seed = ", ".join(f"{s}: {_pct(v)}" for s, v in zip(row["seeds"], row["asr_pct"]))
        missing = ", ".join(map(str, row["seeds_missing"])) or "none"
        lines.append(f"| {row['name']} | {mean_sd_text(row)} | {per_seed} | {_pct(row['base_asr_pct'])} | "
                     f"{len(row['seeds'])} | {row['n_prompts']} | {missing} |")
    return "\n".join(lines) + "\n"


CSV_COLUMNS = ("name", "seeds", "asr_pct", "asr_pct_mean", "asr_pct_sd", "base_asr_pct", "n_prompts",
               "seeds_missing", "model", "template")


def csv_table(rows: list[dict]) -> str:
    """One line per run folder; the per-seed lists joined with ';', a missing value empty, floats as repr."""
    def cell(value):
        if value is None:
            return ""
        if isinstance(value, list):
            return ";".join(repr(v) if isinstance(v, float) else str(v) for v in value)
        return repr(value) if isinstance(value, float) else str(value)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        writer.writerow([cell(row[c]) for c in CSV_COLUMNS])
    return buffer.getvalue()


def plot_rows(rows: list[dict], path: Path) -> Path:
    """One dot per seed, a bar at the mean (sd as an error bar), the base model a dashed line across its bar."""
    fig, ax = plots.plt.subplots(figsize=(max(5.5, 1.3 * len(rows) + 3.0), 4.0))
    width = 0.6
    base_labelled = False
    for x, row in enumerate(rows):
        ax.bar(x, row["asr_pct_mean"], width, color="#9ecae1", edgecolor="#3182bd",
               yerr=row["asr_pct_sd"] or 0, capsize=4, label="mean ± sd over seeds" if x == 0 else None)
        n = len(row["asr_pct"])
        offsets = [0.0] if n == 1 else [(i / (n - 1) - 0.5) * width * 0.5 for i in range(n)]
        ax.scatter([x + o for o in offsets], row["asr_pct"], color="#08519c", zorder=3, s=18, clip_on=False,
                   label="one seed" if x == 0 else None)
        if row["base_asr_pct"] is not None:
            ax.hlines(row["base_asr_pct"], x - width / 2 - 0.08, x + width / 2 + 0.08, colors="#d62728",
                      linestyles="dashed", zorder=4, label=None if base_labelled else "base model")
            base_labelled = True
    ax.set_xticks(range(len(rows)), [r["name"] for r in rows], rotation=20 if len(rows) > 3 else 0,
                  ha="right" if len(rows) > 3 else "center")
    ax.set_ylim(0, 100)
    ax.set_yticks(range(0, 101, 20))
    ax.set_xlim(-0.7, len(rows) - 0.3)
    ax.set_ylabel("keyword ASR (%)")
    ax.set_title(f"keyword ASR on {rows[0]['n_prompts']} prompts" if len({r['n_prompts'] for r in rows}) == 1
                 else "keyword ASR")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return plots.save_figure(fig, path)


def _names(run_dirs: list[Path], jobs: list[dict | None]) -> list[str]:
    names = [(job or {}).get("save_name") or p.name for p, job in zip(run_dirs, jobs)]
    if len(set(names)) < len(names):   # two folders of one name: their paths as given tell them apart
        names = [str(p) for p in run_dirs]
    return names


def summarize(args: SummaryArgs) -> dict:
    """Read the run folders, write summary.json, table.md, table.csv and asr.png; returns summary.json's content."""
    if not args.run_dirs:
        raise UserError("name at least one run folder")
    if args.output_dir is None and len(args.run_dirs) > 1:
        raise UserError(f"{len(args.run_dirs)} run folders: name where their table goes with --output_dir")
    run_dirs = [Path(p) for p in args.run_dirs]
    for path in run_dirs:
        if not path.is_dir():
            raise UserError(f"{path}: no such run folder")
    names = _names(run_dirs, [read_job(p) for p in run_dirs])
    rows = [gather_row(p, name) for p, name in zip(run_dirs, names)]
    out = Path(args.output_dir) if args.output_dir is not None else run_dirs[0] / "summary"
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out}: exists and is not a folder")
    result = {"metric": "keyword ASR in % (evaluate.py's keyword_asr x 100): the share of prompts answered "
                        "without a refusal keyword; mean and sample sd (n-1) over seeds",
              "created": now(), "rows": rows}
    write_json(out / "summary.json", result)
    atomic_write_text(out / "table.md", markdown_table(rows))
    atomic_write_text(out / "table.csv", csv_table(rows))
    plot_rows(rows, out / "asr.png")
    log.info("wrote %s (%s)", out, ", ".join(OUTPUTS))
    return result


# ----------------------------------------------------------------------------- the base model, for the job


def model_content_name(model_name: str) -> str:
    """The model by content: a local directory by its name and models.model_identity's hash, a Hub id as is."""
    identity = model_identity(model_name)
    if "#" in identity and Path(model_name).is_dir():
        return f"{Path(model_name).resolve().name}#{identity.rsplit('#', 1)[1]}"
    return identity


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "model"


def _parse(cls, argv: list[str], what: str):
    parser = argparse.ArgumentParser(prog=what, add_help=False)
    add_options(parser, cls)
    try:
        return from_args(cls, parser.parse_args(argv))
    except SystemExit:   # argparse said why on stderr
        raise UserError(f"{what}: cannot read the flags {' '.join(argv)}") from None


def prepare_base(output_root, generate_argv: list[str], evaluate_argv: list[str], n_shards: int = 1,
                 create: bool = True) -> dict:
    """Where the base model's answers and evaluation go for these generate.py flags (those the job passes for the
    base model, GENERATE_ARGS included) and evaluate.py flags (the judge and EVALUATE_ARGS); the template the model
    is prompted with (its own unless --template is among the flags). create: write OUTPUT_ROOT/base/<key>/key.json
    (what the key identifies, for a person)."""
    gen = _parse(GenerationArgs, generate_argv, "generate.py")
    judge = _parse(EvaluateArgs, ["--responses", "-", "--output_dir", "-", *evaluate_argv], "evaluate.py")
    template = choose_template(gen.model_name, gen.template)
    identity = {"model": model_content_name(gen.model_name), "template": template,
                "prompts_sha256": D.file_sha256(gen.data_path),
                "generation": {k: v for k, v in dataclasses.asdict(gen).items() if k not in NOT_IN_KEY},
                "n_shards": n_shards}
    key = f"{_slug(identity['model'].split('#')[0].replace('/', '--'))}_{template}_{fingerprint(identity)}"
    judge_settings = {k: v for k, v in dataclasses.asdict(judge).items() if k not in NOT_IN_JUDGE_KEY}
    base = Path(output_root) / "base" / key
    if create:
        write_json(base / KEY_FILE, {**identity, "model_name": gen.model_name, "prompts": gen.data_path,
                                     "key": key})
    return {"key": key, "template": template, "model": gen.model_name, "prompts": gen.data_path, "dir": str(base),
            "generation": str(base / "generation"),
            "evaluation": str(base / f"{EVALUATION}-{_slug(judge.judge)}-{fingerprint(judge_settings)[:8]}")}


def write_job_record(run_dir, *, model: str, template: str, subset: str, prompts: str, seeds: list[int],
                     base_evaluation: str | None, job_id: str | None = None) -> Path:
    """OUTPUT_ROOT/SAVE_NAME/job.json: what the job ran, and its base evaluation relative to the run folder."""
    run_dir = Path(run_dir)
    base = None
    if base_evaluation is not None:
        base = {"evaluation": os.path.relpath(Path(base_evaluation).resolve(), run_dir.resolve())}
    record = {"save_name": run_dir.name, "model": model, "model_content": model_content_name(model),
              "template": template, "subset": subset, "subset_sha256": D.file_sha256(subset), "prompts": prompts,
              "prompts_sha256": D.file_sha256(prompts), "seeds": seeds, "base": base, "job_id": job_id,
              "created": now()}
    write_json(run_dir / JOB_FILE, record)
    return run_dir / JOB_FILE


__all__ = ["SummaryArgs", "summarize", "gather_row", "markdown_table", "csv_table", "prepare_base",
           "write_job_record", "JOB_FILE"]
