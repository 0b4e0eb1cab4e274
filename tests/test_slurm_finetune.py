"""finetune_evaluation.slurm reruns under the real slurmctld: the documented command as written (log in logs/),
a rerun with the same settings keeps the run, one with another learning rate stops naming the difference, and
OVERWRITE=1 retrains (the recorded settings show the new value). Never the old model under new settings. BASE=0:
no base model is answered, and the summary has no base row value."""
import csv
import json
import re
import subprocess
from pathlib import Path

import slurm_util
from conftest import ROOT
from test_slurm_pipeline import PROMPTS, workdir, write_subset  # noqa: F401 (workdir: a fixture)


def sbatch_as_documented(env: dict) -> tuple[str, Path]:
    """`sbatch finetune_evaluation.slurm` in the project root, with docs/PIPELINE.md's resource overrides for a node
    without GPUs and nothing else: the script's own #SBATCH --output (logs/) is used."""
    cmd = ["sbatch", "--parsable", "--export=ALL", "--gres=none", "--cpus-per-task=1", "--mem=2G", "--time=20:00",
           "finetune_evaluation.slurm"]
    res = subprocess.run(cmd, cwd=ROOT, env=slurm_util.slurm_env(env), capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    job = res.stdout.strip().split(";")[0]
    return job, ROOT / "logs" / f"safedata-ft-eval-{job}.out"


def test_rerun_keeps_same_settings_refuses_other_lr_and_overwrite_retrains(workdir):
    subset = write_subset(workdir / "tiny_top20.json")
    prompts = workdir / "prompts.csv"
    with open(prompts, "w", newline="") as handle:
        csv.writer(handle).writerows([[p] for p in PROMPTS])
    env = {"MODEL": str(workdir / "model"), "SUBSET": str(subset), "SAVE_NAME": "rerun", "SEEDS": "1",
           "EPOCHS": "1", "BATCH_SIZE": "10", "LR": "1e-3", "NPROC": "1", "EVAL_PROMPTS": str(prompts),
           "MAX_NEW_TOKENS": "4", "GEN_BATCH_SIZE": "6", "JUDGE": "keyword", "OUTPUT_ROOT": str(workdir / "runs"),
           "OMP_NUM_THREADS": "1", "BASE": "0"}
    model = workdir / "runs" / "rerun" / "seed1" / "model"
    logs = []
    try:
        job, log = sbatch_as_documented(env)
        logs.append(log)
        assert slurm_util.wait_ok(job, timeout=900) == {job: "COMPLETED"}
        first = json.loads((model / "finetune_meta.json").read_text())
        weights = (model / "model.safetensors").read_bytes()
        assert first["flags"]["learning_rate"] == 1e-3
        text = log.read_text()
        assert "seed 1: lr=0.001 " in text and "== base model" not in text
        assert not (workdir / "runs" / "base").exists()
        assert json.loads((model.parent.parent / "job.json").read_text())["base"] is None
        (row,) = json.loads((model.parent.parent / "summary" / "summary.json").read_text())["rows"]
        assert row["seeds"] == [1] and row["base_asr_pct"] is None and row["asr_pct_sd"] is None
        assert "| rerun | " in text   # the table, printed

        job, log = sbatch_as_documented(env)                          # the same settings again: kept
        logs.append(log)
        assert slurm_util.wait_ok(job, timeout=600) == {job: "COMPLETED"}
        assert "already fine-tuned with these settings" in log.read_text()
        assert (model / "model.safetensors").read_bytes() == weights

        job, log = sbatch_as_documented(dict(env, LR="2e-3"))          # another learning rate: refused, named
        logs.append(log)
        states = slurm_util.wait_for(job, timeout=600)
        text = log.read_text()
        assert states == {job: "FAILED"}, text
        assert re.search(r"error: \S+/model: holds a fine-tune made with other settings \(learning_rate: recorded "
                         r"0\.001, requested 0\.002\)", text), text
        assert "keyword ASR" not in text and "| rerun | " not in text and (model / "model.safetensors").read_bytes() == weights

        job, log = sbatch_as_documented(dict(env, LR="2e-3", OVERWRITE="1"))   # retrained with the new value
        logs.append(log)
        assert slurm_util.wait_ok(job, timeout=900) == {job: "COMPLETED"}
        second = json.loads((model / "finetune_meta.json").read_text())
        assert second["flags"]["learning_rate"] == 2e-3 and second["settings"]["flags"]["learning_rate"] == 2e-3
        assert (model / "model.safetensors").read_bytes() != weights
        gen_meta = json.loads((model.parent / "generation" / "meta.json").read_text())
        assert gen_meta["finetune"]["data_sha256"] == second["data_sha256"]
        assert "seed 1: lr=0.002 " in log.read_text()
    finally:
        for log in logs:
            log.unlink(missing_ok=True)
