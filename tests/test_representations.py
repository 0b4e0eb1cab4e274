import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, python
from safedata import data as D
from safedata.features.representations import RepresentationArgs, extract_representations
from safedata.models import load_model
from safedata.store import load_tensors


def write_pool(path, n=13):
    styles = ["1. First step.\n2. Second step.", "The answer is 42.", "def f(x):\n    return x + 1", "A short story about a cat."]
    records = [{"instruction": f"Question number {i} about topic {i % 3}", "input": "some input" if i % 4 == 0 else "",
                "output": styles[i % 4] * (1 + i % 3)} for i in range(n)]
    path.write_text(json.dumps(records))
    return path


def hf_reference(model_dir, data_path, template="paper", max_response_length=None, layer=-1, pooling="last"):
    """A plain HF forward pass (with the LM head) on each unpadded example."""
    model, tok = load_model(model_dir, "fp32", "cpu")
    examples, _ = D.load_examples(data_path)
    rows = []
    for e in examples:
        enc = D.encode(e, tok, template, None, max_response_length)
        with torch.no_grad():
            out = model(input_ids=torch.tensor([enc.input_ids]), output_hidden_states=True)
        hidden = out.hidden_states[layer][0]
        supervised = torch.tensor([t != D.IGNORE_INDEX for t in enc.labels])
        rows.append(hidden[supervised].mean(0) if pooling == "mean" else hidden[supervised.nonzero().max()])
    return torch.stack(rows)


@pytest.mark.parametrize("batch_size", [1, 4])
def test_equals_plain_hf_forward(tiny_model_dir, tmp_path, batch_size):
    pool = write_pool(tmp_path / "pool.json")
    out = tmp_path / "reps"
    assert extract_representations(RepresentationArgs(model_name=tiny_model_dir, data_path=pool, output_dir=out,
                                                      batch_size=batch_size, chunk_size=5, dtype="fp32"))
    features, _ = load_tensors(out / "features.safetensors")
    reference = hf_reference(tiny_model_dir, pool)
    torch.testing.assert_close(features["features"], reference, rtol=1e-5, atol=1e-5)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["n"] == 13 and meta["dim"] == 32 and meta["indices"] == list(range(13))
    assert meta["data_sha256"] == D.file_sha256(pool)


def test_layer_pooling_and_chat_template(tiny_model_dir, tmp_path):
    pool = write_pool(tmp_path / "pool.json", n=6)
    out = tmp_path / "reps"
    extract_representations(RepresentationArgs(model_name=tiny_model_dir, data_path=pool, output_dir=out,
                                               template="chat", batch_size=3, layer=1, pooling="mean",
                                               max_response_length=4, dtype="fp32"))
    features, _ = load_tensors(out / "features.safetensors")
    reference = hf_reference(tiny_model_dir, pool, "chat", 4, layer=1, pooling="mean")
    torch.testing.assert_close(features["features"], reference, rtol=1e-5, atol=1e-5)


def test_shards_merge_to_single_run(tiny_model_dir, tmp_path):
    pool = write_pool(tmp_path / "pool.json")
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    extract_representations(RepresentationArgs(model_name=tiny_model_dir, data_path=pool, output_dir=single,
                                               batch_size=2, chunk_size=3, dtype="fp32"))
    assert not extract_representations(RepresentationArgs(model_name=tiny_model_dir, data_path=pool, output_dir=sharded,
                                                          batch_size=5, chunk_size=3, shard="1/3", dtype="fp32"))
    assert not (sharded / "features.safetensors").exists()
    assert not extract_representations(RepresentationArgs(model_name=tiny_model_dir, data_path=pool, output_dir=sharded,
                                                          batch_size=5, chunk_size=3, shard="0/3", dtype="fp32"))
    assert extract_representations(RepresentationArgs(model_name=tiny_model_dir, data_path=pool, output_dir=sharded,
                                                      batch_size=5, chunk_size=3, shard="2/3", dtype="fp32"))
    a, _ = load_tensors(single / "features.safetensors")
    b, _ = load_tensors(sharded / "features.safetensors")
    torch.testing.assert_close(a["features"], b["features"], rtol=1e-6, atol=1e-6)


def test_resume_skips_done_chunks_and_redoes_stale(tiny_model_dir, tmp_path, monkeypatch):
    pool = write_pool(tmp_path / "pool.json")
    out = tmp_path / "reps"
    extract_representations(RepresentationArgs(model_name=tiny_model_dir, data_path=pool, output_dir=out, batch_size=4,
                                               chunk_size=4, dtype="fp32"))
    reference = (out / "features.safetensors").read_bytes()
    (out / "features.safetensors").unlink()
    (out / "meta.json").unlink()
    (out / "chunks" / "chunk-000002.safetensors").unlink()
    (out / "chunks" / "chunk-000001.safetensors").write_bytes(b"truncated")
    calls = []
    import safedata.features.representations as R
    original = R.representation_batch
    monkeypatch.setattr(R, "representation_batch", lambda m, items, *a: calls.append(len(items)) or original(m, items, *a))
    extract_representations(RepresentationArgs(model_name=tiny_model_dir, data_path=pool, output_dir=out, batch_size=4,
                                               chunk_size=4, dtype="fp32"))
    assert sum(calls) == 8  # chunks 1 and 2 only
    assert (out / "features.safetensors").read_bytes() == reference


