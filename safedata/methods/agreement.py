"""How far a method's ranking of a pool agrees with a reference selection (e.g. the paper's released top/bottom-100).

Reference records are matched to the pool by content (data.record_id), never by index: the paper's released
indices refer to pools that differ from the rebuilt one by up to 2 records (../shared/data/README.md).

For a score vector over the pool, ranked as rank.py ranks (descending, ties by file index, non-finite last):
- overlap: |method's top-k ∩ reference top| (and ∩ reference bottom), k = the reference top's size;
- top1 / top10: how many of the reference top fall in the method's top 1% / 10% of the pool;
- pct_top / pct_bottom: the mean percentile of the reference top / bottom in the ranking
  (100 = ranked first, 0 = ranked last; a random ranking gives 50 on average);
- auc: the probability that a reference-top example outscores a reference-bottom one (ties count 1/2):
  1 = the method separates them as the reference did, 0.5 = chance.
"""
from __future__ import annotations

import json

import numpy as np

from .. import data as D
from ..errors import UserError
from ..ranking import check_pool_file
from ..scores import combine, default_weights, read_scores_csv
from ..store import atomic_write_text

METRICS = ("overlap_top", "overlap_bottom", "top1", "top10", "pct_top", "pct_bottom", "auc")


def match_records(pool_ids: list[str], reference_path) -> np.ndarray:
    """Pool positions of a reference file's records (the first pool record with the same content)."""
    first: dict[str, int] = {}
    for position, example_id in enumerate(pool_ids):
        first.setdefault(example_id, position)
    examples, _ = D.load_examples(reference_path, need_response=True, skip_bad=False)
    missing = [e for e in examples if e.id not in first]
    if missing:
        raise UserError(f"{reference_path}: record {missing[0].index} (id {missing[0].id}) is not in the pool "
                        f"({len(missing)} of {len(examples)} missing)")
    return np.array([first[e.id] for e in examples], dtype=np.int64)


def write_sample_pool(data_path, reference_paths, n_random: int, seed: int, output) -> dict:
    """A smaller pool for a method too slow for the whole one: every reference record plus n_random other pool
    records drawn uniformly without replacement (numpy default_rng(seed)), verbatim, in pool order (JSON).

    On it, AUC reference-top vs reference-bottom is exact (it reads only the reference records' scores), while
    percentiles and top-1%/10% counts are relative to the sample, and top-k overlaps are not comparable with
    the full pool's."""
    examples, _ = D.load_examples(data_path, need_response=True, skip_bad=True)
    ids = [e.id for e in examples]
    keep = set()
    for path in reference_paths:
        keep.update(match_records(ids, path).tolist())
    others = np.array(sorted(set(range(len(examples))) - keep))
    if not 0 <= n_random <= len(others):
        raise UserError(f"--sample_size {n_random}: the pool has {len(others)} records besides the references")
    keep.update(np.random.default_rng(seed).choice(others, n_random, replace=False).tolist())
    records = [examples[i].record for i in sorted(keep)]
    atomic_write_text(output, json.dumps(records, indent=4, ensure_ascii=False) + "\n")
    return {"output": str(output), "n": len(records), "n_reference": len(records) - n_random, "seed": seed}


def ranks(scores: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """0-based rank of every pool position in rank.py's order (non-finite scores after all finite ones)."""
    key = np.where(np.isfinite(scores), -scores.astype(np.float64), np.inf)
    order = np.lexsort((indices, key))
    out = np.empty(len(scores), dtype=np.int64)
    out[order] = np.arange(len(scores))
    return out


def auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(positive > negative) + P(tie) / 2 over all pairs (Mann-Whitney U / (n_pos n_neg))."""
    positive, negative = positive[:, None].astype(np.float64), negative[None, :].astype(np.float64)
    return float(((positive > negative).sum() + 0.5 * (positive == negative).sum()) / (positive.size * negative.size))


def agreement(scores: np.ndarray, indices: np.ndarray, top: np.ndarray, bottom: np.ndarray) -> dict:
    """The metrics above for one score vector against one reference (pool positions of its top and bottom)."""
    n = len(scores)
    rank_of = ranks(scores, indices)
    k = len(top)
    mine = set(np.flatnonzero(rank_of < k).tolist())
    percentile = 100.0 * (1 - rank_of / max(1, n - 1))
    finite = np.where(np.isfinite(scores), scores.astype(np.float64), -np.inf)
    return {
        "overlap_top": len(mine & set(top.tolist())),
        "overlap_bottom": len(mine & set(bottom.tolist())),
        "top1": int((rank_of[top] < 0.01 * n).sum()),
        "top10": int((rank_of[top] < 0.10 * n).sum()),
        "pct_top": float(percentile[top].mean()),
        "pct_bottom": float(percentile[bottom].mean()),
        "auc": auc(finite[top], finite[bottom]),
    }


def parse_method(spec: str) -> tuple[str, str, list[float] | None]:
    """'NAME=SCORE_DIR' or 'NAME=SCORE_DIR:w1,w2,...' -> (name, dir, weights)."""
    name, sep, rest = spec.partition("=")
    if not sep or not name or not rest:
        raise UserError(f"--method {spec!r}: expected NAME=SCORE_DIR[:w1,w2,...]")
    directory, _, weights = rest.partition(":")
    try:
        return name, directory, [float(w) for w in weights.split(",")] if weights else None
    except ValueError:
        raise UserError(f"--method {spec!r}: weights must be numbers") from None


def parse_reference(spec: str) -> tuple[str, str, str]:
    """'NAME=TOP_FILE,BOTTOM_FILE' -> (name, top, bottom)."""
    name, sep, rest = spec.partition("=")
    files = rest.split(",")
    if not sep or not name or len(files) != 2:
        raise UserError(f"--reference {spec!r}: expected NAME=TOP_FILE,BOTTOM_FILE")
    return name, files[0], files[1]


def compare(data_path, methods: list[str], references: list[str]) -> list[dict]:
    """One row per (method, reference): the agreement metrics, plus the method's cost from its score dir."""
    rows, positions = [], {}
    for spec in methods:
        name, directory, weights = parse_method(spec)
        meta, indices, ids, columns = read_scores_csv(directory)
        check_pool_file(meta, data_path, f"scores {directory}")
        weights = weights or default_weights(len(columns))
        scores = combine(columns, weights)
        for reference in references:
            ref_name, top_path, bottom_path = parse_reference(reference)
            key = (ref_name, tuple(ids[:1]), len(ids))
            if key not in positions:
                positions[key] = (match_records(ids, top_path), match_records(ids, bottom_path))
            top, bottom = positions[key]
            rows.append({"method": name, "reference": ref_name, "n_pool": len(ids), "weights": weights,
                         "scores": str(directory), "cost": meta.get("cost"), **agreement(scores, indices, top, bottom)})
    return rows
