"""Study 2's committed splits (lab/study2/, docs/real_model/PREREG.md): they are what lab/study2/make_splits.py
recomputes from ../shared/data, and they have the properties the pre-registration states. Indices only: the
tests read the request and record text from ../shared/data and write none of it."""
import csv
import hashlib
import itertools
import json
import re

from conftest import ROOT
from lab.study2 import make_splits as M

STUDY2 = ROOT / "lab" / "study2"


def rows(name):
    with (STUDY2 / name).open(newline="") as f:
        return list(csv.DictReader(f))


def test_committed_splits_are_what_the_script_recomputes(shared_data):
    built = M.build(shared_data)
    assert sorted(built["files"]) == sorted([*M.FILES, "splits.json"])
    for name, text in built["files"].items():
        assert (STUDY2 / name).read_text(encoding="utf-8") == text, name
    manifest = json.loads((STUDY2 / "splits.json").read_text())
    for name in M.FILES:
        assert hashlib.sha256((STUDY2 / name).read_bytes()).hexdigest() == manifest["files"][name], name
    for path, sha in manifest["sources"].items():
        source = ROOT / path if path.startswith("lab/") else shared_data / path
        assert hashlib.sha256(source.read_bytes()).hexdigest() == sha, path
    # the pool is the first study's file, byte for byte
    first = json.loads((ROOT / "lab" / "smollm2_aligned" / "splits.json").read_text())
    assert manifest["pool"]["sha256"] == first["pool_sha256"] and manifest["pool"]["records"] == 50098


def test_advbench_halves_cover_every_prompt_once_and_keep_near_duplicates_together(shared_data):
    calibration = [int(r["index"]) for r in rows("advbench_calibration.csv")]
    report = [int(r["index"]) for r in rows("advbench_report.csv")]
    assert sorted(calibration + report) == list(range(520))
    assert abs(len(calibration) - 260) <= 3 and abs(len(report) - 260) <= 3
    side = {i: "calibration" for i in calibration} | {i: "report" for i in report}
    goals, _ = M.read_advbench(shared_data)
    # an independent pass over all pairs with the stated definition (topic-word Jaccard >= 0.5)
    words = [set(w for w in re.findall(r"[a-z0-9]+", g.lower())
                 if w not in M.STOPWORDS and w not in M.FRAMING_WORDS) for g in goals]
    crossing, pairs = [], 0
    for i, j in itertools.combinations(range(520), 2):
        union = words[i] | words[j]
        if union and len(words[i] & words[j]) / len(union) >= 0.5:
            pairs += 1
            if side[i] != side[j]:
                crossing.append((i, j))
    assert crossing == [] and pairs == json.loads((STUDY2 / "splits.json").read_text())[
        "advbench_halves"]["near_duplicate_pairs"] > 0
    # a group number names one component, all on one side
    groups = {}
    for name in ("advbench_calibration.csv", "advbench_report.csv"):
        for r in rows(name):
            groups.setdefault(r["group"], set()).add(side[int(r["index"])])
    assert all(len(s) == 1 for s in groups.values())


def test_the_split_rule_balances_whole_groups():
    groups = [[0, 1, 2, 3], [4, 5], [6], [7], [8], [9]]
    a, b = M.split_groups(groups, seed=0)
    assert sorted(a + b) == list(range(10)) and len(a) == len(b) == 5
    for g in groups:
        assert set(g) <= set(a) or set(g) <= set(b)
    assert M.split_groups(groups, seed=0) == (a, b)
    assert M.components(5, [(0, 1), (1, 2), (3, 4)]) == [[0, 1, 2], [3, 4]]


def test_heldout2_is_disjoint_from_every_earlier_split(shared_data):
    chosen = [int(r["pool_index"]) for r in rows("heldout2.csv")]
    assert len(chosen) == len(set(chosen)) >= 200
    pool, _ = M.alpaca_pool(shared_data)
    first = json.loads((ROOT / "lab" / "smollm2_aligned" / "splits.json").read_text())["indices"]
    earlier = set(first["pool"]) | set(first["heldout"]) | set(first["align"])
    assert not set(chosen) & earlier
    # the first study's selections are inside its pool (their index CSVs give positions in the 5,000-record file)
    for index_csv in (ROOT / "lab" / "smollm2_study" / "selections").glob("*/*_index.csv"):
        with index_csv.open(newline="") as f:
            for r in csv.DictReader(f):
                assert M.D.record_id(pool[first["pool"][int(r["index"])]]) == r["id"], index_csv
    # no prompt of an earlier split or of the paper's released selections, no prompt twice, an answer each
    def key(rec):
        return (rec.get("instruction", "").strip(), rec.get("input", "").strip())
    earlier_prompts = {key(pool[i]) for i in earlier}
    for rel in M.RELEASED:
        earlier_prompts |= {key(r) for r in json.loads((shared_data / rel).read_text(encoding="utf-8"))}
    prompts = [key(pool[i]) for i in chosen]
    assert len(set(prompts)) == len(prompts) and not set(prompts) & earlier_prompts
    assert all(pool[i]["output"].strip() for i in chosen)
    assert [r["id"] for r in rows("heldout2.csv")] == [M.D.record_id(pool[i]) for i in chosen]
