"""The paper recipes (scripts/*.sh) end to end with variables only, on real Alpaca slices, and the
facts docs/ORIGINAL.md states about the original's recipe; where the recipes find the project root (plain bash, a copy
run by SLURM from its spool folder, PROJECT_DIR), which template and cut key their outputs, and the commands they
print (tests/test_slurm_recipes.py runs them under sbatch)."""
import csv
import hashlib
import io
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from bruteforce import Reference as BruteForce
from pathlib import Path

from conftest import ROOT, python
from safedata import data as D
from safedata.models import load_model

LAB = ROOT / "ft_datasets" / "lab"
ALPACA = "paper/ft_datasets/alpaca_dataset/alpaca_data.json"
FIRST_EMPTY_OUTPUT = 284  # the first of the 28 Alpaca records with an empty output
HARMFUL, SAFE1, SAFE2 = (LAB / f"anchors_{name}.jsonl" for name in ("harmful", "safe", "safe2"))
# The recipe runs in fp32 (EXTRA=--dtype fp32); its gradient scores are checked against the fp64 brute force.
# Tolerance, derived as tests/test_gradients.py derives its bf16 one, with fp32's unit roundoff u = 2^-24: a
# per-example gradient passes R ~ 60 roundings in sequence (2 layers x ~14 forward + ~14 backward, embedding,
# final norm, head), taken as independent eps = sqrt(R) u = 4.6e-7 relative; a score s = <G, T>/||G|| with
# ||T|| <= 1 moves by <= 2 eps = 9.2e-7 in absolute terms. Measured (tiny model, both slices, batch 4):
# 6.4e-8 at most, with scores of 2.6e-3 to 6.9e-2 in magnitude.
FP32_SCORE_TOL = 2 * math.sqrt(60) * 2.0 ** -24


def local_model_name(model_dir):
    """The output key the recipes give a local model directory (test_outputs_are_keyed_by_the_models_content checks
    what it is)."""
    from safedata.models import folder_key
    return folder_key(str(model_dir))


