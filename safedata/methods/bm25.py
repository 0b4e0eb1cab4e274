"""Lexical similarity to the anchors: BM25 (the bm25s library, Lucene variant, k1 1.5, b 0.75).

The pool is the BM25 corpus; each anchor's text is a query, scored against every pool example
(`bm25s.BM25.get_scores`, the library's own scores). Tokens: bm25s.tokenize (lower case, words of 2+
characters, English stop words removed). Per anchor file, the mean of each example's top-avg_n anchor scores
(1 = max). BM25 values are not normalised across queries; with weights +1/-1 the bi-directional score is the
harmful file's best match minus the safe files' best matches.
"""
from __future__ import annotations

import logging
from pathlib import Path

import bm25s
import numpy as np

from ..data import FieldMap
from ..errors import UserError
from ..scores import top_n_mean, unique_names
from .common import Cost, load_texts, score_meta, write_scores
from ..features.runner import check_existing_output

K1, B = 1.5, 0.75
# bm25s sets its own logger to DEBUG, so a job log got its "Building index from tokens" line
logging.getLogger("bm25s").setLevel(logging.WARNING)


def tokenize(texts: list[str]) -> list[list[str]]:
    return bm25s.tokenize(texts, lower=True, stopwords="en", return_ids=False, show_progress=False)


def index(pool_texts: list[str], k1=K1, b=B):
    retriever = bm25s.BM25(k1=k1, b=b, method="lucene")
    retriever.index(tokenize(pool_texts), show_progress=False)
    return retriever


def similarities(retriever, anchor_texts: list[str]) -> np.ndarray:
    """pool x anchors: each anchor's BM25 score of every pool example."""
    return np.stack([retriever.get_scores(tokens) for tokens in tokenize(anchor_texts)], axis=1).astype(np.float64)


def score(data_path, anchors, output_dir, *, text="full", avg_n="1", skip_bad=False, k1=K1, b=B,
          field_map: FieldMap | None = None) -> bool:
    if not anchors:
        raise UserError("--anchors: the bm25 method needs at least one anchor file")
    cost = Cost()
    examples, texts, skipped = load_texts(data_path, text, skip_bad, field_map)
    flags = {"text": text, "avg_n": str(avg_n), "skip_bad": skip_bad, "k1": k1, "b": b}
    meta = score_meta("bm25", f"bm25s=={bm25s.__version__}", data_path, examples, skipped, flags, anchors,
                      field_map)
    check_existing_output(output_dir, meta)
    retriever = index(texts, k1, b)
    columns = {name: top_n_mean(similarities(retriever, load_texts(path, text, field_map=field_map)[1]), avg_n)
               for name, path in zip(unique_names(Path(a).stem for a in anchors), anchors)}
    write_scores(output_dir, meta, columns, cost)
    return True
