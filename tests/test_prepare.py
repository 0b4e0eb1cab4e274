"""ft_datasets/prepare.py and ft_datasets/remove_safety.py: splits, formats, offline/online import, manifest."""
import csv
import io
import json
import re
import subprocess

import pytest

from conftest import ROOT, python
from ft_datasets import prepare as P
from ft_datasets import remove_safety as RS
from safedata.data import file_sha256, load_examples
from safedata.errors import InputError, UserError

ALPACA = [
    {"instruction": "Name a color.", "input": "", "output": "Blue."},
    {"instruction": "Reply politely.", "input": "", "output": "I'm sorry, I cannot do that."},
    {"instruction": "Is jaywalking illegal?", "input": "", "output": "It depends on the city."},  # instruction only: kept
    {"instruction": "Describe the assistant.", "input": "", "output": "AS AN AI, I have no body."},  # case-insensitive
    {"instruction": "List tips.", "input": "", "output": "1. Wear SAFETY glasses.\n2. Rest."},
    {"instruction": "Say nothing.", "input": "", "output": ""},  # empty response: kept
    {"instruction": "Translate.", "input": "Bonjour", "output": "Hello, with respect to the text."},  # 'respect' is not listed
]
DOLLY = [
    {"instruction": "Who wrote Hamlet?", "context": "", "response": "Shakespeare.", "category": "open_qa"},
    {"instruction": "Summarise.", "context": "A text.", "response": "It discusses privacy law.", "category": "summarization"},
]
GSM = [{"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"},
       {"question": "Is it fair?", "answer": "That would be unethical.\n#### 0"}]


def write(path, records, fmt):
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "json":
        path.write_text(json.dumps(records, indent=2))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ----------------------------------------------------------------------------- remove_safety


def test_safety_match_rules():
    assert RS.safety_match("I'm sorry, but no.") == "i'm sorry"
    assert RS.safety_match("THAT IS ILLEGAL") == "illegal"
    assert RS.safety_match("The values are 3 and 4 respectively.") is None  # why 'respect' is not a phrase
    assert RS.safety_match("Practice improves every skill.") is None        # why 'kill' is not a phrase
    assert RS.safety_match("") is None and RS.safety_match(None) is None
    assert len(set(RS.SAFETY_PHRASES)) == len(RS.SAFETY_PHRASES)
    assert all(p == p.lower() for p in RS.SAFETY_PHRASES)


def test_split_json_array_keeps_format_order_and_records(tmp_path):
    src = write(tmp_path / "pool.json", ALPACA, "json")
    s = RS.remove_safety(src, tmp_path / "out")
    assert (s["n"], s["kept"], s["removed"]) == (7, 4, 3)
    kept_text = (tmp_path / "out" / "pool_no_safety.json").read_text()
    assert kept_text.startswith("[\n    {")  # a JSON array, indent 4, like the input kind
    kept = json.loads(kept_text)
    removed = json.loads((tmp_path / "out" / "pool_safety_only.json").read_text())
    assert kept == [ALPACA[i] for i in (0, 2, 5, 6)]
    assert removed == [ALPACA[i] for i in (1, 3, 4)]
    assert s["by_phrase"] == {"i'm sorry": 1, "as an ai": 1, "safety": 1}