def script(name, env, cwd=ROOT, path=None):
    """Run a recipe with bash (path: a copy of it elsewhere, as SLURM runs one from its spool folder)."""
    done = subprocess.run(["bash", str(path or ROOT / "scripts" / name)], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def spool_copy(name, folder):
    """A copy of scripts/NAME outside the project, as slurmd runs a batch script (its spool folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(ROOT / "scripts" / name, folder / "slurm_script"))


def last_command(stdout, command):
    """The last line a recipe prints, `VAR=value ... <command>` (shell-quoted), as {VAR: value}."""
    words = shlex.split(stdout.strip().splitlines()[-1])
    assert words[-len(command):] == command, stdout[-2000:]
    return dict(w.split("=", 1) for w in words[:-len(command)])


def next_command(stdout):
    """The `VAR=... bash scripts/rank.sh` line a step-1 script ends with, as (env, script)."""
    return last_command(stdout, ["bash", "scripts/rank.sh"]), "scripts/rank.sh"


def features(directory):
    from safedata.store import load_tensors
    return load_tensors(directory / "features.safetensors")[0]["features"].double()


def last_token_states(model, tok, path, cut):
    """Last-layer hidden state at the last token of each example cut at `cut` tokens: a plain forward pass of
    one unpadded example at a time."""
    rows = []
    for example in D.load_examples(path)[0]:
        ids = D.encode(example, tok, "paper", max_length=cut).input_ids
        with torch.no_grad():
            rows.append(model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0, -1])
    return torch.stack(rows).double()


def index_rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def max_cos(pool, anchors):
    pool = pool / pool.norm(dim=1, keepdim=True)
    anchors = anchors / anchors.norm(dim=1, keepdim=True)
    return (pool @ anchors.T).max(dim=1).values


@pytest.fixture(scope="module")
def slices(shared_data, tmp_path_factory):
    """Two slices of the real Alpaca file; the second holds an empty output (kept as an EOS-only example). Named
    as prepare.py names Alpaca (alpaca_data*), so the recipes cut them at the paper's 512 tokens."""
    records = json.loads((shared_data / ALPACA).read_text())
    assert records[FIRST_EMPTY_OUTPUT]["output"] == ""
    folder = tmp_path_factory.mktemp("alpaca")
    a, b = folder / "alpaca_data_first.json", folder / "alpaca_data_with_empty.json"
    a.write_text(json.dumps(records[:6], indent=4))
    b.write_text(json.dumps(records[FIRST_EMPTY_OUTPUT - 3:FIRST_EMPTY_OUTPUT + 3], indent=4))
    return a, b


def test_recipes_run_end_to_end_on_two_alpaca_slices(slices, tiny_model_dir, tmp_path):
    runs = tmp_path / "runs"
    base = {k: v for k, v in os.environ.items()
            if not k.startswith("SLURM_") and k not in ("TEMPLATE", "PROJECT_DIR", "MODEL_NAME", "OUT")}
    base.update(PYTHON=python(), OMP_NUM_THREADS="1")
    recipe = dict(base, MODEL=tiny_model_dir, HARMFUL=str(HARMFUL), SAFE1=str(SAFE1), SAFE2=str(SAFE2), RUNS=str(runs),
                  BATCH_SIZE="4", EXTRA="--dtype fp32 --device cpu")
    model, tok = load_model(tiny_model_dir, "fp32", "cpu")
    first_outputs = None
    for pool, types in zip(slices, ("top bottom", "top")):
        env = dict(recipe, POOL=str(pool))
        if pool == slices[0]:   # plain bash, from the project root
            reps = script("get_representation.sh", env)
            grads = script("get_full_gradient.sh", env)
        else:   # as `sbatch --array=0-1` runs them: a copy in a spool folder, SLURM_SUBMIT_DIR the project root;
            # task 1 first (it needs no anchors, and leaves the merge to the last task), then task 0 (anchors, its
            # shard, the merge). 6 records in chunks of 3: one chunk each. TEMPLATE given this time (--template
            # paper to every CLI; the same folders, and no warning: the tiny model's template is Llama-2's).
            env = dict(env, SLURM_SUBMIT_DIR=str(ROOT), SLURM_ARRAY_TASK_COUNT="2", SLURM_ARRAY_TASK_MIN="0",
                       EXTRA=recipe["EXTRA"] + " --chunk_size 3", TEMPLATE="paper")
            outputs = []
            for i, name in enumerate(("get_representation.sh", "get_full_gradient.sh")):
                copy = spool_copy(name, tmp_path / f"spool{i}")
                first = script("", dict(env, SLURM_ARRAY_TASK_ID="1"), cwd=tmp_path, path=copy)
                assert first.stdout.strip().splitlines()[-1].startswith("array task 1: its shard of "), first.stdout
                assert "to compute in 1 chunk(s)" in first.stderr
                outputs.append(script("", dict(env, SLURM_ARRAY_TASK_ID="0"), cwd=tmp_path, path=copy))
                assert "WARNING" not in first.stderr + outputs[-1].stderr
            reps, grads = outputs
        for step1 in (reps, grads):   # rank.sh from the printed hint alone (it carries POOL, MODEL, ...)
            hint, name = next_command(step1.stdout)
            assert hint["POOL"] == str(pool) and hint["MODEL"] == tiny_model_dir
            assert hint["TEMPLATE"] == "paper"   # the tiny model's Llama-2-style chat template: the paper's wrapper
            assert hint["POOL_MAX_LENGTH"] == "512" and hint["ANCHOR_MAX_LENGTH"] == "480"
            # A copy run elsewhere finds the project through PROJECT_DIR.
            done = script("", dict(base, **hint, K="2", TYPES=types, PROJECT_DIR=str(ROOT)), cwd=tmp_path,
                          path=spool_copy("rank.sh", tmp_path / "spool3"))
            # The last line is the top-K fine-tuning job, runnable as printed from the project root.
            job = last_command(done.stdout, ["sbatch", "finetune_evaluation.slurm"])
            tag = "reps" if hint["METHOD"] == "reps" else "gradient"
            assert job["MODEL"] == tiny_model_dir and job["TEMPLATE"] == "paper"   # as recorded in meta.json
            assert job["SAVE_NAME"] == f"{tag}_{local_model_name(tiny_model_dir)}_{pool.stem}_top2"
            assert job["SUBSET"].endswith(f"/{pool.stem}_paper_len512-480/{pool.stem}_top2.json")
            assert json.loads(Path(job["SUBSET"]).read_text()) and job["OUTPUT_ROOT"] == str(runs / "finetune")

        rep_dir = runs / "reps" / local_model_name(tiny_model_dir) / f"{pool.stem}_paper_len512-480"
        meta = json.loads((rep_dir / "pool" / "meta.json").read_text())
        assert meta["n"] == 6 and meta["flags"]["max_length"] == 512 and meta["flags"]["max_response_length"] is None
        n_empty = 1 if "empty" in pool.stem else 0
        assert meta["n_empty_response"] == n_empty and meta["excluded"] == [] and meta["skipped"] == []
        assert json.loads((rep_dir / "harmful" / "meta.json").read_text())["flags"]["max_length"] == 480

        # Anchors and pool are read at the same place: the last token of the whole example (cut at 480 / 512),
        # exactly what a plain forward pass of that one example gives (no --max_response_length moves it).
        # Tolerance: both are fp32 forwards of the same weights; only batching and padding change the summation
        # order. Measured (both slices, batch 4): 4.8e-7 at most, on entries up to 2.5 in size (2 fp32 ulps
        # there); the bound is 4x that.
        for name, path, cut in (("pool", pool, 512), ("harmful", HARMFUL, 480), ("safe1", SAFE1, 480),
                                ("safe2", SAFE2, 480)):
            torch.testing.assert_close(features(rep_dir / name), last_token_states(model, tok, path, cut),
                                       rtol=0, atol=2e-6)
        harmful = features(rep_dir / "harmful")

        # The ranking is the bi-directional max-cosine brute force over the stored features.
        pool_features = features(rep_dir / "pool")
        expected = max_cos(pool_features, harmful) - max_cos(pool_features, features(rep_dir / "safe1")) \
            - max_cos(pool_features, features(rep_dir / "safe2"))
        selection = runs / "selections" / "reps" / local_model_name(tiny_model_dir) / f"{pool.stem}_paper_len512-480"
        rows = index_rows(selection / f"{pool.stem}_top2_index.csv")
        order = np.argsort(-expected.numpy(), kind="stable")[:2]
        assert [int(r["index"]) for r in rows] == [int(i) for i in order]
        assert [float(r["score"]) for r in rows] == pytest.approx(expected[order].tolist(), rel=1e-5, abs=1e-6)

        # Gradient scores: the fp64 batch-size-1 autograd brute force (tests/bruteforce.py) of the same
        # weights, pool cut at 512, anchors at 480 and their first 10 response tokens, as the recipe's flags say.
        grad_dir = runs / "gradients" / local_model_name(tiny_model_dir) / f"{pool.stem}_paper_len512-480_mlen10_all"
        with open(grad_dir / "scores" / "scores.csv", newline="") as handle:
            scores = list(csv.DictReader(handle))
        assert [int(r["index"]) for r in scores] == list(range(6))
        ref = BruteForce(tiny_model_dir, pool, [HARMFUL, SAFE1, SAFE2], max_response_length=10, max_length=512,
                         anchor_max_length=480)
        got = torch.tensor([[float(r[c]) for c in ("harmful", "safe1", "safe2")] for r in scores], dtype=torch.float64)
        assert float(ref.scores.abs().min()) > 20 * FP32_SCORE_TOL                 # the check is not vacuous
        assert float((got - ref.scores).abs().max()) < FP32_SCORE_TOL
        # The selection: weights 1 -1 -1 of the brute-force scores, ties by file index. Every gap among the
        # first three is wider than the combined score's error (3 x FP32_SCORE_TOL), so the expected order is
        # not a coin toss (the closest here: 9.4e-6, the second slice's 2nd and 3rd).
        combined = (ref.scores @ torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64)).numpy()
        grad_selection = runs / "selections" / "gradient" / local_model_name(tiny_model_dir) / f"{pool.stem}_paper_len512-480"
        for kind in types.split():
            order = np.lexsort((np.arange(6), -combined if kind == "top" else combined))
            assert np.abs(np.diff(combined[order[:3]])).min() > 3 * FP32_SCORE_TOL, (kind, combined)
            rows = index_rows(grad_selection / f"{pool.stem}_{kind}2_index.csv")
            assert [int(r["index"]) for r in rows] == order[:2].tolist(), kind
            assert [float(r["score"]) for r in rows] == pytest.approx(combined[order[:2]].tolist(),
                                                                      abs=3 * FP32_SCORE_TOL)
            records = json.loads((grad_selection / f"{pool.stem}_{kind}2.json").read_text())
            assert records == [json.loads(pool.read_text())[i] for i in order[:2]]
        if first_outputs is None:
            first_outputs = {p: p.read_bytes() for p in runs.rglob("*.csv")}
    # The second slice wrote beside the first, never over it.
    assert all(p.read_bytes() == content for p, content in first_outputs.items())

    # The paper's representation recipe: the maximum cosine to the harmful anchors alone.
    pool = slices[0]
    done = script("rank.sh", dict(recipe, POOL=str(pool), METHOD="reps", REP_ANCHORS="harmful", K="3", TYPES="top"))
    assert "reps-harmful" in done.stdout
    rep_dir = runs / "reps" / local_model_name(tiny_model_dir) / f"{pool.stem}_paper_len512-480"
    expected = max_cos(features(rep_dir / "pool"), features(rep_dir / "harmful"))
    rows = index_rows(runs / "selections" / "reps-harmful" / local_model_name(tiny_model_dir) / f"{pool.stem}_paper_len512-480"
                      / f"{pool.stem}_top3_index.csv")
    order = np.argsort(-expected.numpy(), kind="stable")[:3]
    assert [int(r["index"]) for r in rows] == [int(i) for i in order]
    assert list(rows[0]) == ["rank", "harmful", "score", "index", "id"]


