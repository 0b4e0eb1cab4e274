"""Study 2's anchor diagnosis (docs/real_model/PREREG.md, "Anchor diagnosis (Q5; descriptive, selects nothing)").

Pool positions 0-299 of the first study's 5,000-record pool, scored against the same three anchor files as the
first study (harmful, safe1, safe2; score = harmful - safe1 - safe2), four ways:

    a  the committed per-target columns (lab/smollm2_study/grad_pool/scores.csv) restricted to the slice
    b  the anchor targets built with the original code's running-sum averaging (get_gradients.py
       --anchor_combination running_sum: PREREG's "--original_quirks on the anchor targets", whose other half, the
       paper template's supervised trailing space, does not apply to the chat template), the pool as in a
    c  the safe1 and safe2 anchors' answers replaced by the aligned model's own greedy answers (64 new tokens)
    d  --params linear, targets and pool alike (get_gradients refuses a pool and targets of different --params)

Every computed variant runs the first study's commands (scripts/lab_real.sh, stage `scores`) with its one change.
(c): safe1 and safe2 share their prompts, so their answered files are the same and -safe1 and -safe2 are one term
twice; kept as the pre-registration says (the result notes it).

Kept (lab/study2/results/diagnosis.json, committed): per variant its identity (the slice's, the anchor files' and
the model's sha256, the commands' flags), the sha256 of the files it used and made, and the numbers. No text: the
slice, the answered anchors and the score dirs stay under runs/study2/diagnosis (git-ignored). Run by
`python -m lab.study2.run diagnosis` (the study's budget may cut b-d); `python -m lab.study2.run report` shows the
table.
"""
from __future__ import annotations

import copy
import math
import os
import sys
from pathlib import Path

import numpy as np
from scipy import stats as st

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lab.study2 import make_splits as MS  # noqa: E402
from safedata import data as D  # noqa: E402
from safedata.analysis import words  # noqa: E402
from safedata.errors import UserError  # noqa: E402
from safedata.models import model_content_id  # noqa: E402
from safedata.scores import SCORES_FILE, combine, read_scores_file  # noqa: E402
from safedata.store import read_json, write_json  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULT = HERE / "results" / "diagnosis.json"
WORK = ROOT / "runs" / "study2"
POOL = WORK / "data" / "pool.json"
OUT = WORK / "diagnosis"
MODEL = ROOT / "models" / "smollm2-135m-aligned"
COMMITTED_SCORES = ROOT / "lab" / "smollm2_study" / "grad_pool" / SCORES_FILE
ANCHOR_DIR = MS.DEFAULT_SHARED / "paper" / "ft_datasets" / "pure_bad_dataset"
ANCHORS = {"harmful": ANCHOR_DIR / "pure-bad-illegal-activities-selected10.jsonl",
           "safe1": ANCHOR_DIR / "pure-bad-illegal-acticities-selected-10-anchor1.jsonl",   # (sic) the paper's name
           "safe2": ANCHOR_DIR / "pure-bad-illegal-activities-selected-10-anchor2.jsonl"}
SAFE = ("safe1", "safe2")
PYTHON = sys.executable
SLICE_N = 300
TOP_K = 30
VARIANTS = ("a", "b", "c", "d")
WEIGHTS = {"harmful": 1.0, "safe1": -1.0, "safe2": -1.0}
TERMS = ("harmful", "-safe1", "-safe2", "score")

# The first study's gradient scoring (scripts/lab_real.sh, stage `scores`, with its defaults ANCHOR_MAX_LENGTH,
# ANCHOR_MLEN, POOL_MAX_LENGTH, SCORE_BATCH and SCORE_FLAGS).
TARGET_FLAGS = ["--template", "chat", "--max_length", "480", "--max_response_length", "10", "--batch_size", "8",
                "--device", "cpu", "--dtype", "fp32"]
POOL_FLAGS = ["--template", "chat", "--max_length", "512", "--batch_size", "8", "--device", "cpu",
              "--dtype", "fp32"]
# PREREG's answers (lab/study2/run.py GEN_FLAGS: greedy, 64 new tokens, batch 64, fp32 on the CPU)
GEN_FLAGS = ["--template", "chat", "--max_new_tokens", "64", "--batch_size", "64", "--device", "cpu",
             "--dtype", "fp32"]
CHANGE = {"a": "none: the committed columns", "b": "--anchor_combination running_sum on the targets",
          "c": "safe1/safe2 answers: the aligned model's greedy answers", "d": "--params linear"}


# ----------------------------------------------------------------------------- the slice