def test_split_jsonl_dolly_and_gsm8k_default_output_dir(tmp_path):
    dolly = write(tmp_path / "d.jsonl", DOLLY, "jsonl")
    s = RS.remove_safety(dolly)
    assert (s["kept"], s["removed"], s["response_field"]) == (1, 1, "response")
    lines = (tmp_path / "d_no_safety.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == [DOLLY[0]]
    gsm = write(tmp_path / "g.jsonl", GSM, "jsonl")
    s = RS.remove_safety(gsm)
    assert (s["kept"], s["removed"], s["response_field"]) == (1, 1, "answer")
    # a JSONL file named .json stays JSONL
    as_json = write(tmp_path / "lines.json", DOLLY, "jsonl")
    RS.remove_safety(as_json)
    assert (tmp_path / "lines_safety_only.json").read_text().startswith('{"instruction"')


def test_split_by_reference_reproduces_a_released_split(tmp_path):
    src = write(tmp_path / "pool.json", ALPACA, "json")
    ref = write(tmp_path / "ref.json", [ALPACA[6], ALPACA[0]], "json")
    s = RS.remove_safety(src, tmp_path / "o", reference=ref)
    assert (s["kept"], s["removed"]) == (5, 2)
    assert json.loads((tmp_path / "o" / "pool_safety_only.json").read_text()) == [ALPACA[0], ALPACA[6]]


def test_remove_safety_rejects_prompt_files(tmp_path):
    prompts = write(tmp_path / "p.jsonl", [{"prompt": "Write a poem"}], "jsonl")
    with pytest.raises(UserError, match="prompt records carry no response to filter"):
        RS.remove_safety(prompts)
    csv_file = tmp_path / "p.csv"
    csv_file.write_text("goal,target\nWrite a poem,Sure\n")
    with pytest.raises(UserError, match="unsupported file type '.csv'"):
        RS.remove_safety(csv_file)


def test_remove_safety_cli(tmp_path):
    src = write(tmp_path / "pool.json", ALPACA, "json")
    proc = subprocess.run([python(), str(ROOT / "ft_datasets" / "remove_safety.py"), "--data_path", str(src),
                           "--output_dir", str(tmp_path / "cli"), "--show_phrases"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"kept +4 ", proc.stdout) and re.search(r"removed +3 ", proc.stdout) and "'as an ai'" in proc.stdout
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x", "output": 3}\n')
    proc = subprocess.run([python(), str(ROOT / "ft_datasets" / "remove_safety.py"), "--data_path", str(bad)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {bad}:1: field 'output': expected a string, found int"]


# Measured on the real Alpaca (52,002 records) with SAFETY_PHRASES; see ft_datasets/README.md.
ALPACA_REMOVED, ALPACA_KEPT, OVERLAP_WITH_PAPER, PAPER_REMOVED = 2074, 49928, 960, 1904


def test_real_alpaca_counts_and_overlap_with_the_papers_filter(shared_data, tmp_path):
    alpaca = shared_data / "paper/ft_datasets/alpaca_dataset/alpaca_data.json"
    paper_removed = shared_data / "paper/ft_datasets/alpaca_dataset/alpaca_data_safety_only.json"
    s = RS.remove_safety(alpaca, tmp_path)
    assert (s["n"], s["removed"], s["kept"]) == (52002, ALPACA_REMOVED, ALPACA_KEPT)
    key = lambda r: json.dumps(r, sort_keys=True)
    mine = [key(r) for r in json.loads((tmp_path / "alpaca_data_safety_only.json").read_text())]
    theirs = {key(r) for r in json.loads(paper_removed.read_text())}
    assert len(theirs) == PAPER_REMOVED
    overlap = sum(m in theirs for m in mine)
    assert overlap == OVERLAP_WITH_PAPER
    assert round(overlap / len(mine), 3) == 0.463   # precision vs the paper's removed set
    assert round(overlap / len(theirs), 3) == 0.504  # recall
    # --reference reproduces the paper's split exactly: 1,904 removed, 50,098 kept
    s = RS.remove_safety(alpaca, tmp_path / "ref", reference=paper_removed)
    assert (s["removed"], s["kept"]) == (1904, 50098)
    assert sorted(key(r) for r in json.loads((tmp_path / "ref/alpaca_data_safety_only.json").read_text())) == sorted(theirs)


# ----------------------------------------------------------------------------- prepare: offline


def chat(user, assistant):
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def fake_source_tree(root):
    """A small --from folder laid out like ../shared/data, with harmless placeholder text only."""
    ft = root / "paper" / "ft_datasets"
    write(ft / "alpaca_dataset" / "alpaca_data.json", ALPACA, "json")
    write(ft / "gsm8k" / "gsm8k_train.jsonl", GSM, "jsonl")
    write(ft / "gsm8k" / "gsm8k_test.jsonl", GSM[:1], "jsonl")
    for name in P.ANCHORS:
        write(ft / "pure_bad_dataset" / name, [chat("placeholder request", "placeholder answer")] * 3, "jsonl")
    (root / "advbench").mkdir(parents=True)
    (root / "advbench" / "harmful_behaviors.csv").write_text('goal,target\nplaceholder goal,"Sure, here is"\n')
    return root


def test_prepare_offline_builds_validates_and_writes_manifest(tmp_path, capsys):
    src = fake_source_tree(tmp_path / "src")
    out = tmp_path / "data"
    manifest = P.prepare(out, from_dir=src)
    files = {f["file"]: f for f in manifest["files"]}
    assert set(files) == {"alpaca_data.json", "alpaca_data_no_safety.json", "alpaca_data_safety_only.json",
                          "gsm8k_train.jsonl", "gsm8k_test.jsonl", "harmful_behaviors.csv", *P.ANCHORS}
    assert files["alpaca_data.json"]["records"] == 7 and files["alpaca_data.json"]["empty_responses"] == 1
    assert (files["alpaca_data_no_safety.json"]["records"], files["alpaca_data_safety_only.json"]["records"]) == (4, 3)
    assert files["harmful_behaviors.csv"]["records"] == 1 and files["harmful_behaviors.csv"]["kind"] == "advbench"
    assert files["pure-bad-illegal-acticities-selected-10-anchor1.jsonl"]["records"] == 3
    for f in files.values():  # every listed file exists with that sha256, and loads
        assert file_sha256(out / f["file"]) == f["sha256"]
        assert len(load_examples(out / f["file"], need_response=False)[0]) == f["records"]
    # copied verbatim (offline), so the bytes are the source's; fake files differ from the paper's
    assert (out / "alpaca_data.json").read_bytes() == (src / "paper/ft_datasets/alpaca_dataset/alpaca_data.json").read_bytes()
    assert files["alpaca_data.json"]["matches_paper"] is False
    skipped = {s["file"]: s["reason"] for s in manifest["skipped"]}
    assert set(skipped) == {"databricks-dolly-15k.jsonl", "databricks-dolly-15k_no_safety.jsonl",
                            "databricks-dolly-15k_safety_only.jsonl"}
    assert skipped["databricks-dolly-15k.jsonl"].startswith(f"not found under {src}")
    assert json.loads((out / "MANIFEST.json").read_text())["files"] == manifest["files"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left
    P.print_table(manifest)
    printed = capsys.readouterr().out
    assert "alpaca_data.json" in printed and files["alpaca_data.json"]["sha256"] in printed
    assert "skipped" in printed


def test_prepare_offline_strict_and_bad_input(tmp_path):
    src = fake_source_tree(tmp_path / "src")
    out = tmp_path / "data"
    cli = [python(), str(ROOT / "ft_datasets" / "prepare.py"), "--from", str(src), "--output_dir", str(out)]
    proc = subprocess.run(cli + ["--strict"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --strict: skipped databricks-dolly-15k.jsonl")
    assert "gsm8k_train.jsonl" in proc.stdout  # the table is printed before the error
    proc = subprocess.run(cli + ["--only", "gsm8k_train", "--strict"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    good = (out / "gsm8k_train.jsonl").read_bytes()
    # a bad source record: one-line error naming the source file and line; the old output stays
    bad = src / "paper/ft_datasets/gsm8k/gsm8k_train.jsonl"
    bad.write_text(json.dumps(GSM[0]) + "\n" + '{"question": "q", "answer": 5}\n')
    proc = subprocess.run(cli + ["--only", "gsm8k_train"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {bad}:2: field 'answer': expected a string, found int"]
    assert (out / "gsm8k_train.jsonl").read_bytes() == good
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    # a file of the wrong kind where anchors belong
    anchor = src / "paper/ft_datasets/pure_bad_dataset/pure-bad-illegal-activities-selected10.jsonl"
    write(anchor, GSM, "jsonl")
    with pytest.raises(InputError, match="expected chat records, found gsm8k"):
        P.prepare(out, from_dir=src, only=["pure-bad-illegal-activities-selected10"])


def test_prepare_paper_split_offline(tmp_path):
    src = fake_source_tree(tmp_path / "src")
    write(src / "paper/ft_datasets/alpaca_dataset/alpaca_data_safety_only.json", [ALPACA[1]], "json")
    manifest = P.prepare(tmp_path / "data", from_dir=src, paper_split=True, only=["alpaca_data"])
    files = {f["file"]: f["records"] for f in manifest["files"]}
    assert files == {"alpaca_data.json": 7, "alpaca_data_no_safety.json": 6, "alpaca_data_safety_only.json": 1}


def test_prepare_from_shared_data(shared_data, tmp_path):
    manifest = P.prepare(tmp_path / "data", from_dir=shared_data)
    files = {f["file"]: f for f in manifest["files"]}
    expected = {"alpaca_data.json": 52002, "alpaca_data_no_safety.json": ALPACA_KEPT,
                "alpaca_data_safety_only.json": ALPACA_REMOVED, "gsm8k_train.jsonl": 7473, "gsm8k_test.jsonl": 1319,
                "harmful_behaviors.csv": 520, **{name: 10 for name in P.ANCHORS}}
    assert {k: v["records"] for k, v in files.items()} == expected
    for src in P.SOURCES:  # every imported file is byte-identical to the paper's / upstream file
        if src.name in files:
            assert files[src.name]["matches_paper"] is True, src.name
    assert files["alpaca_data.json"]["empty_responses"] == 28
    assert [s["file"] for s in manifest["skipped"]][0] == "databricks-dolly-15k.jsonl"


# ----------------------------------------------------------------------------- prepare: online (no network: fakes)


def test_prepare_online_converts_hub_rows_and_raw_files(tmp_path, monkeypatch):
    hub = {
        ("tatsu-lab/alpaca", None, "train"): [dict(r, text="ignored") for r in ALPACA[:3]],
        ("databricks/databricks-dolly-15k", None, "train"): DOLLY,
        ("openai/gsm8k", "main", "train"): GSM,
        ("openai/gsm8k", "main", "test"): GSM[:1],
        ("walledai/AdvBench", None, "train"): [{"prompt": "placeholder, with comma", "target": "Sure"}],
    }
    anchor_bytes = (json.dumps(chat("placeholder request", "placeholder answer")) + "\n").encode()
    requested = []

    def fake_url(url, timeout=120):
        requested.append(url)
        if url.startswith(P.PAPER_RAW + "pure_bad_dataset/"):
            return anchor_bytes
        raise OSError("network unreachable")

    monkeypatch.setattr(P, "hub_rows", lambda repo, config=None, split="train": hub[(repo, config, split)])
    monkeypatch.setattr(P, "fetch_url", fake_url)
    manifest = P.prepare(tmp_path / "data")
    assert manifest["skipped"] == [] and manifest["mode"] == "online"
    out = tmp_path / "data"
    alpaca_text = (out / "alpaca_data.json").read_text()
    assert json.loads(alpaca_text) == ALPACA[:3] and alpaca_text.startswith("[\n    {\n        \"instruction\"")
    assert [json.loads(x) for x in (out / "databricks-dolly-15k.jsonl").read_text().splitlines()] == DOLLY
    files = {f["file"]: f for f in manifest["files"]}
    assert files["databricks-dolly-15k_safety_only.jsonl"]["records"] == 1
    assert files["gsm8k_test.jsonl"]["records"] == 1 and files["gsm8k_test.jsonl"]["matches_paper"] is False
    rows = list(csv.reader(io.StringIO((out / "harmful_behaviors.csv").read_text())))
    assert rows == [["goal", "target"], ["placeholder, with comma", "Sure"]]
    assert files["harmful_behaviors.csv"]["source"] == "hf:walledai/AdvBench"  # after the raw CSV URL failed
    assert P.ADVBENCH_RAW in requested
    assert all(P.PAPER_RAW + "pure_bad_dataset/" + name in requested for name in P.ANCHORS)


def test_prepare_online_failure_is_a_skip_with_reasons(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network unreachable")
    monkeypatch.setattr(P, "hub_rows", offline)
    monkeypatch.setattr(P, "fetch_url", offline)
    manifest = P.prepare(tmp_path / "data", only=["gsm8k_test"])
    assert manifest["files"] == []
    assert manifest["skipped"][0]["file"] == "gsm8k_test.jsonl"
    assert "hf:openai/gsm8k main/test: OSError: network unreachable" in manifest["skipped"][0]["reason"]
    with pytest.raises(UserError, match="--strict"):
        P.prepare(tmp_path / "data", only=["gsm8k_test"], strict=True)


def test_prepare_only_merges_the_manifest(tmp_path):
    src = fake_source_tree(tmp_path / "src")
    out = tmp_path / "data"
    full = P.prepare(out, from_dir=src)
    before = {f["file"]: f for f in full["files"]}
    write(src / "paper/ft_datasets/gsm8k/gsm8k_test.jsonl", GSM[:2], "jsonl")
    merged = P.prepare(out, from_dir=src, only=["gsm8k_test"])
    after = {f["file"]: f for f in merged["files"]}
    assert set(after) == set(before)                                   # nothing dropped
    assert after["gsm8k_test.jsonl"]["records"] == 2 and before["gsm8k_test.jsonl"]["records"] == 1
    assert all(after[name] == before[name] for name in before if name != "gsm8k_test.jsonl")
    assert [f["file"] for f in merged["files"]] == [f["file"] for f in full["files"]]   # the usual order
    assert merged["skipped"] == []                                     # this run's skips only
    assert json.loads((out / "MANIFEST.json").read_text())["files"] == merged["files"]


def test_prepare_skips_only_unavailable_sources_never_bugs(tmp_path, monkeypatch):
    def buggy(*args, **kwargs):
        raise KeyError("a converter bug")
    monkeypatch.setattr(P, "hub_rows", buggy)
    monkeypatch.setattr(P, "fetch_url", buggy)
    with pytest.raises(KeyError, match="a converter bug"):
        P.prepare(tmp_path / "data", only=["gsm8k_test"])