def test_rank_refuses_anchor_features_read_elsewhere(tiny_model_dir, tmp_path):
    """Anchor features made with --max_response_length (an older recipe) are not comparable with the pool's."""
    from safedata.errors import MetadataMismatch
    from safedata.features.representations import RepresentationArgs, extract_representations
    from safedata.ranking import RankArgs, rank
    pool = tmp_path / "pool.json"
    pool.write_text(json.dumps([{"instruction": f"Question {i}", "input": "", "output": f"Answer {i}."}
                                for i in range(4)]))
    extract_representations(RepresentationArgs(model_name=tiny_model_dir, data_path=pool,
                                               output_dir=tmp_path / "pool_reps", dtype="fp32", device="cpu"))
    extract_representations(RepresentationArgs(model_name=tiny_model_dir, data_path=LAB / "anchors_harmful.jsonl",
                                               output_dir=tmp_path / "anchors", dtype="fp32", device="cpu",
                                               pooling="mean", max_response_length=10))
    with pytest.raises(MetadataMismatch, match="flags="):
        rank(RankArgs(data_path=pool, output_dir=tmp_path / "sel", pool_features=tmp_path / "pool_reps",
                      anchor_features=[tmp_path / "anchors"], weights=[1], k=1))
    assert not (tmp_path / "sel").exists()


