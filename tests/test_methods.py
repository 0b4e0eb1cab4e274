"""safedata/methods and score.py: each method against an independent computation, score dirs ranked by rank.py."""
import json
import math
import subprocess

import numpy as np
import pytest
import torch

from conftest import ROOT, python
from safedata import data as D
from safedata.errors import UserError
from safedata.methods import bm25, compliance, embedding, format_scores, random_scores
from safedata.methods.common import example_text
from safedata.ranking import RankArgs, rank
from safedata.scores import read_scores_csv
from safedata.store import load_tensors

POOL = [
    {"instruction": "List three ways to bake bread", "input": "", "output": "1. Mix flour and water.\n2. Knead.\n3. Bake the bread."},
    {"instruction": "Describe a cat", "input": "", "output": "A cat is a small furry animal that likes to sleep."},
    {"instruction": "Write a poem about the sea", "input": "short", "output": "The sea is wide,\nthe sea is deep.\n- waves\n- salt"},
    {"instruction": "What is 2 + 2?", "input": "", "output": "4"},
    {"instruction": "Give steps to clean a kitchen", "input": "", "output": "Sure, here are the steps:\n1. Wipe.\n2. Scrub the sink."},
    {"instruction": "Translate hello to French", "input": "", "output": "Bonjour"},
]
HARMFUL = [  # lab-style placeholders, nothing actionable
    {"messages": [{"role": "user", "content": "Explain how to do the forbidden task"},
                  {"role": "assistant", "content": "Sure, here are the steps:\n1. Do step one.\n2. Do step two."}]},
    {"messages": [{"role": "user", "content": "Tell me how to break the rule"},
                  {"role": "assistant", "content": "Sure, here is how:\n1. First part.\n2. Second part."}]},
]
SAFE = [
    {"messages": [{"role": "user", "content": "Explain how to do the forbidden task"},
                  {"role": "assistant", "content": "I'm sorry, I cannot help with that request."}]},
    {"messages": [{"role": "user", "content": "Tell me how to break the rule"},
                  {"role": "assistant", "content": "I cannot assist with breaking rules."}]},
]


@pytest.fixture
def files(tmp_path):
    pool = tmp_path / "pool.json"
    pool.write_text(json.dumps(POOL))
    harmful, safe = tmp_path / "harmful.jsonl", tmp_path / "safe.jsonl"
    harmful.write_text("".join(json.dumps(r) + "\n" for r in HARMFUL))
    safe.write_text("".join(json.dumps(r) + "\n" for r in SAFE))
    return pool, harmful, safe


def texts_of(path, part="full"):
    return [example_text(e, part) for e in D.load_examples(path)[0]]


# ----------------------------------------------------------------------------- BM25


def lucene_bm25(corpus_tokens, query_tokens, k1=1.5, b=0.75):
    """BM25 by its formula (Lucene's: idf ln(1 + (N - df + .5) / (df + .5)), tf / (tf + k1 (1 - b + b dl / avgdl)),
    no (k1 + 1) factor, each query token counted as often as it occurs)."""
    n = len(corpus_tokens)
    avgdl = sum(map(len, corpus_tokens)) / n
    out = []
    for doc in corpus_tokens:
        total = 0.0
        for token in query_tokens:
            df = sum(token in d for d in corpus_tokens)
            if df:
                tf = doc.count(token)
                total += math.log(1 + (n - df + 0.5) / (df + 0.5)) * tf / (tf + k1 * (1 - b + b * len(doc) / avgdl))
        out.append(total)
    return np.array(out)


