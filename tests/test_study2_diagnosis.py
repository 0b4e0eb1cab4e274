"""Study 2's anchor diagnosis (lab/study2/diagnosis.py, PREREG "Anchor diagnosis (Q5)"): the analysis against
hand-computed shares, ranks and medians; variant (a) on all 5,000 committed scores against the pre-registration's
numbers and the committed grad-top selection; the computed variants' commands against scripts/lab_real.sh's;
the answered anchors; (b)'s running-sum target; and variant (d) end to end on a tiny model, resumed."""
import csv
import json
import math
import re
import shlex
import subprocess
import time
from pathlib import Path

import pytest

from conftest import ROOT, SHARED, python
from lab.study2 import diagnosis as G
from lab.study2 import make_splits as MS
from lab.study2 import run as R
from safedata.errors import UserError


# ----------------------------------------------------------------------------- the analysis by hand

def test_analyse_by_hand():
    #        position   0   1   2   3
    columns = {"harmful": [1, 0, 0, 1], "safe1": [0, 1, 0, 0], "safe2": [0, 0, 1, -1]}
    answer_words = [1, 5, 9, 3]
    # score = h - s1 - s2 = [1, -1, -1, 2]: mean 1/4, var 7/4 - 1/16 = 27/16 (ddof 0)
    # harmful [1,0,0,1]: var 1/4, cov 3/4 - 1/8 = 5/8; -safe1 [0,-1,0,0]: var 3/16, cov 1/4 + 1/16 = 5/16;
    # -safe2 [0,0,-1,1]: var 1/2, cov 3/4
    expected = {"harmful": (4 / 27, 10 / 27), "-safe1": (3 / 27, 5 / 27), "-safe2": (8 / 27, 12 / 27),
                "score": (1.0, 1.0)}
    # Spearman: words' ranks [1,3,4,2] (deviations -1.5,.5,1.5,-.5; sum of squares 5) against the term's ranks
    # (ties averaged): harmful [3.5,1.5,1.5,3.5] -> -4/sqrt(4*5); -safe1 [3,1,3,3] -> -1/sqrt(3*5);
    # -safe2 [2.5,2.5,1,4] -> -3/sqrt(4.5*5); score [3,1.5,1.5,4] -> -3.5/sqrt(4.5*5)
    rho = {"harmful": -4 / math.sqrt(20), "-safe1": -1 / math.sqrt(15), "-safe2": -3 / math.sqrt(22.5),
           "score": -3.5 / math.sqrt(22.5)}
    # top 2 by the signed term (ties: earlier position): harmful 0,3 -> words 1,3; -safe1 0,2 -> 1,9;
    # -safe2 3,0 -> 3,1; score 3,0 -> 3,1
    top = {"harmful": (2, 1), "-safe1": (5, 1), "-safe2": (2, 1), "score": (2, 1)}
    out = G.analyse(columns, answer_words, top_k=2)
    assert out["n"] == 4 and out["top_k"] == 2 and out["pool_median_words"] == 4
    assert list(out["terms"]) == list(G.TERMS)
    for term, t in out["terms"].items():
        assert t["variance_share"] == pytest.approx(expected[term][0], abs=1e-12), term
        assert t["covariance_share"] == pytest.approx(expected[term][1], abs=1e-12), term
        assert t["spearman_log1p_words"] == pytest.approx(rho[term], abs=1e-12), term
        assert (t["top_median_words"], t["top_one_word"]) == top[term], term
    assert sum(out["terms"][t]["covariance_share"] for t in G.TERMS[:3]) == pytest.approx(1)


def test_analyse_refuses_misaligned_input_and_a_top_larger_than_the_slice():
    columns = {"harmful": [1, 2], "safe1": [0, 0], "safe2": [0, 1]}
    with pytest.raises(ValueError, match="2 scores, 3 answer-word counts"):
        G.analyse(columns, [1, 2, 3], top_k=1)
    with pytest.raises(ValueError, match="top 3"):
        G.analyse(columns, [1, 2], top_k=3)


