"""Selection methods beyond the paper's two: each scores a pool and writes a score dir (scores.csv + meta.json)
that rank.py --scores ranks with the same metadata checks (docs/METHODS.md).

One module per method, called by score.py (dispatch in run.py); a new method is one module with a
`score(...)` that writes its columns through common.write_scores (or the feature runner), and a test.

| method (score.py --method) | module | needs | columns |
| --- | --- | --- | --- |
| random | random_scores | nothing | random |
| bm25 | bm25 | anchor files | one per anchor file (its stem) |
| embedding | embedding | anchor files | one per anchor file |
| format | format_scores | nothing | list_share or answer_words |
| compliance | compliance | an LLM, harmful + safe anchor files | compliance |

Representation and gradient matching, and the anchor-free self-influence scores
(get_gradients.py --self_influence), live in safedata/features/. agreement.py and study.py compare
rankings with reference selections (compare_rankings.py).
"""
