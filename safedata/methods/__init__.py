"""Selection methods: each scores a pool and writes a score dir (scores.csv + meta.json) that rank.py ranks.

One module per method; `METHODS` maps the CLI name (score.py --method) to its module, whose `score(args)`
returns the columns. Representation and gradient matching live in safedata/features/ (they write features
or scores through the shared runner); the compliance direction also runs there, through the same runner.

| method | module | needs anchors | columns |
| --- | --- | --- | --- |
| random | random_scores | no | random |
| bm25 | bm25 | yes (one column per anchor file) | file stems |
| embedding | embedding | yes (one column per anchor file) | file stems |
| format | format_scores | no | list_share or answer_words |
| compliance | compliance | harmful + safe | compliance |
"""