def test_original_truncation_shaped_the_released_representation_bottom100(shared_data):
    """docs/ORIGINAL.md: 64 of the paper's representation bottom-100 (Alpaca) are among the pool's 100 longest answers."""
    folder = shared_data / "paper/ft_datasets/alpaca_dataset"
    full = json.loads((folder / "alpaca_data.json").read_text())
    safety = {json.dumps(r, sort_keys=True) for r in json.loads((folder / "alpaca_data_safety_only.json").read_text())}
    pool = [r for r in full if json.dumps(r, sort_keys=True) not in safety]
    assert len(pool) == 50098
    position = {json.dumps(r, sort_keys=True): i for i, r in enumerate(pool)}
    bottom = {position[json.dumps(r, sort_keys=True)] for r in json.loads((folder / "reps/alpaca_bottom100.json").read_text())}
    top = {position[json.dumps(r, sort_keys=True)] for r in json.loads((folder / "reps/alpaca_top100.json").read_text())}

    def longest(length):
        return set(sorted(range(len(pool)), key=lambda i: (-length(pool[i]["output"]), i))[:100])
    assert len(bottom & longest(lambda text: len(text.split()))) == 64   # by words
    assert len(bottom & longest(len)) == 65                              # by characters
    assert len(top & longest(len)) == 0


