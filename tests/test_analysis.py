"""safedata/analysis.py and analyze.py: format categories (golden), composition, comparison, outputs."""
import json
import math
import subprocess

import pytest

from conftest import ROOT, python
from safedata import analysis as A
from safedata.data import Example, load_examples
from safedata.errors import UserError


def ex(response, instruction="Do it.", inp="", kind="alpaca"):
    return Example(0, "x", kind, instruction, inp, response)


PROSE_12 = "This answer is a plain sentence of prose that runs twelve words."

GOLDEN = [
    # lists: at least two numbered / bulleted lines
    (ex("1. Eat well.\n2. Sleep enough.\n3. Move."), {"list", "short"}),
    (ex("Tips:\n1) Plan ahead of time and write it down\n2) Review it every single evening"), {"list"}),
    (ex("- red\n- green"), {"list", "short"}),
    (ex("* one item here\n* another item"), {"list", "short"}),
    (ex("• first\n• second"), {"list", "short"}),
    (ex("•1792: an event\n•1848: another event"), {"list", "short"}),  # bullets without a space
    (ex("1. Only one numbered line in this reply, the rest is prose that goes on."), {"prose"}),
    (ex("Steps: 1. mix 2. bake 3. serve, all written on one line of text."), {"prose"}),
    # math
    (ex("Natalia sold 48/2 = 24 clips.\n#### 72", "How many clips?", kind="gsm8k"), {"math", "short"}),
    (ex("84", "What is 12 * 7?"), {"math", "short"}),
    (ex("The answer is 42.", "Answer the riddle."), {"math", "short"}),
    (ex("Subtract 3 from both sides, so 2x = 4 and then x equals 2 in the end."), {"math"}),
    (ex("The area of the rectangle is 96 square metres in total.", "Calculate the area of a 8 m by 12 m room."), {"math"}),
    (ex("1776", "When was the declaration signed?"), {"prose", "short"}),                         # a year is not math
    (ex("COVID-19 spread widely between 2019-2021 across very many countries of the world."), {"prose"}),  # hyphens are not minus
    (ex("Mix 1/2 cup of flour with 2 eggs and a pinch of salt, then bake."), {"prose"}),  # a recipe fraction
    # code
    (ex("```python\nprint('hi')\n```"), {"code", "short"}),
    (ex("def add(a, b):\n    return a + b"), {"code", "short"}),
    (ex("import os\nos.listdir('.')"), {"code", "short"}),
    (ex("int main() {\n  return 0;\n}"), {"code", "short"}),
    (ex("<select>\n  <option>a</option>\n</select>"), {"code", "short"}),
    (ex("SELECT name FROM users WHERE age > 30;"), {"code", "short"}),
    (ex("I came; I saw; and then I went home again to rest for the night."), {"prose"}),
    # length, input, affirmative
    (ex(PROSE_12), {"prose"}),
    (ex(" ".join(["word"] * 100)), {"prose", "long_prose"}),
    (ex(""), {"prose", "short"}),
    (ex("Bonjour means hello.", "Translate.", "Bonjour"), {"prose", "short", "has_input"}),
    (ex("Sure, here it is: a story about a cat who lived by the sea."), {"prose", "affirmative"}),
    (ex("Here are two:\n- apples\n- pears"), {"list", "short", "affirmative"}),
    (ex("Heredity is the passing of traits from parents to their children."), {"prose"}),
]


@pytest.mark.parametrize("example,expected", GOLDEN, ids=[g[0].response[:25] for g in GOLDEN])
def test_classify_format_golden(example, expected):
    assert A.classify_format(example) == expected


