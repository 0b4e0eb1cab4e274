"""The README's cluster workflow, under sbatch, as a new user runs it (issue 36): a ChatML model in a local folder, a
chat JSONL pool, no TEMPLATE; from the project root `sbatch --array=0-1 scripts/get_representation.sh` and
`sbatch --array=0-1 scripts/get_full_gradient.sh`, then the rank.sh line the merging task printed, then the
finetune_evaluation.slurm line rank.sh printed last, run verbatim.

Before issue 36 the first step could not run at all: SLURM runs a copy of the batch script from its spool folder, so
the recipes' `cd "$(dirname "$0")/.."` landed there and `source scripts/recipe_env.sh` failed (every task FAILED);
they also prompted every model in Llama-2's [INST] format (`paper` in every meta.json) and rank.sh ended with a
literal `SAVE_NAME=...`.

Everything slurmd reads or writes is under /tmp (slurm_util.job_workdir); the code is the project's own. The jobs
ask for GPUs, 8 CPUs and 64G: the array submissions override that on the sbatch line (as a user on another cluster
would); the printed fine-tuning line cannot carry the test's overrides, so the test sets sbatch's input
variables (SBATCH_GRES, SBATCH_MEM_PER_NODE, SBATCH_TIMELIMIT, SBATCH_OUTPUT: sbatch reads them, and a script's
#SBATCH lines do not override them) and, for the CPU count, which has no such variable in SLURM 22.05, puts an
`sbatch` on PATH that adds `--cpus-per-task=1` and calls the real one: the line itself runs as printed.
"""
import csv
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
from pathlib import Path

import pytest

import slurm_util
from conftest import ROOT, python

LAB = ROOT / "ft_datasets" / "lab"   # the lab's placeholder anchors (non-actionable), read at run time
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
TOPICS = ["baking bread", "planting tomatoes", "a walk in the park", "learning to swim", "painting a fence",
          "tuning a guitar", "folding paper cranes", "brewing tea", "cleaning windows", "reading maps",
          "knitting a scarf", "watching birds"]
PROMPTS = ["Write a short poem about the sea", "Explain how rainbows form", "List three kinds of fruit",
           "Describe a sunny day in the park", "Give a tip for studying"]
K = 4


def chat_model(tiny_model_dir, out: Path) -> Path:
    """The tiny model with a ChatML chat template instead of its Llama-2-style one: its own template is `chat`."""
    from safedata.models import load_tokenizer
    shutil.copytree(tiny_model_dir, out)
    tokenizer = load_tokenizer(str(out))
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(str(out))
    return out


def write_pool(path: Path) -> Path:
    with open(path, "w") as handle:
        for i, topic in enumerate(TOPICS):
            handle.write(json.dumps({"messages": [
                {"role": "user", "content": f"Give me one tip about {topic}."},
                {"role": "assistant", "content": f"Tip {i}: take your time with {topic}, and enjoy it." * (1 + i % 3)},
            ]}) + "\n")
    return path


