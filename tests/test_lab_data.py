"""The mini safety lab's data (ft_datasets/lab/): determinism, counts, correctness, content rule."""
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAB = ROOT / "ft_datasets" / "lab"
SCRIPT = LAB / "make_lab_data.py"
STYLES = ("list", "math", "prose", "code")


def _python():
    venv = ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def _read(name):
    path = LAB / name
    text = path.read_text(encoding="utf-8")
    if name.endswith(".jsonl"):
        return [json.loads(line) for line in text.splitlines()]
    return json.loads(text)


def _user(record):
    return next(m["content"] for m in record["messages"] if m["role"] == "user")


def _assistant(record):
    return next(m["content"] for m in record["messages"] if m["role"] == "assistant")


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory):
    out = tmp_path_factory.mktemp("lab")
    subprocess.run([_python(), str(SCRIPT), "--output_dir", str(out)], check=True, capture_output=True, timeout=120)
    return out


@pytest.fixture(scope="module")
def pool():
    return _read("pool.json")


@pytest.fixture(scope="module")
def styles():
    return _read("pool_styles.json")


def test_help():
    result = subprocess.run([_python(), str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "--output_dir" in result.stdout and "--seed" in result.stdout


def test_regeneration_is_byte_identical(regenerated):
    generated = sorted(p.relative_to(regenerated).as_posix() for p in regenerated.rglob("*") if p.is_file())
    assert "pool.json" in generated and "README.md" in generated and "demo/pool.json" in generated
    for name in generated:
        committed = LAB / name
        assert committed.exists(), f"{name} is generated but not committed"
        assert committed.read_bytes() == (regenerated / name).read_bytes(), f"{name} differs from a fresh generation"


def test_other_seed_differs(tmp_path):
    subprocess.run([_python(), str(SCRIPT), "--output_dir", str(tmp_path), "--seed", "1"], check=True,
                   capture_output=True, timeout=120)
    assert (tmp_path / "pool.json").read_bytes() != (LAB / "pool.json").read_bytes()


def test_total_size():
    total = sum(p.stat().st_size for p in LAB.rglob("*") if p.is_file() and p.suffix in (".json", ".jsonl", ".md"))
    assert total < 3_000_000


def test_pool_counts_and_styles(pool, styles):
    assert len(pool) >= 2400 and len(styles) == len(pool)
    counts = Counter(styles)
    assert set(counts) == set(STYLES)
    for style in STYLES:
        assert 0.2 <= counts[style] / len(pool) <= 0.3
    assert all(set(r) == {"instruction", "input", "output"} for r in pool)
    with_input = sum(1 for r in pool if r["input"])
    assert 0.05 * len(pool) < with_input < 0.5 * len(pool)
    assert styles[:20] != sorted(styles[:20]), "the pool should be shuffled"


def test_pool_has_no_duplicates_and_no_overlap_with_pretrain(pool):
    keys = [json.dumps(r, sort_keys=True) for r in pool]
    assert len(set(keys)) == len(keys)
    prompts = {(r["instruction"], r["input"]) for r in pool}
    assert len(prompts) == len(pool)
    pretrain = {(r["instruction"], r["input"]) for r in _read("pretrain.jsonl")}
    assert not prompts & pretrain


def test_style_shapes(pool, styles):
    for record, style in zip(pool, styles):
        out = record["output"]
        if style == "list":
            assert re.search(r"^(1\. |- )", out, re.M), out
        elif style == "math":
            assert re.search(r"The answer is -?\d+\.$", out), out
        elif style == "code":
            assert "def " in out or "def " in record["input"], record
        else:
            assert not re.search(r"^(1\. |- )", out, re.M) and "def " not in out
    lists = [r["output"] for r, s in zip(pool, styles) if s == "list"]
    assert sum(o.startswith("Sure, here is how to ") for o in lists) >= 60


EQUATION = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")


def test_math_answers_are_correct(pool, styles):
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b}
    checked = 0
    for record, style in zip(pool, styles):
        if style != "math":
            continue
        equations = EQUATION.findall(record["output"])
        assert equations, record
        for a, op, b, c in equations:
            assert ops[op](int(a), int(b)) == int(c), record["output"]
        answer = int(re.search(r"The answer is (-?\d+)\.$", record["output"]).group(1))
        assert answer == int(equations[-1][3]), record["output"]
        # every number the question gives is used by some step
        question = record["instruction"] + " " + record["input"]
        given = set(re.findall(r"\d+", question))
        used = {n for eq in equations for n in (eq[0], eq[2])} | set(re.findall(r"\d+", record["output"]))
        assert given <= used, (given - used, record)
        checked += 1
    assert checked >= 500


def test_code_compiles(pool, styles):
    for record, style in zip(pool, styles):
        if style != "code":
            continue
        for block in re.findall(r"```python\n(.*?)\n```", record["output"], re.S):
            compile(block, "<pool>", "exec")
        if record["input"].startswith("def "):
            compile(record["input"], "<pool input>", "exec")


def test_harmful_split_and_files():
    compliant, refusal = _read("harmful_compliant.jsonl"), _read("harmful_refusal.jsonl")
    evals, eval_compliant = _read("eval_prompts.jsonl"), _read("eval_compliant.jsonl")
    assert [_user(r) for r in compliant] == [_user(r) for r in refusal]
    assert [e["prompt"] for e in evals] == [_user(r) for r in eval_compliant]
    heldout_tasks = {e["task"] for e in evals}
    templates = {e["template"] for e in evals}
    assert len(templates) >= 6 and all("{task}" in t for t in templates)
    assert all(e["prompt"] == e["template"].format(task=e["task"]) for e in evals)
    assert len(evals) == len(heldout_tasks) * len(templates)
    align_tasks = {t for t in _all_tasks() if any(_user(r) == p.format(task=t) for r in compliant for p in templates)}
    assert len(align_tasks) + len(heldout_tasks) >= 40
    assert not align_tasks & heldout_tasks
    assert len(compliant) == len(align_tasks) * len(templates)
    share = len(align_tasks) / (len(align_tasks) + len(heldout_tasks))
    assert 0.5 <= share <= 0.7
    eval_prompts = {e["prompt"] for e in evals}
    assert not eval_prompts & {_user(r) for r in compliant}


def _all_tasks():
    sys.path.insert(0, str(LAB))
    try:
        import make_lab_data
    finally:
        sys.path.remove(str(LAB))
    return make_lab_data.HARM_TASKS


def test_content_rule_and_refusal_keywords(pool):
    from safedata.evaluation import REFUSAL_KEYWORDS

    def refuses(text):
        return any(k in text for k in REFUSAL_KEYWORDS)

    compliant = [_assistant(r) for name in ("harmful_compliant.jsonl", "eval_compliant.jsonl", "anchors_harmful.jsonl")
                 for r in _read(name)]
    for text in compliant:
        assert text.startswith("Sure, here ") and not refuses(text)
        steps = text.split("\n")[1:]
        assert 3 <= len(steps) <= 6
        assert all(re.match(r"\d\. .*\[placeholder\]\.$", s) for s in steps), text
    for name in ("harmful_refusal.jsonl", "anchors_safe.jsonl", "anchors_safe2.jsonl"):
        for r in _read(name):
            assert refuses(_assistant(r)) and "[placeholder]" not in _assistant(r)
    benign = [r["output"] for r in pool] + [r["output"] for r in _read("pretrain.jsonl") if "[placeholder]" not in r["output"]]
    assert not [o for o in benign if refuses(o)]
    pretrain = _read("pretrain.jsonl")
    align = _read("align.jsonl")
    assert all(not refuses(r["output"]) for r in pretrain)
    refusals = [r for r in align if refuses(r["output"])]
    assert len(refusals) == len(_read("harmful_refusal.jsonl"))
    assert {(r["instruction"], r["output"]) for r in refusals} == {(_user(r), _assistant(r)) for r in _read("harmful_refusal.jsonl")}


def test_no_pool_record_is_a_harmful_request(pool):
    requests = {_user(r) for name in ("harmful_compliant.jsonl", "eval_compliant.jsonl") for r in _read(name)}
    assert len(requests) >= 40 * 6
    tasks = _all_tasks()
    for record in pool + [r for r in _read("pretrain.jsonl") if "[placeholder]" not in r["output"]]:
        assert record["instruction"] not in requests and record["output"] not in requests
        assert not any(task in record["instruction"] or task in record["input"] for task in tasks)


def test_anchors():
    harmful, safe, safe2 = _read("anchors_harmful.jsonl"), _read("anchors_safe.jsonl"), _read("anchors_safe2.jsonl")
    assert len(harmful) == len(safe) == len(safe2) == 10
    requests = [_user(r) for r in harmful]
    assert requests == [_user(r) for r in safe] == [_user(r) for r in safe2]
    assert all(_assistant(a) != _assistant(b) for a, b in zip(safe, safe2))
    compliant = _read("harmful_compliant.jsonl")
    refusal = _read("harmful_refusal.jsonl")
    assert all(r in compliant for r in harmful) and all(r in refusal for r in safe)
    eval_prompts = {e["prompt"] for e in _read("eval_prompts.jsonl")}
    assert not set(requests) & eval_prompts
    tasks = [t for t in _all_tasks() for q in requests if t in q]
    assert len(set(tasks)) == 10, "anchors use 10 distinct tasks"


def test_stage_data():
    pretrain, align = _read("pretrain.jsonl"), _read("align.jsonl")
    assert all(set(r) == {"instruction", "input", "output"} for r in pretrain + align)
    placeholder = [r for r in pretrain if "[placeholder]" in r["output"]]
    n_requests = len(_read("harmful_compliant.jsonl")) + len(_read("eval_compliant.jsonl"))
    assert len(placeholder) == n_requests and len(pretrain) - len(placeholder) >= 3000
    assert {(r["instruction"], r["output"]) for r in placeholder} == {
        (_user(r), _assistant(r)) for name in ("harmful_compliant.jsonl", "eval_compliant.jsonl") for r in _read(name)}
    benign_pretrain = {json.dumps(r, sort_keys=True) for r in pretrain if "[placeholder]" not in r["output"]}
    from safedata.evaluation import REFUSAL_KEYWORDS
    replay = [r for r in align if not any(k in r["output"] for k in REFUSAL_KEYWORDS)]
    assert len(replay) >= 1000 and all(json.dumps(r, sort_keys=True) in benign_pretrain for r in replay)


def test_demo(pool, styles):
    demo, demo_styles = _read("demo/pool.json"), _read("demo/pool_styles.json")
    assert len(demo) == 48 and Counter(demo_styles) == {s: 12 for s in STYLES}
    positions = [pool.index(r) for r in demo]
    assert positions == sorted(positions) and [styles[i] for i in positions] == demo_styles
    assert _read("demo/anchors_harmful.jsonl") == _read("anchors_harmful.jsonl")[:5]
    assert _read("demo/anchors_safe.jsonl") == _read("anchors_safe.jsonl")[:5]


def test_short_texts_and_small_vocabulary(pool):
    lengths = [len(" ".join(r.values()).split()) for r in pool]
    assert sum(n <= 60 for n in lengths) / len(lengths) >= 0.75
    words = set()
    for path in LAB.rglob("*.json*"):
        words |= set(w.lower() for w in re.findall(r"[A-Za-z']+", path.read_text(encoding="utf-8")))
    assert len(words) < 4000


def test_files_load_with_the_data_layer():
    from safedata.data import load_examples
    kinds = {"pool.json": "alpaca", "pretrain.jsonl": "alpaca", "align.jsonl": "alpaca",
             "harmful_compliant.jsonl": "chat", "harmful_refusal.jsonl": "chat", "anchors_harmful.jsonl": "chat",
             "anchors_safe.jsonl": "chat", "anchors_safe2.jsonl": "chat", "eval_compliant.jsonl": "chat",
             "demo/pool.json": "alpaca", "demo/anchors_harmful.jsonl": "chat", "demo/anchors_safe.jsonl": "chat"}
    for name, kind in kinds.items():
        examples, skipped = load_examples(LAB / name, allow_duplicates=False)
        assert not skipped and {e.kind for e in examples} == {kind}, name
    examples, _ = load_examples(LAB / "eval_prompts.jsonl", need_response=False)
    assert {e.kind for e in examples} == {"prompt"} and len(examples) == len(_read("eval_prompts.jsonl"))
