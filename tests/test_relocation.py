"""Finished work is content-addressed (issue 36, item 8): a chunk's fingerprint hashes what decides its numbers (the
model's config, weights and tokenizer bytes, each target's tensors, the data's sha256, the value-changing flags),
never a path. So a run tree and a model moved elsewhere (scratch to project space) keep every finished chunk, while
one changed weight, or one changed target value, retires them."""
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from safedata.errors import MetadataMismatch
from safedata.features import gradients as G
from safedata.features.gradients.targets import TARGET_FILE
from safedata.features.representations import RepresentationArgs, extract_representations
from safedata.store import load_tensors, read_json, save_tensors
from test_gradients import ANCHORS_A, MLEN, POOL, write_json, write_jsonl

FP32 = dict(dtype="fp32", device="cpu", batch_size=2)
MERGED = ("meta.json", "scores.csv", "products.safetensors", "examples.csv", "features.safetensors")


@pytest.fixture(autouse=True)
def own_hash_cache(tmp_path, monkeypatch):
    """The weights' hash cache of these tests only (not the user's)."""
    monkeypatch.setenv("SAFEDATA_HASH_CACHE", str(tmp_path / "hash_cache.json"))


def setup_tree(tiny_model_dir, root):
    """A model directory and a run tree holding its inputs, as a user lays them out on scratch space."""
    model, runs = root / "scratch" / "model", root / "scratch" / "runs"
    shutil.copytree(tiny_model_dir, model)
    runs.mkdir()
    write_json(runs / "pool.json", POOL)
    write_jsonl(runs / "anchors.jsonl", ANCHORS_A)
    return model, runs


def run_stages(model, runs):
    """A feature stage, a target build and a gradient scoring stage, each into the run tree."""
    done = [extract_representations(RepresentationArgs(model_name=str(model), data_path=str(runs / "pool.json"),
                                                       output_dir=str(runs / "reps"), chunk_size=3, **FP32)),
            G.build_target(G.GradientArgs(anchor=True, model_name=str(model), data_path=str(runs / "anchors.jsonl"),
                                          output_dir=str(runs / "target"), max_response_length=MLEN, **FP32)),
            G.score_pool(G.GradientArgs(model_name=str(model), data_path=str(runs / "pool.json"),
                                        output_dir=str(runs / "scores"), targets=[str(runs / "target")], chunk_size=3,
                                        **FP32))]
    assert all(done)


def stamps(directory):
    """Each chunk file's inode and mtime: a recomputed chunk is a new file (an atomic rename), so both move."""
    chunks = sorted((directory / "chunks").glob("chunk-*.safetensors"))
    assert chunks
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in chunks}


def as_if_killed_before_merge(directory):
    for name in MERGED:
        (directory / name).unlink(missing_ok=True)


def move_model(model, to):
    """A move across file systems: a copy (new inodes, so no cached hash can stand in for the bytes) and a delete."""
    shutil.copytree(model, to)
    shutil.rmtree(model)
    return to


def test_moved_run_tree_and_model_keep_every_finished_chunk(tiny_model_dir, tmp_path, caplog):
    model, runs = setup_tree(tiny_model_dir, tmp_path)
    run_stages(model, runs)
    features = load_tensors(runs / "reps" / "features.safetensors")[0]["features"]
    scores = (runs / "scores" / "scores.csv").read_bytes()
    target_bytes = (runs / "target" / TARGET_FILE).read_bytes()

    new_runs = tmp_path / "project" / "runs_moved"
    shutil.move(runs, new_runs)
    new_model = move_model(model, tmp_path / "project" / "models" / "renamed_model")
    as_if_killed_before_merge(new_runs / "scores")     # the scores' chunks alone decide what is recomputed
    before = {stage: stamps(new_runs / stage) for stage in ("reps", "scores")}
    caplog.set_level(logging.INFO, logger="safedata")
    caplog.clear()
    run_stages(new_model, new_runs)

    assert "stale chunk" not in caplog.text and "recomputing" not in caplog.text
    assert {stage: stamps(new_runs / stage) for stage in ("reps", "scores")} == before
    assert "target already built with these settings" in caplog.text
    assert (new_runs / "target" / TARGET_FILE).read_bytes() == target_bytes
    assert torch.equal(load_tensors(new_runs / "reps" / "features.safetensors")[0]["features"], features)
    assert (new_runs / "scores" / "scores.csv").read_bytes() == scores
    meta = read_json(new_runs / "scores" / "meta.json")          # the new place is recorded, for a person
    assert meta["model"].startswith(str(new_model.resolve()) + "#sha256:")
    assert meta["data_file"] == str((new_runs / "pool.json").resolve())


def test_one_changed_weight_or_target_value_retires_the_chunks(tiny_model_dir, tmp_path, caplog):
    model, runs = setup_tree(tiny_model_dir, tmp_path)
    run_stages(model, runs)
    features = load_tensors(runs / "reps" / "features.safetensors")[0]["features"]
    caplog.set_level(logging.INFO, logger="safedata")

    # One weight value changed in a moved copy of the model: every feature chunk is recomputed, and a target made
    # with the original model is refused for scoring (the stages compare the models' contents).
    changed = move_model(model, tmp_path / "elsewhere" / "model")
    weights = load_file(str(changed / "model.safetensors"))
    weights["model.norm.weight"][0] += 0.5
    save_file(weights, str(changed / "model.safetensors"), metadata={"format": "pt"})
    as_if_killed_before_merge(runs / "reps")
    before = stamps(runs / "reps")
    caplog.clear()
    assert extract_representations(RepresentationArgs(model_name=str(changed), data_path=str(runs / "pool.json"),
                                                      output_dir=str(runs / "reps"), chunk_size=3, **FP32))
    assert caplog.text.count("stale chunk") == len(before)
    after = stamps(runs / "reps")
    assert all(after[name] != before[name] for name in before)
    assert not torch.equal(load_tensors(runs / "reps" / "features.safetensors")[0]["features"], features)
    with pytest.raises(MetadataMismatch, match="model="):
        G.score_pool(G.GradientArgs(model_name=str(changed), data_path=str(runs / "pool.json"),
                                    output_dir=str(tmp_path / "other_scores"), targets=[str(runs / "target")],
                                    **FP32))

    # The target file rewritten with another model path in its metadata, tensors unchanged: chunks kept.
    weights["model.norm.weight"][0] -= 0.5
    save_file(weights, str(changed / "model.safetensors"), metadata={"format": "pt"})   # the original bytes back
    target_file = runs / "target" / TARGET_FILE
    tensors, metadata = load_tensors(target_file)
    save_tensors(target_file, tensors, dict(metadata, model="/some/other/place#sha256:0123456789abcdef"))
    score_args = G.GradientArgs(model_name=str(changed), data_path=str(runs / "pool.json"),
                                output_dir=str(runs / "scores"), targets=[str(runs / "target")], chunk_size=3, **FP32)
    as_if_killed_before_merge(runs / "scores")
    before = stamps(runs / "scores")
    caplog.clear()
    assert G.score_pool(score_args)
    assert "stale chunk" not in caplog.text and stamps(runs / "scores") == before

    # One target value changed: every score chunk is recomputed.
    name = sorted(tensors)[0]
    tensors[name].view(-1)[0] += 1.0
    save_tensors(target_file, tensors, metadata)
    as_if_killed_before_merge(runs / "scores")
    caplog.clear()
    assert G.score_pool(score_args)
    assert caplog.text.count("stale chunk") == len(before)
    after = stamps(runs / "scores")
    assert all(after[name] != before[name] for name in before)