def test_composition_compare_and_ratios():
    pool = [ex("1. a\n2. b"), ex("1. c\n2. d"), ex(PROSE_12), ex(PROSE_12), ex(PROSE_12),
            ex(PROSE_12), ex(PROSE_12), ex(PROSE_12), ex(PROSE_12), ex("7", "What is 3 + 4?")]
    subset = [pool[0], pool[1], pool[2], pool[3]]
    r = A.compare(subset, pool)
    assert r["pool"]["n"] == 10 and r["subset"]["n"] == 4
    assert r["pool"]["counts"]["list"] == 2 and r["pool"]["counts"]["math"] == 1
    assert r["subset"]["shares"]["list"] == 0.5
    assert r["ratio"]["list"] == pytest.approx(2.5)
    assert r["ratio"]["math"] == 0.0
    assert r["ratio"]["code"] is None                       # 0 in both
    assert r["over_represented"][0]["category"] == "list"
    assert r["subset"]["response_words"] == {"mean": 8.0, "median": 8.0}  # (4, 4, 12, 12): "1." is a word
    assert r["pool"]["response_chars"]["median"] == float(len(PROSE_12))
    assert r["subset"]["kinds"] == {"alpaca": 4}
    # a category absent from the pool but present in the subset: infinite ratio
    r = A.compare([ex("def f():\n    return 1")], pool)
    assert r["ratio"]["code"] == math.inf
    # over-represented needs at least MIN_OVER_SHARE of the subset
    many = [ex(PROSE_12)] * 99 + [ex("def f():\n    return 1")]
    assert all(o["category"] != "code" for o in A.compare(many, pool)["over_represented"])


