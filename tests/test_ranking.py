import csv
import json

import numpy as np
import pytest
import torch

from safedata import ranking as R
from safedata.errors import MetadataMismatch, UserError
from safedata.features.representations import RepresentationArgs, extract_representations
from safedata.scores import anchor_scores
from safedata.store import save_tensors, write_json
from test_representations import write_pool


def brute_scores(pool, anchors, avg_n):
    out = []
    for p in pool:
        cos = [float(np.dot(p, a) / np.linalg.norm(p) / np.linalg.norm(a)) for a in anchors]
        cos.sort(reverse=True)
        n = len(cos) if avg_n == "all" else int(avg_n)
        out.append(np.mean(cos[:n]))
    return np.array(out)


@pytest.mark.parametrize("avg_n", ["1", "2", "all"])
def test_anchor_scores_equal_numpy_brute_force(avg_n):
    rng = np.random.default_rng(0)
    pool, anchors = rng.normal(size=(50, 7)), rng.normal(size=(5, 7))
    got = anchor_scores(torch.tensor(pool), torch.tensor(anchors), avg_n, block=16).numpy()
    np.testing.assert_allclose(got, brute_scores(pool, anchors, avg_n), rtol=1e-5, atol=1e-6)


def test_select_top_bottom_range_ties_and_nonfinite():
    scores = np.array([0.5, np.nan, 0.9, 0.5, -1.0, np.inf * 0, 0.9], dtype=np.float32)
    idx = np.arange(7)
    assert R.select(scores, idx, "top", 3).tolist() == [2, 6, 0]
    assert R.select(scores, idx, "bottom", 2).tolist() == [4, 0]
    assert R.select(scores, idx, "range", range_start=1, range_end=4).tolist() == [6, 0, 3]
    with pytest.raises(UserError, match="only 5 example"):
        R.select(scores, idx, "top", 6)


def make_features(directory, feats, meta_over=None, data_sha="abc", ids=None):
    directory.mkdir(parents=True)
    save_tensors(directory / "features.safetensors", {"features": torch.tensor(feats, dtype=torch.float32)})
    n = len(feats)
    meta = {"stage": "representations", "model": "m", "template": "paper", "data_sha256": data_sha, "n": n,
            "flags": {"layer": -1, "pooling": "last", "max_response_length": None}, "indices": list(range(n)),
            "ids": ids or [f"id{i}" for i in range(n)]}
    meta.update(meta_over or {})
    write_json(directory / "meta.json", meta)


def test_end_to_end_bidirectional_selection(tiny_model_dir, tmp_path):
    pool = write_pool(tmp_path / "pool.json", n=12)
    anchors = tmp_path / "anchors.jsonl"
    anchors.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Request {i}"},
                                                        {"role": "assistant", "content": f"Sure, here:\n1. Step {i}."}]}) + "\n"
                               for i in range(3)))
    safe = tmp_path / "safe.jsonl"
    safe.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Request {i}"},
                                                     {"role": "assistant", "content": "I cannot help with that."}]}) + "\n"
                            for i in range(3)))
    for name, path, cut in (("pool", pool, 512), ("harm", anchors, 480), ("safe", safe, 480)):  # the paper's cuts
        extract_representations(RepresentationArgs(model_name=tiny_model_dir, data_path=path,
                                                   output_dir=tmp_path / name, max_length=cut, dtype="fp32"))
    summary = R.rank(R.RankArgs(data_path=pool, output_dir=tmp_path / "sel", name="alpaca",
                                pool_features=tmp_path / "pool", anchor_features=[tmp_path / "harm", tmp_path / "safe"],
                                weights=[1, -1], k=4))
    fs = {n: R.load_features(tmp_path / n).all().numpy() for n in ("pool", "harm", "safe")}
    expected = brute_scores(fs["pool"], fs["harm"], "1") - brute_scores(fs["pool"], fs["safe"], "1")
    order = sorted(range(12), key=lambda i: (-expected[i], i))[:4]
    rows = list(csv.DictReader(open(tmp_path / "sel" / "alpaca_top4_index.csv")))
    assert [int(r["index"]) for r in rows] == order
    np.testing.assert_allclose([float(r["score"]) for r in rows], expected[order], rtol=1e-5, atol=1e-6)  # fp32 cosines
    selected = json.loads((tmp_path / "sel" / "alpaca_top4.json").read_text())
    assert selected == [json.loads(pool.read_text())[i] for i in order]
    assert summary["columns"] == ["harm", "safe"]


