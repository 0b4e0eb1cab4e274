"""Bad input, kills, determinism and memory: a run is trustworthy or it stops with one line."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ROOT, python
from safedata import data as D
from safedata.errors import UserError


def write_pool(path, n):
    records = [{"instruction": f"Describe item {i} in a few words", "input": "",
                "output": ("1. A point.\n2. Another point. " if i % 2 else "A short sentence about it. ") * (1 + i % 4)}
               for i in range(n)]
    path.write_text(json.dumps(records, indent=1))
    return path


def rep_cmd(model, pool, out, *extra):
    return [python(), str(ROOT / "get_representation.py"), "--model_name", model, "--data_path", str(pool),
            "--output_dir", str(out), "--chunk_size", "4", "--batch_size", "2", *extra]


def kill9_when(cmd, progressed, timeout=120):
    """Start cmd, SIGKILL it as soon as progressed() is true (or at the timeout)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not progressed():
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def n_chunks(directory):
    return len(list((directory / "chunks").glob("chunk-*.safetensors")))


def test_kill9_then_rerun_is_byte_identical(tiny_model_dir, tmp_path):
    pool = write_pool(tmp_path / "pool.json", 400)
    clean = tmp_path / "clean"
    subprocess.run(rep_cmd(tiny_model_dir, pool, clean), check=True, capture_output=True)
    killed = tmp_path / "killed"
    kill9_when(rep_cmd(tiny_model_dir, pool, killed), lambda: n_chunks(killed) >= 2)
    done_before = n_chunks(killed)
    assert 2 <= done_before < 100 and not (killed / "features.safetensors").exists()
    result = subprocess.run(rep_cmd(tiny_model_dir, pool, killed), check=True, capture_output=True, text=True)
    assert "resuming" in result.stderr
    assert (killed / "features.safetensors").read_bytes() == (clean / "features.safetensors").read_bytes()
    a, b = (json.loads((d / "meta.json").read_text()) for d in (clean, killed))
    for meta in (a, b):
        meta.pop("created"), meta.pop("data_file")
    assert a == b  # meta.json differs only in its date


def write_anchors(path, n=4):
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Placeholder request {i}"},
                                                     {"role": "assistant", "content": f"Sure:\n1. Placeholder step {i}."}]}) + "\n"
                            for i in range(n)))
    return path


def grad_cmd(model, data, out, *extra):
    return [python(), str(ROOT / "get_gradients.py"), "--model_name", model, "--data_path", str(data),
            "--output_dir", str(out), "--batch_size", "2", *extra]


def kill9_after(cmd, started, delay, timeout=300):
    """Start cmd; once started(proc) holds, wait `delay` seconds more, then SIGKILL it (unless it finished).
    Returns whether it was killed."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not started(proc):
        time.sleep(0.01)
    end = time.time() + delay
    while time.time() < end and proc.poll() is None:
        time.sleep(0.01)
    killed = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return killed


def test_kill9_gradients_both_modes_then_rerun_is_byte_identical(tiny_model_dir, tmp_path):
    """Anchor stage: killed once its build has begun (it holds the target lock, pid written into it) and at a
    random point after; scoring: killed after its first chunk and at a random point after. The reruns give
    the clean run's bytes."""
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    anchors = write_anchors(tmp_path / "anchors.jsonl")
    pool = write_pool(tmp_path / "pool.json", 300)
    runs, took = {}, {}
    for name in ("clean", "killed"):
        target, scores = tmp_path / name / "target", tmp_path / name / "scores"
        anchor_cmd = grad_cmd(tiny_model_dir, anchors, target, "--anchor", "--max_response_length", "10")
        score_cmd = grad_cmd(tiny_model_dir, pool, scores, "--targets", str(target), "--chunk_size", "4")
        lock = target / ".target.lock"
        holds_lock = lambda proc: lock.exists() and lock.read_text().strip() == str(proc.pid)  # noqa: E731
        if name == "killed":
            assert kill9_after(anchor_cmd, holds_lock, 0.0), seed                # the build had begun
            assert not (target / "meta.json").exists(), seed
            kill9_after(anchor_cmd, holds_lock, rng.uniform(0, took["anchor"]))  # somewhere in the build
        start = time.time()
        subprocess.run(anchor_cmd, check=True, capture_output=True)
        took["anchor"] = time.time() - start
        if name == "killed":
            assert kill9_after(score_cmd, lambda proc: n_chunks(scores) >= 1, 0.0), seed
            first = n_chunks(scores)
            assert 1 <= first < 75 and not (scores / "scores.csv").exists(), seed
            kill9_after(score_cmd, lambda proc: n_chunks(scores) > first, rng.uniform(0, took["scores"]))
        start = time.time()
        subprocess.run(score_cmd, check=True, capture_output=True)
        took["scores"] = time.time() - start
        runs[name] = [(target / "target.safetensors").read_bytes(), (scores / "scores.csv").read_bytes()]
    assert runs["clean"] == runs["killed"], seed


