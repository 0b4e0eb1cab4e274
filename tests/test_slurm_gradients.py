"""A SLURM array of gradient scoring where every task builds the three targets and then scores its shard,
started together, with target builds made deliberately non-deterministic: each target is built once (the
others wait on its lock and keep it), every task scores against the same bytes, and one scores.csv is merged
that equals a single run against those targets under the tasks' settings (one thread: fp32 sums are split
across threads, so the thread count changes the last bits)."""
import json
import os
import re
import subprocess

import pytest

import perturbed_targets
import slurm_util
from conftest import ROOT, python
from safedata.features import gradients as G

TARGETS = ("harmful", "safe1", "safe2")


def anchors(path, answer):
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Placeholder request {i}"},
                                                     {"role": "assistant", "content": f"{answer} {i}."}]}) + "\n"
                            for i in range(3)))
    return path


@pytest.fixture()
def workdir(request):
    slurm_util.require_slurm()
    with slurm_util.job_workdir(request.getfixturevalue("tiny_model_dir"), "safedata-slurm-grad-") as base:
        yield base


def test_array_tasks_build_each_target_once_and_merge_one_scores_csv(workdir):
    pool = workdir / "pool.json"
    pool.write_text(json.dumps([{"instruction": f"Describe thing {i}", "input": "",
                                 "output": "1. A part.\n2. Another part. " * (1 + i % 3)} for i in range(13)]))
    files = {"harmful": anchors(workdir / "harmful.jsonl", "Sure, placeholder step"),
             "safe1": anchors(workdir / "safe1.jsonl", "I cannot help with placeholder"),
             "safe2": anchors(workdir / "safe2.jsonl", "Sorry, not placeholder")}
    model, out = workdir / "model", workdir / "out"
    common = f'--model_name "{model}" --dtype fp32 --device cpu --batch_size 2'
    builder = f'"{python()}" "{ROOT / "tests" / "perturbed_targets.py"}"'
    builds = "".join(f'{builder} --anchor {common} --data_path "{files[t]}" '
                     f'--output_dir "{out / t}" --max_response_length 10\n' for t in TARGETS)
    scoring = (f'"{python()}" "{ROOT / "get_gradients.py"}" {common} --data_path "{pool}" '
               f'--output_dir "{{out}}" --chunk_size 2 --targets ' + " ".join(f'"{out / t}"' for t in TARGETS))
    script = workdir / "task.sh"
    # Every task waits (up to 120 s) until a second one has started, so at least two build at once whatever
    # the scheduler's timing (the test cluster runs one task per CPU, and CI has two).
    # No --shard: each task takes its part of the pool from SLURM_ARRAY_TASK_ID / _COUNT.
    script.write_text("#!/bin/bash\nset -euo pipefail\nexport OMP_NUM_THREADS=1\n"
                      f'touch "{workdir}/started.$SLURM_ARRAY_TASK_ID"\n'
                      f'for _ in $(seq 1200); do [ "$(ls "{workdir}" | grep -c "^started[.]")" -ge 2 ] && break; '
                      "sleep 0.1; done\n"
                      'echo "start $(date +%s.%N)"\n' + builds + 'echo "built $(date +%s.%N)"\n'
                      + scoring.format(out=out / "scores") + "\n")
    script.chmod(0o755)
    job = slurm_util.submit(script, env={"PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"},
                            sbatch_args=["--array=0-3", f"--output={workdir}/task-%a.out", "--time=15"])
    states = slurm_util.wait_ok(job, timeout=900)
    assert sorted(states.values()) == ["COMPLETED"] * 4
    logs = [(workdir / f"task-{i}.out").read_text() for i in range(4)]
    # tasks really ran at once: a second one started before the first had built its targets
    starts = sorted(float(re.search(r"^start (\S+)", log, re.M).group(1)) for log in logs)
    built = min(float(re.search(r"^built (\S+)", log, re.M).group(1)) for log in logs)
    assert starts[1] < built, "no two array tasks ran at once: the test cluster needs 2 CPUs (setup_cluster.sh)"
    text = "\n".join(logs)
    for t in TARGETS:   # built exactly once; every other task waited for the lock and kept it
        assert len(re.findall(rf"wrote {re.escape(str(out / t / 'target.safetensors'))}", text)) == 1, t
        assert len(re.findall(rf"{re.escape(str(out / t))}: target already built", text)) == 3, t
    assert text.count(perturbed_targets.LOG_LINE) == 3          # each build was perturbed
    # one merged scores.csv, equal to a single run against the same targets with the tasks' settings
    single = workdir / "single"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    subprocess.run(["bash", "-c", scoring.format(out=single)], check=True, cwd=ROOT,
                   env={**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}, capture_output=True)
    merged = (out / "scores" / "scores.csv").read_bytes()
    assert merged == (single / "scores.csv").read_bytes() and merged.count(b"\n") == 13 + 1
    # and the hook really makes builds differ: a second build of the same target has other bytes
    with perturbed_targets.perturbing_target_writes():
        assert G.build_target(G.GradientArgs(anchor=True, model_name=str(model), data_path=files["harmful"],
                                             output_dir=workdir / "again", max_response_length=10, batch_size=2,
                                             dtype="fp32", device="cpu"))
    assert (workdir / "again" / "target.safetensors").read_bytes() != \
        (out / "harmful" / "target.safetensors").read_bytes()
