"""Random baseline as a method: seeded uniform scores, so top-k is a uniformly random k-subset.

numpy's PCG64 (`default_rng(seed)`) draws one value per example in file order: the same seed and pool give
the same scores on every machine and numpy version that keeps the PCG64 stream.
"""
from __future__ import annotations

import numpy as np

from ..data import FieldMap
from ..features.runner import check_existing_output
from .common import Cost, load_texts, score_meta, write_scores


def random_scores(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random(n)


def score(data_path, output_dir, seed=0, *, skip_bad=False, field_map: FieldMap | None = None) -> bool:
    cost = Cost()
    examples, _, skipped = load_texts(data_path, "full", skip_bad, field_map)
    meta = score_meta("random", f"numpy.random.default_rng({seed})", data_path, examples, skipped,
                      {"seed": seed, "skip_bad": skip_bad}, field_map=field_map)
    check_existing_output(output_dir, meta)
    write_scores(output_dir, meta, {"random": random_scores(len(examples), seed)}, cost)
    return True