# ----------------------------------------------------------------------------- variant (a) on the committed scores

@pytest.fixture(scope="module")
def first_pool(tmp_path_factory):
    """The first study's pool file: runs/study2/data/pool.json, else rebuilt from ../shared/data as run.py's data
    stage does (about 3 s), its sha256 checked against the first study's splits.json."""
    if G.POOL.is_file():
        return G.POOL
    if not SHARED.exists():
        pytest.skip("neither runs/study2/data/pool.json nor ../shared/data to rebuild it")
    pool, _ = MS.alpaca_pool(SHARED)
    first = json.loads(MS.FIRST_SPLITS.read_text())
    text = json.dumps([pool[i] for i in first["indices"]["pool"]], indent=1, ensure_ascii=False) + "\n"
    path = tmp_path_factory.mktemp("pool") / "pool.json"
    path.write_text(text, encoding="utf-8")
    assert MS.sha256_bytes(text.encode("utf-8")) == first["files"]["pool.json"]
    return path


def test_variant_a_on_all_5000_gives_the_preregistered_numbers(first_pool):
    records = G.pool_records(first_pool)
    columns, answer_words = G.scored_rows(G.COMMITTED_SCORES, records)
    assert len(answer_words) == 5000
    out = G.analyse(columns, answer_words, top_k=100)
    t = out["terms"]
    # PREREG: var(-safe1)/var(score) = 0.63 (covariance share 0.70), harmful 0.49 (0.14), -safe2 0.27 (0.16); its
    # figures are the 3-decimal values rounded again (harmful's covariance share is 0.13495: 0.135, then 0.14)
    shares = {term: (round(round(t[term]["variance_share"], 3), 2), round(round(t[term]["covariance_share"], 3), 2))
              for term in ("harmful", "-safe1", "-safe2")}
    assert shares == {"harmful": (0.49, 0.14), "-safe1": (0.63, 0.70), "-safe2": (0.27, 0.16)}
    # top-100 median answer words: combined 2 (39 one-word), harmful 26, -safe1 5, -safe2 16.5; pool 28
    assert {term: t[term]["top_median_words"] for term in G.TERMS} == {"harmful": 26, "-safe1": 5, "-safe2": 16.5,
                                                                      "score": 2}
    assert t["score"]["top_one_word"] == 39 and out["pool_median_words"] == 28
    # the combined score's top 100 is the first study's grad-top (rank.py --weights 1 -1 -1)
    with (ROOT / "lab/smollm2_study/selections/grad/pool_top100_index.csv").open(newline="") as f:
        grad_top = {int(r["index"]) for r in csv.DictReader(f)}
    score = [h - s1 - s2 for h, s1, s2 in zip(columns["harmful"], columns["safe1"], columns["safe2"])]
    assert set(sorted(range(5000), key=lambda i: -score[i])[:100]) == grad_top


def test_variant_a_stage_on_the_slice_and_kept(first_pool, tmp_path):
    def no_sh(command):
        raise AssertionError(f"variant (a) computes nothing: {command}")
    out = G.diagnosis_stage(no_sh, variants=("a",), pool=first_pool, out_dir=tmp_path / "work",
                            result=tmp_path / "diagnosis.json")
    entry = out["variants"]["a"]
    assert out["slice"]["n"] == 300 and entry["analysis"]["n"] == 300 and entry["analysis"]["top_k"] == 30
    slice_records = json.loads((tmp_path / "work" / "slice_300.json").read_text())
    assert slice_records == json.loads(Path(first_pool).read_text())[:300]
    # the slice's answer words, counted here with str.split
    words = sorted(len(r["output"].split()) for r in slice_records)
    assert entry["analysis"]["pool_median_words"] == (words[149] + words[150]) / 2
    kept = (tmp_path / "diagnosis.json").read_text()
    assert G.diagnosis_stage(no_sh, variants=("a",), pool=first_pool, out_dir=tmp_path / "work",
                             result=tmp_path / "diagnosis.json") == out
    assert (tmp_path / "diagnosis.json").read_text() == kept
    assert "| a | -safe1 |" in G.table(out)


