"""Score dirs and the arithmetic on their columns, for every method: scores.csv written and read, column names,
the default bi-directional weights, the weighted total and the top-N mean of similarities to an anchor set.

A score dir holds `scores.csv` (header `index,id,<one column per score source>`, file order, every float as
repr writes it, so a reader gets the writer's exact value) and `meta.json` (the pool's sha256, the method and its
flags), what rank.py --scores and audit.py --scores read.
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np
import torch

from .errors import UserError
from .store import META, atomic_write_text, read_json

SCORES_FILE = "scores.csv"
RESERVED_COLUMNS = ("index", "id")
BLOCK_BYTES = 32 << 20  # pool rows read per step: memory stays O(32 MB + N) whatever the pool size


def unique_names(names) -> list[str]:
    """Column names from source names (anchor file stems, feature or target dir names): a name already taken, or
    one of the CSV's own columns, gets its position appended."""
    out: list[str] = []
    for name in names:
        out.append(name if name not in out and name not in RESERVED_COLUMNS else f"{name}_{len(out)}")
    return out


def default_weights(n_columns: int) -> list[float]:
    """Bi-directional anchoring: +1 for the first (harmful) column, -1 for each safe counterpart."""
    return [1.0] + [-1.0] * (n_columns - 1)


def scores_csv_text(indices, ids, columns: dict, rows=None) -> str:
    """scores.csv's text: index, id, one column per score source (repr floats); `rows`: the positions written
    (default all)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["index", "id", *columns])
    for row in range(len(ids)) if rows is None else rows:
        writer.writerow([indices[row], ids[row], *(repr(float(values[row])) for values in columns.values())])
    return buffer.getvalue()


def write_scores_csv(output_dir, indices, ids, columns: dict, rows=None) -> Path:
    """OUTPUT_DIR/scores.csv (scores_csv_text), atomically."""
    for name, values in columns.items():
        if len(values) != len(ids):
            raise ValueError(f"column {name}: {len(values)} values for {len(ids)} examples")
    path = Path(output_dir) / SCORES_FILE
    atomic_write_text(path, scores_csv_text(indices, ids, columns, rows))
    return path


def read_scores_csv(directory) -> tuple[dict, np.ndarray, list[str], dict[str, np.ndarray]]:
    """(meta, indices, ids, columns) of a score dir (any method's)."""
    directory = Path(directory)
    meta = read_json(directory / META)
    path = directory / SCORES_FILE
    if not path.exists():
        raise UserError(f"{path}: missing (did every shard finish?)")
    return (meta, *read_scores_file(path))


def read_scores_file(path) -> tuple[np.ndarray, list[str], dict[str, np.ndarray]]:
    """(indices, ids, columns) of one scores.csv, also one kept without its score dir's meta.json."""
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        fields = reader.fieldnames or []
        if fields[:2] != ["index", "id"] or len(fields) < 3:
            raise UserError(f"{path}:1: expected header index,id,<target...>, found {','.join(fields)}")
        names = fields[2:]
        indices, ids, cols = [], [], {n: [] for n in names}
        for row in reader:
            try:
                indices.append(int(row["index"]))
                ids.append(row["id"])
                for n in names:
                    cols[n].append(float(row[n]) if row[n] not in ("", None) else math.nan)
            except (TypeError, ValueError):
                raise UserError(f"{path}:{reader.line_num}: malformed score row") from None
    # fp64, as scores.csv holds them: the index CSV and the order keep every digit the scoring stage wrote
    return np.array(indices, dtype=np.int64), ids, {n: np.array(v, dtype=np.float64) for n, v in cols.items()}


def combine(columns: dict[str, np.ndarray], weights: list[float]) -> np.ndarray:
    """The weighted total of the columns, in fp64."""
    if len(weights) != len(columns):
        raise UserError(f"--weights: {len(weights)} weight(s) for {len(columns)} score source(s) "
                        f"({', '.join(columns)})")
    total = np.zeros(len(next(iter(columns.values()))), dtype=np.float64)
    for weight, values in zip(weights, columns.values()):
        total += weight * values.astype(np.float64)
    return total


def parse_avg_n(avg_n) -> str:
    """'all' or a positive integer (as text); checked before any feature is read."""
    text = str(avg_n).strip()
    if text == "all" or (text.isdigit() and int(text) >= 1):
        return text
    raise UserError(f"--avg_n {avg_n!r}: expected a positive integer (1 = max cosine, the paper) or 'all'")


def top_n_count(avg_n, n_anchors: int) -> int:
    """How many of the highest similarities --avg_n averages: 'all' or 1..n_anchors."""
    n_top = n_anchors if str(avg_n) == "all" else int(avg_n)
    if not 1 <= n_top <= n_anchors:
        raise UserError(f"--avg_n {avg_n}: must be 'all' or between 1 and the anchor set size {n_anchors}")
    return n_top


def top_n_mean(similarities: np.ndarray, avg_n="1") -> np.ndarray:
    """Per pool row (pool x anchors): the mean of its top-avg_n similarities; 1 = max, 'all' = mean."""
    m = similarities.shape[1]
    top = np.sort(similarities, axis=1)[:, m - top_n_count(avg_n, m):]
    return top.mean(axis=1)


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True)


def anchor_scores(pool, anchors: torch.Tensor, avg_n="1", block=None) -> torch.Tensor:
    """Per pool row: the mean of its top-avg_n cosine similarities to the anchors (fp32).

    avg_n=1 is the maximum (the paper's default); 'all' the mean over the whole set, which for
    unit anchors equals the cosine-scaled dot with the mean anchor. `pool` is a tensor or a
    FeatureSet; either way it is read in row blocks, so memory is O(block x d + N).
    """
    anchors_unit = _normalize(anchors.float())
    m = anchors_unit.shape[0]
    n_top = top_n_count(avg_n, m)
    block = block or max(1, BLOCK_BYTES // (4 * anchors.shape[1]))
    if hasattr(pool, "blocks"):  # a ranking.FeatureSet: read from disk in row blocks
        n, blocks = pool.n, pool.blocks(block)
    else:
        n, blocks = pool.shape[0], ((s, pool[s:s + block]) for s in range(0, pool.shape[0], block))
    out = torch.empty(n, dtype=torch.float32)
    for start, rows in blocks:
        cos = _normalize(rows.float()) @ anchors_unit.T
        top = cos if n_top == m else cos.topk(n_top, dim=1).values
        out[start:start + rows.shape[0]] = top.mean(dim=1)
    return out
