"""Chunks: only a missing, truncated, foreign or stale chunk is recomputed; any other read error stops."""
import errno
import os
import json
import subprocess

import pytest
import torch

from conftest import ROOT, python
from safedata.errors import UserError
from safedata.store import ChunkStore


def filled_store(root, fingerprint="fp-a", n=10, chunk_size=4):
    chunks = ChunkStore(root, fingerprint, n, chunk_size)
    for c in range(chunks.n_chunks):
        chunks.save(c, {"x": torch.arange(len(chunks.span(c)), dtype=torch.float32)})
    return chunks


def test_missing_truncated_foreign_and_stale_chunks_are_recomputed(tmp_path):
    chunks = filled_store(tmp_path)
    assert chunks.missing() == []
    chunks.path(0).unlink()                                            # missing
    chunks.path(1).write_bytes(chunks.path(1).read_bytes()[:-5])       # truncated
    chunks.path(2).write_bytes(b"not a safetensors file at all")       # foreign
    assert chunks.missing() == [0, 1, 2]
    filled_store(tmp_path, n=10)
    assert ChunkStore(tmp_path, "fp-b", 10, 4).missing() == [0, 1, 2]  # stale: another run's fingerprint
    assert ChunkStore(tmp_path, "fp-a", 12, 4).missing() == [2]        # chunk 2 now spans other rows


def test_unreadable_chunk_stops_with_one_line_instead_of_recomputing(tmp_path, monkeypatch):
    chunks = filled_store(tmp_path)
    chunks.path(1).unlink()
    chunks.path(1).mkdir()                                             # a directory where a chunk should be
    with pytest.raises(UserError, match=r"chunk-000001\.safetensors: cannot read this chunk") as err:
        chunks.missing()
    assert "\n" not in str(err.value)

    import safedata.store

    def denied(path, framework):
        raise PermissionError(errno.EACCES, "Permission denied", path)
    monkeypatch.setattr(safedata.store, "safe_open", denied)   # the reader store.py imported
    with pytest.raises(UserError, match=r"chunk-000000\.safetensors: cannot read this chunk \(Permission denied\)"):
        ChunkStore(tmp_path, "fp-a", 10, 4).done(0)


def test_cli_stops_on_an_unreadable_chunk_and_leaves_it(tiny_model_dir, tmp_path):
    pool = tmp_path / "pool.json"
    pool.write_text(json.dumps([{"instruction": f"Describe item {i}", "input": "", "output": f"Item {i} is fine."}
                                for i in range(6)]))
    out = tmp_path / "reps"
    cmd = [python(), str(ROOT / "get_representation.py"), "--model_name", tiny_model_dir, "--data_path", str(pool),
           "--output_dir", str(out), "--chunk_size", "2"]
    subprocess.run(cmd, check=True, capture_output=True)
    (out / "features.safetensors").unlink()
    (out / "meta.json").unlink()
    chunk = out / "chunks" / "chunk-000001.safetensors"
    chunk.unlink()
    chunk.mkdir()
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith(f"error: {chunk}: cannot read this chunk")
    assert chunk.is_dir() and not (out / "features.safetensors").exists()



def test_target_lock_makes_a_second_builder_wait_and_names_the_holder(tmp_path):
    """Two processes build one target: the second takes the lock only after the first let it go, and the lock file
    names whoever holds it. The first holds it for 1.5 s; the second starts 0.5 s in, so it must wait >= ~1 s."""
    import time

    from safedata.features.gradients.targets import LOCK_FILE, target_lock
    holder = subprocess.Popen([python(), "-c", (
        "import sys, time; sys.path.insert(0, sys.argv[1])\n"
        "from safedata.features.gradients.targets import target_lock\n"
        "with target_lock(sys.argv[2]):\n"
        "    print('held', flush=True); time.sleep(1.5)\n"), str(ROOT), str(tmp_path)],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    assert (tmp_path / LOCK_FILE).read_text().strip() == str(holder.pid)
    start = time.monotonic()
    with target_lock(tmp_path):
        waited = time.monotonic() - start
        assert (tmp_path / LOCK_FILE).read_text().strip() == str(os.getpid())
    assert holder.wait(timeout=30) == 0
    assert waited > 0.5, waited


def test_model_identity_follows_the_weights_not_the_trainers_pickle(tiny_model_dir, tmp_path):
    """Two fine-tunes with the same weights are the same model: the Trainer's training_args.bin (a pickle with a
    timestamped logging dir) must not enter the identity, while a changed weight file must."""
    import shutil

    from safedata.models import TRAINING_ARGS_FILE, model_identity
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / TRAINING_ARGS_FILE).write_bytes(b"run 1")
    first = model_identity(str(model))
    (model / TRAINING_ARGS_FILE).write_bytes(b"run 2, another logging dir")
    assert model_identity(str(model)) == first
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert model_identity(str(model)) != first