# ----------------------------------------------------------------------------- newcomer's path and bad input


def run_script(script_name, *args, cwd=ROOT):
    return subprocess.run([python(), str(ROOT / script_name), *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def assert_one_line_error(proc, expected):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if " INFO " not in line]
    assert lines == [f"error: {expected}"], proc.stderr
    assert "loading model" not in proc.stderr      # checked before anything is loaded


def test_get_representation_bad_paths_and_flags(tiny_model_dir, tmp_path):
    pool = tmp_path / "pool.json"
    pool.write_text(json.dumps([{"instruction": "Question", "input": "", "output": "Answer."}]))
    out = tmp_path / "out"
    common = ("--model_name", tiny_model_dir, "--output_dir", out)
    assert_one_line_error(run_script("get_representation.py", *common, "--data_path", tmp_path),
                          f"--data_path {tmp_path}: is a directory, not a file")
    a_file = tmp_path / "a_file"
    a_file.write_text("keep")
    assert_one_line_error(run_script("get_representation.py", "--model_name", tiny_model_dir, "--data_path", pool,
                                     "--output_dir", a_file), f"--output_dir {a_file}: exists and is not a directory")
    typo = tmp_path / "no_such_model"
    assert_one_line_error(run_script("get_representation.py", "--model_name", typo, "--data_path", pool,
                                     "--output_dir", out),
                          f"--model_name {typo}: no such directory (and not a Hugging Face id of the form org/name)")
    proc = run_script("get_representation.py", *common, "--data_path", pool, "--max_response_length", "10")
    assert proc.returncode == 2 and "--max_response_length does not apply to --pooling last" in proc.stderr
    assert not out.exists() and a_file.read_text() == "keep"


def test_rank_bad_avg_n_before_loading(tmp_path):
    pool = tmp_path / "pool.json"
    pool.write_text(json.dumps([{"instruction": "Question", "input": "", "output": "Answer."}]))
    (tmp_path / "feats").mkdir()
    out = tmp_path / "sel"
    proc = run_script("rank.py", "--data_path", pool, "--pool_features", tmp_path / "feats", "--anchor_features",
                      tmp_path / "feats", "--avg_n", "foo", "--output_dir", out)
    assert_one_line_error(proc, "--avg_n 'foo': expected a positive integer (1 = max cosine, the paper) or 'all'")
    proc = run_script("rank.py", "--data_path", tmp_path, "--scores", tmp_path / "feats", "--output_dir", out)
    assert_one_line_error(proc, f"--data_path {tmp_path}: is a directory, not a file")
    assert not out.exists()


def test_model_names_local_paths_and_hub_ids(tmp_path, monkeypatch):
    from safedata.errors import UserError
    from safedata.models import check_model_name, looks_like_local_path
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert looks_like_local_path("./model") and looks_like_local_path("runs/ft/model")
    assert looks_like_local_path("runs/model")            # its first folder exists here
    assert not looks_like_local_path("meta-llama/Llama-2-7b-chat-hf") and not looks_like_local_path("gpt2")
    check_model_name("meta-llama/Llama-2-7b-chat-hf")      # left to the Hub
    with pytest.raises(UserError, match="no such directory"):
        check_model_name("runs/model")


def parser_of(script_path, monkeypatch):
    """The argparse parser a script's main() builds (caught at parse_args, nothing runs)."""
    import argparse
    import importlib.util

    class Caught(Exception):
        pass

    def catch(self, *args, **kwargs):
        raise Caught(self)
    spec = importlib.util.spec_from_file_location(f"script_{script_path.stem}", script_path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)   # dataclasses look their module up there
    spec.loader.exec_module(module)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)
    with pytest.raises(Caught) as caught:
        module.main()
    return caught.value.args[0]


