"""The test SLURM cluster itself: a plain batch job and an array job really run through sbatch."""
import socket

import pytest

from slurm_util import require_slurm, submit, wait_for, wait_ok


@pytest.fixture
def slurm():
    return require_slurm()


def _script(path, body):
    path.write_text("#!/bin/bash\nset -euo pipefail\n" + body)
    path.chmod(0o755)
    return path


def test_batch_job_runs(slurm, tmp_path):
    out = tmp_path / "result.txt"
    script = _script(tmp_path / "job.sh", 'echo "$SLURM_JOB_ID $(hostname -s) $MY_VALUE $1" > "$OUT_FILE"\n')
    job_id = submit(script, args=["arg1"], env={"OUT_FILE": str(out), "MY_VALUE": "hello"},
                    sbatch_args=["--job-name=safedata-trivial", "--time=5"])
    states = wait_ok(job_id, timeout=120)
    assert states == {job_id: "COMPLETED"}
    assert out.exists(), f"job {job_id} wrote no {out}"
    jid, host, value, arg = out.read_text().split()
    assert jid == job_id
    assert host == socket.gethostname().split(".")[0]
    assert (value, arg) == ("hello", "arg1")


def test_array_job_runs_every_task(slurm, tmp_path):
    script = _script(tmp_path / "array.sh",
                     'echo "$SLURM_ARRAY_TASK_ID $SLURM_ARRAY_TASK_COUNT" > "$OUT_DIR/task-$SLURM_ARRAY_TASK_ID.txt"\n')
    job_id = submit(script, env={"OUT_DIR": str(tmp_path)},
                    sbatch_args=["--array=0-2", f"--output={tmp_path}/array-%A_%a.out", "--time=5"])
    states = wait_ok(job_id, timeout=180)
    assert states == {f"{job_id}_{i}": "COMPLETED" for i in range(3)}
    for i in range(3):
        f = tmp_path / f"task-{i}.txt"
        assert f.exists(), f"array task {i} wrote nothing"
        assert f.read_text().split() == [str(i), "3"]


def test_failed_job_is_reported(slurm, tmp_path):
    script = _script(tmp_path / "fail.sh", 'echo "about to fail"\nexit 3\n')
    job_id = submit(script, sbatch_args=["--time=5"])
    states = wait_for(job_id, timeout=120)
    assert states == {job_id: "FAILED"}
    assert "about to fail" in (tmp_path / f"slurm-{job_id}.out").read_text()