def first_pool_sha256() -> str:
    return read_json(MS.FIRST_SPLITS)["files"]["pool.json"]


def pool_records(pool: Path = POOL, expected_sha256: str | None = "first study") -> list[dict]:
    """The records of a pool file (by default the first study's 5,000-record pool, which run.py's data stage
    writes), its sha256 checked unless expected_sha256 is None."""
    pool = Path(pool)
    if not pool.is_file():
        raise UserError(f"{pool}: missing (run: .venv/bin/python -m lab.study2.run data)")
    expected = first_pool_sha256() if expected_sha256 == "first study" else expected_sha256
    if expected is not None and D.file_sha256(pool) != expected:
        raise UserError(f"{pool}: sha256 is not the first study's pool.json ({expected[:12]})")
    return [record for _, record in D.read_raw_records(pool)]


def write_slice(records: list[dict], n: int = SLICE_N, out_dir: Path = OUT) -> Path:
    """Pool positions 0..n-1 as a JSON array (a record's index in the slice is its pool position)."""
    if len(records) < n:
        raise UserError(f"the pool has {len(records)} records, fewer than the slice's {n}")
    return D.write_records(records[:n], Path(out_dir) / f"slice_{n}.json")


def scored_rows(scores_csv: Path, records: list[dict], n: int | None = None) -> tuple[dict, list[int]]:
    """The per-target columns of a scores.csv at pool positions below n (all when None), with each row's answer
    words; each row's id is checked against the pool record at its position."""
    indices, ids, columns = read_scores_file(scores_csv)
    keep = np.flatnonzero(indices < (len(records) if n is None else n))
    for row in keep:
        if indices[row] >= len(records) or ids[row] != D.record_id(records[indices[row]]):
            raise UserError(f"{scores_csv}: row {row} (index {indices[row]}, id {ids[row]}) is not the pool's record")
    missing = set(WEIGHTS) - set(columns)
    if missing:
        raise UserError(f"{scores_csv}: no column {', '.join(sorted(missing))}")
    return ({name: columns[name][keep] for name in WEIGHTS},
            [words(records[indices[row]].get("output")) for row in keep])


# ----------------------------------------------------------------------------- the analysis

def analyse(columns: dict, answer_words, top_k: int = TOP_K) -> dict:
    """Per term (harmful, -safe1, -safe2 and score = harmful - safe1 - safe2): var(term)/var(score),
    cov(term, score)/var(score) (the three terms' shares sum to 1), Spearman with log(1 + answer words), and the median answer
    words (and one-word count) of the top_k records by the signed term (ties: the earlier position first).
    columns: {harmful, safe1, safe2} -> values aligned with answer_words."""
    answer_words = np.asarray(answer_words, dtype=float)
    term_values = {"harmful": np.asarray(columns["harmful"], dtype=float),
                   "-safe1": -np.asarray(columns["safe1"], dtype=float),
                   "-safe2": -np.asarray(columns["safe2"], dtype=float)}
    score = combine({name: np.asarray(columns[name], dtype=float) for name in WEIGHTS}, list(WEIGHTS.values()))
    term_values["score"] = score
    if len(score) != len(answer_words) or len(score) < top_k:
        raise ValueError(f"{len(score)} scores, {len(answer_words)} answer-word counts, top {top_k}")
    score_var = float(np.var(score))       # ddof 0 throughout: the shares are ratios of the same kind
    log_words = np.log1p(answer_words)
    terms = {}
    for name, values in term_values.items():
        top = np.argsort(-values, kind="stable")[:top_k]
        rho = st.spearmanr(values, log_words).statistic
        terms[name] = {"variance_share": float(np.var(values)) / score_var,
                       "covariance_share": float(np.cov(values, score, ddof=0)[0, 1]) / score_var,
                       "spearman_log1p_words": None if math.isnan(rho) else float(rho),
                       "top_median_words": float(np.median(answer_words[top])),
                       "top_one_word": int((answer_words[top] == 1).sum())}
    return {"n": len(score), "top_k": top_k, "pool_median_words": float(np.median(answer_words)), "terms": terms}