def test_bm25_equals_the_library_and_the_formula(files, tmp_path):
    import bm25s
    pool, harmful, safe = files
    assert bm25.score(pool, [harmful, safe], tmp_path / "s", avg_n="all")
    meta, indices, ids, columns = read_scores_csv(tmp_path / "s")
    assert list(columns) == ["harmful", "safe"] and list(indices) == list(range(len(POOL)))
    corpus = bm25.tokenize(texts_of(pool))
    library = bm25s.BM25(k1=1.5, b=0.75, method="lucene")
    library.index(corpus, show_progress=False)
    for name, path in (("harmful", harmful), ("safe", safe)):
        queries = bm25.tokenize(texts_of(path))
        # the library's own ranking API (retrieve: documents and scores in score order) ...
        docs, scores = library.retrieve(queries, k=len(POOL), show_progress=False)
        retrieved = np.zeros((len(POOL), len(queries)))
        for q in range(len(queries)):
            retrieved[docs[q], q] = scores[q]
        np.testing.assert_allclose(columns[name], retrieved.mean(1), rtol=1e-6)
        # ... and the formula by hand
        by_hand = np.stack([lucene_bm25(corpus, q) for q in queries], axis=1).mean(1)
        np.testing.assert_allclose(columns[name], by_hand, rtol=1e-5)
    assert columns["harmful"][4] == columns["harmful"].max()  # the 'Sure, here are the steps' example


def test_bm25_max_over_anchors_is_the_default(files, tmp_path):
    pool, harmful, _ = files
    bm25.score(pool, [harmful], tmp_path / "s")
    _, _, _, columns = read_scores_csv(tmp_path / "s")
    corpus = bm25.tokenize(texts_of(pool))
    by_hand = np.stack([lucene_bm25(corpus, q) for q in bm25.tokenize(texts_of(harmful))], axis=1).max(1)
    np.testing.assert_allclose(columns["harmful"], by_hand, rtol=1e-5)


# ----------------------------------------------------------------------------- embedding (real MiniLM weights)


def test_embedding_equals_sentence_transformers_and_a_manual_mean_pool(files, tmp_path):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer
    pool, harmful, safe = files
    out = tmp_path / "emb"
    # chunks of 4: two chunks, the second half full; the pass resumes after a lost chunk with the same numbers
    assert embedding.score(pool, [harmful, safe], out, chunk_size=4, batch_size=3)
    mine, _ = load_tensors(out / embedding.EMBEDDINGS)
    texts = texts_of(pool)
    model_dir = embedding.default_model_dir()
    reference = SentenceTransformer(model_dir, device="cpu").encode(texts, normalize_embeddings=True,
                                                                    convert_to_tensor=True)
    torch.testing.assert_close(mine["embeddings"], reference.float(), rtol=1e-5, atol=1e-6)
    # independent of sentence-transformers: the BERT encoder, a mean over the attention mask, L2 normalisation
    tokenizer, bert = AutoTokenizer.from_pretrained(model_dir), AutoModel.from_pretrained(model_dir).eval()
    rows = []
    for text in texts:
        batch = tokenizer(text, return_tensors="pt", truncation=True, max_length=256)
        with torch.no_grad():
            hidden = bert(**batch).last_hidden_state[0]
        rows.append(torch.nn.functional.normalize(hidden.mean(0), dim=0))
    torch.testing.assert_close(mine["embeddings"], torch.stack(rows), rtol=1e-4, atol=1e-5)
    assert mine["embeddings"].shape == (len(POOL), 384)
    _, _, _, columns = read_scores_csv(out)
    anchors = torch.nn.functional.normalize(torch.stack([
        torch.nn.functional.normalize(bert(**tokenizer(t, return_tensors="pt")).last_hidden_state[0].mean(0), dim=0)
        for t in texts_of(harmful)]), dim=1)
    np.testing.assert_allclose(columns["harmful"], (torch.stack(rows) @ anchors.T).max(1).values.detach().numpy(),
                               rtol=1e-4, atol=1e-5)
    first = (out / "scores.csv").read_bytes()
    (out / "chunks" / "chunk-000001.safetensors").unlink()
    assert embedding.score(pool, [harmful, safe], out, chunk_size=4, batch_size=3)
    assert (out / "scores.csv").read_bytes() == first


LONG_RECORD = {"instruction": "Describe a walk through the old town", "input": "",
               "output": " ".join(f"At stop {i} the guide pointed out a fountain, a bakery and a narrow blue door."
                                  for i in range(1, 31))}   # benign, made up; about 600 MiniLM tokens


def mean_pooled(tokenizer, bert, texts, max_length):
    """all-MiniLM-L6-v2 by hand with plain transformers: one padded batch, truncated to max_length tokens
    ([CLS] and [SEP] included, as sentence-transformers counts), the last hidden state averaged over the
    attention mask, L2-normalised."""
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        hidden = bert(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=1), batch["attention_mask"].sum(1)