def test_kill9_generation_then_rerun_is_byte_identical(tiny_model_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Placeholder question number {i} about gardening"}) + "\n"
                               for i in range(120)))
    out = {}
    for name in ("clean", "killed"):
        d = tmp_path / name
        cmd = [python(), str(ROOT / "generate.py"), "--model_name", tiny_model_dir, "--data_path", str(prompts),
               "--output_dir", str(d), "--batch_size", "4", "--max_new_tokens", "12", "--dtype", "fp32"]
        partial = d / "responses.partial.jsonl"
        if name == "killed":
            kill9_when(cmd, lambda: partial.exists() and partial.read_text().count("\n") >= 8)
            assert partial.exists() and not (d / "responses.jsonl").exists()
        subprocess.run(cmd, check=True, capture_output=True)
        out[name] = (d / "responses.jsonl").read_bytes()
    assert out["clean"] == out["killed"] and out["clean"].count(b"\n") == 120


def test_same_command_twice_is_byte_identical(tiny_model_dir, tmp_path):
    pool = write_pool(tmp_path / "pool.json", 10)
    anchors = tmp_path / "anchors.jsonl"
    anchors.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Placeholder request {i}"},
                                                        {"role": "assistant", "content": "Sure:\n1. Step."}]}) + "\n"
                               for i in range(3)))
    outputs = []
    for run in ("a", "b"):
        d = tmp_path / run
        subprocess.run(rep_cmd(tiny_model_dir, pool, d / "pool"), check=True, capture_output=True)
        subprocess.run(rep_cmd(tiny_model_dir, anchors, d / "anchors", "--max_length", "480"), check=True,
                       capture_output=True)
        subprocess.run([python(), str(ROOT / "rank.py"), "--data_path", str(pool), "--pool_features", str(d / "pool"),
                        "--anchor_features", str(d / "anchors"), "--k", "3", "--output_dir", str(d / "sel")],
                       check=True, capture_output=True)
        outputs.append([(d / "pool" / "features.safetensors").read_bytes(),
                        (d / "sel" / "pool_top3.json").read_bytes(), (d / "sel" / "pool_top3_index.csv").read_bytes()])
    assert outputs[0] == outputs[1]


# ----------------------------------------------------------------------------- fuzzing the loaders

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                           lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
                           max_leaves=8)
record_like = st.fixed_dictionaries({}, optional={k: st.one_of(st.text(max_size=6), json_values) for k in
                                                  ("instruction", "input", "output", "question", "answer", "messages",
                                                   "prompt", "context", "response")})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=st.lists(st.one_of(record_like, json_values), max_size=4), suffix=st.sampled_from([".json", ".jsonl"]),
       need_response=st.booleans())
def test_fuzz_json_loaders_fail_with_one_line(tmp_path, records, suffix, need_response):
    path = tmp_path / f"fuzz{suffix}"
    text = json.dumps(records) if suffix == ".json" else "".join(json.dumps(r) + "\n" for r in records)
    path.write_text(text)
    try:
        examples, _ = D.load_examples(path, need_response=need_response)
    except UserError as err:
        assert "\n" not in str(err) and str(path) in str(err)
    else:
        assert [e.index for e in examples] == list(range(len(records)))
        assert all(isinstance(e.instruction, str) and e.instruction.strip() for e in examples)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=200), suffix=st.sampled_from([".json", ".jsonl", ".csv"]))
def test_fuzz_raw_bytes_never_crash(tmp_path, raw, suffix):
    path = tmp_path / f"raw{suffix}"
    path.write_bytes(raw)
    try:
        D.load_examples(path, need_response=False)
    except UserError as err:
        assert "\n" not in str(err)


