"""What is and is not bit-stable in gradient scores (docs/RELIABILITY.md, "Determinism"), one test per statement:

* `--shard` never changes the bytes: every example is scored in the same batch whichever shard runs it;
* `--chunk_size` and `--batch_size` decide which examples share a (padded) batch, and so the last bits: fp32
  scores move by a few 1e-7 of the column's largest score, far inside fp32's own error against fp64;
* the thread count changes fp32's last bits too (long sums split across threads), by as little.
The fp64 statements (1e-12 against an fp64 brute force at any batch size on a model that computes in fp64
throughout; not so on Hugging Face Llama models, whose RMSNorm and rotary embedding compute in fp32) are
tested in tests/test_gradients.py and tests/test_real_model.py."""
import os
import subprocess

import pytest
import torch

from conftest import ROOT, python
from safedata.features import gradients as G
from test_gradients import FP64, MLEN, POOL, read_columns, write_json

FP32 = dict(dtype="fp32", device="cpu")
# fp32 against fp64: measured up to 2.2e-6 of the column's largest score on the tests' tiny model (2^-24 = 6e-8
# a rounding, a few dozen roundings deep); README states 1e-5.
FP32_VS_FP64 = 1e-5
# Two fp32 runs that differ only in batch composition or thread count: each is within FP32_VS_FP64 of fp64,
# so within twice that of each other (measured: batch composition 2.3e-6, 1 vs 2 threads 5.9e-7, bytes differ).
FP32_VS_FP32 = 2 * FP32_VS_FP64


@pytest.fixture(scope="module")
def pool16(tmp_path_factory):
    """The tests' pool twice over (16 examples, mixed lengths: every batch composition pads differently)."""
    return write_json(tmp_path_factory.mktemp("stability") / "pool.json", POOL + [
        {**r, "output": r["output"] + " Indeed."} for r in POOL])


@pytest.fixture(scope="module")
def fp32_targets(tiny_model_dir, tmp_path_factory):
    from test_gradients import ANCHORS_A, ANCHORS_B, write_jsonl
    d = tmp_path_factory.mktemp("stability_targets")
    out = []
    for name, records in (("a", ANCHORS_A), ("b", ANCHORS_B)):
        path = write_jsonl(d / f"{name}.jsonl", records)
        assert G.build_target(G.GradientArgs(anchor=True, model_name=tiny_model_dir, data_path=path,
                                             output_dir=d / name, max_response_length=MLEN, batch_size=2, **FP32))
        out.append(d / name)
    return out


def scores_of(directory):
    columns = read_columns(directory / "scores.csv")
    return torch.tensor([[float(v) for v in columns[name]] for name in ("a", "b")], dtype=torch.float64).T


def spread(a, b):
    """Largest difference, as a share of each column's largest score."""
    return float(((a - b).abs() / b.abs().max(0).values).max())


def test_shards_never_change_the_bytes(tiny_model_dir, pool16, fp32_targets, tmp_path):
    kw = dict(batch_size=3, chunk_size=4, **FP32)
    assert G.score_pool(G.GradientArgs(model_name=tiny_model_dir, data_path=pool16, output_dir=tmp_path / "single",
                                       targets=fp32_targets, **kw))
    assert not G.score_pool(G.GradientArgs(model_name=tiny_model_dir, data_path=pool16, output_dir=tmp_path / "sharded",
                                           targets=fp32_targets, shard="0/3", **kw))
    assert not G.score_pool(G.GradientArgs(model_name=tiny_model_dir, data_path=pool16, output_dir=tmp_path / "sharded",
                                           targets=fp32_targets, shard="2/3", **kw))
    assert G.score_pool(G.GradientArgs(model_name=tiny_model_dir, data_path=pool16, output_dir=tmp_path / "sharded",
                                       targets=fp32_targets, shard="1/3", **kw))
    assert (tmp_path / "sharded" / "scores.csv").read_bytes() == (tmp_path / "single" / "scores.csv").read_bytes()


def test_chunk_and_batch_size_move_fp32_scores_only_in_their_last_bits(tiny_model_dir, pool16, fp32_targets,
                                                                        tmp_path):
    runs = {}
    for batch_size, chunk_size in ((1, 16), (3, 16), (3, 4), (8, 16)):
        out = tmp_path / f"b{batch_size}c{chunk_size}"
        assert G.score_pool(G.GradientArgs(model_name=tiny_model_dir, data_path=pool16, output_dir=out,
                                           targets=fp32_targets, batch_size=batch_size, chunk_size=chunk_size, **FP32))
        runs[batch_size, chunk_size] = scores_of(out)
    reference = tmp_path / "fp64"   # the fp32 targets scored by the fp64 model: the batches' own error is fp32's
    assert G.score_pool(G.GradientArgs(model_name=tiny_model_dir, data_path=pool16, output_dir=reference,
                                       targets=fp32_targets, batch_size=1, chunk_size=16, **FP64))
    exact = scores_of(reference)
    for setting, scores in runs.items():
        assert spread(scores, exact) < FP32_VS_FP64, (setting, spread(scores, exact))
        assert spread(scores, runs[1, 16]) < FP32_VS_FP32, setting


def test_thread_count_moves_fp32_scores_only_in_their_last_bits(tiny_model_dir, pool16, fp32_targets, tmp_path):
    runs = []
    for threads in ("1", "2"):
        out = tmp_path / f"threads{threads}"
        subprocess.run([python(), str(ROOT / "get_gradients.py"), "--model_name", tiny_model_dir, "--data_path",
                        pool16, "--output_dir", str(out), "--batch_size", "8", "--dtype", "fp32", "--device", "cpu",
                        "--targets", *map(str, fp32_targets)],
                       check=True, capture_output=True, env=dict(os.environ, OMP_NUM_THREADS=threads))
        runs.append(scores_of(out))
    assert spread(runs[0], runs[1]) < FP32_VS_FP32