def test_committed_scores_of_another_pool_are_refused(tmp_path):
    pool = [{"instruction": f"Say {i}.", "input": "", "output": "word " * i} for i in range(4)]
    with pytest.raises(UserError, match="is not the pool's record"):
        G.scored_rows(G.COMMITTED_SCORES, pool, 4)


# ----------------------------------------------------------------------------- the commands

def lab_real_gradient_calls() -> list[dict]:
    """scripts/lab_real.sh's get_gradients.py calls as flag -> values, each variable at the script's default."""
    text = (ROOT / "scripts" / "lab_real.sh").read_text()
    defaults = dict(re.findall(r'^(\w+)=\$\{\1:-"?([^}"]*)"?\}', text, re.M))
    calls = []
    for line in text.replace("\\\n", " ").splitlines():
        if "get_gradients.py" not in line:
            continue
        line = re.sub(r"\$(\w+)", lambda m: defaults.get(m.group(1), "<" + m.group(1) + ">"),
                      line.split("get_gradients.py", 1)[1])
        calls.append(flag_values(shlex.split(line.split(";")[0])))
    return calls


def flag_values(words) -> dict:
    out, flag = {}, None
    for word in map(str, words):
        if word.startswith("--"):
            flag = word
            out[flag] = []
        else:
            out[flag].append(word)
    return out


PATH_FLAGS = ("--model_name", "--data_path", "--output_dir", "--targets")


def without_paths(flags: dict) -> dict:
    return {k: v for k, v in flags.items() if k not in PATH_FLAGS}


def test_commands_carry_the_first_studys_flags_and_one_change(tmp_path):
    target_flags, pool_flags = lab_real_gradient_calls()
    target_flags, pool_flags = without_paths(target_flags), without_paths(pool_flags)
    assert target_flags["--anchor"] == [] and target_flags["--max_length"] == ["480"]
    assert pool_flags["--target_names"] == ["harmful", "safe1", "safe2"] and pool_flags["--max_length"] == ["512"]
    change = {"b": ({"--anchor_combination": ["running_sum"]}, {}), "c": ({}, {}),
              "d": ({"--params": ["linear"]}, {"--params": ["linear"]})}
    slice_path = tmp_path / "slice_300.json"
    for variant, (target_change, pool_change) in change.items():
        commands = G.variant_commands(variant, slice_path=slice_path, out_dir=tmp_path)
        entry = ["get_gradients.py"]
        targets = {}
        for name, command in commands["targets"].items():
            assert command[0] == G.PYTHON and command[1:1 + len(entry)] == entry, (variant, name)
            targets[name] = flag_values(command[1 + len(entry):])
            assert without_paths(targets[name]) == {**target_flags, **target_change}, (variant, name)
            assert targets[name]["--model_name"] == [str(G.MODEL)]
        pool = flag_values(commands["pool"][2:])
        assert commands["pool"][1] == "get_gradients.py"
        assert without_paths(pool) == {**pool_flags, **pool_change}, variant
        assert pool["--data_path"] == [str(slice_path)]
        assert pool["--targets"] == [targets[n]["--output_dir"][0] for n in ("harmful", "safe1", "safe2")]
        answered = {n: str(tmp_path / "c" / "anchors" / f"{n}.jsonl") for n in ("safe1", "safe2")}
        for name in ("harmful", "safe1", "safe2"):
            anchor = answered[name] if variant == "c" and name != "harmful" else str(G.ANCHORS[name])
            assert targets[name]["--data_path"] == [anchor], (variant, name)
        assert bool(commands["answers"]) == (variant == "c")
    answers = G.variant_commands("c", slice_path=slice_path, out_dir=tmp_path)["answers"]
    for name, command in answers.items():
        assert command[1] == "generate.py" and [str(c) for c in command[2:8]] == [
            "--model_name", str(G.MODEL), "--data_path", str(G.ANCHORS[name]), "--output_dir",
            str(tmp_path / "c" / "answers" / name)]
        assert command[8:] == R.GEN_FLAGS          # PREREG's answers: run.py's generation flags
    with pytest.raises(ValueError):
        G.variant_commands("a", slice_path=slice_path)


