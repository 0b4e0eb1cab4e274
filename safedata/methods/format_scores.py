"""Format heuristics (what the composition analysis finds in the paper's selections): no model, no anchors.

- list_share: the share of the response's non-empty lines that are list items (a number '1.' / '1)' or a
  bullet, the same line pattern as safedata.analysis's list detector); 0 for an empty response.
- answer_words: the response's length in whitespace-separated words (safedata.analysis.words).
"""
from __future__ import annotations

import numpy as np

from ..analysis import LIST_LINE, words
from ..data import FieldMap
from ..errors import UserError
from ..features.runner import check_existing_output
from .common import Cost, load_texts, score_meta, write_scores

FEATURES = ("list_share", "answer_words")


def list_share(response: str) -> float:
    lines = [line for line in response.splitlines() if line.strip()]
    if not lines:
        return 0.0
    return sum(bool(LIST_LINE.match(line)) for line in lines) / len(lines)


def feature_values(responses: list[str], feature: str) -> np.ndarray:
    if feature == "list_share":
        return np.array([list_share(r) for r in responses], dtype=np.float64)
    if feature == "answer_words":
        return np.array([words(r) for r in responses], dtype=np.float64)
    raise UserError(f"--feature {feature!r}: choose one of {', '.join(FEATURES)}")


def score(data_path, output_dir, feature="list_share", *, skip_bad=False, field_map: FieldMap | None = None) -> bool:
    cost = Cost()
    examples, responses, skipped = load_texts(data_path, "response", skip_bad, field_map)
    meta = score_meta("format", "-", data_path, examples, skipped, {"feature": feature, "skip_bad": skip_bad,
                                                                    "text": "response"}, field_map=field_map)
    check_existing_output(output_dir, meta)
    write_scores(output_dir, meta, {feature: feature_values(responses, feature)}, cost)
    return True