def test_read_into_fills_callers_memory_with_the_files_bytes(tmp_path):
    """SafetensorsReader.read / read_into against safetensors' own loader (the reference), and read_into's checks."""
    from safetensors.torch import load_file, save_file

    from safedata.store import SafetensorsReader
    tensors = {"a::dense": torch.randn(5, 3, generator=torch.Generator().manual_seed(0)),
               "b": torch.arange(7, dtype=torch.int64), "c": torch.tensor(2.5, dtype=torch.float64)}
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path))
    reference = load_file(str(path))
    reader = SafetensorsReader(path)
    bank = torch.full((2, 15), float("nan"))
    reader.read_into("a::dense", bank[1])                               # a row of memory laid out by the caller
    assert torch.equal(bank[1].view(5, 3), reference["a::dense"])
    assert bool(bank[0].isnan().all())                                  # nothing written outside the row
    assert torch.equal(reader.read("a::dense", 2, 4), reference["a::dense"][2:4])
    assert torch.equal(reader.read("b"), reference["b"]) and torch.equal(reader.read("c"), reference["c"])
    for wrong in (torch.empty(15, dtype=torch.float64), torch.empty(14), torch.empty(6, 5)[:, :3]):
        with pytest.raises(ValueError, match="read_into a::dense"):
            reader.read_into("a::dense", wrong)


def test_a_target_with_dense_parts_left_on_disk_reads_back_the_written_tensors(tmp_path):
    """load_target(defer_dense=True): dense parts stay in the file until read (whole, or into the caller's memory);
    every part, read either way, is the tensor that was written."""
    from safedata.features.gradients.targets import (TARGET_FILE, TARGET_FORMAT, TARGET_VERSION, ParamTarget,
                                                     StoredTensor, Target, load_target)
    from safedata.store import META, save_tensors, write_json
    gen = torch.Generator().manual_seed(1)
    written = Target({"w": ParamTarget((4, 3), dense=torch.randn(4, 3, generator=gen)),
                      "v": ParamTarget((2, 5), fact_g=torch.randn(6, 2, generator=gen),
                                       fact_x=torch.randn(6, 5, generator=gen),
                                       fact_scale=torch.rand(6, generator=gen))})
    save_tensors(tmp_path / TARGET_FILE, written.tensors(), {"format": TARGET_FORMAT, "version": TARGET_VERSION})
    write_json(tmp_path / META, {"stage": "gradient_target", "target": {"layout": written.layout(), "norm": 1.0}})
    deferred, _ = load_target(tmp_path, defer_dense=True)
    assert isinstance(deferred.params["w"].dense, StoredTensor) and deferred.params["w"].form == "dense"
    assert deferred.params["w"].nbytes() == 4 * 3 * 4
    row = torch.empty(12)
    assert torch.equal(deferred.params["w"].dense.read_into(row).view(4, 3), written.params["w"].dense)
    reread = deferred.tensors()                                         # read whole, as a saver would
    assert set(reread) == set(written.tensors())
    assert all(torch.equal(reread[k], v) for k, v in written.tensors().items())
    assert torch.equal(deferred.params["w"].to_dense(torch.float64), written.params["w"].dense.double())