# ----------------------------------------------------------------------------- the answered anchors (c)

def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_answered_anchors_replace_only_the_answers(tmp_path):
    anchors = _write_jsonl(tmp_path / "a.jsonl", [
        {"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Old {i}."}],
         "source": i} for i in range(3)])
    responses = _write_jsonl(tmp_path / "responses.jsonl", [
        {"index": i, "id": "x", "prompt": f"Question {i}?", "response": f"New {i}."} for i in range(3)])
    out = G.answered_anchors(anchors, responses, tmp_path / "out.jsonl")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [{"messages": [{"role": "user", "content": f"Question {i}?"},
                                  {"role": "assistant", "content": f"New {i}."}], "source": i} for i in range(3)]
    wrong = _write_jsonl(tmp_path / "wrong.jsonl", [
        {"index": i, "id": "x", "prompt": f"Question {2 - i}?", "response": "r"} for i in range(3)])
    with pytest.raises(UserError, match="wrong.jsonl"):
        G.answered_anchors(anchors, wrong, tmp_path / "bad.jsonl")


def test_the_safe_anchor_sets_share_prompts_so_answered_files_are_identical(shared_data, tmp_path):
    """PREREG (c) on the real anchor files (read here, written only under tmp): safe1 and safe2 ask the same
    prompts, so the same greedy answers make the same file."""
    prompts = {}
    for name in G.SAFE:
        rows = [json.loads(line) for line in G.ANCHORS[name].read_text(encoding="utf-8").splitlines() if line]
        prompts[name] = [r["messages"][0]["content"] for r in rows]
    assert prompts["safe1"] == prompts["safe2"]
    responses = _write_jsonl(tmp_path / "responses.jsonl", [
        {"index": i, "id": "x", "prompt": p, "response": f"answer {i}"} for i, p in enumerate(prompts["safe1"])])
    made = [G.answered_anchors(G.ANCHORS[n], responses, tmp_path / f"{n}.jsonl").read_bytes() for n in G.SAFE]
    assert made[0] == made[1]


# ----------------------------------------------------------------------------- tiny-model runs

@pytest.fixture(scope="module")
def tiny_inputs(tmp_path_factory):
    """Anchor files (harmful, safe1, safe2: three exchanges each) and a 6-record pool of benign toy text."""
    root = tmp_path_factory.mktemp("inputs")
    anchors = {}
    for k, name in enumerate(("harmful", "safe1", "safe2")):
        anchors[name] = _write_jsonl(root / f"{name}.jsonl", [
            {"messages": [{"role": "user", "content": f"Tell me about topic {i}."},
                          {"role": "assistant", "content": f"Answer {k} on topic {i} has some plain facts."}]}
            for i in range(3)])
    pool = root / "pool.json"
    pool.write_text(json.dumps([{"instruction": f"Write about item {i}.", "input": "",
                                 "output": " ".join(["item"] * (2 * i + 1))} for i in range(6)]))
    return {"anchors": anchors, "pool": pool}


def _sh(calls):
    def sh(command):
        calls.append([str(c) for c in command])
        start = time.time()
        subprocess.run([python(), *[str(c) for c in command[1:]]], check=True, cwd=ROOT)
        calls[-1] = (calls[-1], time.time() - start)
    return sh