def test_cli_refuses_other_flags_in_same_output_dir(tiny_model_dir, tmp_path):
    pool = write_pool(tmp_path / "pool.json", n=4)
    out = tmp_path / "reps"
    cmd = [python(), str(ROOT / "get_representation.py"), "--model_name", tiny_model_dir, "--data_path", str(pool),
           "--output_dir", str(out)]
    subprocess.run(cmd, check=True, capture_output=True)
    bad = subprocess.run(cmd + ["--pooling", "mean"], capture_output=True, text=True)
    assert bad.returncode == 2
    err = bad.stderr.strip().splitlines()[-1]
    assert err.startswith("error:") and "flags=" in err and "Traceback" not in bad.stderr


def test_anchor_and_pool_are_read_at_the_same_token(tiny_model_dir, tmp_path):
    """The same record gives the same feature as an anchor (cut at 480) and in a pool (cut at 512): the last
    token of the example, as a plain forward pass reads it; a cut example is read at its last kept token."""
    from safedata.errors import UserError
    anchors = tmp_path / "anchors.jsonl"
    anchors.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Placeholder request {i}"},
                                                        {"role": "assistant", "content": "Sure:\n1. Step. " * (1 + i)}]})
                               + "\n" for i in range(3)))
    pool = tmp_path / "pool.jsonl"
    pool.write_text(anchors.read_text() + json.dumps({"messages": [{"role": "user", "content": "Other"},
                                                                  {"role": "assistant", "content": "Fine."}]}) + "\n")
    extract_representations(RepresentationArgs(model_name=tiny_model_dir, data_path=anchors, output_dir=tmp_path / "a",
                                               max_length=480, dtype="fp32", batch_size=2))
    extract_representations(RepresentationArgs(model_name=tiny_model_dir, data_path=pool, output_dir=tmp_path / "p",
                                               max_length=512, dtype="fp32", batch_size=3))
    a = load_tensors(tmp_path / "a" / "features.safetensors")[0]["features"]
    p = load_tensors(tmp_path / "p" / "features.safetensors")[0]["features"]
    torch.testing.assert_close(a, p[:3], rtol=1e-5, atol=1e-5)
    model, tok = load_model(tiny_model_dir, "fp32", "cpu")
    examples, _ = D.load_examples(anchors)
    for row, example in enumerate(examples):
        ids = D.encode(example, tok, "paper").input_ids
        with torch.no_grad():
            plain = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0, -1]
        torch.testing.assert_close(a[row], plain, rtol=1e-5, atol=1e-5)
    # A cut inside the response: read at the last kept token.
    n = len(D.encode(examples[2], tok, "paper").input_ids) - 3
    extract_representations(RepresentationArgs(model_name=tiny_model_dir, data_path=anchors,
                                               output_dir=tmp_path / "cut", max_length=n, dtype="fp32"))
    cut = load_tensors(tmp_path / "cut" / "features.safetensors")[0]["features"]
    ids = D.encode(examples[2], tok, "paper").input_ids[:n]
    with torch.no_grad():
        plain = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0, -1]
    torch.testing.assert_close(cut[2], plain, rtol=1e-5, atol=1e-5)
    with pytest.raises(UserError, match="--max_response_length does not apply to --pooling last"):
        extract_representations(RepresentationArgs(model_name=tiny_model_dir, data_path=anchors,
                                                   output_dir=tmp_path / "mlen", max_response_length=10, dtype="fp32"))
    assert not (tmp_path / "mlen").exists()


# bf16 tolerance, derived. With bf16 weights and activations every matmul output, residual add and norm is
# rounded to bf16 (unit roundoff u = 2^-8); a last-layer hidden state passes through about 10 such roundings per
# decoder layer. Independent roundings add in quadrature, so its relative (L2) error is about sqrt(10 L) u; twice
# that is the bound (the final RMSNorm rescales, it does not amplify relative error).
def test_bf16_on_cpu_within_derived_tolerance(tiny_model_dir, tmp_path):
    pool = write_pool(tmp_path / "pool.json", n=8)
    out = tmp_path / "reps"
    assert extract_representations(RepresentationArgs(model_name=tiny_model_dir, data_path=pool, output_dir=out,
                                                      batch_size=3, chunk_size=4, dtype="bf16", device="cpu"))
    features = load_tensors(out / "features.safetensors")[0]["features"].double()
    # The reference: the same bf16-rounded weights (their rounding is the model, not an error), run in fp64.
    model, tok = load_model(tiny_model_dir, "bf16", "cpu")
    model = model.double()
    rows = []
    for e in D.load_examples(pool)[0]:
        enc = D.encode(e, tok)
        with torch.no_grad():
            hidden = model(input_ids=torch.tensor([enc.input_ids]), output_hidden_states=True).hidden_states[-1][0]
        rows.append(hidden[len(enc.input_ids) - 1])
    reference = torch.stack(rows)
    layers = model.config.num_hidden_layers
    bound = 2 * (10 * layers) ** 0.5 * 2.0 ** -8
    rel_err = ((features - reference).norm(dim=1) / reference.norm(dim=1)).max().item()
    print(f"bf16 representations: max relative error {rel_err:.2e}, bound {bound:.2e}")
    assert rel_err < bound, (rel_err, bound)
    assert rel_err > 1e-5          # it really ran in bf16 (an fp32 run is ~1e-7 off)