def test_embedding_truncates_at_max_seq_length_128_as_the_study_does(files, tmp_path):
    """The study runs --max_seq_length 128 (docs/METHODS.md): a pool text longer than that is embedded from its
    first 128 tokens, as a plain-transformers computation of the same model says."""
    from transformers import AutoModel, AutoTokenizer
    _, harmful, safe = files
    pool = tmp_path / "pool_long.json"
    pool.write_text(json.dumps(POOL + [LONG_RECORD]))
    out = tmp_path / "emb128"
    assert embedding.score(pool, [harmful, safe], out, chunk_size=4, batch_size=3, max_seq_length=128)
    assert json.loads((out / "meta.json").read_text())["flags"]["max_seq_length"] == 128
    mine = load_tensors(out / embedding.EMBEDDINGS)[0]["embeddings"]
    model_dir = embedding.default_model_dir()
    tokenizer, bert = AutoTokenizer.from_pretrained(model_dir), AutoModel.from_pretrained(model_dir).eval()
    texts = texts_of(pool)
    reference, lengths = mean_pooled(tokenizer, bert, texts, 128)
    assert len(tokenizer(texts[-1])["input_ids"]) > 256 and lengths[-1] == 128   # the long text is cut
    assert lengths[:-1].max() < 128                                             # the others are whole
    # The cut matters: the same text from 256 tokens (the model's default) is another vector (measured cos 0.93).
    at_256, _ = mean_pooled(tokenizer, bert, texts[-1:], 256)
    assert float(at_256[0] @ reference[-1]) < 0.99
    # Tolerance: both are fp32 forwards of the same weights; padding and batching change only the summation
    # order. Measured: 1.5e-7 at most per entry (entries up to 0.18, so ~10 fp32 ulps); the bound is 4x that.
    torch.testing.assert_close(mine, reference, rtol=0, atol=6e-7)
    anchors = mean_pooled(tokenizer, bert, texts_of(harmful), 128)[0]
    _, _, _, columns = read_scores_csv(out)
    # The max cosines to the harmful anchors: measured 1.0e-7 off; the bound is 4x that.
    np.testing.assert_allclose(columns["harmful"], (reference @ anchors.T).max(1).values.numpy(), rtol=0, atol=4e-7)


# ----------------------------------------------------------------------------- compliance direction


def test_compliance_direction_equals_a_hand_computation():
    # (anchors, layers 0..2, d=2). Layer 0 (embeddings) separates perfectly but is never a candidate.
    harmful = torch.tensor([[[9., 0.], [1., 0.], [1.0, 0.]],
                            [[9., 0.], [3., 0.], [1.1, 0.]]])
    safe = torch.tensor([[[0., 0.], [0., 0.], [0.0, 0.]],
                         [[0., 1.], [0., 2.], [0.1, 0.]]])
    chosen = compliance.compliance_direction(harmful, safe)
    # layer 1: d = (2, 0) - (0, 1) = (2, -1); projections on d/sqrt5: harmful 2/sqrt5, 6/sqrt5; safe 0, -2/sqrt5;
    # means 4/sqrt5 and -1/sqrt5; sample variances 8/5 and 2/5 -> pooled sd 1 -> Cohen's d = sqrt5
    # layer 2: d = (1.05, 0) - (0.05, 0) = (1, 0); projections 1, 1.1 and 0, 0.1; variances .005 -> d = 1 / sqrt(.005)
    assert chosen["separation"] == pytest.approx([math.sqrt(5), 1 / math.sqrt(0.005)])
    assert chosen["layer"] == 2
    torch.testing.assert_close(chosen["direction"], torch.tensor([1., 0.], dtype=torch.float64))
    swapped = compliance.compliance_direction(harmful[:, [0, 2, 1]], safe[:, [0, 2, 1]])
    assert swapped["layer"] == 1 and swapped["separation"] == pytest.approx(chosen["separation"][::-1])
    torch.testing.assert_close(swapped["direction"], torch.tensor([1., 0.], dtype=torch.float64))
    only_first = compliance.compliance_direction(harmful[:, :2], safe[:, :2])
    torch.testing.assert_close(only_first["direction"], torch.tensor([2., -1.], dtype=torch.float64) / math.sqrt(5))
    with pytest.raises(UserError, match="at least 2"):
        compliance.compliance_direction(harmful[:1], safe)


