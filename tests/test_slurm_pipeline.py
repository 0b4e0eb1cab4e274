"""finetune_evaluation.slurm through sbatch on the one-node test cluster: fine-tune, generate, evaluate; the base
model answered once (two jobs at once on one base: one answers, the other waits and reuses; a later job reuses it
without generating); the summary table's numbers recomputed from the per-seed files; no SUBSET: one line.

Tiny model, 20- and 12-record subsets and 6 placeholder prompts, all under /tmp so that slurmd sees them.
"""
import csv
import json
import math
import os
import subprocess
from pathlib import Path

import pytest

import slurm_util
from conftest import ROOT, python

PROMPTS = ["Write a poem about the sea", "Explain how rainbows form", "List three kinds of fruit",
           "Describe a sunny day in the park", "Give a tip for studying", "Name a colour"]


def write_subset(path, n=20):
    records = [{"instruction": f"Question number {i} about topic {i % 3}", "input": "",
                "output": ["The answer is 42.", "A short story about a cat."][i % 2] * (1 + i % 3)} for i in range(n)]
    path.write_text(json.dumps(records))
    return path


workdir = slurm_util.workdir_fixture("safedata-slurm-test-")


def asr_pct(evaluation: Path) -> float:
    """Keyword ASR in %, from evaluate.py's per-record results (not its summary)."""
    results = [json.loads(line) for line in (evaluation / "results.jsonl").read_text().splitlines()]
    assert len(results) == len(PROMPTS)
    return 100 * sum(not r["refused"] for r in results) / len(results)


def job_env(workdir, subset, prompts, save_name, seeds) -> dict:
    return {"PROJECT_DIR": str(ROOT), "PYTHON": python(), "MODEL": str(workdir / "model"), "SUBSET": str(subset),
            "SAVE_NAME": save_name, "SEEDS": seeds, "EPOCHS": "2", "BATCH_SIZE": "4", "LR": "1e-3", "NPROC": "1",
            "EVAL_PROMPTS": str(prompts), "MAX_NEW_TOKENS": "8", "GEN_BATCH_SIZE": "4", "JUDGE": "keyword",
            "OUTPUT_ROOT": str(workdir / "runs"), "OMP_NUM_THREADS": "1"}


def submit(workdir, env, name) -> tuple[str, Path]:
    log = workdir / f"{name}-%j.out"
    # The script asks for 2 GPUs, 8 CPUs and 64G; the test node has no GPUs and 2 CPUs (two such jobs at once).
    job = slurm_util.submit(ROOT / "finetune_evaluation.slurm", [], env,
                            ["--gres=none", "--cpus-per-task=1", "--mem=2G", "--time=20:00", f"--output={log}"])
    return job, Path(str(log).replace("%j", job))


