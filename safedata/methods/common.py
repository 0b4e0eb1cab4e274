"""What every method shares: the texts it reads, and the score dir it writes (scores.csv + meta.json).

A score dir has the layout rank.py --scores reads (safedata.ranking.read_scores_csv): `scores.csv` with
header `index,id,<column...>` in file order, and `meta.json` with the pool's sha256 (rank.py refuses
another pool), the method, its flags, the anchor files and their sha256, and the cost of the run
(seconds, peak resident memory).
"""
from __future__ import annotations

import csv
import io
import resource
import time
from pathlib import Path

import numpy as np

from .. import data as D
from ..errors import UserError
from ..store import META, atomic_write_text, environment, now, write_json

SCORES = "scores.csv"
TEXT_PARTS = ("full", "prompt", "response")


def example_text(example: D.Example, part: str = "full") -> str:
    """The text a text-only method reads: the user turn (instruction + input), the response, or both."""
    if part == "prompt":
        return D.user_turn(example)
    if part == "response":
        return example.response or ""
    if part == "full":
        return D.user_turn(example) + "\n" + (example.response or "")
    raise UserError(f"--text {part!r}: choose one of {', '.join(TEXT_PARTS)}")


def load_texts(path, part="full", skip_bad=False) -> tuple[list[D.Example], list[str], list[str]]:
    """(examples, texts, skipped) of a records file (pool or anchors), in file order."""
    examples, skipped = D.load_examples(path, need_response=True, skip_bad=skip_bad)
    return examples, [example_text(e, part) for e in examples], skipped


def anchor_column_names(anchor_paths) -> list[str]:
    """One column per anchor file, named by its stem (a repeated stem gets its position appended)."""
    names: list[str] = []
    for path in anchor_paths:
        stem = Path(path).stem
        names.append(stem if stem not in names else f"{stem}_{len(names)}")
    return names


def aggregate(similarities: np.ndarray, avg_n="1") -> np.ndarray:
    """Per pool row (pool x anchors): the mean of its top-avg_n similarities; 1 = max, 'all' = mean (as rank.py)."""
    m = similarities.shape[1]
    n_top = m if str(avg_n) == "all" else int(avg_n)
    if not 1 <= n_top <= m:
        raise UserError(f"--avg_n {avg_n}: must be 'all' or between 1 and the anchor set size {m}")
    top = np.sort(similarities, axis=1)[:, m - n_top:]
    return top.mean(axis=1)


class Cost:
    """Wall seconds and peak resident memory of this process (what a method's selection costs)."""

    def __init__(self):
        self.start = time.perf_counter()

    def result(self) -> dict:
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {"seconds": round(time.perf_counter() - self.start, 3), "peak_rss_mib": round(peak_kib / 1024, 1)}


def score_meta(method: str, model: str, data_path, examples, skipped, flags: dict, anchors=()) -> dict:
    """meta.json fields the runner's metadata check and rank.py read (stage, model, template, data_sha256, flags)."""
    return {
        "stage": "method_scores",
        "method": method,
        "model": model,
        "template": f"text:{flags.get('text', '-')}",
        "data_file": str(Path(data_path).resolve()),
        "data_sha256": D.file_sha256(data_path),
        "flags": flags,
        "anchors": [{"file": str(Path(a).resolve()), "sha256": D.file_sha256(a)} for a in anchors],
        "n": len(examples),
        "indices": [e.index for e in examples],
        "ids": [e.id for e in examples],
        "skipped": list(skipped),
    }


def write_scores_csv(output_dir, meta: dict, columns: dict[str, np.ndarray]) -> Path:
    """scores.csv: index, id, one column per score source (repr floats), in file order; atomically."""
    n = meta["n"]
    for name, values in columns.items():
        if len(values) != n:
            raise ValueError(f"column {name}: {len(values)} values for {n} examples")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["index", "id", *columns])
    for row, (index, example_id) in enumerate(zip(meta["indices"], meta["ids"])):
        writer.writerow([index, example_id, *(repr(float(values[row])) for values in columns.values())])
    path = Path(output_dir) / SCORES
    atomic_write_text(path, buffer.getvalue())
    return path


def write_scores(output_dir, meta: dict, columns: dict[str, np.ndarray], cost: Cost | None = None) -> Path:
    """scores.csv and meta.json (with the column names, the date and the run's cost)."""
    output_dir = Path(output_dir)
    write_scores_csv(output_dir, meta, columns)
    meta = dict(meta, columns=list(columns), created=now(), environment=environment())
    if cost is not None:
        meta["cost"] = cost.result()
    write_json(output_dir / META, meta)
    return output_dir / SCORES
