"""What every method shares: the texts it reads, and the score dir it writes (scores.csv + meta.json).

A score dir has the layout rank.py --scores reads (safedata.scores): `scores.csv` with
header `index,id,<column...>` in file order, and `meta.json` with the pool's sha256 (rank.py refuses
another pool), the method, its flags, the anchor files and their sha256, and the cost of the run
(seconds, peak resident memory).
"""
from __future__ import annotations

import resource
import time
from pathlib import Path

import numpy as np

from .. import data as D
from ..errors import UserError
from ..scores import SCORES_FILE, write_scores_csv
from ..store import META, environment, now, write_json

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


def load_texts(path, part="full", skip_bad=False,
               field_map: D.FieldMap | None = None) -> tuple[list[D.Example], list[str], list[str]]:
    """(examples, texts, skipped) of a records file (pool or anchors), in file order."""
    examples, skipped = D.load_examples(path, need_response=True, skip_bad=skip_bad, field_map=field_map)
    return examples, [example_text(e, part) for e in examples], skipped


class Cost:
    """Wall seconds and peak resident memory of this process (what a method's selection costs)."""

    def __init__(self):
        self.start = time.perf_counter()

    def result(self) -> dict:
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {"seconds": round(time.perf_counter() - self.start, 3), "peak_rss_mib": round(peak_kib / 1024, 1)}


def score_meta(method: str, model: str, data_path, examples, skipped, flags: dict, anchors=(),
               field_map: D.FieldMap | None = None) -> dict:
    """meta.json fields the runner's metadata check and rank.py read (stage, model, template, data_sha256, flags);
    --field_map, when one was given."""
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
        **D.recorded_field_map(field_map),
    }


def write_scores(output_dir, meta: dict, columns: dict[str, np.ndarray], cost: Cost | None = None) -> Path:
    """scores.csv and meta.json (with the column names, the date and the run's cost)."""
    output_dir = Path(output_dir)
    write_scores_csv(output_dir, meta["indices"], meta["ids"], columns)
    meta = dict(meta, columns=list(columns), created=now(), environment=environment())
    if cost is not None:
        meta["cost"] = cost.result()
    write_json(output_dir / META, meta)
    return output_dir / SCORES_FILE
