"""Results kept in git (lab_real.py keep, kept).

runs/ does not survive from one session to the next, and each fine-tune + evaluation of the study costs about
half an hour of the 2 cores. keep_run writes an evaluated run's numbers and per-prompt refused flags (no text)
into KEPT_DIR, which is committed, with the identity of what made them: the study's settings
(lab.real.settings.StudySettings, stored as the KEY=VALUE strings the script gave) and the sha256 of the subset
it was fine-tuned on. scripts/lab_real.sh skips a run whose kept result has the same identity, and the report
reads kept results for the runs that runs/ no longer holds.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lab.real.runs import EVAL_SETS, evaluated_run, refused_flags
from lab.real.settings import StudySettings
from safedata import data as D
from safedata.config import option, shared
from safedata.errors import UserError
from safedata.store import read_json, write_json

Seed = int | str     # a fine-tune's seed; "" for the aligned model (evaluated, not fine-tuned)


def run_seed(text: str) -> Seed:
    """--seed's value: a whole number, or empty for the aligned model."""
    if not text:
        return ""
    try:
        return int(text)
    except ValueError:
        raise UserError(f"--seed {text}: not a whole number (empty for the aligned model)") from None


@dataclass(kw_only=True)
class KeptArgs:
    """lab_real.py kept: which run, and what it must have been made with."""

    kept: str = option(help="the kept results' directory (committed)")
    condition: str = option(help="the run's condition (subset name)")
    seed: str = option("", "empty for the aligned model")
    settings: str = option(help="the study's settings as KEY=VALUE words")
    subset: str | None = option(None, "the subset the run was fine-tuned on (its sha256 is kept)")


@dataclass(kw_only=True)
class KeepArgs:
    """lab_real.py keep: the evaluated run, its wall seconds, and what kept names (KeptArgs)."""

    run: str = option(help="the evaluated run's directory")
    wall_tsv: str | None = option(None, "scripts/lab_real.sh's wall.tsv: the run's fine-tune and evaluation seconds "
                                        "are kept")
    kept: str = shared(KeptArgs, "kept")
    condition: str = shared(KeptArgs, "condition")
    seed: str = shared(KeptArgs, "seed")
    settings: str = shared(KeptArgs, "settings")
    subset: str | None = shared(KeptArgs, "subset")


def kept_path(kept_dir: str | Path, condition: str, seed: Seed) -> Path:
    """KEPT_DIR/CONDITION_seedN.json, or KEPT_DIR/aligned.json for the aligned model."""
    return Path(kept_dir) / (f"{condition}.json" if seed == "" else f"{condition}_seed{seed}.json")


def identity(settings: StudySettings, subset: str | Path | None) -> dict:
    """What a kept result was made with, as its record stores it: the settings' identity and the subset's sha256."""
    return {"settings": settings.identity(), "subset_sha256": D.file_sha256(subset) if subset else None}


def stage_seconds(wall_tsv: str | Path) -> dict[str, int]:
    """Wall seconds per stage name from scripts/lab_real.sh's wall.tsv ("name<TAB>seconds" lines), summed: a stage
    stopped and resumed has a line per attempt (and a stage re-entered and found done, a line of a few seconds)."""
    wall: dict[str, int] = {}
    if Path(wall_tsv).is_file():
        for number, line in enumerate(Path(wall_tsv).read_text().splitlines(), 1):
            name, tab, seconds = line.partition("\t")
            if not tab or not seconds.strip().isdigit():
                raise UserError(f"{wall_tsv}, line {number}: not 'stage<TAB>seconds': {line!r}")
            wall[name] = wall.get(name, 0) + int(seconds)
    return wall


def run_stage_names(condition: str, seed: Seed) -> list[str]:
    """The wall.tsv stage names of one run of the study (scripts/lab_real.sh names them so)."""
    if condition == "aligned":
        return ["evaluate_aligned"]
    return [f"finetune_{condition}_{seed}", f"evaluate_{condition}_{seed}"]


def keep_run(run: str | Path, kept_dir: str | Path, condition: str, seed: Seed, settings: StudySettings,
             subset: str | Path | None = None, wall_tsv: str | Path | None = None) -> Path:
    """KEPT_DIR/CONDITION_seedN.json (aligned.json): the run's per-seed row, its per-prompt refused flags per set
    (a string of 0/1, prompt i at position i), the identity (settings, subset sha256) it was made with, and, from
    WALL_TSV, the wall seconds of its fine-tune and evaluation (so the report can state them when runs/ is gone;
    not part of the identity)."""
    row = evaluated_run(Path(run))
    refused = {}
    for set_name in EVAL_SETS:
        pairs = refused_flags(Path(run), set_name)
        if [index for index, _ in pairs] != list(range(len(pairs))):
            raise UserError(f"{run}/{set_name}_eval/results.jsonl: prompt indices are not 0..{len(pairs) - 1} in "
                            "order (an incomplete evaluation?): not kept")
        refused[set_name] = "".join(str(flag) for _, flag in pairs)
    path = kept_path(kept_dir, condition, seed)
    record = {"condition": condition, "seed": seed, "identity": identity(settings, subset), "row": row,
              "refused": refused}
    if wall_tsv is not None:
        wall = stage_seconds(Path(wall_tsv))
        record["wall_s"] = {name: wall[name] for name in run_stage_names(condition, seed) if name in wall}
    write_json(path, record)
    return path


def kept_run(kept_dir: str | Path, condition: str, seed: Seed, settings: StudySettings,
             subset: str | Path | None = None) -> dict | None:
    """The kept result of (condition, seed) if it was made with these settings and this subset, else None."""
    path = kept_path(kept_dir, condition, seed)
    if not path.is_file():
        return None
    record = read_json(path)
    return record if record.get("identity") == identity(settings, subset) else None


def kept_records(kept_dir: str | Path, settings: StudySettings | None) -> list[dict]:
    """Every kept result in KEPT_DIR; one made with other settings stops the report (results are never mixed). The
    report's `seeds` setting (which seeds the study lists) is not part of a run's identity; no settings: only
    records kept with none match."""
    want = settings.identity() if settings else {}
    records = []
    for path in sorted(Path(kept_dir).glob("*.json")):
        record = read_json(path)
        if record.get("identity", {}).get("settings") != want:
            raise UserError(f"{path}: kept with settings {record.get('identity', {}).get('settings')}, the report's "
                            f"are {want}: move it away or report with its settings")
        records.append(record)
    return records