def test_variant_b_target_is_the_chat_encoding_with_the_originals_averaging(tiny_model_dir, tiny_inputs, tmp_path):
    """(b)'s target command: the chat template's tokens (each anchor's gradient norm as the plain target's), the
    running-sum combination (tests/test_gradients.py checks its values against a literal autograd loop)."""
    anchors = tiny_inputs["anchors"]["safe1"]
    flags = ["--model_name", tiny_model_dir, "--data_path", anchors, *G.TARGET_FLAGS]
    subprocess.run([python(), "get_gradients.py", "--anchor", *flags, "--output_dir", tmp_path / "plain"],
                   cwd=ROOT, check=True)
    command = G.variant_commands("b", slice_path=tmp_path / "slice.json", out_dir=tmp_path)["targets"]["safe1"]
    change = command[command.index("--anchor_combination"):command.index("--anchor_combination") + 2]
    subprocess.run([python(), "get_gradients.py", "--anchor", *flags, "--output_dir", tmp_path / "running",
                    *change], cwd=ROOT, check=True)
    plain, running = (json.loads((tmp_path / d / "meta.json").read_text()) for d in ("plain", "running"))
    assert running["template"] == plain["template"] == "chat"
    assert running["flags"]["anchor_combination"] == "running_sum" and not running["flags"]["original_quirks"]
    assert "C_i = G_0 + ... + G_i" in running["target"]["combination"]
    assert running["target"]["anchor_norms"] == plain["target"]["anchor_norms"]
    assert running["target"]["norm"] != pytest.approx(plain["target"]["norm"], rel=1e-3)


def test_variant_d_end_to_end_on_a_tiny_model_and_not_rerun(tiny_model_dir, tiny_inputs, tmp_path):
    calls, timed_names = [], []

    def timed(name, fn, *args):
        timed_names.append(name)
        return fn(*args)
    settings = dict(model=Path(tiny_model_dir), pool=tiny_inputs["pool"], anchors=tiny_inputs["anchors"],
                    out_dir=tmp_path / "work", result=tmp_path / "diagnosis.json", slice_n=4, top_k=2,
                    pool_sha256=None)
    out = G.diagnosis_stage(_sh(calls), timed, ("d",), **settings)
    assert timed_names == ["diagnosis_d"] and len(calls) == 4
    assert all(command[-2:] == ["--params", "linear"] for command, _ in calls)
    scores = tmp_path / "work" / "d" / "pool" / "scores.csv"
    with scores.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["index"]) for r in rows] == [0, 1, 2, 3] and list(rows[0]) == ["index", "id", "harmful", "safe1",
                                                                                  "safe2"]
    meta = json.loads((scores.parent / "meta.json").read_text())
    assert meta["flags"]["params"] == "linear" and meta["n"] == 4
    entry = out["variants"]["d"]
    assert entry["analysis"]["n"] == 4 and entry["identity"]["commands"]["pool"][-2:] == ["--params", "linear"]
    # answer words of the 4 records: 1, 3, 5, 7
    assert entry["analysis"]["pool_median_words"] == 4
    seconds = calls[-1][1]
    print(f"tiny pool scoring: {seconds:.1f} s for 4 records, {seconds / 4:.2f} s a record (process start included)")
    # kept: neither the stage nor the variant runs again
    again = G.diagnosis_stage(_sh(calls), timed, ("d",), **settings)
    assert again == out and len(calls) == 4 and timed_names == ["diagnosis_d"]
    (tmp_path / "diagnosis.json").unlink()
    assert G.diagnosis_stage(_sh(calls), timed, ("d",), **settings)["variants"]["d"]["analysis"] == entry["analysis"]
    assert len(calls) == 4 and timed_names == ["diagnosis_d"]
    assert G.run_variant("d", _sh(calls), timed, model=settings["model"], slice_path=tmp_path / "work" / "slice_4.json",
                         anchors=settings["anchors"], out_dir=tmp_path / "work") == scores
    assert len(calls) == 4