def test_cli_user_error_is_one_line_without_traceback(tiny_model_dir, tmp_path):
    """A real model, so that nothing stops the run before the data: it reaches the bad record (line 2, a null
    'output') and stops there with one line naming the file, the line and the field."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x", "output": "y"}\n{"instruction": "x", "output": null}\n')
    result = subprocess.run([python(), str(ROOT / "get_representation.py"), "--model_name", tiny_model_dir,
                             "--data_path", str(bad), "--output_dir", str(tmp_path / "o")], capture_output=True, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.strip().splitlines() if " INFO " not in line]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith(f"error: {bad}:2: field 'output': "), result.stderr
    assert "expected a string" in errors[0]
    assert not (tmp_path / "o" / "features.safetensors").exists()


# ----------------------------------------------------------------------------- memory

MEASURE = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import numpy, torch, safetensors.torch
from pathlib import Path
from safedata import ranking

# The kernel's own high-water mark (VmHWM), not a sampler: a thread polling every few ms can miss a short peak.
# Writing 5 to /proc/self/clear_refs (Linux >= 4.0) resets it to the current RSS, so the growth below is the
# peak of the work alone, imports excluded. Where that is refused, the mark left by the imports is the base
# (as tests/test_plan.py's MEASURE does), and the gap it may hide is reported for the test to bound.
def status_kb(key):
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith(key + ":"))

try:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    reset = True
except OSError:
    reset = False
rss, base = status_kb("VmRSS"), status_kb("VmHWM")
if sys.argv[2] == "rank":
    ranking.rank(ranking.RankArgs(data_path=sys.argv[3], output_dir=sys.argv[5], name="big", pool_features=sys.argv[4],
                                  anchor_features=[sys.argv[4] + "_anchors"], k=50))
else:  # the control: reading the features whole, so the measurement is shown to see it
    features = safetensors.torch.load(Path(sys.argv[4], "features.safetensors").read_bytes())["features"]
    print(float(features.sum()))
print(json.dumps({"base_kb": base, "peak_kb": status_kb("VmHWM"), "reset": reset, "hidden_kb": base - rss}))
"""


def test_ranking_streams_a_pool_larger_than_its_memory_budget(tmp_path):
    import numpy as np
    import torch
    from safedata.store import stream_rows_to_safetensors, write_json
    n, dim, block = 60_000, 1024, 4096  # 245 MB of features
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(f'{{"question": "q{i}", "answer": "a{i}"}}\n' for i in range(n)))
    examples, _ = D.load_examples(pool)
    feats = tmp_path / "feats"
    rng = np.random.default_rng(0)
    blocks = (torch.from_numpy(rng.standard_normal((min(block, n - s), dim), dtype=np.float32)) for s in range(0, n, block))
    stream_rows_to_safetensors(feats / "features.safetensors", "features", blocks, n, (dim,), torch.float32)
    meta = {"stage": "representations", "model": "m", "template": "paper", "flags": {}, "n": n,
            "data_sha256": D.file_sha256(pool), "indices": list(range(n)), "ids": [e.id for e in examples]}
    write_json(feats / "meta.json", meta)
    anchors = tmp_path / "feats_anchors"
    stream_rows_to_safetensors(anchors / "features.safetensors", "features",
                               [torch.from_numpy(rng.standard_normal((5, dim), dtype=np.float32))], 5, (dim,), torch.float32)
    write_json(anchors / "meta.json", dict(meta, n=5, indices=list(range(5)), ids=[f"a{i}" for i in range(5)]))
    feature_mb = n * dim * 4 / 2**20

    def grown_mb(mode):
        result = subprocess.run([python(), "-c", MEASURE, str(ROOT), mode, str(pool), str(feats), str(tmp_path / "sel")],
                                capture_output=True, text=True, check=True)
        usage = json.loads(result.stdout.strip().splitlines()[-1])
        # without the reset, a peak of the imports above the base RSS could hide that much growth: bound it
        assert usage["reset"] or usage["hidden_kb"] / 1024 < 0.05 * feature_mb, usage
        return (usage["peak_kb"] - usage["base_kb"]) / 1024
    # Features are streamed in 32 MB blocks (8,192 rows of 1,024 fp32 here); the pool records, ids and the
    # N-long score vectors are what remains. Reading the features whole costs at least their size: the same
    # measurement on that control shows it would catch a ranking that did.
    ranked, whole = grown_mb("rank"), grown_mb("whole")
    assert whole > 0.95 * feature_mb, (whole, feature_mb)
    assert ranked < 0.6 * feature_mb, (ranked, feature_mb)
    assert len(json.loads(open(tmp_path / "sel" / "big_top50.jsonl").readline())) == 2
