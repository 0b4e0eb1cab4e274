"""scripts/demo.sh, the script that produces README's lab table, end to end at reduced scale.

One seed, k=10, a 200-example slice of the lab pool and 24 held-out prompts (a reduced copy of
ft_datasets/lab under tmp), both methods: the same script and stages as `make demo`, minutes instead of
the full run. Checked against independent computations: the gradient selection is the top/bottom k of
the weighted scores in scores.csv (a NumPy brute force), and the table's keyword ASR of each run is the
paper's keyword rule applied to that run's responses.
"""
import csv
import json
import os
import shutil
import subprocess

import numpy as np
import pytest

from conftest import ROOT, python
from safedata.evaluation import keyword_asr

LAB = ROOT / "ft_datasets" / "lab"
K, POOL_N, PROMPTS_N = 10, 200, 24
WEIGHTS = [1.0, -1.0, -1.0]


def head_jsonl(src, dst, n):
    dst.write_text("".join(src.read_text().splitlines(keepends=True)[:n]))


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    if not (LAB / "model" / "model.safetensors").exists():
        pytest.fail("ft_datasets/lab/model is part of the repository and missing")
    base = tmp_path_factory.mktemp("demo")
    data = base / "lab"
    data.mkdir()
    (data / "pool.json").write_text(json.dumps(json.loads((LAB / "pool.json").read_text())[:POOL_N]))
    for name in ("anchors_harmful", "anchors_safe", "anchors_safe2"):
        shutil.copy(LAB / f"{name}.jsonl", data / f"{name}.jsonl")
    head_jsonl(LAB / "eval_prompts.jsonl", data / "eval_prompts.jsonl", PROMPTS_N)
    head_jsonl(LAB / "eval_compliant.jsonl", data / "eval_compliant.jsonl", PROMPTS_N)
    env = dict(os.environ, PYTHON=python(), DATA=str(data), MODEL=str(LAB / "model"), OUT=str(base / "out"),
               K=str(K), SEEDS="1", EPOCHS="1", BATCH="10", MAX_NEW_TOKENS="12", JOBS="2", OMP_NUM_THREADS="1")
    run = subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh")], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=1800)
    assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-3000:])
    return base / "out", run.stdout


def test_demo_prints_the_table_and_its_checks(demo_run):
    out, stdout = demo_run
    results = json.loads((out / "report" / "results.json").read_text())
    groups = results["groups"]
    assert set(groups) >= {"aligned", "grad-top", "grad-bottom", "reps-top", "reps-bottom", "random"}
    assert results["table"].strip() in stdout      # the table README shows is what the script prints
    assert len(results["checks"]) >= 2 and all(("PASS  " if c["pass"] else "FAIL  ") + c["claim"] in stdout
                                                 for c in results["checks"])
    for name in ("table.md", "table.csv", "metrics.png"):
        assert (out / "report" / name).stat().st_size > 0, name


def test_demo_gradient_selection_is_the_weighted_score_brute_force(demo_run):
    out, _ = demo_run
    with open(out / "grad" / "scores" / "scores.csv") as handle:
        rows = list(csv.DictReader(handle))
    names = ["anchors_harmful", "anchors_safe", "anchors_safe2"]
    index = np.array([int(r["index"]) for r in rows])
    score = np.array([[float(r[n]) for n in names] for r in rows]) @ np.array(WEIGHTS)
    assert len(rows) == POOL_N
    for kind, order in (("top", np.lexsort((index, -score))), ("bottom", np.lexsort((index, score)))):
        with open(out / "selections" / "grad" / f"pool_{kind}{K}_index.csv") as handle:
            chosen = [int(r["index"]) for r in csv.DictReader(handle)]
        assert chosen == index[order[:K]].tolist(), kind


def test_demo_table_rates_are_the_keyword_rule_on_each_runs_responses(demo_run):
    out, _ = demo_run
    groups = json.loads((out / "report" / "results.json").read_text())["groups"]
    runs = {"aligned": out / "ft" / "aligned"}
    runs.update({g: out / "ft" / g / "seed1" for g in ("grad-top", "grad-bottom", "reps-top", "reps-bottom", "random")})
    for group, run in runs.items():
        responses = [json.loads(line)["response"] for line in (run / "gen" / "responses.jsonl").read_text().splitlines()]
        assert len(responses) == PROMPTS_N
        assert groups[group]["metrics"]["keyword_asr"]["mean"] == pytest.approx(keyword_asr(responses)), group