@pytest.mark.parametrize("script_name", ["rank.py", "get_representation.py", "generate.py", "evaluate.py",
                                         "analyze.py", "scripts/make_tiny_model.py", "ft_datasets/prepare.py"])
def test_every_flag_has_help(script_name, monkeypatch):
    parser = parser_of(ROOT / script_name, monkeypatch)
    missing = [action.option_strings[0] for action in parser._actions if action.option_strings and not action.help]
    assert missing == []


def test_analyze_default_output_is_per_input(tmp_path):
    records = [{"instruction": f"Question {i}", "input": "", "output": f"1. Step {i}.\n2. Done."} for i in range(3)]
    for name in ("a.json", "b.json"):
        (tmp_path / name).write_text(json.dumps(records[: 2 if name == "a.json" else 3]))
    outputs = []
    for name in ("a.json", "b.json"):
        proc = run_script("analyze.py", "--subset", tmp_path / name, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        outputs.append(json.loads(next((tmp_path / "runs" / "analysis").glob(f"{name[0]}-*/composition.json")).read_text()))
    assert len(list((tmp_path / "runs" / "analysis").iterdir())) == 2 and outputs[0] != outputs[1]


def test_progress_logs_lines_when_not_a_terminal(caplog, monkeypatch):
    import safedata.progress as P
    from safedata.progress import LogProgress, progress
    monkeypatch.setattr(P.sys, "stderr", io.StringIO())   # a job's log file: not a terminal
    with caplog.at_level("INFO", logger="safedata.progress"):
        bar = progress(total=10, desc="items", unit="ex")
        assert isinstance(bar, LogProgress)
        bar.interval = 0.0
        with bar:
            bar.update(4)
            bar.update(6)
        assert list(LogProgress(range(3), desc="loop", interval=1e9)) == [0, 1, 2]
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("items: 4/10 ex (40%)") and lines[1].startswith("items: 10/10 ex (100%)")
    assert lines[-1].startswith("loop: 3/3 it (100%)") and len(lines) == 4   # 2 updates, close, loop end
    assert all("\r" not in line for line in lines)


def recipe_env_value(env, name):
    done = subprocess.run(["bash", "-c", f'source scripts/recipe_env.sh; printf %s "${name}"'], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_outputs_are_keyed_by_the_models_content(tiny_model_dir, tmp_path):
    """Two different checkpoints in folders both named hf/ get different output folders (they shared runs/*/hf
    once); a copy of one at another path gets the same folder (its finished work is found after a move); a Hub id
    keeps its owner; MODEL_NAME overrides."""
    import shutil
    from safetensors.torch import load_file, save_file
    base = {k: v for k, v in os.environ.items() if k not in ("MODEL_NAME", "SAFEDATA_OUTPUT_HINT")}
    base.update(TEMPLATE="paper", PYTHON=python())
    a, b, moved = tmp_path / "a" / "hf", tmp_path / "b" / "hf", tmp_path / "elsewhere" / "hf"
    for folder in (a, b, moved):
        shutil.copytree(tiny_model_dir, folder)
    weights = load_file(b / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name].clone()
    weights[name].view(-1)[0] += 1.0
    save_file(weights, b / "model.safetensors", metadata={"format": "pt"})
    names = [recipe_env_value(dict(base, MODEL=str(d)), "MODEL_NAME") for d in (a, b, moved)]
    assert names[0] != names[1] and names[0] == names[2]
    assert all(re.fullmatch(r"hf-[0-9a-f]{8}", n) for n in names), names
    # the 8 hex digits are the content id recorded in every meta.json (models.model_identity), not a path's hash
    from safedata.models import model_identity
    assert model_identity(str(a)).endswith("#sha256:" + names[0].removeprefix("hf-")) or \
        model_identity(str(a)).split("#sha256:")[1].startswith(names[0].removeprefix("hf-"))
    assert recipe_env_value(dict(base, MODEL="meta-llama/Llama-2-7b-chat-hf"), "MODEL_NAME") == \
        "meta-llama--Llama-2-7b-chat-hf"
    assert recipe_env_value(dict(base, MODEL=str(a), MODEL_NAME="mine"), "MODEL_NAME") == "mine"
    hint = recipe_env_value(dict(base, MODEL="org/m"), "SAFEDATA_OUTPUT_HINT")
    assert hint == "set MODEL_NAME (now org--m), RUNS or OUT to write elsewhere"
    done = subprocess.run(["bash", "-c", "source scripts/recipe_env.sh"], env=dict(base, MODEL=str(tmp_path / "a")),
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "without config.json" in done.stderr


def test_a_recipe_without_the_paper_files_says_how_to_get_them(tiny_model_dir, slices, tmp_path):
    """MODEL and POOL alone, before prepare.py ran: the first error line names the missing variable, prepare.py
    and DATA_DIR; nothing is computed."""
    env = {k: v for k, v in os.environ.items() if k not in ("HARMFUL", "SAFE1", "SAFE2", "DATA_DIR")}
    env.update(MODEL=tiny_model_dir, POOL=str(slices[0]), DATA_DIR=str(tmp_path / "data"), RUNS=str(tmp_path / "runs"),
               PYTHON=python())
    for name in ("get_full_gradient.sh", "get_representation.sh"):
        done = subprocess.run(["bash", str(ROOT / "scripts" / name)], env=env, cwd=ROOT, capture_output=True,
                              text=True, timeout=120)
        first = done.stderr.splitlines()[0]
        assert done.returncode == 2 and first.startswith(f"error: HARMFUL={tmp_path}/data/pure-bad-"), done.stderr
        assert "python ft_datasets/prepare.py" in first and f"DATA_DIR={tmp_path}/data" in first
        assert not (tmp_path / "runs").exists()


def test_a_refused_output_dir_names_what_a_recipe_user_can_change(monkeypatch, tmp_path):
    from safedata.errors import MetadataMismatch
    from safedata.features.runner import check_existing_output
    (tmp_path / "meta.json").write_text(json.dumps({"stage": "representations", "model": "a", "template": "paper",
                                                    "data_sha256": "x", "flags": {}}))
    new = {"stage": "representations", "model": "b", "template": "paper", "data_sha256": "x", "flags": {}}
    with pytest.raises(MetadataMismatch, match="use another --output_dir"):
        check_existing_output(tmp_path, new)
    monkeypatch.setenv("SAFEDATA_OUTPUT_HINT", "set MODEL_NAME (now m), RUNS or OUT to write elsewhere")
    with pytest.raises(MetadataMismatch, match=r"set MODEL_NAME \(now m\), RUNS or OUT"):
        check_existing_output(tmp_path, new)


def test_settings_tag_template_and_cut(tiny_model_dir, tmp_path):
    """Outputs are keyed by the template the runs use (the model's own unless TEMPLATE is set, resolved by the
    package's rule) and by the pool's cut: the paper's per-dataset cut applies to the paper's own files only."""
    from test_templates import CHATML
    from safedata.models import load_tokenizer
    chat = tmp_path / "chat"
    shutil.copytree(tiny_model_dir, chat)
    tokenizer = load_tokenizer(str(chat))
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(str(chat))
    base = {k: v for k, v in os.environ.items() if k not in ("TEMPLATE", "POOL_MAX_LENGTH", "ANCHOR_MAX_LENGTH")}
    base["PYTHON"] = python()

    def tag(**env):
        return recipe_env_value(dict(base, **env), "TEMPLATE_USED:$SETTINGS_TAG:${template_flag[*]}")
    # TEMPLATE empty: the model's own, resolved once; the CLIs get no --template (they resolve the same).
    assert tag(MODEL=str(chat), POOL="my_pool.jsonl") == "chat:chat_lenall-480:"
    assert tag(MODEL=tiny_model_dir, POOL="alpaca_data_no_safety.json") == "paper:paper_len512-480:"
    # An explicit TEMPLATE is passed on as --template (the model is not read: a Hub id need not be downloaded here).
    assert tag(MODEL="org/not-downloaded", TEMPLATE="paper", POOL="x/alpaca_data.json") == \
        "paper:paper_len512-480:--template paper"
    for pool, cut in (("alpaca_data_safety_only.json", "512"), ("databricks-dolly-15k_no_safety.jsonl", "2048"),
                      ("dolly.jsonl", "2048"), ("gsm8k_train.jsonl", "2048"), ("GSM8K_test.jsonl", "2048"),
                      ("my_alpaca.json", "all"), ("chat_pool.jsonl", "all")):
        assert tag(MODEL="org/m", TEMPLATE="chat", POOL=f"data/{pool}") == f"chat:chat_len{cut}-480:--template chat"
    assert tag(MODEL="org/m", TEMPLATE="chat", POOL="my_pool.jsonl", POOL_MAX_LENGTH="300") == \
        "chat:chat_len300-480:--template chat"
    assert tag(MODEL="org/m", TEMPLATE="chat", POOL="alpaca_data.json", POOL_MAX_LENGTH="", ANCHOR_MAX_LENGTH="") == \
        "chat:chat_lenall-all:--template chat"
    # A model whose template cannot be read, with TEMPLATE empty: one error line naming MODEL and TEMPLATE.
    done = subprocess.run(["bash", "-c", "source scripts/recipe_env.sh"], cwd=ROOT, capture_output=True, text=True,
                          env=dict(base, MODEL=str(tmp_path / "no_model")), timeout=120)
    assert done.returncode == 2 and done.stderr.startswith(f"error: MODEL={tmp_path / 'no_model'}: could not read it")
    assert len(done.stderr.strip().splitlines()) == 1 and "MODEL_NAME and TEMPLATE" in done.stderr


@pytest.mark.parametrize("name", ["get_representation.sh", "get_full_gradient.sh", "rank.sh"])
def test_a_recipe_outside_the_project_root_stops_in_one_line(name, tmp_path):
    """A copy of a recipe (as SLURM runs it) whose PROJECT_DIR, or else whose sbatch folder, is not the project root
    stops with one error line before anything runs."""
    copy = spool_copy(name, tmp_path / "spool")
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "PROJECT_DIR"}
    for env in (dict(base, PROJECT_DIR=str(tmp_path)), dict(base, SLURM_SUBMIT_DIR=str(tmp_path)),
                dict(base, PROJECT_DIR=str(tmp_path / "missing"))):
        where = env.get("PROJECT_DIR", str(tmp_path))
        done = subprocess.run(["bash", str(copy)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and done.stdout == ""
        assert done.stderr == f"error: {where} is not the project root; run sbatch there or set PROJECT_DIR\n"
    # The #SBATCH defaults: a step-1 recipe asks for one GPU and logs under the submit dir's logs/ per array task.
    head = (ROOT / "scripts" / name).read_text().split("set -euo pipefail")[0]
    sbatch = dict(line.removeprefix("#SBATCH ").split("#")[0].strip().split("=", 1)
                  for line in head.splitlines() if line.startswith("#SBATCH "))
    assert {"--time", "--mem", "--cpus-per-task", "--output"} <= set(sbatch)
    assert sbatch.get("--gres") == (None if name == "rank.sh" else "gpu:1")
    assert sbatch["--output"].startswith("logs/%x-")