def test_model_identity_is_the_content_wherever_the_model_lies(tiny_model_dir, tmp_path, monkeypatch):
    """`<path>#sha256:<hex>`: the path for a person, the content id (config, every byte of the weights, the tokenizer)
    for every comparison (store.model_key); a model recorded the old way is never taken for a content match."""
    import shutil

    from safedata.errors import MetadataMismatch
    from safedata.models import model_identity
    from safedata.store import model_key, require_same
    monkeypatch.setenv("SAFEDATA_HASH_CACHE", "off")
    a, b = tmp_path / "a" / "model", tmp_path / "b" / "copy"
    shutil.copytree(tiny_model_dir, a)
    shutil.copytree(tiny_model_dir, b)
    ida, idb = model_identity(str(a)), model_identity(str(b))
    assert ida.startswith(f"{a.resolve()}#sha256:") and ida != idb and model_key(ida) == model_key(idb)
    require_same({"model": ida}, {"model": idb}, ("model",), "a", "b")
    weights = b / "model.safetensors"          # a byte in the middle: the old first/last-MiB hash never read it
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 1
    weights.write_bytes(bytes(data))
    assert model_key(model_identity(str(b))) != model_key(ida)
    shutil.copy(a / "model.safetensors", weights)
    template = b / "chat_template.jinja"              # the tokenizer's chat template: it changes token ids
    assert "[INST]" in template.read_text()
    template.write_text(template.read_text().replace("[INST]", "[USER]"))
    assert model_key(model_identity(str(b))) != model_key(ida)
    assert model_key("org/name") == "org/name"
    with pytest.raises(MetadataMismatch, match="recorded before models were identified by their content"):
        require_same({"model": ida}, {"model": f"{a.resolve()}#0123456789ab"}, ("model",), "this run", "target t")


def test_hash_cache_trusts_the_stat_key_and_rehashes_a_rewritten_file(tmp_path, monkeypatch):
    import hashlib

    import safedata.models as M
    cache = tmp_path / "cache.json"
    monkeypatch.setenv("SAFEDATA_HASH_CACHE", str(cache))
    monkeypatch.setattr(M, "_HASHES", {})
    path = tmp_path / "w.bin"
    path.write_bytes(b"x" * 1000)
    M.cached_file_sha256(path)                             # just written: too fresh to be remembered
    assert not cache.exists() and not M._HASHES
    monkeypatch.setattr(M, "RACY_S", 0.0)
    calls = []
    monkeypatch.setattr(M, "file_sha256", lambda p: calls.append(p) or hashlib.sha256(p.read_bytes()).hexdigest())
    first = M.cached_file_sha256(path)
    monkeypatch.setattr(M, "_HASHES", {})                  # another process: the cache file answers
    assert M.cached_file_sha256(path) == first and len(calls) == 1
    assert json.loads(cache.read_text()) == {M._stat_key(path): first}
    path.write_bytes(b"y" * 1000)                          # same size, rewritten in place: hashed again
    assert M.cached_file_sha256(path) != first and len(calls) == 2


def test_a_cut_is_counted_once_logged_and_recorded(tiny_model_dir, tmp_path, caplog):
    """A pool with known token lengths and a --max_length that cuts exactly the k longest: the stage logs
    'cut k of n' and meta.json records n_cut = k; each cut example keeps max_length tokens."""
    import logging

    from safedata import data as D
    from safedata.features.representations import RepresentationArgs, extract_representations
    from safedata.models import load_tokenizer
    from safedata.store import read_json
    records = [{"instruction": f"Describe item {i}", "input": "", "output": " ".join(["word"] * (4 * i + 1))}
               for i in range(6)]
    pool = tmp_path / "pool.json"
    pool.write_text(json.dumps(records))
    examples, _ = D.load_examples(pool, need_response=True)
    full = {e.index: len(e) for e in D.encode_examples(examples, load_tokenizer(tiny_model_dir), "paper")[0]}
    lengths = sorted(full.values())
    assert len(set(lengths)) == 6
    k = 2
    cut_at = lengths[-k - 1]                               # exactly the k longest are longer than this
    caplog.set_level(logging.INFO, logger="safedata")
    for max_length, n_cut, line in ((None, 0, "no --max_length: none of 6 example(s) cut"),
                                    (cut_at, k, f"cut {k} of 6 example(s) at {cut_at} tokens")):
        caplog.clear()
        out = tmp_path / f"reps_{max_length}"
        assert extract_representations(RepresentationArgs(model_name=tiny_model_dir, data_path=str(pool),
                                                          output_dir=str(out), max_length=max_length, dtype="fp32",
                                                          device="cpu"))
        assert caplog.text.count(line) == 1
        assert read_json(out / "meta.json")["n_cut"] == n_cut
    encoded, excluded = encoding = D.encode_examples(examples, load_tokenizer(tiny_model_dir), "paper", cut_at)
    assert encoding.n_cut == k and not excluded
    assert [e.cut for e in encoded] == [max(0, full[e.index] - cut_at) for e in encoded]
    assert all(len(e) == min(full[e.index], cut_at) for e in encoded)