def user_env(**extra) -> dict:
    """A user's shell: no SLURM job, no PROJECT_DIR, no TEMPLATE; SLURM_CONF pointing at the test cluster."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SBATCH_")) and k not in ("PROJECT_DIR", "TEMPLATE", "MODEL_NAME", "OUT")}
    env["SLURM_CONF"] = slurm_util.slurm_conf()
    env.update({k: str(v) for k, v in extra.items()})
    return env


def sbatch_array(script: str, env: dict, log_dir: Path) -> str:
    """`sbatch --array=0-1 scripts/SCRIPT` from the project root, the resources overridden for the test node."""
    cmd = ["sbatch", "--parsable", "--array=0-1", "--gres=none", "--cpus-per-task=1", "--mem=2G", "--time=20:00",
           f"--output={log_dir}/%x-%A_%a.out", f"scripts/{script}"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip(), done.stderr
    return done.stdout.strip().split(";")[0]


def task_logs(log_dir: Path, job: str) -> dict:
    return {int(p.name.rsplit("_", 1)[1].split(".")[0]): p.read_text() for p in log_dir.glob(f"*-{job}_*.out")}


def check_array(log_dir: Path, job: str, merged_file: Path, script: str) -> str:
    """Both tasks had work; the task whose log shows the merge ends with the next command; returns that line."""
    logs = task_logs(log_dir, job)
    assert sorted(logs) == [0, 1], list(log_dir.iterdir())
    for text in logs.values():
        assert re.search(r"\d+ example\(s\) to compute in \d+ chunk\(s\)", text.split("reading")[-1]), text[-3000:]
    merged = [text for text in logs.values() if f"wrote {merged_file}" in text]
    assert len(merged) >= 1, {i: t[-2000:] for i, t in logs.items()}
    lines = [text.strip().splitlines()[-1] for text in merged]
    assert all(line.endswith(f"bash scripts/{script}") for line in lines), lines
    for i, text in logs.items():   # a task that did not merge says so (or, finishing with the merger, also prints it)
        last = text.strip().splitlines()[-1]
        assert last.startswith(f"array task {i}: its shard of ") or last.endswith(f"bash scripts/{script}"), last
    return lines[0]


def assignments(line: str, command: list[str]) -> dict:
    words = shlex.split(line)
    assert words[-len(command):] == command, line
    env = dict(w.split("=", 1) for w in words[:-len(command)])
    assert all(re.fullmatch(r"[A-Z_]+", k) for k in env), line
    return env


workdir = slurm_util.workdir_fixture("safedata-slurm-recipes-")


def test_cluster_workflow_with_a_chat_model(workdir):
    model = chat_model(workdir / "model", workdir / "chat_model")
    pool = write_pool(workdir / "my_pool.jsonl")
    runs = workdir / "runs"
    logs = workdir / "logs"
    logs.mkdir()
    env = user_env(MODEL=model, POOL=pool, HARMFUL=LAB / "anchors_harmful.jsonl", SAFE1=LAB / "anchors_safe.jsonl",
                   SAFE2=LAB / "anchors_safe2.jsonl", RUNS=runs, BATCH_SIZE=4, PYTHON=python(), OMP_NUM_THREADS=1,
                   EXTRA="--dtype fp32 --device cpu --chunk_size 3")   # 12 records, 4 chunks: 2 per task

    # Step 1: both arrays, submitted as the README says (cwd = project root).
    reps_job = sbatch_array("get_representation.sh", env, logs)
    grads_job = sbatch_array("get_full_gradient.sh", env, logs)
    for job in (reps_job, grads_job):
        assert sorted(slurm_util.wait_ok(job, timeout=420).values()) == ["COMPLETED"] * 2

    # Outputs keyed by the model's own template (chat) and no cut (a pool that is not one of the paper's files).
    (reps,) = (runs / "reps").glob("*/my_pool_chat_lenall-480")
    (grads,) = (runs / "gradients").glob("*/my_pool_chat_lenall-480_mlen10_all")
    metas = {str(p.relative_to(runs)): json.loads(p.read_text()) for p in runs.rglob("meta.json")}
    assert len(metas) == 8, sorted(metas)   # reps: harmful safe1 safe2 pool; gradients: harmful safe1 safe2 scores
    assert {name: meta["template"] for name, meta in metas.items()} == dict.fromkeys(metas, "chat")
    assert json.loads((reps / "pool" / "meta.json").read_text())["flags"]["max_length"] is None
    assert json.loads((grads / "scores" / "meta.json").read_text())["n"] == len(TOPICS)

    # Each array's merging task ends with the next command, carrying what locates its outputs.
    rank_reps = check_array(logs, reps_job, reps / "pool" / "features.safetensors", "rank.sh")
    rank_grads = check_array(logs, grads_job, grads / "scores" / "scores.csv", "rank.sh")
    hint = assignments(rank_reps, ["bash", "scripts/rank.sh"])
    assert hint["TEMPLATE"] == "chat" and hint["MODEL"] == str(model) and hint["POOL"] == str(pool)
    assert hint["METHOD"] == "reps" and hint["REPS"] == str(reps) and hint["RUNS"] == str(runs)
    assert hint["POOL_MAX_LENGTH"] == "" and hint["ANCHOR_MAX_LENGTH"] == "480"
    hint = assignments(rank_grads, ["bash", "scripts/rank.sh"])
    assert hint["METHOD"] == "gradient" and hint["SCORES"] == str(grads / "scores") and hint["TEMPLATE"] == "chat"

    # Step 2: rank.sh as printed (from the project root), with a random-K control.
    step2 = dict(user_env(PYTHON=python(), OMP_NUM_THREADS=1), K=str(K))
    done = subprocess.run(["bash", "-c", rank_grads], cwd=ROOT, env=dict(step2, TYPES="top"), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    job = assignments(done.stdout.strip().splitlines()[-1], ["sbatch", "finetune_evaluation.slurm"])
    assert job["TEMPLATE"] == "chat" and job["SAVE_NAME"].startswith("gradient_") and Path(job["SUBSET"]).is_file()
    done = subprocess.run(["bash", "-c", rank_reps], cwd=ROOT, env=dict(step2, TYPES="top random"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    *_, random_line, top_line = done.stdout.strip().splitlines()
    control = assignments(random_line, ["sbatch", "finetune_evaluation.slurm"])
    top = assignments(top_line, ["sbatch", "finetune_evaluation.slurm"])
    records = [json.loads(line) for line in pool.read_text().splitlines()]
    # The random control: the top K of numpy's PCG64 draws with seed 1 (RANDOM_SEEDS' default), one per record.
    import numpy as np
    draws = np.random.default_rng(1).random(len(records))
    expected = [records[i] for i in np.argsort(-draws, kind="stable")[:K]]
    assert [json.loads(line) for line in Path(control["SUBSET"]).read_text().splitlines()] == expected
    assert "random" in control["SAVE_NAME"] and "seed1" in control["SAVE_NAME"]
    assert top["SAVE_NAME"] != control["SAVE_NAME"] and top["SAVE_NAME"].startswith("reps_")
    assert len(Path(top["SUBSET"]).read_text().splitlines()) == K
    for job in (control, top):
        assert job["MODEL"] == str(model) and job["TEMPLATE"] == "chat"
        assert job["OUTPUT_ROOT"] == str(runs / "finetune")

    # Step 3: the top-K job, its line run verbatim (resources from sbatch's input variables and the CPU shim).
    prompts = workdir / "prompts.csv"
    with open(prompts, "w", newline="") as handle:
        csv.writer(handle).writerows([[p] for p in PROMPTS])
    shim = workdir / "bin"
    shim.mkdir()
    (shim / "sbatch").write_text(f'#!/bin/bash\nexec {shutil.which("sbatch")} --cpus-per-task=1 "$@"\n')
    (shim / "sbatch").chmod(0o755)
    env = user_env(PATH=f"{shim}:{os.environ['PATH']}", SBATCH_GRES="none", SBATCH_MEM_PER_NODE="2G",
                   SBATCH_TIMELIMIT="30:00", SBATCH_OUTPUT=f"{workdir}/ft-%j.out", PYTHON=python(),
                   OMP_NUM_THREADS=1, EVAL_PROMPTS=prompts, MAX_NEW_TOKENS=8, SEEDS="1 2", EPOCHS=1, BATCH_SIZE=4,
                   GEN_BATCH_SIZE=8, LR="1e-3")
    done = subprocess.run(["bash", "-c", top_line], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    job_id = re.fullmatch(r"Submitted batch job (\d+)", done.stdout.strip()).group(1)
    assert slurm_util.wait_ok(job_id, timeout=600) == {job_id: "COMPLETED"}
    log = (workdir / f"ft-{job_id}.out").read_text()

    run_dir = Path(top["OUTPUT_ROOT"]) / top["SAVE_NAME"]
    per_seed = {seed: json.loads((run_dir / f"seed{seed}" / "evaluation" / "summary.json").read_text())
                for seed in (1, 2)}
    for seed in (1, 2):
        assert json.loads((run_dir / f"seed{seed}" / "model" / "finetune_meta.json").read_text())["template"] == "chat"
    summary = json.loads((run_dir / "summary" / "summary.json").read_text())
    (row,) = summary["rows"]
    asr = [100 * per_seed[seed]["keyword_asr"] for seed in (1, 2)]
    assert row["name"] == top["SAVE_NAME"] and row["seeds"] == [1, 2] and row["n_prompts"] == len(PROMPTS)
    assert all(per_seed[seed]["n"] == len(PROMPTS) for seed in (1, 2))
    assert row["asr_pct"] == pytest.approx(asr)
    assert row["asr_pct_mean"] == pytest.approx(sum(asr) / 2)
    assert row["asr_pct_sd"] == pytest.approx(statistics.stdev(asr))   # the sample sd (n - 1)
    (base,) = (Path(top["OUTPUT_ROOT"]) / "base").rglob("summary.json")   # the base model's evaluation
    assert row["base_asr_pct"] == pytest.approx(100 * json.loads(base.read_text())["keyword_asr"])
    # The job's log ends with the Markdown table holding the row.
    tail = log.strip().splitlines()[-6:]
    assert tail[-1].startswith("|") and any(line.startswith("|") and top["SAVE_NAME"] in line for line in tail), tail