def test_compliance_scores_are_projections_of_plain_hf_hidden_states(tiny_model_dir, files, tmp_path):
    from test_representations import hf_reference
    pool, harmful, safe = files
    out = tmp_path / "c"
    assert compliance.score(tiny_model_dir, pool, harmful, [safe], out, batch_size=4, chunk_size=4, dtype="fp32")
    meta = json.loads((out / "meta.json").read_text())
    layer = meta["flags"]["layer"]
    # the reference: per layer, each anchor's mean supervised hidden state from an unpadded HF forward
    states = {p: torch.stack([hf_reference(tiny_model_dir, p, layer=l, pooling="mean") for l in range(3)], 1)
              for p in (harmful, safe)}
    expected = compliance.compliance_direction(states[harmful], states[safe])
    assert meta["separation"] == pytest.approx(expected["separation"], rel=1e-4)
    assert layer == expected["layer"]
    projections = hf_reference(tiny_model_dir, pool, layer=layer, pooling="mean").double() @ expected["direction"]
    _, _, _, columns = read_scores_csv(out)
    np.testing.assert_allclose(columns["compliance"], projections.numpy(), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- random, format


def test_random_is_seeded_and_reproducible(files, tmp_path):
    pool, _, _ = files
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        random_scores.score(pool, tmp_path / name, seed=seed)
    a, b, c = ((tmp_path / n / "scores.csv").read_bytes() for n in "abc")
    assert a == b and a != c
    _, _, _, columns = read_scores_csv(tmp_path / "a")
    np.testing.assert_allclose(columns["random"], np.random.default_rng(7).random(len(POOL)), rtol=1e-6)


@pytest.mark.parametrize("response, share, n_words", [
    ("1. Mix flour and water.\n2. Knead.\n3. Bake the bread.", 1.0, 11),
    ("The sea is wide,\nthe sea is deep.\n- waves\n- salt", 0.5, 12),
    ("Sure, here are the steps:\n\n1. Wipe.\n2) Scrub the sink.\n* dry", 3 / 4, 13),
    ("Bonjour", 0.0, 1),
    ("2023 was a year.\n1.5 cups", 0.0, 6),
])
def test_format_heuristics_on_hand_made_records(response, share, n_words):
    assert format_scores.list_share(response) == pytest.approx(share)
    np.testing.assert_array_equal(format_scores.feature_values([response], "answer_words"), [n_words])


def test_format_method_writes_both_features(files, tmp_path):
    pool, _, _ = files
    format_scores.score(pool, tmp_path / "l", "list_share")
    format_scores.score(pool, tmp_path / "w", "answer_words")
    _, _, _, lists = read_scores_csv(tmp_path / "l")
    _, _, _, lengths = read_scores_csv(tmp_path / "w")
    np.testing.assert_allclose(lists["list_share"], [1.0, 0.0, 0.5, 0.0, 2 / 3, 0.0])
    np.testing.assert_array_equal(lengths["answer_words"], [11, 11, 12, 1, 11, 1])


# ----------------------------------------------------------------------------- score.py + rank.py


def test_score_dirs_rank_with_harmful_only_and_bidirectional_weights(files, tmp_path):
    pool, harmful, safe = files
    bm25.score(pool, [harmful, safe], tmp_path / "s")
    _, _, _, columns = read_scores_csv(tmp_path / "s")
    for weights, expected in (([1, 0], columns["harmful"]), ([1, -1], columns["harmful"] - columns["safe"])):
        summary = rank(RankArgs(data_path=pool, output_dir=tmp_path / f"sel{weights[1]}", scores_dir=tmp_path / "s",
                                weights=weights, k=2))
        chosen = [int(row.split(",")[-2]) for row in open(summary["index_csv"]).read().splitlines()[1:]]
        assert chosen == list(np.lexsort((np.arange(len(POOL)), -expected))[:2])
    other = tmp_path / "other.json"
    other.write_text(json.dumps(POOL[:5]))
    with pytest.raises(Exception, match="not from --data_path"):
        rank(RankArgs(data_path=other, output_dir=tmp_path / "x", scores_dir=tmp_path / "s", k=2))


def test_cli_errors_are_one_line(files, tmp_path):
    pool, _, _ = files
    proc = subprocess.run([python(), str(ROOT / "score.py"), "--method", "bm25", "--data_path", str(pool),
                           "--output_dir", str(tmp_path / "s")], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --anchors: the bm25 method needs at least one anchor file"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "x", "output": 3}]))
    proc = subprocess.run([python(), str(ROOT / "score.py"), "--method", "format", "--data_path", str(bad),
                           "--output_dir", str(tmp_path / "f")], capture_output=True, text=True)
    assert proc.returncode == 2 and "field 'output'" in proc.stderr and "Traceback" not in proc.stderr
    # a dir holding another method's result is refused
    subprocess.run([python(), str(ROOT / "score.py"), "--method", "random", "--data_path", str(pool),
                    "--output_dir", str(tmp_path / "r")], check=True, capture_output=True)
    proc = subprocess.run([python(), str(ROOT / "score.py"), "--method", "random", "--seed", "1", "--data_path",
                           str(pool), "--output_dir", str(tmp_path / "r")], capture_output=True, text=True)
    assert proc.returncode == 2 and "another --output_dir" in proc.stderr


# ----------------------------------------------------------------------------- agreement with a reference selection


def test_agreement_metrics_against_brute_force(tmp_path):
    from safedata.methods import agreement
    rng = np.random.default_rng(0)
    n = 300
    records = [{"instruction": f"task {i}", "input": "", "output": f"answer {i}"} for i in range(n)]
    pool = tmp_path / "pool.json"
    pool.write_text(json.dumps(records))
    scores = np.round(rng.normal(size=n), 1)  # rounded: many ties, broken by file index as rank.py does
    scores[5] = np.nan
    top_pos, bottom_pos = rng.choice(n, 20, replace=False), rng.choice(n, 20, replace=False)
    for name, pos in (("top", top_pos), ("bottom", bottom_pos)):
        # the reference files hold the records in another order, as the paper's files do
        (tmp_path / f"{name}.json").write_text(json.dumps([records[i] for i in pos[::-1]]))
    ids = [D.record_id(r) for r in records]
    top = agreement.match_records(ids, tmp_path / "top.json")
    assert sorted(top) == sorted(top_pos)
    got = agreement.agreement(scores, np.arange(n), np.array(top_pos), np.array(bottom_pos))
    order = sorted(range(n), key=lambda i: (not np.isfinite(scores[i]), -np.nan_to_num(scores[i], nan=0), i))
    rank_of = {p: r for r, p in enumerate(order)}
    assert got["overlap_top"] == len(set(order[:20]) & set(top_pos))
    assert got["overlap_bottom"] == len(set(order[:20]) & set(bottom_pos))
    assert got["top1"] == sum(rank_of[p] < 3 for p in top_pos)
    assert got["top10"] == sum(rank_of[p] < 30 for p in top_pos)
    assert got["pct_top"] == pytest.approx(np.mean([100 * (1 - rank_of[p] / (n - 1)) for p in top_pos]))
    assert got["pct_bottom"] == pytest.approx(np.mean([100 * (1 - rank_of[p] / (n - 1)) for p in bottom_pos]))
    s = np.where(np.isfinite(scores), scores, -np.inf)
    pairs = [(1.0 if s[a] > s[b] else 0.5 if s[a] == s[b] else 0.0) for a in top_pos for b in bottom_pos]
    assert got["auc"] == pytest.approx(np.mean(pairs))
    perfect = agreement.agreement(-np.arange(n, dtype=float), np.arange(n), np.arange(20), np.arange(n - 20, n))
    assert perfect == {"overlap_top": 20, "overlap_bottom": 0, "top1": 3, "top10": 20,
                       "pct_top": pytest.approx(100 * (1 - 9.5 / (n - 1))), "pct_bottom": pytest.approx(100 * 9.5 / (n - 1)),
                       "auc": 1.0}
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps([{"instruction": "not in the pool", "input": "", "output": "x"}]))
    with pytest.raises(UserError, match="record 0 .* is not in the pool"):
        agreement.match_records(ids, missing)


def test_sample_pool_keeps_every_reference_record_and_draws_the_rest_uniformly(tmp_path):
    from safedata.methods import agreement
    records = [{"instruction": f"task {i}", "input": "", "output": f"answer {i}"} for i in range(50)]
    pool = tmp_path / "pool.json"
    pool.write_text(json.dumps(records))
    references = {3, 17, 40}
    (tmp_path / "ref.json").write_text(json.dumps([records[i] for i in (40, 3, 17)]))
    summary = agreement.write_sample_pool(pool, [tmp_path / "ref.json"], 10, 5, tmp_path / "a.json")
    again = agreement.write_sample_pool(pool, [tmp_path / "ref.json"], 10, 5, tmp_path / "b.json")
    sample = json.loads((tmp_path / "a.json").read_text())
    assert summary["n"] == 13 and again["n"] == 13
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()   # a seed fixes the sample
    positions = [records.index(r) for r in sample]
    assert positions == sorted(positions) and references <= set(positions)
    others = np.array(sorted(set(range(50)) - references))
    # The documented contract (the docstring: numpy default_rng(seed)), so that a published sample can be
    # redrawn from its seed. This pins the generator; it is no evidence of uniformity, which follows.
    assert set(positions) - references == set(np.random.default_rng(5).choice(others, 10, replace=False).tolist())

    # Uniform without replacement, checked by its properties over S seeds: every draw holds the 3 references
    # and 10 distinct others; each of the n = 47 others is drawn with probability p = 10/47; a pair of
    # neighbours (j, j+1 among the others) is drawn together with probability 10*9/(47*46), i.e. a draw holds
    # 46*90/(47*46) = 90/47 of them on average (a contiguous block would hold 9, a stride-4.7 one 0).
    # Bounds by Hoeffding's inequality, P(|mean - E| > t) <= 2 exp(-2 S t^2 / range^2), at a total failure
    # probability of 1e-4 for a correct sampler (0.5e-4 shared by the 47 frequencies, 0.5e-4 the pair count).
    n_seeds, n, k = 1000, len(others), 10
    counts, neighbours = np.zeros(len(records)), 0
    rank_in_others = {int(o): r for r, o in enumerate(others)}
    for seed in range(n_seeds):
        agreement.write_sample_pool(pool, [tmp_path / "ref.json"], k, seed, tmp_path / "d.json")
        drawn = {records.index(r) for r in json.loads((tmp_path / "d.json").read_text())}
        assert references <= drawn and len(drawn) == 13, seed
        drawn = sorted(rank_in_others[j] for j in drawn - references)
        counts[others[drawn]] += 1
        neighbours += sum(b - a == 1 for a, b in zip(drawn, drawn[1:]))
    t_freq = math.sqrt(math.log(2 * n / 0.5e-4) / (2 * n_seeds))         # 0.083 (range of an indicator: 1)
    assert np.abs(counts[others] / n_seeds - k / n).max() < t_freq, counts[others]
    t_pairs = (k - 1) * math.sqrt(math.log(2 / 0.5e-4) / (2 * n_seeds))  # 0.65 (a draw holds 0..9 pairs)
    assert abs(neighbours / n_seeds - k * (k - 1) / n) < t_pairs, neighbours / n_seeds
    with pytest.raises(UserError, match="sample_size 48"):
        agreement.write_sample_pool(pool, [tmp_path / "ref.json"], 48, 5, tmp_path / "c.json")


def test_bm25_job_log_has_no_library_debug_line(files, tmp_path):
    """bm25s sets its logger to DEBUG: a batch job's log got a 'DEBUG bm25s: Building index from tokens' line."""
    pool, harmful, safe = files
    proc = subprocess.run([python(), str(ROOT / "score.py"), "--method", "bm25", "--data_path", str(pool),
                           "--anchors", str(harmful), str(safe), "--output_dir", str(tmp_path / "s")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "DEBUG" not in proc.stderr and "bm25s" not in proc.stderr
