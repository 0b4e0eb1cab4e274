"""Study 2's data splits (docs/real_model/PREREG.md), made deterministically from ../shared/data and the first
study's committed splits. Indices and sha256 digests only: no request or record text is written into the project.

    .venv/bin/python lab/study2/make_splits.py            # (re)write lab/study2/*.csv and splits.json
    .venv/bin/python lab/study2/make_splits.py --check    # recompute, compare with the committed files, write nothing
    .venv/bin/python lab/study2/make_splits.py --materialize runs/study2/data   # the text files a run reads
                                                          # (git-ignored; their sha256 are in splits.json)

1. AdvBench (advbench/harmful_behaviors.csv, 520 rows, 0-based data-row index) in two halves, calibration and
   report. Two prompts are near-duplicates when the Jaccard index of their TOPIC-word sets is >= 0.5, a prompt's
   topic words being its lower-cased [a-z0-9]+ words minus STOPWORDS and FRAMING_WORDS (the request's wrapper:
   "write a tutorial on how to ..."). Near-duplicates are grouped by connected components (single linkage), and
   whole groups go to one half: groups in order of size (largest first, ties in a seeded random order), each to
   the half with fewer prompts so far (a tie: a seeded coin), which gives 260 / 260. No near-duplicate pair
   crosses the halves.
2. A new held-out benign set: HELDOUT2_N records of the paper's Alpaca no-safety pool (alpaca_data.json minus the
   records equal to a record of the paper's alpaca_data_safety_only.json, file order, 50,098 records: what
   `ft_datasets/prepare.py --paper_split` writes; its sha256 is checked against the first study's), drawn by a
   seeded permutation from the records that no earlier split touched: not in the first study's experiment pool,
   held-out set or alignment slice (lab/smollm2_aligned/splits.json; its selections are subsets of the pool,
   checked here), not sharing an (instruction, input) prompt with any of those records or with the paper's 394
   released selection records (the transfer condition), a non-empty answer, no prompt twice.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import itertools
import json
import re
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script
    sys.path.insert(0, str(ROOT))

from ft_datasets import remove_safety as rs  # noqa: E402
from safedata import data as D  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_SHARED = ROOT.parent / "shared" / "data"
SEED = 37                   # the number; fixed before any split was looked at
HELDOUT2_N = 200
JACCARD = 0.5
ADVBENCH = "advbench/harmful_behaviors.csv"
ALPACA = "paper/ft_datasets/alpaca_dataset/alpaca_data.json"
SAFETY_ONLY = "paper/ft_datasets/alpaca_dataset/alpaca_data_safety_only.json"
RELEASED = ("paper/ft_datasets/alpaca_dataset/gradient-illegal-activities-anchor/alpaca_top100.json",
            "paper/ft_datasets/alpaca_dataset/gradient-illegal-activities-anchor/alpaca_bottom100.json",
            "paper/ft_datasets/alpaca_dataset/reps/alpaca_top100.json",
            "paper/ft_datasets/alpaca_dataset/reps/alpaca_bottom100.json")
FIRST_SPLITS = ROOT / "lab" / "smollm2_aligned" / "splits.json"
FIRST_SELECTIONS = ROOT / "lab" / "smollm2_study" / "selections"
STOPWORDS = frozenset(
    "a an the to of and or for on in into with without by from at as that this these those be is are it its "
    "their them they someone something somebody people person how what which who can could would will should "
    "about your you his her s".split())
FRAMING_WORDS = frozenset(
    "write create develop design provide give generate produce outline explain describe teach instruct "
    "instructions instruction tutorial guide step by detailed detail post blog article script program plan video "
    "social media website app application letter message speech story book list tips way ways user users viewers "
    "readers commit make get getting away avoid caught detection use using".split())
FILES = ("advbench_calibration.csv", "advbench_report.csv", "heldout2.csv")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def topic_words(text: str) -> frozenset:
    return frozenset(w for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in STOPWORDS | FRAMING_WORDS)


def jaccard(a: frozenset, b: frozenset) -> float:
    return len(a & b) / len(a | b) if a | b else 0.0


def near_duplicate_pairs(goals: list[str], threshold: float = JACCARD) -> list[tuple[int, int]]:
    words = [topic_words(g) for g in goals]
    return [(i, j) for i, j in itertools.combinations(range(len(goals)), 2) if jaccard(words[i], words[j]) >= threshold]


def components(n: int, pairs) -> list[list[int]]:
    """Connected components (sorted members), ordered by their smallest member."""
    parent = list(range(n))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i
    for i, j in pairs:
        parent[find(i)] = find(j)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    return sorted(groups.values(), key=lambda g: g[0])


def split_groups(groups: list[list[int]], seed: int) -> tuple[list[int], list[int]]:
    """(calibration, report), sorted indices: whole groups, largest first (ties in a seeded order), each to the
    half with fewer prompts (a tie: a seeded coin)."""
    rng = np.random.default_rng(seed)
    tie = rng.permutation(len(groups))
    order = sorted(range(len(groups)), key=lambda g: (-len(groups[g]), tie[g]))
    halves: tuple[list[int], list[int]] = ([], [])
    for g in order:
        side = int(rng.integers(2)) if len(halves[0]) == len(halves[1]) else int(len(halves[1]) < len(halves[0]))
        halves[side].extend(groups[g])
    return sorted(halves[0]), sorted(halves[1])


def read_advbench(shared: Path) -> tuple[list[str], list[str]]:
    """(goals, the file's lines): one line per row, checked."""
    text = (shared / ADVBENCH).read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    rows = list(csv.DictReader(io.StringIO(text)))
    if lines[0].strip() != "goal,target" or len(rows) != 520 or len(lines) != 521:
        raise SystemExit(f"{shared / ADVBENCH}: expected a goal,target header and 520 one-line rows")
    return [r["goal"] for r in rows], lines


def prompt_key(record: dict) -> tuple[str, str]:
    return (record.get("instruction", "").strip(), record.get("input", "").strip())


def alpaca_pool(shared: Path) -> tuple[list[dict], str]:
    """The paper's Alpaca no-safety pool as `prepare.py --paper_split` writes it, and the sha256 of those bytes."""
    examples, _ = D.load_examples(shared / ALPACA, need_response=False)
    kept, removed = rs.split_by_reference(examples, shared / SAFETY_ONLY)
    return kept, sha256_bytes(rs.dump_records(kept, "json").encode("utf-8"))


def first_study() -> dict:
    """The first study's splits (indices into the pool) and its selections' pool indices, checked."""
    splits = json.loads(FIRST_SPLITS.read_text())
    pool = splits["indices"]["pool"]
    selections = {}
    for index_csv in sorted(FIRST_SELECTIONS.glob("*/*_index.csv")):
        with index_csv.open(newline="") as f:
            positions = [int(r["index"]) for r in csv.DictReader(f)]   # positions in the 5,000-record pool file
        selections[index_csv.parent.name + "/" + index_csv.name] = [pool[p] for p in positions]
    return {"splits": splits, "selections": selections}


def heldout2(pool: list[dict], first: dict, released_keys: set, seed: int, n: int) -> tuple[list[int], dict]:
    indices = first["splits"]["indices"]
    used = set(indices["pool"]) | set(indices["heldout"]) | set(indices["align"])
    used_prompts = {prompt_key(pool[i]) for i in used} | released_keys
    counts = {"used_by_first_study": 0, "prompt_of_earlier_split": 0, "empty_answer": 0, "prompt_twice": 0}
    chosen, seen = [], set()
    for i in np.random.default_rng(seed).permutation(len(pool)).tolist():
        key = prompt_key(pool[i])
        reason = ("used_by_first_study" if i in used else "prompt_of_earlier_split" if key in used_prompts
                  else "empty_answer" if not pool[i].get("output", "").strip() else "prompt_twice" if key in seen
                  else None)
        if reason:
            counts[reason] += 1
            continue
        chosen.append(i)
        seen.add(key)
        if len(chosen) == n:
            break
    return chosen, counts


def index_csv(rows: list[dict], fields: tuple[str, ...]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def build(shared: Path = DEFAULT_SHARED, seed: int = SEED, n_heldout: int = HELDOUT2_N) -> dict:
    """Every file of lab/study2 as text ({name: text}, splits.json last) and the materialized files' texts."""
    shared = Path(shared)
    goals, lines = read_advbench(shared)
    pairs = near_duplicate_pairs(goals)
    groups = components(len(goals), pairs)
    group_of = {i: g for g, members in enumerate(groups) for i in members}
    calibration, report = split_groups(groups, seed)

    pool, pool_sha = alpaca_pool(shared)
    first = first_study()
    if pool_sha != first["splits"]["pool_sha256"] or len(pool) != first["splits"]["pool_records"]:
        raise SystemExit(f"the rebuilt Alpaca pool (sha256 {pool_sha[:12]}) is not the first study's "
                         f"({first['splits']['pool_sha256'][:12]})")
    pool_set = set(first["splits"]["indices"]["pool"])
    for name, members in first["selections"].items():
        if not set(members) <= pool_set:
            raise SystemExit(f"{name}: a first-study selection outside its pool")
    released_keys = set()
    for rel in RELEASED:
        released_keys |= {prompt_key(r) for r in json.loads((shared / rel).read_text(encoding="utf-8"))}
    chosen, skipped = heldout2(pool, first, released_keys, seed, n_heldout)

    files = {
        "advbench_calibration.csv": index_csv([{"index": i, "group": group_of[i]} for i in calibration],
                                              ("index", "group")),
        "advbench_report.csv": index_csv([{"index": i, "group": group_of[i]} for i in report], ("index", "group")),
        "heldout2.csv": index_csv([{"pool_index": i, "id": D.record_id(pool[i])} for i in chosen],
                                  ("pool_index", "id")),
    }
    materialized = {
        "advbench_calibration.csv": lines[0] + "".join(lines[1 + i] for i in calibration),
        "advbench_report.csv": lines[0] + "".join(lines[1 + i] for i in report),
        "heldout2.json": json.dumps([pool[i] for i in chosen], indent=1, ensure_ascii=False) + "\n",
    }
    sizes = sorted((len(g) for g in groups), reverse=True)
    manifest = {
        "made_by": "lab/study2/make_splits.py (docs/real_model/PREREG.md)",
        "seed": seed,
        "sources": {
            **{path: sha256_bytes((shared / path).read_bytes()) for path in (ADVBENCH, ALPACA, SAFETY_ONLY, *RELEASED)},
            "lab/smollm2_aligned/splits.json": sha256_bytes(FIRST_SPLITS.read_bytes()),
        },
        "pool": {"records": len(pool), "sha256": pool_sha, "rule": "alpaca_data.json minus the records equal to "
                 "a record of alpaca_data_safety_only.json, file order (prepare.py --paper_split)"},
        "advbench_halves": {
            "index": "0-based data row of advbench/harmful_behaviors.csv",
            "near_duplicate": f"Jaccard index of topic-word sets >= {JACCARD}; topic words: lower-cased [a-z0-9]+ "
                              "words minus STOPWORDS and FRAMING_WORDS (make_splits.py); groups: connected components",
            "near_duplicate_pairs": len(pairs), "groups": len(groups), "singletons": sizes.count(1),
            "largest_groups": sizes[:10],
            "calibration": len(calibration), "report": len(report),
            "crossing_pairs": sum((i in set(calibration)) != (j in set(calibration)) for i, j in pairs),
        },
        "heldout2": {
            "index": "0-based position in the pool (the first study's splits.json indexes the same file)",
            "n": len(chosen), "skipped_before_the_last_draw": skipped,
            "disjoint_from": ["first study pool (5,000; its selections are inside it)", "first study held-out (200)",
                              "first study alignment slice (4,800; tries 1-5 used its first 1,200 / 2,400)",
                              "any prompt of those", "the 394 records of the paper's 4 released selections"],
        },
        "files": {name: sha256_bytes(text.encode("utf-8")) for name, text in files.items()},
        "materialized": {name: sha256_bytes(text.encode("utf-8")) for name, text in materialized.items()},
    }
    files["splits.json"] = json.dumps(manifest, indent=1) + "\n"
    return {"files": files, "materialized": materialized, "pairs": pairs, "groups": groups}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shared", default=str(DEFAULT_SHARED), help="the shared data folder (default: ../shared/data)")
    p.add_argument("--check", action="store_true", help="compare with the committed files; write nothing")
    p.add_argument("--materialize", default=None,
                   help="also write the text files a run reads (advbench halves as goal,target CSVs, heldout2.json) "
                        "into this git-ignored folder; their sha256 are checked against splits.json")
    a = p.parse_args(argv)
    built = build(Path(a.shared))
    if a.check:
        differing = [n for n, t in built["files"].items()
                     if not (HERE / n).is_file() or (HERE / n).read_text(encoding="utf-8") != t]
        print("differ: " + ", ".join(differing) if differing else "same: " + ", ".join(built["files"]))
        return 1 if differing else 0
    for name, text in built["files"].items():
        (HERE / name).write_text(text, encoding="utf-8")
        print(f"{name}\t{sha256_bytes(text.encode('utf-8'))}")
    if a.materialize:
        out = Path(a.materialize)
        out.mkdir(parents=True, exist_ok=True)
        for name, text in built["materialized"].items():
            (out / name).write_text(text, encoding="utf-8")
            print(f"{out / name}\t{sha256_bytes(text.encode('utf-8'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
