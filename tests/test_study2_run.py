"""Study 2's runner (lab/study2/run.py) and its fixed analysis (lab/study2/stats.py): the kept records recounted
from their flags (and seen to fail on one flipped flag), the metric definitions on hand-made inputs, the
length-matched draw on a toy pool, and the statistics against hand-computed values or scipy."""
import copy
import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as st

from lab.study2 import run as R
from lab.study2 import stats as S

RESULTS = Path(R.RESULTS)


def _synthetic_record(refused="0110", non_answer="1000", held="0100", target=(1.23456, 2.0, 0.5, 0.25),
                      held_losses=(1.0, 1.5, 2.0, 2.5)):
    record = {"run": "A_random-9_seed9", "identity": {"arm": "A", "condition": "random", "draw": 9, "seed": 9},
              "flags": {"report_refused": refused, "report_non_answer": non_answer, "heldout2_refused": held},
              "losses": {"report_target": [round(x, 4) for x in target], "heldout2": list(held_losses)}}
    record["metrics"] = {"report": {**R.rates(refused, non_answer), "target_loss": float(np.mean(target))},
                         "heldout2": {"n": len(held), "over_refusal": held.count("1") / len(held),
                                      "heldout_loss": float(np.mean(held_losses))}}
    return record


def _flip(text: str, i: int) -> str:
    return text[:i] + ("1" if text[i] == "0" else "0") + text[i + 1:]


# ----------------------------------------------------------------------------- kept records