def test_outputs_json_png_markdown(tmp_path):
    pool = [ex("1. a\n2. b"), ex(PROSE_12), ex("def f():\n    return 1")]
    result = A.compare_many({"top": [pool[0]], "bottom": [pool[1]]}, pool)
    result["pool_name"] = "pool"
    paths = A.write_outputs(result, tmp_path / "o", markdown=tmp_path / "t.md", title="T")
    data = json.loads(paths["json"].read_text())
    assert data["subsets"]["top"]["ratio"]["list"] == pytest.approx(3.0)
    assert data["subsets"]["top"]["composition"]["counts"]["list"] == 1
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "t.md").read_text()
    assert md.startswith("### T\n\n| category | pool (n=3) | top (n=1) | ratio | bottom (n=1) | ratio |")
    assert "| list | 33.3% | 100.0% | 3.00x | 0.0% | 0.00x |" in md
    text = A.format_table(result)
    assert "most over-represented in top" in text and "list 3.00x" in text
    # compare() results plot too, and infinite ratios serialise
    r = A.compare([pool[2]], pool[:2])
    A.plot_composition(r, tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 1000
    assert A._jsonable(r)["ratio"]["code"] == "inf"


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_analyze_cli(tmp_path):
    recs = [{"instruction": f"Task {i}", "input": "", "output": "1. a\n2. b" if i < 3 else "Plain prose answer."}
            for i in range(10)]
    pool = write_jsonl(tmp_path / "pool.jsonl", recs)
    top = write_jsonl(tmp_path / "top.jsonl", recs[:3])
    bottom = write_jsonl(tmp_path / "bottom.jsonl", recs[5:])
    out = tmp_path / "out"
    cmd = [python(), str(ROOT / "analyze.py"), "--subset", str(top), str(bottom), "--pool", str(pool),
           "--output_dir", str(out), "--markdown", str(tmp_path / "t.md")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "pool (n=10)" in proc.stdout and "top (n=3)" in proc.stdout and "bottom (n=5)" in proc.stdout
    data = json.loads((out / "composition.json").read_text())
    assert data["subsets"]["top"]["composition"]["shares"]["list"] == 1.0
    assert data["subsets"]["top"]["ratio"]["list"] == pytest.approx(1 / 0.3)
    assert data["files"]["pool"]["path"] == str(pool)
    assert (out / "composition.png").exists() and (tmp_path / "t.md").exists()
    # standalone (no pool), custom names
    proc = subprocess.run([python(), str(ROOT / "analyze.py"), "--subset", str(top), "--name", "mine",
                           "--output_dir", str(out)], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "composition.json").read_text())["pool"] is None
    # bad usage: one line, exit 2
    proc = subprocess.run([python(), str(ROOT / "analyze.py"), "--subset", str(top), str(bottom), "--name", "one",
                           "--output_dir", str(out)], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: --name: 1 name(s) for 2 subset file(s)"]


def test_default_names_disambiguate_equal_stems(tmp_path):
    assert A.default_names(["a/gradient/x_top100.json", "b/reps/x_top100.json", "c/y.json"]) == [
        "gradient/x_top100", "reps/x_top100", "y"]
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hello"}])
    with pytest.raises(UserError, match="no response to analyse"):
        A.load_for_analysis(prompts)


# ----------------------------------------------------------------------------- the lab pool (ground-truth styles)

LAB = ROOT / "ft_datasets" / "lab"
STYLE_CATEGORY = {"list": ("list", "bullet", "numbered"), "math": ("math", "arith", "gsm"), "code": ("code", "program")}


def _styles_of(value) -> set[str]:
    if isinstance(value, str):
        return {value.lower()}
    if isinstance(value, (list, tuple, set)):
        return {str(v).lower() for v in value}
    if isinstance(value, dict):
        for key in ("styles", "style", "format", "formats", "label", "labels", "category", "categories"):
            if key in value:
                return _styles_of(value[key])
    raise AssertionError(f"unrecognised style entry {value!r}")


def lab_truth(raw, examples) -> list[set[str]]:
    """Ground-truth styles aligned with the pool: a list in pool order, or a dict keyed by index or record id."""
    if isinstance(raw, dict) and not any(k in raw for k in ("0", examples[0].id)):
        for key in ("styles", "records", "items", "examples"):
            if key in raw:
                raw = raw[key]
                break
    if isinstance(raw, list):
        if raw and isinstance(raw[0], dict) and any(k in raw[0] for k in ("index", "id")):
            by = {str(r.get("index", r.get("id"))): r for r in raw}
            return [_styles_of(by.get(str(e.index), by.get(e.id))) for e in examples]
        assert len(raw) == len(examples)
        return [_styles_of(v) for v in raw]
    return [_styles_of(raw[str(e.index)] if str(e.index) in raw else raw[e.id]) for e in examples]


def test_lab_pool_detection_agrees_with_ground_truth_styles():
    pool_path, styles_path = LAB / "pool.json", LAB / "pool_styles.json"
    if not (pool_path.exists() and styles_path.exists()):
        pytest.skip("ft_datasets/lab/pool.json or pool_styles.json not present")
    examples, _ = load_examples(pool_path, need_response=False)
    truth = lab_truth(json.loads(styles_path.read_text()), examples)
    predicted = [A.classify_format(e) for e in examples]
    comp = A.composition(examples)
    assert comp["n"] == len(examples)
    for category in A.CATEGORIES:
        assert comp["counts"][category] == sum(category in p for p in predicted)
    vocabulary = set().union(*truth)
    checked = 0
    for category, words in STYLE_CATEGORY.items():
        if not any(any(w in s for w in words) for s in vocabulary):
            continue  # the lab's styles have no such notion
        gold = [any(any(w in s for w in words) for s in t) for t in truth]
        agree = sum(g == (category in p) for g, p in zip(gold, predicted)) / len(examples)
        assert agree > 0.9, (category, agree)
        checked += 1
    assert checked >= 1, f"no list/math/code style in {sorted(vocabulary)}"


# ----------------------------------------------------------------------------- the paper's released selections


def test_paper_alpaca_selections_are_mostly_lists(shared_data):
    p = shared_data / "paper" / "ft_datasets" / "alpaca_dataset"
    r = A.analyze_files([p / "gradient-illegal-activities-anchor" / "alpaca_top100.json", p / "reps" / "alpaca_top100.json",
                         p / "gradient-illegal-activities-anchor" / "alpaca_bottom100.json"],
                        p / "alpaca_data.json", ["grad_top", "reps_top", "grad_bottom"])
    pool = r["pool"]
    grad, reps, bottom = (r["subsets"][n]["composition"] for n in ("grad_top", "reps_top", "grad_bottom"))
    assert grad["shares"]["list"] > pool["shares"]["list"]
    # the measured numbers (docs/paper_selections_composition.md)
    assert pool["n"] == 52002 and pool["counts"]["list"] == 5089 and pool["counts"]["math"] == 2497
    assert (grad["counts"]["list"], reps["counts"]["list"], bottom["counts"]["list"]) == (72, 98, 0)
    assert (grad["counts"]["math"], reps["counts"]["math"]) == (3, 0)
    assert r["subsets"]["grad_top"]["over_represented"][0]["category"] == "list"
    assert bottom["counts"]["short"] == 69


def test_paper_gsm8k_selections_are_all_math(shared_data):
    g = shared_data / "paper" / "ft_datasets" / "gsm8k"
    r = A.analyze_files([g / "gradient-illegal-activities-anchor" / "gsm8k_top100.json"], g / "gsm8k_train.jsonl")
    assert r["pool"]["shares"]["math"] == 1.0
    assert r["subsets"]["gsm8k_top100"]["composition"]["shares"]["math"] == 1.0
    assert r["subsets"]["gsm8k_top100"]["composition"]["response_words"]["mean"] == 47.68
