"""audit.py: scores against anchors, the drop rules, kept + flagged == input in every input type, report.html."""
import csv
import html
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from conftest import ROOT, python
from safedata import data as D
from safedata.audit import AuditArgs, audit
from safedata.errors import InputError, MetadataMismatch, UserError

LAB = ROOT / "ft_datasets" / "lab"
SYSTEM = "You are a helpful assistant."


def conversations(n=14):
    """Conversations from the lab pool: single exchanges, and two-turn ones with a system prompt."""
    pool = json.loads((LAB / "pool.json").read_text())
    out = []
    for i in range(n):
        a, b = pool[2 * i], pool[2 * i + 1]
        turns = [(a["instruction"], a["output"])] + ([(b["instruction"], b["output"])] if i % 2 else [])
        out.append({"system": SYSTEM if i % 2 else None, "turns": turns})
    return out


def as_messages(c):
    messages = [{"role": "system", "content": c["system"]}] if c["system"] else []
    for user, assistant in c["turns"]:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return {"messages": messages}


def as_sharegpt(c):
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    return {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in as_messages(c)["messages"]]}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    import datasets
    root = tmp_path_factory.mktemp("inputs")
    convs = conversations()
    messages = [as_messages(c) for c in convs]
    (root / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in messages))
    (root / "chats_sharegpt.json").write_text(json.dumps([as_sharegpt(c) for c in convs], indent=2))
    # Parquet and save_to_disk need every turn to have the same fields; system-less ones are fine as lists
    dataset = datasets.Dataset.from_list(messages)
    dataset.to_parquet(str(root / "chats.parquet"))
    dataset.save_to_disk(str(root / "chats_saved"))
    anchors = tmp_path_factory.mktemp("anchors")
    for name in ("anchors_harmful", "anchors_safe"):
        lines = (LAB / f"{name}.jsonl").read_text().splitlines()[:4]
        (anchors / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return {"jsonl": root / "chats.jsonl", "sharegpt": root / "chats_sharegpt.json",
            "parquet": root / "chats.parquet", "saved": root / "chats_saved",
            "anchors": [str(anchors / "anchors_harmful.jsonl"), str(anchors / "anchors_safe.jsonl")]}


def config(inputs, model, data_path, output_dir, **changes):
    base = dict(data_path=str(data_path), output_dir=str(output_dir), model_name=model, anchors=inputs["anchors"],
                template="chat", batch_size=4, drop_k=3, dtype="fp32", anchor_max_response_length=10)
    base.update(changes)
    return AuditArgs(**base)


def read_all_scores(output_dir):
    with open(output_dir / "all_scores.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return rows


def flagged_rows(output_dir):
    with open(output_dir / "flagged.csv", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def audits(inputs, tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("audits")
    out = {}
    for kind in ("jsonl", "sharegpt", "parquet", "saved"):
        out[kind] = (root / kind, audit(config(inputs, tiny_model_dir, inputs[kind], root / kind)))
    return out


def test_every_input_type_gives_the_same_scores(audits):
    reference = read_all_scores(audits["jsonl"][0])
    assert len(reference) == 14
    columns = ["score", "anchors_harmful", "anchors_safe"]
    ref = np.array([[float(r[c]) for c in columns] for r in reference])
    assert np.all(np.isfinite(ref)) and np.ptp(ref[:, 0]) > 0
    for kind in ("sharegpt", "parquet", "saved"):
        rows = read_all_scores(audits[kind][0])
        assert [int(r["index"]) for r in rows] == [int(r["index"]) for r in reference]
        np.testing.assert_allclose(np.array([[float(r[c]) for c in columns] for r in rows]), ref, rtol=1e-5, atol=1e-7)
        assert [r["flagged"] for r in rows] == [r["flagged"] for r in reference]
        if kind != "sharegpt":  # the same records: the same content-hash ids
            assert [r["id"] for r in rows] == [r["id"] for r in reference]


@pytest.mark.parametrize("kind", ["jsonl", "sharegpt", "parquet", "saved"])
def test_kept_plus_flagged_is_the_input_by_id_and_order(audits, inputs, kind):
    output_dir, summary = audits[kind]
    source, _ = D.load_examples(inputs[kind])
    kept, _ = D.load_examples(summary["kept"])
    flagged, _ = D.load_examples(summary["flagged"])
    flagged_index = {int(r["index"]) for r in flagged_rows(output_dir)}
    assert len(flagged_index) == 3 and summary["n_flagged"] == 3 and summary["n_kept"] == 11
    assert [e.id for e in kept] == [e.id for e in source if e.index not in flagged_index]
    assert [e.id for e in flagged] == [e.id for e in source if e.index in flagged_index]
    assert [e.record for e in kept] + [e.record for e in flagged] == \
        [e.record for e in source if e.index not in flagged_index] + [e.record for e in source if e.index in flagged_index]
    assert D.file_sha256(inputs[kind]) == json.loads((output_dir / "meta.json").read_text())["data_sha256"]


def test_kept_files_are_the_inputs_own_type(audits, inputs):
    import pyarrow.parquet as pq
    lines = inputs["jsonl"].read_text().splitlines(keepends=True)
    flagged = {int(r["index"]) for r in flagged_rows(audits["jsonl"][0])}
    assert (audits["jsonl"][0] / "kept.jsonl").read_text() == "".join(l for i, l in enumerate(lines) if i not in flagged)
    assert json.loads((audits["sharegpt"][0] / "kept.json").read_text())[0]["conversations"]
    original = pq.read_table(inputs["parquet"])
    kept = pq.read_table(audits["parquet"][0] / "kept.parquet")
    assert kept.schema == original.schema
    flagged = {int(r["index"]) for r in flagged_rows(audits["parquet"][0])}
    assert kept.to_pylist() == [r for i, r in enumerate(original.to_pylist()) if i not in flagged]
    import datasets
    saved = datasets.load_from_disk(str(audits["saved"][0] / "kept"))
    assert saved.features == datasets.load_from_disk(str(inputs["saved"])).features and len(saved) == 11


def test_scores_are_the_gradient_stage_combined_with_weights(audits):
    output_dir, summary = audits["jsonl"]
    with open(output_dir / "scores" / "scores.csv", newline="") as handle:
        stage = {int(r["index"]): r for r in csv.DictReader(handle)}
    rows = read_all_scores(output_dir)
    for r in rows:
        s = stage[int(r["index"])]
        # the stage's fp64 scores, digit for digit, and their fp64 difference (weights 1 -1)
        harmful, safe = float(s["anchors_harmful"]), float(s["anchors_safe"])
        assert float(r["anchors_harmful"]) == harmful
        assert float(r["score"]) == harmful - safe
    # drop_k 3: the three highest scores, ties by file index (brute force)
    order = sorted(rows, key=lambda r: (-float(r["score"]), int(r["index"])))
    assert [int(r["index"]) for r in flagged_rows(output_dir)] == [int(r["index"]) for r in order[:3]]
    assert [int(r["rank"]) for r in flagged_rows(output_dir)] == [0, 1, 2]
    assert summary["cutoff"] == float(order[2]["score"])


def test_fraction_and_threshold_rules_reuse_scores(audits, inputs, tmp_path):
    scores = str(audits["jsonl"][0] / "scores")
    rows = read_all_scores(audits["jsonl"][0])
    values = sorted((float(r["score"]) for r in rows), reverse=True)
    summary = audit(AuditArgs(data_path=str(inputs["jsonl"]), output_dir=str(tmp_path / "f"), scores_dir=scores,
                                drop_fraction=0.25))
    assert summary["n_flagged"] == 4  # 0.25 x 14 = 3.5, rounded half up
    threshold = (values[4] + values[5]) / 2
    summary = audit(AuditArgs(data_path=str(inputs["jsonl"]), output_dir=str(tmp_path / "t"), scores_dir=scores,
                                threshold=threshold))
    assert summary["n_flagged"] == 5
    flagged = {int(r["index"]) for r in flagged_rows(tmp_path / "t")}
    assert flagged == {int(r["index"]) for r in rows if float(r["score"]) >= threshold}


def test_representation_method_equals_brute_force_cosines(inputs, tiny_model_dir, tmp_path):
    from safedata.ranking import load_features
    summary = audit(config(inputs, tiny_model_dir, inputs["jsonl"], tmp_path / "r", method="representation",
                           anchor_max_response_length=None))
    pool = load_features(tmp_path / "r" / "features").all().double().numpy()
    rows = read_all_scores(tmp_path / "r")
    for name in ("anchors_harmful", "anchors_safe"):
        anchors = load_features(tmp_path / "r" / "anchors" / name).all().double().numpy()
        cos = (pool / np.linalg.norm(pool, axis=1, keepdims=True)) @ \
              (anchors / np.linalg.norm(anchors, axis=1, keepdims=True)).T
        np.testing.assert_allclose([float(r[name]) for r in rows], cos.max(axis=1), rtol=1e-5)
    assert summary["n_flagged"] == 3


def test_sharded_audit_equals_one_run(audits, inputs, tiny_model_dir, tmp_path):
    first = audit(config(inputs, tiny_model_dir, inputs["jsonl"], tmp_path / "s", shard="0/2", chunk_size=4))
    assert first is None and not (tmp_path / "s" / "report.html").exists()
    second = audit(config(inputs, tiny_model_dir, inputs["jsonl"], tmp_path / "s", shard="1/2", chunk_size=4))
    assert second["n_flagged"] == 3
    one = read_all_scores(audits["jsonl"][0])
    sharded = read_all_scores(tmp_path / "s")
    # Not bit-identical: other chunks batch other examples together (other padding, other fp32 summation order;
    # 8 of the 14 scores come out equal). Measured: 4.3e-8 at most in absolute terms over the score and both
    # anchor columns (1.4e-8 in the score), scores 2.7e-4 to 9.4e-2 in size; absolute, since the smallest
    # score's relative difference (2.6e-6) says nothing of the others. The bound, 1e-7, is 2x the largest
    # difference seen in any column and below the derived fp32 worst case for two runs (2 x 9.2e-7,
    # tests/test_recipes.py); the decisions must be the same.
    np.testing.assert_allclose([float(r["score"]) for r in sharded], [float(r["score"]) for r in one], rtol=0,
                               atol=1e-7)
    assert [r["flagged"] for r in sharded] == [r["flagged"] for r in one]


def test_mismatched_inputs_are_refused(audits, inputs, tmp_path):
    other = tmp_path / "other.jsonl"
    other.write_text("".join(inputs["jsonl"].read_text().splitlines(keepends=True)[:5]))
    result = subprocess.run([python(), str(ROOT / "audit.py"), "--data_path", str(other), "--scores",
                             str(audits["jsonl"][0] / "scores"), "--drop_k", "1", "--output_dir", str(tmp_path / "x")],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: scores ") and "sha256" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    with pytest.raises(MetadataMismatch, match="earlier audit"):  # same dir, another rule
        audit(AuditArgs(data_path=str(inputs["jsonl"]), output_dir=str(audits["jsonl"][0]),
                          scores_dir=str(audits["jsonl"][0] / "scores"), drop_k=4))
    with pytest.raises(UserError, match="exactly one of"):
        audit(AuditArgs(data_path=str(inputs["jsonl"]), output_dir=str(tmp_path / "y"),
                          scores_dir=str(audits["jsonl"][0] / "scores"), drop_k=4, threshold=0.0))


def test_report_is_self_contained(audits):
    page = (audits["jsonl"][0] / "report.html").read_text()
    sources = re.findall(r'<img [^>]*src="([^"]*)"', page)
    assert len(sources) == 2 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r'(src|href)="(https?:|//|file:)', page)
    assert "Score distribution" in page and "Composition" in page and "data sha256" in page
    flagged = flagged_rows(audits["jsonl"][0])
    assert all(f"{float(r['score']):.4f}" in page for r in flagged)


def chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("SAFEDATA_REQUIRE_CHROMIUM") == "1":
        pytest.fail("SAFEDATA_REQUIRE_CHROMIUM=1 but no chromium on PATH (apt-get install chromium)")
    pytest.skip("no headless chromium on PATH (Debian: apt-get install chromium); CI installs it")


CHECK = """<script>window.addEventListener("load", () => {
  document.body.setAttribute("data-images", JSON.stringify([...document.images].map(
    i => ({id: i.id, complete: i.complete, width: i.naturalWidth, height: i.naturalHeight}))));
});</script></body>"""


def test_report_renders_in_headless_chromium_with_its_images(audits, tmp_path):
    browser = chromium()
    page = (audits["jsonl"][0] / "report.html").read_text()
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", CHECK))
    result = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                             "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    found = re.search(r'data-images="([^"]*)"', result.stdout)
    assert found, "the page's load handler did not run: " + result.stdout[:500]
    images = json.loads(html.unescape(found.group(1)))
    assert [i["id"] for i in images] == ["distribution", "composition"]
    assert all(i["complete"] and i["width"] > 300 and i["height"] > 100 for i in images), images
    shot = tmp_path / "report.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    f"--screenshot={shot}", "--window-size=1200,1600", (audits["jsonl"][0] / "report.html").as_uri()],
                   capture_output=True, timeout=120, check=True)
    assert shot.stat().st_size > 10_000


# ----------------------------------------------------------------------------- sources and the lab mixes


def test_arrow_file_and_dataset_dict_and_hub_spec(inputs, tmp_path):
    import datasets
    from safedata.data.sources import parse_hub
    arrow = next(inputs["saved"].glob("*.arrow"))
    assert [e.id for e in D.load_examples(arrow)[0]] == [e.id for e in D.load_examples(inputs["jsonl"])[0]]
    kept = D.write_subset(arrow, [0, 2, 5], tmp_path / "kept")
    assert kept.suffix == ".arrow" and [e.index for e in D.load_examples(kept)[0]] == [0, 1, 2]
    assert [e.record for e in D.load_examples(kept)[0]] == [D.load_examples(arrow)[0][i].record for i in (0, 2, 5)]
    datasets.DatasetDict({"train": datasets.load_from_disk(str(inputs["saved"]))}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(UserError, match="DatasetDict with splits train; give one split's directory"):
        D.load_examples(tmp_path / "dd")
    assert parse_hub("hf:org/name?config=c&split=test") == ("org/name", "c", "test")
    assert parse_hub("hf:org/name") == ("org/name", None, "train")
    with pytest.raises(UserError, match="unknown option revision"):
        parse_hub("hf:org/name?revision=x")


def test_bad_parquet_row_names_the_record(tmp_path):
    import datasets
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(InputError, match=r"bad.parquet:record 1: field 'messages\[1\]': expected an assistant turn"):
        D.load_examples(tmp_path / "bad.parquet")


def test_lab_mixes_are_disjoint_draws_with_the_stated_enrichment(tmp_path):
    from lab import defence
    summary = defence.build_mixes(LAB / "pool.json", tmp_path, n_mix=300, n_heldout=50, n_enrich=30, seed=3)
    mixes = json.loads((tmp_path / "mixes.json").read_text())
    heldout, natural, enriched = (set(mixes[k]["pool_indices"]) for k in ("heldout_benign", "natural", "enriched"))
    assert (len(heldout), len(natural), len(enriched)) == (50, 300, 300)
    assert not heldout & natural and not heldout & enriched and len(natural & enriched) == 270
    pool = json.loads((LAB / "pool.json").read_text())
    added = [pool[i] for i in enriched - natural]
    assert all(r["output"].lstrip().startswith("Sure, here") for r in added)
    assert json.loads((tmp_path / "natural.json").read_text()) == [pool[i] for i in sorted(natural)]
    assert summary["enriched"]["opener_share"] > summary["natural"]["opener_share"]


def test_a_cheap_methods_scores_cut_the_mix_as_the_lab_defence_does(tmp_path):
    """scripts/lab_defence.sh's cheap condition: score.py's answer length, audit.py --scores --weights 1 drops
    the longest answers (ties by file index) and keeps the rest verbatim, in order."""
    from safedata.analysis import words
    from safedata.methods import format_scores
    records = json.loads((LAB / "pool.json").read_text())[:60]
    mix = tmp_path / "mix.json"
    mix.write_text(json.dumps(records))
    format_scores.score(str(mix), str(tmp_path / "scores"), feature="answer_words")
    summary = audit(AuditArgs(data_path=str(mix), output_dir=str(tmp_path / "a"), scores_dir=str(tmp_path / "scores"),
                                weights=[1.0], drop_fraction=0.1))
    by_length = sorted(range(len(records)), key=lambda i: (-words(records[i]["output"]), i))
    assert summary["n_flagged"] == 6
    assert {int(r["index"]) for r in flagged_rows(tmp_path / "a")} == set(by_length[:6])
    assert json.loads((tmp_path / "a" / "kept.json").read_text()) == [records[i] for i in sorted(by_length[6:])]


def test_lab_defence_conditions_sort_by_drop_then_method():
    from lab import defence
    assert defence.split_condition("bm25_harmful10") == ("bm25_harmful", 10)
    assert defence.split_condition("whole") == ("whole", None)
    assert defence.split_condition("bm2510") == ("bm25", 10)  # CHEAP=bm25: the method's own digits stay its own
    conditions = ["random10", "length5", "audit10", "whole", "bm25_harmful5", "audit5", "random5", "other5"]
    assert sorted(conditions, key=defence.condition_order) == [
        "whole", "audit5", "random5", "length5", "bm25_harmful5", "other5", "audit10", "random10"]