def test_refuses_mismatches(tmp_path):
    pool_file = tmp_path / "pool.json"
    pool_file.write_text(json.dumps([{"instruction": "a", "input": "", "output": "b"},
                                     {"instruction": "c", "input": "", "output": "d"}]))
    from safedata.data import file_sha256
    sha = file_sha256(pool_file)
    from safedata.data import load_examples
    ids = [e.id for e in load_examples(pool_file)[0]]
    make_features(tmp_path / "pool", [[1, 0], [0, 1]], data_sha=sha, ids=ids)
    make_features(tmp_path / "other_model", [[1, 0]], {"model": "another"})
    make_features(tmp_path / "other_template", [[1, 0]], {"template": "chat"})
    make_features(tmp_path / "mlen10", [[1, 0]], {"flags": {"layer": -1, "pooling": "last", "max_response_length": 10}})
    make_features(tmp_path / "cut480", [[1, 0]], {"flags": {"layer": -1, "pooling": "last", "max_response_length": None,
                                                            "max_length": 480}})
    with pytest.raises(MetadataMismatch, match="model='another'"):
        R.rank(R.RankArgs(data_path=pool_file, output_dir=tmp_path / "o", pool_features=tmp_path / "pool",
                          anchor_features=[tmp_path / "other_model"], k=1))
    with pytest.raises(MetadataMismatch, match="template='chat'"):
        R.rank(R.RankArgs(data_path=pool_file, output_dir=tmp_path / "o", pool_features=tmp_path / "pool",
                          anchor_features=[tmp_path / "other_template"], k=1))
    # An anchor read elsewhere than the pool (an older --max_response_length run) is refused; another cut is fine.
    with pytest.raises(MetadataMismatch, match="'max_response_length': 10"):
        R.rank(R.RankArgs(data_path=pool_file, output_dir=tmp_path / "o", pool_features=tmp_path / "pool",
                          anchor_features=[tmp_path / "mlen10"], k=1))
    R.rank(R.RankArgs(data_path=pool_file, output_dir=tmp_path / "o", pool_features=tmp_path / "pool",
                      anchor_features=[tmp_path / "cut480"], k=1))
    pool_file.write_text(pool_file.read_text() + " ")
    with pytest.raises(MetadataMismatch, match="not from --data_path"):
        R.rank(R.RankArgs(data_path=pool_file, output_dir=tmp_path / "o", pool_features=tmp_path / "pool",
                          anchor_features=[tmp_path / "cut480"], k=1))


def score_dir_for(tmp_path, n, header, values):
    """A pool of n question/answer records and a gradient score dir with one row of `values` per record."""
    from safedata.data import file_sha256, load_examples
    pool_file = tmp_path / "pool.jsonl"
    pool_file.write_text("".join(json.dumps({"question": f"q{i}", "answer": f"a{i}"}) + "\n" for i in range(n)))
    examples, _ = load_examples(pool_file)
    d = tmp_path / "scores"
    d.mkdir()
    write_json(d / "meta.json", {"stage": "gradient_scores", "data_sha256": file_sha256(pool_file)})
    rows = [header] + [",".join([str(e.index), e.id, *map(str, v)]) for e, v in zip(examples, values)]
    (d / "scores.csv").write_text("\n".join(rows) + "\n")
    return pool_file, examples, d


def test_scores_csv_path_with_weights(tmp_path):
    pool_file, examples, d = score_dir_for(tmp_path, 5, "index,id,harm,safe1,safe2", [
        (0.1, 0.0, 0.0), (0.5, 0.4, 0.0), (0.3, -0.2, 0.1), ("nan", 0, 0), (0.2, 0.0, 0.0)])
    summary = R.rank(R.RankArgs(data_path=pool_file, output_dir=tmp_path / "sel", name="g", scores_dir=d,
                                weights=[1, -1, -1], k=2, kind="top"))
    got = [int(r["index"]) for r in csv.DictReader(open(tmp_path / "sel" / "g_top2_index.csv"))]
    assert got == [2, 4] and summary["n_nonfinite"] == 1 and summary["nonfinite_ids"] == [examples[3].id]
    assert (tmp_path / "sel" / "g_top2.jsonl").read_text().splitlines()[0] == json.dumps({"question": "q2", "answer": "a2"})


def test_scores_keep_fp64_digits_and_no_avg_n_is_reported(tmp_path):
    """scores.csv holds fp64 scores: the index CSV repeats them digit for digit (repr of the float the CSV
    parses to) and the order follows them, even where two scores agree to fp32 (they used to be rounded to fp32:
    a tie broken by file index, and 0.1 written as 0.10000000149011612). --avg_n has no meaning for --scores."""
    values = ["0.1", "0.30000000000000004", "0.3000000000000001"]
    assert np.float32(0.30000000000000004) == np.float32(0.3000000000000001)
    pool_file, examples, d = score_dir_for(tmp_path, 3, "index,id,harmful", [(v,) for v in values])
    summary = R.rank(R.RankArgs(data_path=pool_file, output_dir=tmp_path / "sel", name="g", scores_dir=d, weights=[1],
                                k=3, kind="top"))
    rows = list(csv.DictReader(open(tmp_path / "sel" / "g_top3_index.csv")))
    assert [int(r["index"]) for r in rows] == [2, 1, 0]
    assert [r["harmful"] for r in rows] == ["0.3000000000000001", "0.30000000000000004", "0.1"]
    assert [r["score"] for r in rows] == ["0.3000000000000001", "0.30000000000000004", "0.1"]
    assert summary["avg_n"] is None
    with pytest.raises(UserError, match="--avg_n 3"):
        R.rank(R.RankArgs(data_path=pool_file, output_dir=tmp_path / "sel2", name="g", scores_dir=d, weights=[1], k=3,
                          avg_n="3"))