def table(diagnosis: dict) -> str:
    """A markdown table, one row per variant and term."""
    k = diagnosis["top_k"]
    lines = [f"| variant | term | variance share | covariance share | Spearman with log(1 + words) | top-{k} median "
             f"words | top-{k} one-word |", "|---|---|---|---|---|---|---|"]
    for variant, kept in diagnosis["variants"].items():
        for term, t in kept["analysis"]["terms"].items():
            rho = "n/a" if t["spearman_log1p_words"] is None else f"{t['spearman_log1p_words']:+.3f}"
            lines.append(f"| {variant} | {term} | {t['variance_share']:.3f} | {t['covariance_share']:+.3f} | {rho} | "
                         f"{t['top_median_words']:g} | {t['top_one_word']} |")
    medians = sorted({v["analysis"]["pool_median_words"] for v in diagnosis["variants"].values()})
    lines.append(f"\nslice: {diagnosis['slice']['n']} records, median answer words "
                 f"{', '.join(f'{m:g}' for m in medians)}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the computed variants

def variant_commands(variant: str, *, model: Path = MODEL, slice_path: Path, anchors: dict = ANCHORS,
                     out_dir: Path = OUT) -> dict:
    """The variant's commands: {"answers": {safe name: generate.py} (c only), "targets": {name: command},
    "pool": command}, in order; out_dir/variant holds their outputs."""
    if variant not in VARIANTS[1:]:
        raise ValueError(f"variant {variant!r}: computed variants are {', '.join(VARIANTS[1:])}")
    root = Path(out_dir) / variant
    extra = ["--params", "linear"] if variant == "d" else []
    answers, target_data = {}, dict(anchors)
    if variant == "c":
        for name in SAFE:
            answers[name] = [PYTHON, "generate.py", "--model_name", model, "--data_path", anchors[name],
                             "--output_dir", root / "answers" / name, *GEN_FLAGS]
            target_data[name] = answered_path(out_dir, name)
    running_sum = ["--anchor_combination", "running_sum"] if variant == "b" else []
    targets = {name: [PYTHON, "get_gradients.py", "--anchor", "--model_name", model, "--data_path", target_data[name],
                      "--output_dir", root / "targets" / name, *TARGET_FLAGS, *running_sum, *extra]
               for name in WEIGHTS}
    pool = [PYTHON, "get_gradients.py", "--model_name", model, "--data_path", slice_path, "--output_dir",
            root / "pool", "--targets", *(root / "targets" / name for name in WEIGHTS), "--target_names",
            *WEIGHTS, *POOL_FLAGS, *extra]
    return {"answers": answers, "targets": targets, "pool": pool}


def answered_path(out_dir: Path, name: str) -> Path:
    return Path(out_dir) / "c" / "anchors" / f"{name}.jsonl"


def answered_anchors(anchor_file: Path, responses: Path, out: Path) -> Path:
    """The anchor file with each record's assistant answer replaced by the response to its prompt (generate.py's
    responses.jsonl, file order); every other field kept."""
    records = [record for _, record in D.read_jsonl(anchor_file)]
    answers = [row for _, row in D.read_jsonl(responses)]
    if len(answers) != len(records):
        raise UserError(f"{responses}: {len(answers)} responses for the {len(records)} records of {anchor_file}")
    answered = []
    for position, (record, answer) in enumerate(zip(records, answers)):
        messages = record.get("messages") if isinstance(record, dict) else None
        roles = [m.get("role") for m in messages] if isinstance(messages, list) else []
        if roles != ["user", "assistant"]:
            raise UserError(f"{anchor_file}:{position + 1}: expected one user and one assistant message")
        if answer.get("index") != position or answer.get("prompt") != messages[0]["content"]:
            raise UserError(f"{responses}: response {position} does not answer {anchor_file}'s record {position + 1}")
        record = copy.deepcopy(record)
        record["messages"][1]["content"] = answer["response"]
        answered.append(record)
    return D.write_records(answered, out)


def file_digests(paths: dict) -> dict:
    return {name: D.file_sha256(Path(p)) for name, p in paths.items()}


def _flags(command: list) -> list[str]:
    """A command as kept: the interpreter left out, paths relative to the checkout (the shared data as ../shared)."""
    return [os.path.relpath(part.resolve(), ROOT) if isinstance(part, Path) else str(part) for part in command[1:]]


def variant_identity(variant: str, commands: dict, *, model: Path, slice_path: Path, anchors: dict) -> dict:
    """What a variant's numbers depend on: the slice, the three anchor files, the model (content) and the flags."""
    return {"variant": variant, "slice_sha256": D.file_sha256(Path(slice_path)),
            "anchors_sha256": file_digests(anchors), "model": model_content_id(Path(model)),
            "commands": {"answers": {n: _flags(c) for n, c in commands["answers"].items()},
                         "targets": {n: _flags(c) for n, c in commands["targets"].items()},
                         "pool": _flags(commands["pool"])}}


def _compute(commands: dict, sh, anchors: dict, out_dir: Path) -> None:
    for name, command in commands["answers"].items():
        sh(command)
        answered_anchors(anchors[name], Path(command[command.index("--output_dir") + 1]) / "responses.jsonl",
                         answered_path(out_dir, name))
    for command in commands["targets"].values():
        sh(command)
    sh(commands["pool"])


def run_variant(variant: str, sh, timed=None, *, model: Path = MODEL, slice_path: Path, anchors: dict = ANCHORS,
                out_dir: Path = OUT) -> Path:
    """Run a computed variant (b, c or d) through sh(command) and return its scores.csv. A finished variant (its
    done.json holding the same identity) is not run again; a stopped one resumes (the CLIs keep finished work).
    timed(name, fn, *args), if given, wraps the work (lab/study2/run.py's Wall.timed)."""
    commands = variant_commands(variant, model=model, slice_path=slice_path, anchors=anchors, out_dir=out_dir)
    identity = variant_identity(variant, commands, model=model, slice_path=slice_path, anchors=anchors)
    done = Path(out_dir) / variant / "done.json"
    scores = Path(out_dir) / variant / "pool" / SCORES_FILE
    if scores.is_file() and done.is_file() and read_json(done) == identity:
        return scores
    (timed or (lambda name, fn, *args: fn(*args)))(f"diagnosis_{variant}", _compute, commands, sh, anchors, out_dir)
    write_json(done, identity)
    return scores


# ----------------------------------------------------------------------------- the stage

def diagnosis_stage(sh, timed=None, variants=VARIANTS, *, seconds=None, model: Path = MODEL, pool: Path = POOL,
                    anchors: dict = ANCHORS, out_dir: Path = OUT, result: Path = RESULT,
                    committed_scores: Path = COMMITTED_SCORES, slice_n: int = SLICE_N, top_k: int = TOP_K,
                    pool_sha256: str | None = "first study") -> dict:
    """PREREG's diagnosis on pool positions 0..slice_n-1: each variant asked for (a: no compute) analysed and kept
    in `result`; a variant kept there with the same identity is not run again (the others kept for this slice are
    left as they are). seconds(name), if given, records the wall seconds of diagnosis_<variant> (run.py's
    Wall.seconds)."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"variants {unknown}: choose from {', '.join(VARIANTS)}")
    records = pool_records(pool, pool_sha256)
    slice_path = write_slice(records, slice_n, out_dir)
    slice_records = records[:slice_n]
    slice_sha256 = D.file_sha256(slice_path)
    kept = read_json(result) if Path(result).is_file() else {}
    if kept.get("top_k") != top_k:
        kept = {}
    diagnosis = {"prereg": "docs/real_model/PREREG.md, Anchor diagnosis (Q5)", "top_k": top_k,
                 "slice": {"n": slice_n, "positions": [0, slice_n - 1], "sha256": slice_sha256,
                           "pool_sha256": D.file_sha256(Path(pool))},
                 "variants": {v: e for v, e in kept.get("variants", {}).items()
                              if e["identity"]["slice_sha256"] == slice_sha256}}
    for variant in variants:
        if variant == "a":
            identity = {"variant": "a", "slice_sha256": slice_sha256,
                        "scores_sha256": D.file_sha256(Path(committed_scores))}
        else:
            commands = variant_commands(variant, model=model, slice_path=slice_path, anchors=anchors, out_dir=out_dir)
            identity = variant_identity(variant, commands, model=model, slice_path=slice_path, anchors=anchors)
        if diagnosis["variants"].get(variant, {}).get("identity") == identity:
            continue
        entry = {"change": CHANGE[variant], "identity": identity}
        if variant == "a":
            scores = Path(committed_scores)
        else:
            scores = run_variant(variant, sh, timed, model=model, slice_path=slice_path, anchors=anchors,
                                 out_dir=out_dir)
            entry["scores_sha256"] = D.file_sha256(scores)
            if seconds is not None:
                entry["wall_s"] = seconds(f"diagnosis_{variant}")
        if variant == "c":
            used = {name: answered_path(out_dir, name) for name in SAFE}
            entry["answered_anchors_sha256"] = file_digests(used)
            if len(set(entry["answered_anchors_sha256"].values())) == 1:
                entry["note"] = "safe1 and safe2 share their prompts: the answered files are identical"
        columns, answer_words = scored_rows(scores, slice_records, slice_n)
        entry["analysis"] = analyse(columns, answer_words, top_k)
        diagnosis["variants"][variant] = entry
        diagnosis["variants"] = {v: diagnosis["variants"][v] for v in VARIANTS if v in diagnosis["variants"]}
        write_json(result, diagnosis)      # after each variant: a stopped stage keeps what it finished
    write_json(result, diagnosis)
    return diagnosis