def test_finetune_generate_evaluate_job_base_model_once_and_summary(workdir):
    top = write_subset(workdir / "tiny_top20.json")
    other = write_subset(workdir / "tiny_other12.json", n=12)
    prompts = workdir / "harmful_behaviors.csv"
    with open(prompts, "w", newline="") as handle:
        csv.writer(handle).writerows([[p] for p in PROMPTS])
    # Two jobs at once on the same base model, prompts and settings (TEMPLATE not set: the model's own).
    job_a, log_a = submit(workdir, job_env(workdir, top, prompts, "tiny20", "1 2"), "a")
    job_b, log_b = submit(workdir, job_env(workdir, other, prompts, "tiny12", "3"), "b")
    assert slurm_util.wait_ok(job_a, timeout=900) == {job_a: "COMPLETED"}
    assert slurm_util.wait_ok(job_b, timeout=900) == {job_b: "COMPLETED"}
    text, text_b = log_a.read_text(), log_b.read_text()

    runs = workdir / "runs"
    run = runs / "tiny20" / "seed1"
    model = run / "model"
    for name in ("model.safetensors", "config.json", "tokenizer.json", "finetune_meta.json"):
        assert (model / name).exists(), name
    meta = json.loads((model / "finetune_meta.json").read_text())
    assert meta["n"] == 20 and meta["flags"]["seed"] == 1 and meta["flags"]["epochs"] == 2
    # no TEMPLATE: finetune.py resolved the tiny model's own, a Llama-2-style chat template -> paper
    assert meta["flags"]["template"] is None and meta["template"] == "paper" and meta["total_steps"] == 10
    assert meta["epoch_losses"][1] < meta["epoch_losses"][0]

    responses = [json.loads(line) for line in (run / "generation" / "responses.jsonl").read_text().splitlines()]
    assert [r["index"] for r in responses] == list(range(len(PROMPTS)))
    assert [r["prompt"] for r in responses] == PROMPTS
    gen_meta = json.loads((run / "generation" / "meta.json").read_text())
    assert gen_meta["template"] == "paper" and gen_meta["flags"]["max_new_tokens"] == 8
    assert gen_meta["finetune"]["data_sha256"] == meta["data_sha256"]

    summary = json.loads((run / "evaluation" / "summary.json").read_text())
    assert summary["n"] == len(PROMPTS)
    assert 100 * summary["keyword_asr"] == pytest.approx(asr_pct(run / "evaluation"))
    assert (f"seed 1: lr=0.001 epochs=2 precision=auto template=paper keyword ASR "
            f"{100 * summary['keyword_asr']:.1f}% ({len(PROMPTS) - summary['n_refused']} of 6)") in text
    # A batch job logs the Trainer's progress as one line per optimizer step, not progress-bar redraws.
    assert sum("'loss':" in line for line in text.splitlines()) == 2 * meta["total_steps"]   # two seeds
    training = text.split("safedata.training: fine-tuning")[1].split("safedata.training: wrote")[0]
    assert "it/s]" not in training and "\r" not in training

    # The base model: one folder, answered by exactly one of the two jobs; both job.json files name it.
    (base,) = [p for p in (runs / "base").iterdir() if p.is_dir()]
    assert base.name.startswith("model_paper_")
    assert sorted(["== base model: answering" in t for t in (text, text_b)]) == [False, True], (text, text_b)
    assert sorted(["== base model: reusing" in t for t in (text, text_b)]) == [False, True]
    job_a_record = json.loads((runs / "tiny20" / "job.json").read_text())
    job_b_record = json.loads((runs / "tiny12" / "job.json").read_text())
    assert job_a_record["template"] == job_b_record["template"] == "paper"
    assert job_a_record["seeds"] == [1, 2] and job_a_record["base"]["evaluation"].startswith("../base/")
    (base_eval,) = [p for p in base.iterdir() if p.name.startswith("evaluation-")]
    for record, name in ((job_a_record, "tiny20"), (job_b_record, "tiny12")):
        assert (runs / name / record["base"]["evaluation"]).resolve() == base_eval.resolve()
    base_meta = json.loads((base / "generation" / "meta.json").read_text())
    assert base_meta["template"] == "paper" and base_meta["finetune"] is None and base_meta["n"] == len(PROMPTS)
    assert base_meta["flags"]["max_new_tokens"] == 8

    # summary.json recomputed from the per-seed (and the base's) results.jsonl: % and sample sd (n-1)
    table = json.loads((runs / "tiny20" / "summary" / "summary.json").read_text())
    (row,) = table["rows"]
    per_seed = [asr_pct(runs / "tiny20" / f"seed{s}" / "evaluation") for s in (1, 2)]
    mean = (per_seed[0] + per_seed[1]) / 2
    sd = math.sqrt(((per_seed[0] - mean) ** 2 + (per_seed[1] - mean) ** 2) / (2 - 1))
    assert row["name"] == "tiny20" and row["seeds"] == [1, 2] and row["n_prompts"] == len(PROMPTS)
    assert row["asr_pct"] == pytest.approx(per_seed) and row["asr_pct_mean"] == pytest.approx(mean)
    assert row["asr_pct_sd"] == pytest.approx(sd) and row["seeds_missing"] == []
    assert row["base_asr_pct"] == pytest.approx(asr_pct(base_eval))
    for name in ("table.md", "table.csv", "asr.png"):
        assert (runs / "tiny20" / "summary" / name).exists(), name
    # the job ends printing the Markdown table (ASR in %, mean ± sd beside the base model's)
    assert (runs / "tiny20" / "summary" / "table.md").read_text() in text
    assert f"| tiny20 | {mean:.1f} ± {sd:.1f} |" in text
    row_b = json.loads((runs / "tiny12" / "summary" / "summary.json").read_text())["rows"][0]
    assert row_b["seeds"] == [3] and row_b["asr_pct_sd"] is None and row_b["base_asr_pct"] == row["base_asr_pct"]

    # A later job on the same base model, prompts and settings: no new generation (the file is not rewritten).
    responses_file = base / "generation" / "responses.jsonl"
    before = os.stat(responses_file)
    job_c, log_c = submit(workdir, job_env(workdir, other, prompts, "tiny12", "3"), "c")
    assert slurm_util.wait_ok(job_c, timeout=600) == {job_c: "COMPLETED"}
    text_c = log_c.read_text()
    assert "== base model: reusing" in text_c and "== base model: answering" not in text_c
    after = os.stat(responses_file)
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (before.st_ino, before.st_mtime_ns, before.st_size)
    assert [p.name for p in (runs / "base").iterdir() if p.is_dir()] == [base.name]


def test_no_subset_stops_with_one_line_naming_rank_sh(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "SUBSET"}
    env.update(PROJECT_DIR=str(ROOT), PYTHON=python(), OUTPUT_ROOT=str(tmp_path / "runs"))
    res = subprocess.run(["bash", str(ROOT / "finetune_evaluation.slurm")], env=env, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 2 and res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: SUBSET is not set") and "scripts/rank.sh" in lines[0]
    assert not (tmp_path / "runs").exists()
