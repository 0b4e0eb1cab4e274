"""finetune_evaluation.slurm through sbatch on the one-node test cluster: fine-tune, generate, evaluate.

Tiny model, a 20-record subset and 6 placeholder prompts, all under /tmp so that slurmd sees them.
"""
import csv
import json
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


@pytest.fixture()
def workdir(request):
    slurm_util.require_slurm()  # before building anything
    with slurm_util.job_workdir(request.getfixturevalue("tiny_model_dir"), "safedata-slurm-test-") as base:
        yield base


def test_finetune_generate_evaluate_job(workdir):
    subset = write_subset(workdir / "tiny_top20.json")
    prompts = workdir / "harmful_behaviors.csv"
    with open(prompts, "w", newline="") as handle:
        csv.writer(handle).writerows([[p] for p in PROMPTS])
    env = {
        "PROJECT_DIR": str(ROOT), "PYTHON": python(), "MODEL": str(workdir / "model"), "SUBSET": str(subset),
        "SAVE_NAME": "tiny20", "SEEDS": "1", "EPOCHS": "2", "BATCH_SIZE": "4", "LR": "1e-3", "NPROC": "1",
        "EVAL_PROMPTS": str(prompts), "MAX_NEW_TOKENS": "8", "GEN_BATCH_SIZE": "4", "JUDGE": "keyword",
        "OUTPUT_ROOT": str(workdir / "runs"), "OMP_NUM_THREADS": "1",
    }
    log = workdir / "job-%j.out"
    # The script asks for 4 GPUs, 16 CPUs and 200G; the test node has no GPUs and 2 CPUs.
    job = slurm_util.submit(ROOT / "finetune_evaluation.slurm", [], env,
                            ["--gres=none", "--cpus-per-task=1", "--mem=2G", "--time=20:00", f"--output={log}"])
    assert slurm_util.wait_ok(job, timeout=900) == {job: "COMPLETED"}
    text = Path(str(log).replace("%j", job)).read_text()

    run = workdir / "runs" / "tiny20" / "seed1"
    model = run / "model"
    for name in ("model.safetensors", "config.json", "tokenizer.json", "finetune_meta.json"):
        assert (model / name).exists(), name
    meta = json.loads((model / "finetune_meta.json").read_text())
    assert meta["n"] == 20 and meta["flags"]["seed"] == 1 and meta["flags"]["epochs"] == 2
    assert meta["template"] == "paper" and meta["total_steps"] == 10
    assert meta["epoch_losses"][1] < meta["epoch_losses"][0]

    responses = [json.loads(line) for line in (run / "generation" / "responses.jsonl").read_text().splitlines()]
    assert [r["index"] for r in responses] == list(range(len(PROMPTS)))
    assert [r["prompt"] for r in responses] == PROMPTS
    gen_meta = json.loads((run / "generation" / "meta.json").read_text())
    assert gen_meta["template"] == "paper" and gen_meta["flags"]["max_new_tokens"] == 8
    assert gen_meta["finetune"]["data_sha256"] == meta["data_sha256"]

    summary = json.loads((run / "evaluation" / "summary.json").read_text())
    assert summary["n"] == len(PROMPTS)
    results = [json.loads(line) for line in (run / "evaluation" / "results.jsonl").read_text().splitlines()]
    assert len(results) == len(PROMPTS)
    assert summary["keyword_asr"] == pytest.approx(sum(not r["refused"] for r in results) / len(PROMPTS))
    assert f"seed 1: lr=0.001 epochs=2 precision=auto keyword_asr={summary['keyword_asr']} n=6" in text
    # A batch job logs the Trainer's progress as one line per optimizer step, not progress-bar redraws.
    assert sum("'loss':" in line for line in text.splitlines()) == meta["total_steps"]
    training = text.split("safedata.training: fine-tuning")[1].split("safedata.training: wrote")[0]
    assert "it/s]" not in training and "\r" not in training