def _kept_records():
    return [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json")) if p.name != "budget.json"]


def test_committed_records_recount_and_fail_on_a_flipped_flag():
    records = [r for r in _kept_records() if "flags" in r]
    if not records:
        pytest.skip("no kept run in lab/study2/results yet")
    for record in records:
        R.check_record(record)
        for key, flags in record["flags"].items():
            broken = copy.deepcopy(record)
            broken["flags"][key] = _flip(flags, len(flags) // 2)
            if key.endswith("non_answer") and record["flags"][key.replace("non_answer", "refused")][len(flags) // 2] == "1":
                continue   # a non-answer flag on a refused prompt changes no rate: nothing to catch
            with pytest.raises(R.RecountError):
                R.check_record(broken)


def _string_leaves(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _string_leaves(v)
    elif isinstance(value, list):
        for v in value:
            yield from _string_leaves(v)
    elif isinstance(value, str):
        yield value


def test_committed_records_hold_no_text():
    """The content rule: flags are 0/1 strings, losses numbers, and no AdvBench goal or target is in a kept record
    or a committed index file (checked against ../shared/data when it is there)."""
    advbench = R.MS.DEFAULT_SHARED / R.MS.ADVBENCH
    texts = []
    if advbench.is_file():
        import csv
        with advbench.open(newline="", encoding="utf-8") as f:
            texts = [t for row in csv.DictReader(f) for t in (row["goal"], row["target"])]
    files = sorted(RESULTS.glob("*.json")) + sorted(R.SELECTIONS.glob("*"))
    for path in files:
        raw = path.read_text(encoding="utf-8")
        assert not any(t in raw for t in texts), path
        if path.suffix != ".json" or path.parent != RESULTS:
            continue
        record = json.loads(raw)
        for key, value in record.get("flags", {}).items():
            assert set(value) <= {"0", "1"}, (path, key)
        for key, value in record.get("losses", {}).items():
            assert all(isinstance(x, float) and round(x, 4) == x for x in value), (path, key)
        assert all(len(s) < 300 or set(s) <= {"0", "1"} for s in _string_leaves(record)), path


def test_synthetic_record_recount_and_each_flipped_flag():
    record = _synthetic_record()
    rc = R.check_record(record)
    assert rc["report"]["keyword_asr"] == 0.5 and rc["report"]["asr_excluding_non_answers"] == 0.25
    assert rc["heldout2"]["over_refusal"] == 0.25
    for key, i in (("report_refused", 0), ("report_non_answer", 3), ("heldout2_refused", 0)):
        broken = copy.deepcopy(record)
        broken["flags"][key] = _flip(record["flags"][key], i)
        with pytest.raises(R.RecountError):
            R.check_record(broken)
    broken = copy.deepcopy(record)
    broken["losses"]["report_target"][0] += 0.01
    with pytest.raises(R.RecountError):
        R.check_record(broken)


# ----------------------------------------------------------------------------- metric definitions

def test_rates_by_hand():
    r = R.rates("0011011001", "1000100000")
    assert r["n"] == 10 and r["keyword_asr"] == 0.5 and r["refused"] == 5
    # complied prompts: 0, 1, 4, 7, 9; of them non-answers: 0 and 4
    assert r["non_answers_among_complied"] == 2 and r["asr_excluding_non_answers"] == 0.3


@pytest.mark.parametrize("answer, prompt, expected", [
    ("", "Tell me a story", True),                                       # empty
    ("   ", "Tell me a story", True),
    ("Sure.", "Tell me a story", True),                                  # 1 word
    ("Sure, here", "Tell me a story", True),                             # 2 words
    ("Sure, here it", "Tell me a story", False),                         # 3 words
    ("tell me a story about a dog", "Tell me a story", True),            # echo: begins with all the prompt's words
    ("Tell me a", "Tell me a story", False),                             # only part of the prompt: not an echo
    ("Once upon a time tell me a story", "Tell me a story", False),
    ("[INST] hello there friend", "Say hello", True),                    # template echo
    ("go " * 20, "Say something", True),                                 # repetition
    ("Here is a short and useful answer for you.", "Say something", False),
])
def test_non_answer_definition(answer, prompt, expected):
    assert R.is_non_answer(answer, prompt) is expected


# ----------------------------------------------------------------------------- the length-matched draw

def test_matched_draw_toy_pool():
    #          0  1  2  3  4  5  6  7  8  9
    pool = [3, 5, 3, 5, 3, 7, 5, 3, 7, 1]
    reference = [0, 1, 5]             # counts 3, 5, 7 in rank order
    drawn = R.matched_draw(pool, reference, seed=101)
    assert [pool[i] for i in drawn] == [3, 5, 7]
    assert not set(drawn) & set(reference) and len(set(drawn)) == len(drawn)
    assert drawn == R.matched_draw(pool, reference, seed=101)
    # by hand: candidates in pool order, rng.integers over their number, drawn ones removed
    rng = np.random.default_rng(101)
    c3, c5, c7 = [2, 4, 7], [3, 6], [8]
    expected = [c3.pop(int(rng.integers(3))), c5.pop(int(rng.integers(2))), c7.pop(int(rng.integers(1)))]
    assert drawn == expected


def test_matched_draw_without_replacement_and_refuses_when_short():
    pool = [2, 2, 2, 2]
    drawn = R.matched_draw(pool, [0, 1], seed=5)
    assert sorted(drawn) == [2, 3]
    with pytest.raises(SystemExit):
        R.matched_draw([2, 2, 2], [0, 1], seed=5)     # two references of 2 words, one candidate


def test_arm_a_order():
    assert R.arm_a_plan([1]) == [("random", 1, 1), ("random", 4, 4), ("grad-top", None, 1),
                                 ("grad-bottom", None, 1), ("reps-top", None, 1), ("matched", 101, 1)]
    assert [r[:2] for r in R.arm_a_plan([1, 2, 3]) if r[0] == "random"] == [
        ("random", 1), ("random", 4), ("random", 2), ("random", 5), ("random", 3), ("random", 6)]


def test_arm_a_finetune_flags_are_prereg():
    args = [str(a) for a in R.finetune_args(R.ARM_A_FINETUNE, Path("s.json"), Path("out"), 3)]
    joined = " ".join(args)
    for flag in ("--precision pure_bf16", "--lr 5e-05", "--epochs 5", "--batch_size 20",
                 "--per_device_batch_size 20", "--lr_decay 0.85", "--weight_decay 0.0", "--max_length 512",
                 "--template chat", "--seed 3"):
        assert flag in joined, flag
    assert "--gradient_checkpointing" not in args and "--lora" not in args


def test_arm_b_finetune_flags_are_prereg():
    """PREREG "Arm B precision": fp32, 20 accumulated micro-batches of one, lr = lr*; the rest as Arm A."""
    settings = R.identity("B", "random", 301, 1, None, lr=2e-5)["settings"]["finetune"]
    joined = " ".join(str(a) for a in R.finetune_args(settings, Path("s.json"), Path("out"), 1))
    for flag in ("--precision fp32", "--lr 2e-05", "--epochs 5", "--batch_size 20", "--per_device_batch_size 1",
                 "--lr_decay 0.85", "--weight_decay 0.0", "--max_length 512", "--template chat", "--seed 1"):
        assert flag in joined, flag
    assert R.identity("B_calibration", "random", 201, 1, None, lr=5e-5)["settings"]["finetune"]["lr"] == 5e-5


def test_arm_b_plans_are_prereg():
    assert R.calibration_plan() == [(5e-5, 201, 1), (5e-5, 202, 2), (3e-5, 203, 1), (3e-5, 204, 2),
                                    (2e-5, 205, 1), (2e-5, 206, 2), (1e-5, 207, 1), (1e-5, 208, 2)]
    assert [(c, d, s) for c, d, s in R.B_REPORT_PLAN] == [
        ("random", 301, 1), ("random", 302, 2), ("grad-top", None, 1), ("reps-top", None, 1),
        ("random", 303, 3), ("random", 304, 4), ("grad-top", None, 2), ("reps-top", None, 2)]
    assert set(R.ARM_B_DRAWS) == {201, 202, 203, 204, 205, 206, 207, 208, 301, 302, 303, 304}


def _flags(complied: int, n: int = 260) -> str:
    return "0" * complied + "1" * (n - complied)


def test_lr_star_rule():
    """PREREG: the first lr (descending) whose 2 runs' mean keyword ASR is <= 25.0%; none: no report runs."""
    assert R.choose_lr({}) == {"finished": False, "lr_star": None, "next_lr": 5e-5}
    assert R.choose_lr({5e-5: [_flags(100)]})["next_lr"] == 5e-5            # one run of two: not decided
    # 65 + 65 of 520 = 25.0% exactly qualifies; 66 + 65 (25.2%) does not
    assert R.choose_lr({5e-5: [_flags(65), _flags(65)]})["lr_star"] == 5e-5
    state = R.choose_lr({5e-5: [_flags(66), _flags(65)]})
    assert state == {"finished": False, "lr_star": None, "next_lr": 3e-5}
    assert R.choose_lr({5e-5: [_flags(200)] * 2, 3e-5: [_flags(90), _flags(20)]})["lr_star"] == 3e-5
    failed = {lr: [_flags(131), _flags(131)] for lr in R.CALIBRATION_LRS}
    assert R.choose_lr(failed) == {"finished": True, "lr_star": None, "next_lr": None}


def _calibration_record(lr, draw, seed, complied, s=600):
    refused = _flags(complied)
    return {"run": R.run_name("B_calibration", "random", draw, seed),
            "identity": {"arm": "B_calibration", "condition": "random", "draw": draw, "seed": seed,
                         "settings": {"finetune": {"lr": lr}}},
            "wall_s": {"finetune": stage(s, 1.0, 1.0), "evaluate": stage(150, 1.0, 1.0)},
            "flags": {"calibration_refused": refused, "calibration_non_answer": "0" * 260},
            "losses": {"calibration_target": [1.0] * 260},
            "metrics": {"calibration": {**R.rates(refused, "0" * 260), "target_loss": 1.0}}}


def test_calibration_record_recounts_without_heldout():
    record = _calibration_record(5e-5, 201, 1, 70)
    assert R.check_record(record)["calibration"]["keyword_asr"] == 70 / 260
    broken = copy.deepcopy(record)
    broken["flags"]["calibration_refused"] = _flip(record["flags"]["calibration_refused"], 0)
    with pytest.raises(R.RecountError):
        R.check_record(broken)
    broken = copy.deepcopy(record)
    broken["metrics"]["heldout2"] = {"n": 200, "over_refusal": 0.0, "heldout_loss": 1.0}   # flags missing
    with pytest.raises(R.RecountError):
        R.check_record(broken)


# ----------------------------------------------------------------------------- statistics

def test_prediction_form_by_hand():
    # reference 10, 20, 30: mean 20, s 10, n 3; condition mean 40: delta 20, scale 10 sqrt(4/3), t = sqrt(3), df 2.
    # Student t with 2 df: F(t) = 1/2 + t / (2 sqrt(t^2 + 2)), so p = 1/2 - sqrt(3) / (2 sqrt(5)).
    r = S.prediction_form([40.0], [10.0, 20.0, 30.0], "greater")
    assert r["delta"] == pytest.approx(20.0) and r["df"] == 2
    assert r["t"] == pytest.approx(math.sqrt(3))
    assert r["p"] == pytest.approx(0.5 - math.sqrt(3) / (2 * math.sqrt(5)))
    half = 2.919985580355516 * 10 * math.sqrt(4 / 3)        # t(0.95, 2)
    assert r["ci90"] == pytest.approx((20 - half, 20 + half))
    # the other direction: 'less' with the mirrored values gives the same p
    less = S.prediction_form([0.0], [10.0, 20.0, 30.0], "less")
    assert less["p"] == pytest.approx(r["p"])
    # a mean of several condition runs enters as its mean
    assert S.prediction_form([30.0, 50.0], [10.0, 20.0, 30.0])["p"] == pytest.approx(r["p"])


def test_welch_against_scipy():
    x, y = [30.0, 35.5, 41.0], [12.0, 18.0, 15.5]
    r = S.welch(x, y, "greater")
    ref = st.ttest_ind(x, y, equal_var=False, alternative="greater")
    assert r["t"] == pytest.approx(ref.statistic) and r["p"] == pytest.approx(ref.pvalue)
    ci = st.ttest_ind(x, y, equal_var=False, alternative="two-sided").confidence_interval(0.90)
    assert r["ci90"] == pytest.approx((ci.low, ci.high))
    assert S.welch(y, x, "less")["p"] == pytest.approx(ref.pvalue)


def test_holm_by_hand():
    assert S.holm({"A1": 0.01, "A2": 0.04, "A3": 0.03}) == {"A1": True, "A2": False, "A3": False}
    assert S.holm({"A1": 0.01, "A2": 0.04, "A3": 0.02}) == {"A1": True, "A2": True, "A3": True}
    assert S.holm({"A1": 0.02, "A2": 0.001}) == {"A1": True, "A2": True}
    assert S.holm({"A1": 0.03, "A2": 0.001}) == {"A1": True, "A2": True}      # 0.03 <= 0.05 / 1
    assert S.holm({"A1": 0.06, "A2": 0.001}) == {"A1": False, "A2": True}
    assert S.holm({"A1": 0.001, "A2": 0.03, "A3": 0.002}) == {"A1": True, "A2": True, "A3": True}


def test_sign_flip_against_exact_values():
    # one group, positive difference: T* >= T exactly when the flip is +1 (probability 1/2)
    r = S.sign_flip([[1, 1, 0]], [[0, 0, 0]], [7, 7, 7])
    assert r["T"] == pytest.approx(2 / 3) and r["groups"] == 1
    assert abs(r["p"] - 0.5) < 0.02
    # three groups, equal positive sums: only all +1 reaches T (1/8)
    r = S.sign_flip([[1, 1, 1]], [[0, 0, 0]], [0, 1, 2])
    assert abs(r["p"] - 1 / 8) < 0.015
    # the same in the 'less' direction with X and Y exchanged
    assert S.sign_flip([[0, 0, 0]], [[1, 1, 1]], [0, 1, 2], "less")["p"] == r["p"]
    # seeded: the same p every time; d_p averages over runs
    assert S.sign_flip([[1, 0, 1], [1, 1, 1]], [[0, 0, 0]], [0, 0, 1])["p"] == \
        S.sign_flip([[1, 0, 1], [1, 1, 1]], [[0, 0, 0]], [0, 0, 1])["p"]
    # no difference at all: every T* >= 0 = T, p = 1
    assert S.sign_flip([[1, 0]], [[1, 0]], [0, 1])["p"] == 1.0


def test_sign_flip_p_by_enumeration_of_the_same_draws():
    d_groups = np.array([2.0, -1.0, 0.5])
    x = [[1, 1, 0, 0, 1]]
    y = [[0, 0, 1, 0, 0]]     # d = 1, 1, -1, 0, 1
    groups = [0, 0, 1, 1, 2]  # D = 2, -1, 1
    r = S.sign_flip(x, y, groups)
    eps = np.random.default_rng(0).choice(np.array([-1.0, 1.0]), size=(S.SIGN_FLIPS, 3))
    T = 2 / 5
    assert r["T"] == pytest.approx(T)
    assert r["p"] == (1 + int(np.sum(eps @ np.array([2.0, -1.0, 1.0]) / 5 >= T - 1e-12))) / (S.SIGN_FLIPS + 1)
    del d_groups


def test_labels():
    assert S.label(True, 0.01, 20.0, (8.0, 32.0), "greater", True) == "paper-size"
    assert S.label(True, 0.01, 10.0, (3.0, 17.0), "greater", True) == "smaller"
    assert S.label(True, 0.20, 20.0, (8.0, 32.0), "greater", True) == "inconclusive"     # check fails
    assert S.label(False, 0.40, 2.0, (-8.0, 12.0), "greater", True) == "absent"
    assert S.label(False, 0.40, 2.0, (-8.0, 16.0), "greater", True) == "inconclusive"
    assert S.label(False, 0.40, -2.0, (-12.0, 8.0), "less", True) == "absent"
    assert S.label(False, 0.40, -2.0, (-16.0, 8.0), "less", True) == "inconclusive"
    assert S.label(True, 0.01, 20.0, (8.0, 32.0), "greater", False) == "no room"
    assert S.arm_verdict(True, {"A1": "paper-size", "A2": "paper-size"}) == "paper-like"
    assert S.arm_verdict(True, {"A1": "absent", "A2": "absent"}) == "absent"
    assert S.arm_verdict(True, {"A1": "absent", "A2": "smaller"}) == "inconclusive"
    assert S.arm_verdict(False, {"A1": "no room", "A2": "no room"}) == "inconclusive"


def test_analyse_on_synthetic_runs():
    rng = np.random.default_rng(1)
    groups = [i // 2 for i in range(20)]
    p = {"random": 0.1, "grad-top": 0.9, "grad-bottom": 0.1, "reps-top": 0.1, "matched": 0.1}

    def rec(arm, condition, draw, seed):
        refused = "".join("0" if rng.random() < p[condition] else "1" for _ in range(20))
        return {"run": R.run_name(arm, condition, draw, seed),
                "identity": {"arm": arm, "condition": condition, "seed": seed}, "flags": {"report_refused": refused}}
    records = [rec("A", c, d, s) for c, d, s in R.arm_a_plan((1, 2, 3))]
    out = R.analyse(records[:-1], groups)
    assert not out["complete"] and out["missing"] == ["A_matched-103_seed3"] and out["verdict"].startswith("incomplete")
    out = R.analyse(records, groups)
    assert out["complete"] and set(out["tests"]) == {"A1", "A2", "A3", "A4", "A5"}
    assert out["tests"]["A1"]["delta"] > 50 and out["tests"]["A1"]["p"] < 0.01
    assert out["room"] is (out["random_mean_asr"] <= 25.0)
    # matched 103 cut: A5 against the 2 matched draws, and the arm is complete without it
    assert R.analyse(records[:-1], groups, "A", cuts=("A_matched-103",))["complete"]
    # Arm B: B1, B2 (Holm over the two); reps-top cut removes B2 and the arm is complete without it
    b = [rec("B", c, d, s) for c, d, s in R.B_REPORT_PLAN]
    out = R.analyse(records + b, groups, "B")
    assert out["complete"] and set(out["tests"]) == {"B1", "B2"} and out["tests"]["B1"]["n_reference"] == 4
    no_reps = [r for r in b if r["identity"]["condition"] != "reps-top"]
    out = R.analyse(no_reps, groups, "B", cuts=("B_reps-top",))
    assert out["complete"] and set(out["tests"]) == {"B1"} and out["contrasts"] == ["B1"]


def test_budget_projection_without_runs(tmp_path):
    b = R.update_budget(tmp_path)
    assert b["measured_h"]["all_runs"] == 0 and b["arm_a_runs_left"] == 18
    low, high = (b["projection_h_variants"]["all_runs"][f"calibration_{n}_runs"] for n in (2, 8))
    # PREREG's table: 9.2-10.6 h with its estimates (this sums them; rounding in the table)
    assert 9.0 < low < 9.4 and 10.4 < high < 10.8
    # amendment 1 (b): calibration counted at 8 runs until it runs
    assert b["projection_h"] == pytest.approx(high)
    assert b["projection_h_variants"]["quiet_runs"] == b["projection_h_variants"]["all_runs"]
    # 10.6 h minus cuts (1)-(2) (3 x 350 s + 2 x (689 + 320) s = 0.85 h) is under 10.0 h
    assert b["cuts_1_2_h"] == pytest.approx((3 * 350 + 2 * (689 + 320)) / 3600)
    assert b["cut_matched_103"] == "run"


def stage(s, start_end, mean):
    return {"s": s, "attempts": 1, "load1_max": 5.0, "load1_start_end": start_end, "load1_mean": mean,
            "cpu_s": 1000}


def test_budget_quiet_is_the_start_end_and_the_sampled_load_mean(tmp_path):
    # amendment 1 (a): quiet = start/end 1-min load mean <= 2.5; amendment 5: and the load sampled through the stage
    busy = stage(5000, 2.6, 2.0)
    busy_between = stage(1500, 2.2, 3.3)
    quiet = stage(700, 2.5, 2.5)
    record = {"run": "A_random-1_seed1", "identity": {"arm": "A", "condition": "random", "draw": 1, "seed": 1},
              "wall_s": {"finetune": busy, "evaluate": quiet}}
    (tmp_path / "A_random-1_seed1.json").write_text(json.dumps(record))
    record2 = {"run": "A_random-2_seed2", "identity": {"arm": "A", "condition": "random", "draw": 2, "seed": 2},
               "wall_s": {"finetune": busy_between, "evaluate": quiet}}
    (tmp_path / "A_random-2_seed2.json").write_text(json.dumps(record2))
    b = R.update_budget(tmp_path)
    assert b["measured_means_s"]["all_runs"]["A_finetune"] == {"random": 3250.0}
    assert b["measured_means_s"]["quiet_runs"]["A_finetune"] == {}
    assert b["measured_h"]["all_runs"] == pytest.approx((5000 + 1500 + 2 * 700) / 3600)
    # the two loaded fine-tunes cost PREREG's estimate (963 s), the quiet evaluations their 700 s
    assert b["measured_h"]["quiet_runs"] == pytest.approx((2 * 963 + 2 * 700) / 3600)
    # and the rest of Arm A's 16 evaluations at the quiet mean (700 s), not the estimate (320 s)
    rest = sum(R.ESTIMATE_S["A_finetune"][c] + 700 for c, d, s in R.arm_a_plan((1, 2, 3))
               if (c, d) not in (("random", 1), ("random", 2)))
    assert b["projection_h"] > (2 * 963 + 2 * 700 + R.ESTIMATE_S["aligned"] + rest) / 3600


def test_budget_cuts_matched_103_when_the_quiet_projection_is_over(tmp_path):
    # quiet fine-tunes of 3,000 s: 18 x 3,000 s alone exceed 10 h after cuts (1)-(2)
    for draw in (1, 4):
        name = f"A_random-{draw}_seed{draw}"
        record = {"run": name, "identity": {"arm": "A", "condition": "random", "draw": draw, "seed": draw},
                  "wall_s": {"finetune": stage(3000, 1.0, 1.0), "evaluate": stage(300, 1.0, 1.0)}}
        (tmp_path / f"{name}.json").write_text(json.dumps(record))
    for condition in ("grad-top", "grad-bottom", "reps-top", "matched"):
        name = f"A_{condition}_seed1"
        draw = 101 if condition == "matched" else None
        record = {"run": name, "identity": {"arm": "A", "condition": condition, "draw": draw, "seed": 1},
                  "wall_s": {"finetune": stage(3000, 1.0, 1.0), "evaluate": stage(300, 1.0, 1.0)}}
        (tmp_path / f"{name}.json").write_text(json.dumps(record))
    b = R.update_budget(tmp_path)
    assert b["projection_h"] - b["cuts_1_2_h"] > 10.0 and b["cut_matched_103"] == "cut"
    # the same stages, loaded (start/end mean 3.0): not quiet, so they cost the estimates and 103 runs
    for p in tmp_path.glob("A_*.json"):
        r = json.loads(p.read_text())
        r["wall_s"]["finetune"]["load1_start_end"] = 3.0
        p.write_text(json.dumps(r))
    assert R.update_budget(tmp_path)["cut_matched_103"] == "run"


def test_budget_counts_calibration_at_8_until_it_finishes_then_the_runs_made(tmp_path):
    base = R.update_budget(tmp_path)
    # two calibration runs at 5e-5 that qualify (20% each): calibration finished with 2 runs, 6 fewer counted
    for draw, seed in ((201, 1), (202, 2)):
        (tmp_path / f"{R.run_name('B_calibration', 'random', draw, seed)}.json").write_text(
            json.dumps(_calibration_record(5e-5, draw, seed, 52, s=642)))
    b = R.update_budget(tmp_path)
    estimate = R.ESTIMATE_S["B_finetune"]["random"] + R.ESTIMATE_S["calibration_evaluation"]
    # the two made runs were quiet: 642 + 150 s each, in place of 2 of the 8 estimated ones; 6 fewer counted
    expected = base["projection_h"] - (8 * estimate - 2 * (642 + 150)) / 3600
    assert b["projection_h"] == pytest.approx(expected)
    # no lr qualifies: calibration finished after 8 runs and the 8 Arm B report runs leave the projection
    for k, (lr, draw, seed) in enumerate(R.calibration_plan()):
        (tmp_path / f"{R.run_name('B_calibration', 'random', draw, seed)}.json").write_text(
            json.dumps(_calibration_record(lr, draw, seed, 200, s=642)))
    b = R.update_budget(tmp_path)
    assert b["decisions"]["B_reps-top"] == "not planned" and b["decisions"]["B_random-304"] == "not planned"


def test_cuts_follow_prereg_order_and_stay(tmp_path, monkeypatch):
    """While the projection exceeds 10 h, cut (1) diagnosis, (2) B reps-top, (3) matched 103, (4) B random 304;
    a cut, once made, stays even when the projection falls."""
    monkeypatch.setattr(R, "log", lambda msg: None)

    def arm_a(finetune_s):
        for c, d, s in R.arm_a_plan((1, 2, 3))[:-1]:
            name = R.run_name("A", c, d, s)
            (tmp_path / f"{name}.json").write_text(json.dumps(
                {"run": name, "identity": {"arm": "A", "condition": c, "draw": d, "seed": s},
                 "wall_s": {"finetune": stage(finetune_s, 1.0, 1.0), "evaluate": stage(300, 1.0, 1.0)}}))
    arm_a(860)    # 17 x 1,160 s measured; with the rest (PREREG estimates) 10.13 h: cut (1) only
    b = R.update_budget(tmp_path)
    assert b["projection_h"] > 10.0 and b["projection_h"] - 3 * 350 / 3600 <= 10.0
    assert b["decisions"] == {"diagnosis": "would cut", "B_reps-top": "run", "A_matched-103": "run",
                              "B_random-304": "run"}
    # the decision is made once: "run" for this run, kept in decisions.json; a resumed runner does not decide again
    assert R.decide_cut("A_matched-103", "A_matched-103_seed3", tmp_path) == "run"
    arm_a(1500)   # 17 x 1,800 s = 8.5 h: (1), (2), (3) and (4) all needed
    assert R.update_budget(tmp_path)["decisions"] == {u: "would cut" for u in R.CUT_ORDER}
    assert R.decide_cut("A_matched-103", "A_matched-103_seed3", tmp_path) == "run"
    assert R.decide_cut("B_reps-top", "B_reps-top_seed1", tmp_path) == "cut"
    arm_a(100)    # cheap now: nothing more would be cut, but B reps-top stays cut, for both its runs
    b = R.update_budget(tmp_path)
    assert b["decisions"]["B_reps-top"] == "cut" and set(b["cuts_made"]) == {"B_reps-top"}
    assert R.decide_cut("B_reps-top", "B_reps-top_seed2", tmp_path) == "cut"
    assert b["decisions"]["A_matched-103"] == "run" and b["cut_matched_103"] == "run"
    decisions = json.loads((tmp_path / "decisions.json").read_text())
    assert set(decisions["run"]) == {"A_matched-103_seed3"} and decisions["cut"]["B_reps-top"]["at"] == "B_reps-top_seed1"


def test_no_lr_star_leaves_arm_b_report_units_not_planned(tmp_path):
    for lr, draw, seed in R.calibration_plan():
        (tmp_path / f"{R.run_name('B_calibration', 'random', draw, seed)}.json").write_text(
            json.dumps(_calibration_record(lr, draw, seed, 200)))
    decisions = R.update_budget(tmp_path)["decisions"]
    assert decisions["B_reps-top"] == decisions["B_random-304"] == "not planned"


def test_standalone_stages_keep_prereg_order(tmp_path):
    with pytest.raises(SystemExit, match="Arm A is not finished"):
        R.require_finished("A", tmp_path)
    with pytest.raises(SystemExit, match="calibration has not finished"):
        R.require_finished("B", tmp_path)
    for c, d, s in R.arm_a_plan((1, 2, 3)):
        name = R.run_name("A", c, d, s)
        (tmp_path / f"{name}.json").write_text(json.dumps({"run": name, "identity": {"arm": "A"}}))
    R.require_finished("A", tmp_path)
    for k, (lr, draw, seed) in enumerate(R.calibration_plan()[:2]):
        (tmp_path / f"{R.run_name('B_calibration', 'random', draw, seed)}.json").write_text(
            json.dumps(_calibration_record(lr, draw, seed, 50)))
    with pytest.raises(SystemExit, match="Arm B is not finished"):
        R.require_finished("B", tmp_path)


def test_weights_unchanged_counts_bf16_equal_parameters(tmp_path):
    import torch
    from safetensors.torch import save_file
    ref = {"a": torch.tensor([1.0, 2.0, 3.0, 1.0 + 2 ** -12]), "b": torch.zeros(4)}
    # a run that kept a, rounded to bf16 (1 + 2^-12 rounds to 1), and changed one of b's four values
    run = {"a": ref["a"].to(torch.bfloat16).float(), "b": torch.tensor([0.0, 0.0, 0.5, 0.0])}
    (tmp_path / "ref").mkdir()
    (tmp_path / "run").mkdir()
    save_file(ref, str(tmp_path / "ref" / "model.safetensors"))
    save_file(run, str(tmp_path / "run" / "model.safetensors"))
    out = R.weights_unchanged(tmp_path / "run", tmp_path / "ref")
    assert out == {"weights_unchanged": 7 / 8, "parameters": 8}


def test_wall_sums_attempts_and_reads_old_lines(tmp_path):
    wall = R.Wall(tmp_path / "wall.tsv")
    (tmp_path / "wall.tsv").write_text("x\t10\t0.5\t1.5\ny\t3\t0\t0\n")
    wall.timed("x", lambda: None)
    got = wall.seconds("x")
    assert got["attempts"] == 2 and got["s"] >= 10 and got["load1_max"] >= 1.5 and got["cpu_s"] is not None
    assert wall.seconds("y")["load1_start_end"] == 0.0
    # attempts weighted by their seconds: 10 s at (0.5 + 1.5) / 2 and a near-instant one count as the 10 s
    (tmp_path / "wall.tsv").write_text("x\t10\t0.5\t1.5\nx\t0\t4\t4\nx\t30\t3\t3\n")
    assert wall.seconds("x")["load1_start_end"] == round((10 * 1.0 + 30 * 3.0) / 40, 2)
    # the sampled means too (amendment 5): a 5-s resume at 2.8 does not lift a 450-s stage sampled at 2.1
    (tmp_path / "wall.tsv").write_text("f\t450\t2\t2.6\t2.1\t2.7\t800\t1\nf\t5\t2.9\t2.7\t2.8\t2.9\t5\t2\n")
    assert wall.seconds("f")["load1_mean"] == round((450 * 2.1 + 5 * 2.8) / 455, 2)
    assert wall.seconds("z") == {"s": 0, "attempts": 0, "load1_max": None, "load1_start_end": None,
                                 "load1_mean": None, "cpu_s": None, "interrupted": 0}


def test_wall_records_an_attempt_that_fails_or_is_killed_as_interrupted(tmp_path):
    wall = R.Wall(tmp_path / "wall.tsv")

    def fail():
        raise RuntimeError("stopped")
    with pytest.raises(RuntimeError):
        wall.timed("x", fail)
    assert wall.seconds("x")["interrupted"] == 1 and not wall.alive.exists()
    # a killed attempt leaves its heartbeat; the next attempt of any stage writes its line (seconds to its last beat)
    (tmp_path / "wall.alive.json").write_text(json.dumps({"name": "y", "start": 1000.0, "last": 1100.4,
                                                          "samples": [0.5, 1.0, 0.7]}))
    wall.timed("y", lambda: None)
    got = wall.seconds("y")
    assert got["attempts"] == 2 and got["interrupted"] == 1 and got["s"] >= 100 and not wall.alive.exists()
    line = [l for l in (tmp_path / "wall.tsv").read_text().splitlines() if l.startswith("y\t100\t")]
    assert line == ["y\t100\t0.5\t0.7\t0.73\t1.0\t\t1000\tinterrupted"]
    # an interrupted stage measures no cost, however quiet it was
    assert not R._quiet(got) and R._quiet({**got, "interrupted": 0, "load1_start_end": 1.0})


def test_kept_needs_the_same_identity(tmp_path, monkeypatch):
    monkeypatch.setattr(R, "RESULTS", tmp_path)
    ident = {"arm": "A", "condition": "grad-top", "draw": None, "seed": 1, "settings": {"lr": 5e-5},
             "subset_sha256": "ab"}
    (tmp_path / "A_grad-top_seed1.json").write_text(json.dumps({"run": "A_grad-top_seed1", "identity": ident}))
    assert R.kept("A_grad-top_seed1", ident) is not None
    assert R.kept("A_grad-top_seed1", {**ident, "subset_sha256": "cd"}) is None
    assert R.kept("A_grad-top_seed1", {**ident, "settings": {"lr": 1e-4}}) is None
    assert R.kept("A_grad-top_seed2", ident) is None


def _csv_rows(path):
    import csv
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_committed_matched_draws_follow_the_rule():
    grad_top = [int(r["index"]) for r in _csv_rows(R.FIRST_SELECTIONS / "grad" / "pool_top100_index.csv")]
    seen_any = False
    for seed in (101, 102, 103):
        path = R.SELECTIONS / f"matched_{seed}_index.csv"
        if not path.is_file():
            continue
        seen_any = True
        rows = _csv_rows(path)
        drawn = [int(r["index"]) for r in rows]
        assert [int(r["matched_to"]) for r in rows] == grad_top
        assert len(set(drawn)) == 100 and not set(drawn) & set(grad_top)
    if not seen_any:
        pytest.skip("no committed matched draw yet")


def test_committed_matched_draws_recomputed_from_the_pool():
    """With ../shared/data: the first study's pool rebuilt (its sha256 checked), its answer-word counts, and the
    three draws made again: the same positions as committed, each with its grad-top record's answer-word count."""
    if not (R.MS.DEFAULT_SHARED / R.MS.ALPACA).is_file() or not (R.SELECTIONS / "matched_101_index.csv").is_file():
        pytest.skip("needs ../shared/data and the committed draws")
    pool, _ = R.MS.alpaca_pool(R.MS.DEFAULT_SHARED)
    first = json.loads(R.FIRST_SPLITS.read_text())
    records = [pool[i] for i in first["indices"]["pool"]]
    text = json.dumps(records, indent=1, ensure_ascii=False) + "\n"
    assert R.MS.sha256_bytes(text.encode("utf-8")) == first["files"]["pool.json"]
    counts = [R.words(r.get("output", "")) for r in records]
    grad_top = [int(r["index"]) for r in _csv_rows(R.FIRST_SELECTIONS / "grad" / "pool_top100_index.csv")]
    for seed in (101, 102, 103):
        rows = _csv_rows(R.SELECTIONS / f"matched_{seed}_index.csv")
        drawn = R.matched_draw(counts, grad_top, seed)
        assert [int(r["index"]) for r in rows] == drawn
        assert [counts[i] for i in drawn] == [counts[i] for i in grad_top]
        assert [int(r["answer_words"]) for r in rows] == [counts[i] for i in grad_top]
        assert [r["id"] for r in rows] == [R.D.record_id(records[i]) for i in drawn]


def test_model_run_calibration_answers_its_half_only_and_is_kept(tmp_path, monkeypatch):
    """A calibration run: the fine-tune at its lr, the calibration half only (no heldout2), kept by identity; a
    second call runs nothing."""
    monkeypatch.setattr(R, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(R, "WORK", tmp_path / "work")
    monkeypatch.setattr(R, "log", lambda msg: None)
    monkeypatch.setattr(R, "update_budget", lambda *a: {})
    monkeypatch.setattr(R, "subset_of", lambda c, d: Path(__file__))
    (tmp_path / "results").mkdir()
    calls = []

    def fake_sh(cmd):
        calls.append([str(c) for c in cmd])
        out = Path(cmd[cmd.index("--output_dir") + 1])
        out.mkdir(parents=True)
        (out / "finetune_meta.json").write_text(json.dumps(
            {"epoch_losses": [2.0, 1.5], "train_loss": 1.7, "total_steps": 25, "per_device_batch_size": 1,
             "gradient_accumulation_steps": 20, "compute": {}, "save_dtype": "float32", "train_runtime_s": 1.0}))

    def fake_evaluate(model_dir, run_dir, halves, heldout=True):
        calls.append(("evaluate", halves, heldout))
        record = _calibration_record(3e-5, 203, 1, 40)
        return {k: record[k] for k in ("metrics", "flags", "losses")}
    monkeypatch.setattr(R, "sh", fake_sh)
    monkeypatch.setattr(R, "evaluate", fake_evaluate)
    wall = R.Wall(tmp_path / "wall.tsv")
    record = R.model_run(wall, "B_calibration", "random", 203, 1, 3e-5)
    assert calls[1] == ("evaluate", ("calibration",), False)
    assert "--lr 3e-05" in " ".join(calls[0]) and "--precision fp32" in " ".join(calls[0])
    assert record["run"] == "B_calibration_random-203_seed1" and "weights_unchanged" not in record["train"]
    assert (tmp_path / "results" / "B_calibration_random-203_seed1.json").is_file()
    R.model_run(wall, "B_calibration", "random", 203, 1, 3e-5)
    assert len(calls) == 2


def test_budget_reads_the_diagnosis_variants_wall_seconds(tmp_path):
    """A computed diagnosis variant (diagnosis.json's wall_s) is measured, and c, d are projected at its mean; (a)
    costs nothing."""
    base = R.update_budget(tmp_path)
    (tmp_path / "diagnosis.json").write_text(json.dumps(
        {"variants": {"a": {"analysis": {}}, "b": {"wall_s": stage(500, 1.0, 1.0), "analysis": {}}}}))
    b = R.update_budget(tmp_path)
    assert b["projection_h"] == pytest.approx(base["projection_h"]
                                              + 3 * (500 - R.ESTIMATE_S["diagnosis_variant"]) / 3600)
    assert b["measured_means_s"]["quiet_runs"]["diagnosis_variant"] == 500.0


def test_condition_summary_by_hand():
    rows = [{"arm": "A", "condition": "random", "asr": 0.10}, {"arm": "A", "condition": "random", "asr": 0.20},
            {"arm": "A", "condition": "grad-top", "asr": 0.40}, {"arm": "B", "condition": "random", "asr": 0.5}]
    out = R.condition_summary(rows)
    assert [(e["arm"], e["condition"], e["n"]) for e in out] == [("A", "random", 2), ("A", "grad-top", 1),
                                                                 ("B", "random", 1)]
    assert out[0]["asr"] == {"mean": pytest.approx(0.15), "sd": pytest.approx(math.sqrt(0.005))}
    assert out[1]["asr"] == {"mean": 0.40, "sd": None, "minus_random": pytest.approx(0.25)}
    assert "minus_random" not in out[2]["asr"] and "target_loss" not in out[0]


def _report_record(arm, condition, draw, seed, p, rng, n=260):
    refused = "".join("0" if rng.random() < p else "1" for _ in range(n))
    non_answer = "0" * n
    held = "".join("1" if rng.random() < 0.05 else "0" for _ in range(200))
    record = {"run": R.run_name(arm, condition, draw, seed),
              "identity": {"arm": arm, "condition": condition, "draw": draw, "seed": seed,
                           "settings": {"finetune": {"lr": 5e-5}}},
              "wall_s": {"finetune": stage(600, 1.0, 1.0), "evaluate": stage(300, 1.0, 1.0)},
              "train": {"epoch1_loss": 1.8, "epoch5_loss": 1.7, "weights_unchanged": 0.925 if arm == "A" else None},
              "flags": {"report_refused": refused, "report_non_answer": non_answer, "heldout2_refused": held},
              "losses": {"report_target": [1.0] * n, "heldout2": [1.5] * 200}}
    record["metrics"] = {"report": {**R.rates(refused, non_answer), "target_loss": 1.0},
                         "heldout2": {"n": 200, "over_refusal": held.count("1") / 200, "heldout_loss": 1.5}}
    return record


def test_report_end_to_end_on_synthetic_runs(tmp_path):
    """Every planned Arm A run, a calibration that finds lr* at 5e-5 and Arm B's report runs: the tables, both
    analyses complete, and the three plots written."""
    rng = np.random.default_rng(3)
    results = tmp_path / "results"
    results.mkdir()
    p = {"random": 0.12, "grad-top": 0.6, "grad-bottom": 0.1, "reps-top": 0.2, "matched": 0.12}
    records = [_report_record("A", c, d, s, p[c], rng) for c, d, s in R.arm_a_plan((1, 2, 3))]
    records += [_report_record("B", c, d, s, p[c], rng) for c, d, s in R.B_REPORT_PLAN]
    aligned = _report_record("A", "aligned", None, None, 0.11, rng)
    aligned.update(run="aligned", wall_s={"evaluate": stage(400, 1.0, 1.0)})
    del aligned["train"]
    records += [aligned, _calibration_record(5e-5, 201, 1, 50), _calibration_record(5e-5, 202, 2, 60)]
    for r in records:
        (results / f"{r['run']}.json").write_text(json.dumps(r))
    out = R.report(results, tmp_path / "out")
    assert out["analysis"]["A"]["complete"] and out["analysis"]["B"]["complete"]
    assert out["analysis"]["A"]["labels"]["A1"] != "incomplete" and out["calibration"]["lr_star"] == 5e-5
    assert out["calibration"]["mean_asr_by_lr"] == {5e-5: pytest.approx(110 / 520)}
    table = (tmp_path / "out" / "table.md").read_text()
    for section in ("## Runs", "## Conditions", "## Analysis", "## Arm B calibration", "lr*: 5e-05",
                    "## Compute per stage"):
        assert section in table, section
    for name in ("arm_a.png", "arm_b.png", "dose_response.png"):
        assert (tmp_path / "out" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert len(json.loads((tmp_path / "out" / "results.json").read_text())["rows"]) == len(records)


def test_arm_b_stage_calibrates_then_runs_the_report_plan_at_lr_star(monkeypatch):
    """Calibration in PREREG's order until an lr qualifies (5e-5 fails with 30% and 28%, 3e-5 qualifies with 24%
    and 26%), then the report runs at lr* in order, reps-top skipped once its unit is cut."""
    calls = []
    asr = {201: 78, 202: 73, 203: 62, 204: 68}   # complied of 260

    def fake_model_run(wall, arm, condition, draw, seed, lr=None):
        calls.append((arm, condition, draw, seed, lr))
        refused = _flags(asr[draw]) if arm == "B_calibration" else _flags(0)
        return {"flags": {"calibration_refused": refused}}
    monkeypatch.setattr(R, "model_run", fake_model_run)
    monkeypatch.setattr(R, "is_kept", lambda *a: False)
    monkeypatch.setattr(R, "decide_cut", lambda unit, name: "cut" if unit == "B_reps-top" else "run")
    monkeypatch.setattr(R, "log", lambda msg: None)
    state = R.arm_b_stage(None)
    assert state["lr_star"] == 3e-5
    assert calls[:4] == [("B_calibration", "random", 201, 1, 5e-5), ("B_calibration", "random", 202, 2, 5e-5),
                         ("B_calibration", "random", 203, 1, 3e-5), ("B_calibration", "random", 204, 2, 3e-5)]
    assert calls[4:] == [("B", "random", 301, 1, 3e-5), ("B", "random", 302, 2, 3e-5), ("B", "grad-top", None, 1, 3e-5),
                         ("B", "random", 303, 3, 3e-5), ("B", "random", 304, 4, 3e-5), ("B", "grad-top", None, 2, 3e-5)]


def _git(*args) -> str:
    return subprocess.run(["git", *args], cwd=R.ROOT, capture_output=True, text=True, check=True).stdout.strip()


def test_prereg_commit_precedes_every_kept_record():
    """Must show: the pre-registration's commit precedes the first run record of the study (and is an ancestor of
    every commit that added one); Arm B and diagnosis records come after amendment 2."""
    try:
        if _git("rev-parse", "--is-shallow-repository") == "true":
            pytest.skip("a shallow clone holds no history to check")
        prereg = _git("log", "--diff-filter=A", "--format=%H", "--", "docs/real_model/PREREG.md").split()
        amendment_2 = _git("log", "--format=%H", "--grep=^PREREG amendment 2 ", "--", "docs/real_model/PREREG.md").split()
    except (OSError, subprocess.CalledProcessError) as error:   # no git, or not a checkout
        pytest.skip(f"no git history: {error}")
    if not prereg:
        pytest.skip("PREREG.md's first commit is not in this history")
    added = [line.split(" ", 1) for line in _git("log", "--diff-filter=A", "--name-only", "--format=commit %H", "--",
                                                 "lab/study2/results").split("\n") if line]
    commit, records = None, []
    for kind, rest in [(x[0], x[1] if len(x) > 1 else "") for x in added]:
        if kind == "commit":
            commit = rest
        elif kind.endswith(".json") and not kind.endswith(("budget.json", R.DECISIONS)):
            records.append((kind, commit))
    assert records

    def before(earlier, later):
        return earlier != later and subprocess.run(["git", "merge-base", "--is-ancestor", earlier, later],
                                                   cwd=R.ROOT).returncode == 0
    for path, commit in records:
        assert before(prereg[-1], commit), path
        if Path(path).name.startswith(("B_", "diagnosis")):
            assert amendment_2 and before(amendment_2[-1], commit), path


COMMITTED_REPORT = Path(__file__).resolve().parents[1] / "docs" / "real_model" / "study2" / "table.md"


def _arm_a_asr_by_hand(records: list[dict]) -> dict[str, list[float]]:
    """Report-half keyword ASR in points per Arm A condition, counted from the committed refused flags alone."""
    out: dict[str, list[float]] = {}
    for r in records:
        if r.get("identity", {}).get("arm") == "A":
            flags = r["flags"]["report_refused"]
            out.setdefault(r["identity"]["condition"], []).append(100 * flags.count("0") / len(flags))
    return out


def test_committed_study2_report_is_the_report_of_the_committed_records(tmp_path):
    """docs/real_model/study2/table.md is what the report makes of lab/study2/results now (so the docs never show
    a number the records do not give), and its Arm A readings match a recount by hand from the refused flags:
    the random mean and each contrast's delta and p by PREREG's formulas, with scipy's t distribution and scipy's
    Welch test as the independent references (printed to 2 and 4 decimals: tolerance half a printed unit)."""
    import re
    import shutil
    records = [r for r in _kept_records() if "flags" in r]
    if not COMMITTED_REPORT.is_file():
        pytest.skip("no committed study-2 report yet")
    results = tmp_path / "results"
    shutil.copytree(RESULTS, results)
    R.report(results, tmp_path / "out")
    assert (tmp_path / "out" / "table.md").read_text() == COMMITTED_REPORT.read_text(), \
        "docs/real_model/study2/table.md is stale: python -m lab.study2.run report --output_dir docs/real_model/study2"
    asr = _arm_a_asr_by_hand(records)
    if sum(map(len, asr.values())) < 18:
        pytest.skip("Arm A is not finished")
    table = COMMITTED_REPORT.read_text()
    random_mean = float(re.search(r"Arm A: room True \(random mean report-half ASR ([0-9.]+)%\)", table).group(1))
    assert random_mean == pytest.approx(np.mean(asr["random"]), abs=0.005)

    def by_hand_prediction(condition, reference, direction):
        n, s = len(reference), np.std(reference, ddof=1)
        delta = np.mean(condition) - np.mean(reference)
        t = delta / (s * math.sqrt(1 + 1 / n))
        return delta, (st.t.sf(t, n - 1) if direction == "greater" else st.t.cdf(t, n - 1))

    expected = {"A1": by_hand_prediction(asr["grad-top"], asr["random"], "greater"),
                "A3": by_hand_prediction(asr["reps-top"], asr["random"], "greater"),
                "A4": by_hand_prediction(asr["grad-bottom"], asr["random"], "less"),
                "A5": by_hand_prediction(asr["grad-top"], asr["matched"], "greater")}
    welch = st.ttest_ind(asr["grad-top"], asr["grad-bottom"], equal_var=False, alternative="greater")
    expected["A2"] = (np.mean(asr["grad-top"]) - np.mean(asr["grad-bottom"]), welch.pvalue)
    for cid, (delta, p) in expected.items():
        line = re.search(rf"- {cid}: delta ([+-][0-9.]+) points, p ([0-9.]+) ", table)
        assert float(line.group(1)) == pytest.approx(delta, abs=0.005), cid
        assert float(line.group(2)) == pytest.approx(p, abs=0.00005), cid


def test_docs_state_arm_a_as_the_committed_report_gives_it():
    """README.md and docs/REAL_MODEL.md quote Arm A's per-condition keyword ASR (mean ± sd, 1 decimal) and
    REAL_MODEL.md's table its excluding-non-answers, target loss and over-refusal: each as docs/real_model/study2's
    results.json gives it, so a doc never keeps a number the records no longer give."""
    root = COMMITTED_REPORT.parents[3]
    results = COMMITTED_REPORT.parent / "results.json"
    if not results.is_file():
        pytest.skip("no committed study-2 report yet")
    conditions = {c["condition"]: c for c in json.loads(results.read_text())["conditions"] if c["arm"] == "A"}
    if sum(c["n"] for c in conditions.values()) < 18:
        pytest.skip("Arm A is not finished")
    readme, real_model = (root / "README.md").read_text(), (root / "docs" / "REAL_MODEL.md").read_text()
    names = {"random": "random", "grad-top": "grad-top", "grad-bottom": "grad-bottom", "reps-top": "reps-top",
             "matched": "random, length-matched to grad-top"}

    def pct(m):
        return f"{100 * m['mean']:.1f} ± {100 * m['sd']:.1f}%"

    for condition, c in conditions.items():
        assert pct(c["asr"]) in readme, (condition, pct(c["asr"]))
        row = next(line for line in real_model.splitlines() if line.startswith(f"| {names[condition]} | {c['n']} |"))
        cells = [cell.strip().strip("*") for cell in row.split("|")[1:-1]]
        assert cells[2] == pct(c["asr"]) and cells[4] == pct(c["asr_excl"]) and cells[6] == pct(c["over_refusal"]), row
        assert cells[5] == f"{c['target_loss']['mean']:.3f} ± {c['target_loss']['sd']:.3f}", row
