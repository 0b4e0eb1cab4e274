"""Helpers for tests that submit real jobs to a SLURM cluster.

The cluster is found through the SLURM_CONF environment variable (what `.ci/run` exports after
`tests/slurm/setup_cluster.sh`), or else the file /tmp/safedata-slurm/slurm.conf that the setup script
writes by default. On a laptop without SLURM, `require_slurm()` skips; with SAFEDATA_REQUIRE_SLURM=1
(CI) it fails instead, so CI can never pass by skipping.

There is no accounting daemon on the test cluster, so `sacct` does not work: job states come from
`scontrol show job -o` (finished jobs stay visible for MinJobAge = 600 s).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

DEFAULT_CONF = "/tmp/safedata-slurm/slurm.conf"
TERMINAL_STATES = frozenset({
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
    "BOOT_FAIL", "DEADLINE", "REVOKED", "SPECIAL_EXIT",
})
VANISHED = "VANISHED"  # the job left slurmctld's memory before we saw it finish
_CMD_TIMEOUT = 30
_SPLIT = re.compile(r" (?=[A-Za-z][\w:/]*=)")


def slurm_conf() -> str | None:
    """Path of the cluster's slurm.conf: $SLURM_CONF, else the setup script's default, else None."""
    conf = os.environ.get("SLURM_CONF")
    if conf:
        return conf
    return DEFAULT_CONF if os.path.isfile(DEFAULT_CONF) else None


def slurm_env(extra: dict | None = None) -> dict:
    """os.environ plus `extra`, with SLURM_CONF pointing at the test cluster."""
    env = dict(os.environ)
    if extra:
        env.update({k: str(v) for k, v in extra.items()})
    conf = slurm_conf()
    if conf and "SLURM_CONF" not in (extra or {}):
        env["SLURM_CONF"] = conf
    return env


def _run(cmd, env=None, timeout=_CMD_TIMEOUT, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env or slurm_env(), cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def slurm_status() -> tuple[bool, str]:
    """(True, description) when sbatch can submit to a responding controller with a usable node."""
    missing = [c for c in ("sbatch", "squeue", "scontrol", "sinfo", "scancel") if shutil.which(c) is None]
    if missing:
        return False, f"{', '.join(missing)} not on PATH (run: bash tests/slurm/setup_cluster.sh)"
    conf = slurm_conf()
    if conf is None:
        return False, f"no SLURM_CONF set and no {DEFAULT_CONF} (run: bash tests/slurm/setup_cluster.sh)"
    if not os.path.isfile(conf):
        return False, f"SLURM_CONF={conf} does not exist"
    try:
        ping = _run(["scontrol", "ping"])
        if ping.returncode != 0 or "UP" not in ping.stdout:
            msg = (ping.stdout + ping.stderr).strip().splitlines()
            return False, f"slurmctld not responding (SLURM_CONF={conf}): {msg[0] if msg else ping.returncode}"
        nodes = _run(["sinfo", "-h", "-o", "%t"])
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"SLURM commands failed (SLURM_CONF={conf}): {e}"
    states = nodes.stdout.split()
    usable = [s for s in states if s.rstrip("*~#!%$@^-") in ("idle", "mix", "alloc", "comp", "plnd")]
    if not usable:
        return False, f"no usable node (SLURM_CONF={conf}; sinfo states: {states or nodes.stderr.strip()})"
    return True, f"SLURM_CONF={conf}, node states {states}"


def slurm_available() -> bool:
    return slurm_status()[0]


def require_slurm() -> str:
    """Skip the test when there is no SLURM cluster; fail instead when SAFEDATA_REQUIRE_SLURM=1.

    Returns the SLURM_CONF path in use.
    """
    ok, reason = slurm_status()
    if not ok:
        if os.environ.get("SAFEDATA_REQUIRE_SLURM") == "1":
            pytest.fail(f"SLURM required (SAFEDATA_REQUIRE_SLURM=1) but not available: {reason}", pytrace=False)
        pytest.skip(f"SLURM not available: {reason}")
    return slurm_conf()


def submit(script_path, args=(), env: dict | None = None, sbatch_args=(), cwd=None) -> str:
    """`sbatch --parsable --export=ALL [sbatch_args] script [args]`; returns the job id (a string).

    The job sees os.environ merged with `env`. Unless sbatch_args name an output file, the job's
    stdout+stderr go to <script dir>/slurm-<jobid>.out (each array task its own file). The job's
    working directory is `cwd`, default the script's directory.
    """
    script = Path(script_path).resolve()
    sbatch_args = [str(a) for a in sbatch_args]
    cmd = ["sbatch", "--parsable", "--export=ALL"]
    if not any(a in ("-o", "--output") or a.startswith(("--output=", "-o")) for a in sbatch_args):
        cmd.append(f"--output={script.parent / 'slurm-%j.out'}")
    workdir = Path(cwd) if cwd is not None else script.parent
    if not any(a in ("-D", "--chdir") or a.startswith(("--chdir=", "-D")) for a in sbatch_args):
        cmd.append(f"--chdir={workdir}")
    cmd += sbatch_args + [str(script)] + [str(a) for a in args]
    res = _run(cmd, env=slurm_env(env), cwd=str(workdir))
    out = res.stdout.strip()
    if res.returncode != 0 or not out:
        pytest.fail(f"sbatch failed (exit {res.returncode}): {' '.join(cmd)}\nstdout: {res.stdout}\n"
                    f"stderr: {res.stderr}", pytrace=False)
    return out.splitlines()[-1].split(";")[0].strip()


def job_records(job_id) -> list[dict] | None:
    """Parsed `scontrol show job -o JOB` lines (one per array task or pending range); None if unknown."""
    res = _run(["scontrol", "show", "job", "-o", str(job_id)])
    if res.returncode != 0:
        if "Invalid job id" in res.stderr:
            return None
        raise RuntimeError(f"scontrol show job {job_id} failed: {res.stderr.strip()}")
    records = []
    for line in res.stdout.splitlines():
        line = line.strip()
        if not line:
            continue
        rec = {}
        for field in _SPLIT.split(line):
            key, _, value = field.partition("=")
            rec[key] = value
        records.append(rec)
    records.sort(key=lambda r: (r.get("ArrayTaskId", "").isdigit(), int(r["ArrayTaskId"])
                                if r.get("ArrayTaskId", "").isdigit() else 0))
    return records


def _task_key(rec: dict) -> str:
    task = rec.get("ArrayTaskId")
    if task and task != "N/A":
        return f"{rec.get('ArrayJobId', rec.get('JobId'))}_{task}"
    return rec.get("JobId", "?")


def _tail(path: str, limit: int = 4000) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as e:
        return f"<cannot read: {e}>"
    return text if len(text) <= limit else "...\n" + text[-limit:]


def job_report(job_id, records: list[dict] | None = None) -> str:
    """Human-readable state, exit code and output-file contents of every task of a job."""
    if records is None:
        try:
            records = job_records(job_id)
        except Exception as e:  # noqa: BLE001 - a report must not raise
            return f"job {job_id}: cannot query: {e}"
    if not records:
        return f"job {job_id}: not known to slurmctld any more"
    lines = []
    for rec in records:
        lines.append(f"job {_task_key(rec)}: state={rec.get('JobState')} reason={rec.get('Reason')} "
                     f"exit={rec.get('ExitCode')} node={rec.get('NodeList')}")
        seen = set()
        for key in ("StdOut", "StdErr"):
            path = rec.get(key)
            if not path or path in seen or path == "/dev/null":
                continue
            seen.add(path)
            lines.append(f"--- {key} {path} ---\n{_tail(path)}")
    return "\n".join(lines)


def wait_for(job_id, timeout: float = 120, poll: float = 1.0, cancel_on_timeout: bool = True) -> dict:
    """Wait until the job (every task of an array job) has finished; returns {task: final state}.

    Keys are "<jobid>" for a plain job and "<arrayjobid>_<index>" for array tasks. A job that
    vanished from slurmctld before being seen finished gets the state VANISHED. On timeout the job
    is cancelled (unless cancel_on_timeout=False) and the test fails with the job's state and output.
    """
    poll = max(0.5, float(poll))
    deadline = time.monotonic() + timeout
    states: dict = {}
    records = None
    transient = ""
    while True:
        try:
            records = job_records(job_id)
        except (RuntimeError, subprocess.TimeoutExpired) as e:  # controller restarting: keep polling
            transient = str(e)
            if time.monotonic() >= deadline:
                pytest.fail(f"job {job_id}: slurmctld unreachable until the {timeout:.0f}s timeout: {transient}",
                            pytrace=False)
            time.sleep(poll)
            continue
        if records is None:
            if not states:
                pytest.fail(f"job {job_id} is unknown to slurmctld", pytrace=False)
            return {k: (v if v in TERMINAL_STATES else VANISHED) for k, v in states.items()}
        states = {_task_key(r): r.get("JobState", "?") for r in records}
        if all(s in TERMINAL_STATES for s in states.values()):
            return states
        if time.monotonic() >= deadline:
            report = job_report(job_id, records)
            if cancel_on_timeout:
                _run(["scancel", str(job_id)])
            pytest.fail(f"job {job_id} not finished after {timeout:.0f}s (states {states})\n{report}",
                        pytrace=False)
        time.sleep(poll)


def wait_ok(job_id, timeout: float = 120, poll: float = 1.0) -> dict:
    """wait_for(), then fail the test (with the output files' content) unless every task COMPLETED."""
    states = wait_for(job_id, timeout=timeout, poll=poll)
    bad = {k: v for k, v in states.items() if v != "COMPLETED"}
    if bad:
        pytest.fail(f"job {job_id}: tasks did not complete: {bad}\n{job_report(job_id)}", pytrace=False)
    return states


def workdir_fixture(prefix: str):
    """A test module's `workdir` fixture: skips without a cluster (before building anything), else job_workdir."""
    @pytest.fixture()
    def workdir(request):
        require_slurm()
        with job_workdir(request.getfixturevalue("tiny_model_dir"), prefix) as base:
            yield base
    return workdir


@contextmanager
def job_workdir(tiny_model_dir, prefix: str):
    """A world-readable directory under /tmp (the slurmd user reads it) holding a copy of the tiny model."""
    base = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    base.chmod(0o755)
    shutil.copytree(tiny_model_dir, base / "model")
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)
