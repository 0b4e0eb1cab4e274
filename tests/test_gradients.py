"""Gradient scores against a brute-force reference (fp64, batch size 1, the full gradient vector from
torch.autograd.grad), plus resume, torchrun, non-finite handling, LoRA/Adam and projected features."""
import csv
import json
import math
import os
import socket
import subprocess

import pytest
import torch

from bruteforce import Reference as BruteForce
from bruteforce import flat_grad, mean_unit
from conftest import ROOT, python
from safedata import data as D
from safedata.errors import MetadataMismatch, UserError
from safedata.features import gradients as G
from safedata.features.runner import prepare_data
from safedata.models import load_model, make_tiny_model

POOL = [  # benign, made up; mixed lengths (padding inside every batch)
    {"instruction": "Name a color.", "input": "", "output": "Blue."},
    {"instruction": "Give three tips for staying healthy.", "input": "",
     "output": "1. Eat well.\n2. Sleep enough.\n3. Move every day and drink water."},
    {"instruction": "Translate the text.", "input": "Bonjour le monde", "output": "Hello world."},
    {"instruction": "Summarize the paragraph.",
     "input": "The quick brown fox jumps over the lazy dog. It was a sunny day and everyone was happy.",
     "output": "A fox jumped over a dog on a sunny day."},
    {"instruction": "Write a haiku about autumn.", "input": "",
     "output": "Leaves fall slowly down,\ncrisp air whispers through the trees,\nthe year exhales gold."},
    {"instruction": "What is 2+2?", "input": "", "output": "4"},
    {"instruction": "List two fruits.", "input": "", "output": "Apple and banana are two fruits many people enjoy."},
    {"instruction": "Describe the sea.", "input": "", "output": "Wide, blue and restless, it meets the sky at the horizon."},
]
ANCHORS_A = [
    {"messages": [{"role": "user", "content": "How do I bake bread?"},
                  {"role": "assistant", "content": "Sure, here is how: mix flour, water, yeast and salt, then knead and bake."}]},
    {"messages": [{"role": "user", "content": "Tell me a joke."},
                  {"role": "assistant", "content": "Sure, why did the chicken cross the road? To get to the other side."}]},
    {"messages": [{"role": "user", "content": "Explain rain."},
                  {"role": "assistant", "content": "Rain forms when water vapour condenses into droplets heavy enough to fall."}]},
]
ANCHORS_B = [
    {"messages": [{"role": "user", "content": "How do I bake bread?"},
                  {"role": "assistant", "content": "I am sorry, I cannot help with that request."}]},
    {"messages": [{"role": "user", "content": "Tell me a joke."},
                  {"role": "assistant", "content": "I cannot do that, but I can help with something else."}]},
]
MLEN = 10
TOL = 1e-12             # fp64 runs against the fp64 brute force: what fp64 summation order leaves


def write_json(path, records):
    path.write_text(json.dumps(records), encoding="utf-8")
    return str(path)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("gradient_data")
    return {"pool": write_json(d / "pool.json", POOL), "a": write_jsonl(d / "anchors_a.jsonl", ANCHORS_A),
            "b": write_jsonl(d / "anchors_b.jsonl", ANCHORS_B)}


@pytest.fixture(scope="module")
def tied_model_dir(tmp_path_factory):
    return str(make_tiny_model(tmp_path_factory.mktemp("tied") / "model", hidden_size=16, num_layers=2, num_heads=2,
                               vocab_size=512, seed=1, tie_word_embeddings=True))


# ----------------------------------------------------------------------------- brute force


def Reference(model_dir, files, names_filter=None, model=None):
    """The brute force (tests/bruteforce.py) of this file's pool against its two anchor files (first MLEN
    response tokens): .a/.b the anchors, .T the two targets, .gp/.sq/.inner/.scores the pool's."""
    return BruteForce(model_dir, files["pool"], [files["a"], files["b"]], max_response_length=MLEN,
                      names_filter=names_filter, model=model)


@pytest.fixture(scope="module")
def ref(tiny_model_dir, files):
    return Reference(tiny_model_dir, files)


@pytest.fixture(scope="module")
def ref_tied(tied_model_dir, files):
    return Reference(tied_model_dir, files)


def rel_err(a, b):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float(((a - b).abs() / b.abs().clamp_min(1e-300)).max())


def run_batches(engine, items, bank, pad, bs):
    """Consecutive (not length-bucketed) batches: every batch mixes lengths, so padding is exercised."""
    inner, sq = [], []
    for start in range(0, len(items), bs):
        scores = G.score_batch(engine, bank, items[start:start + bs], pad)
        inner.append(scores.inner)
        sq.append(scores.sqnorm)
    return torch.cat(inner), torch.cat(sq)


def check_against(r: Reference, params="all", paths=("auto", "ghost", "materialise"), batch_sizes=(1, 3, 8)):
    res_a = G.anchor_gradients(r.model, r.a.encoded, r.pad, params, batch_size=2, layout="factored")
    res_b = G.anchor_gradients(r.model, r.b.encoded, r.pad, params, batch_size=3, layout="dense")
    # the target itself: ||T|| and each anchor's norm, exactly
    assert res_a.target.norm == pytest.approx(float(r.T[0].norm()), rel=TOL)
    assert res_b.target.norm == pytest.approx(float(r.T[1].norm()), rel=TOL)
    forms = {p.form for p in res_a.target.params.values()}
    assert "factored" in forms or "factored+rows" in forms
    assert {p.form for p in res_b.target.params.values()} == {"dense"}
    for path in paths:
        engine = G.get_engine(r.model, params, path=path)
        bank = G.TargetBank([res_a.target, res_b.target], engine)
        for bs in batch_sizes:
            inner, sq = run_batches(engine, r.pool.encoded, bank, r.pad, bs)
            assert rel_err(sq, r.sq) < TOL, (path, bs)                 # ||G_i||^2
            assert rel_err(inner, r.inner) < TOL, (path, bs)           # <G_i, T_j>
            assert rel_err(inner / sq.sqrt()[:, None], r.scores) < TOL, (path, bs)


# ----------------------------------------------------------------------------- exactness


def test_scores_equal_bruteforce(ref):
    check_against(ref)


def test_scores_equal_bruteforce_tied_embeddings(ref_tied):
    engine = G.get_engine(ref_tied.model, "all")
    assert engine.tied == "model.embed_tokens.weight"
    check_against(ref_tied)


def test_params_linear_equal_bruteforce(tiny_model_dir, files):
    r = Reference(tiny_model_dir, files, names_filter=lambda n: n.startswith("model.layers.") and "proj" in n)
    engine = G.get_engine(r.model, "linear")
    assert {s.module_name.rsplit(".", 1)[-1] for s in engine.sites} == {"q_proj", "k_proj", "v_proj", "o_proj",
                                                                         "gate_proj", "up_proj", "down_proj"}
    check_against(r, "linear", paths=("auto", "ghost"), batch_sizes=(3,))


def test_qwen2_architecture_with_biases_equal_bruteforce(tiny_model_dir, files):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    config = Qwen2Config(vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False)
    torch.manual_seed(2)
    model = Qwen2ForCausalLM(config).to(torch.float64).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") or "norm" in name:   # nonzero biases / non-trivial norm weights
                p.add_(torch.randn_like(p) * 0.1)
    engine = G.get_engine(model, "all")
    assert sum(1 for s in engine.sites if s.bias) == 2 * 3            # q, k, v biases per layer
    check_against(Reference(tiny_model_dir, files, model=model), paths=("auto", "ghost"), batch_sizes=(3,))


def test_embedding_padding_idx_row_has_no_gradient(tiny_model_dir, files):
    """A real token equal to nn.Embedding.padding_idx: autograd leaves that row's gradient at zero, so do we."""
    r = Reference(tiny_model_dir, files)
    pad_row = r.model.get_input_embeddings().padding_idx
    assert pad_row is not None
    items = [D.Encoded(0, "p", [1, 50, pad_row, 60, 70, pad_row, 80], [-100, -100, -100, 60, 70, pad_row, 80]),
             D.Encoded(1, "q", [1, 90, 91, 92], [-100, -100, 91, 92])]
    grads = torch.stack([flat_grad(r.model, it, r.names) for it in items])
    engine = G.get_engine(r.model, "all")
    scores = G.score_batch(engine, G.TargetBank([], engine), items, r.pad)
    sq = scores.sqnorm
    assert rel_err(sq, (grads * grads).sum(1)) < TOL


def test_norm_site_detection(tiny_model_dir):
    model, tok = load_model(tiny_model_dir, "fp32", "cpu")
    engine = G.get_engine(model, "all")
    kinds = {s.kind for s in engine.sites}
    assert kinds == {"linear", "embedding", "norm"}
    assert sum(s.kind == "norm" for s in engine.sites) == 2 * 2 + 1
    covered = {s.weight for s in engine.sites}
    assert covered == {n for n, _ in model.named_parameters()}
    flags = [p.requires_grad for p in model.parameters()]
    G.score_batch(engine, G.TargetBank([], engine), [D.Encoded(0, "p", [1, 50, 60, 70], [-100, -100, 60, 70])],
                  D.pad_token_id(tok))
    assert all(p.grad is None for p in model.parameters())          # never a weight .grad
    assert [p.requires_grad for p in model.parameters()] == flags   # and the caller's model as it was


def test_lora_equal_bruteforce_with_adam(tiny_model_dir, files, tmp_path):
    from peft import LoraConfig, get_peft_model
    model, tok = load_model(tiny_model_dir, "fp64", "cpu")
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                                  lora_dropout=0.0, task_type="CAUSAL_LM"))
    with torch.no_grad():  # a "trained" adapter: B != 0 (a fresh one has B = 0, hence dL/dA = 0)
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    peft_model.save_pretrained(tmp_path / "adapter")
    names = [n for n, _ in peft_model.named_parameters() if "lora_" in n]
    params = dict(peft_model.named_parameters())
    gen = torch.Generator().manual_seed(1)
    state = {i: {"step": torch.tensor(5.0), "exp_avg": torch.randn(params[n].shape, generator=gen) * 1e-3,
                 "exp_avg_sq": torch.rand(params[n].shape, generator=gen) * 1e-5} for i, n in enumerate(names)}
    torch.save({"state": state, "param_groups": [{"params": list(range(len(names))), "betas": (0.9, 0.999),
                                                  "eps": 1e-8}]}, tmp_path / "optimizer.pt")

    base, tok = load_model(tiny_model_dir, "fp64", "cpu")
    lm = G.apply_lora(base, {}, tmp_path / "adapter")
    pad = D.pad_token_id(tok)
    pool = prepare_data(files["pool"], tok, "paper")
    anchors = prepare_data(files["a"], tok, "paper", max_response_length=MLEN)
    lnames = [n for n, _ in lm.named_parameters() if "lora_" in n]
    assert len(lnames) == len(names)
    ga = torch.stack([flat_grad(lm, it, lnames) for it in anchors.encoded])
    gp = torch.stack([flat_grad(lm, it, lnames) for it in pool.encoded])
    m = torch.cat([state[i]["exp_avg"].reshape(-1) for i in range(len(names))]).double()
    v = torch.cat([state[i]["exp_avg_sq"].reshape(-1) for i in range(len(names))]).double()
    adam_p = (0.9 * m + 0.1 * gp) / (torch.sqrt(0.999 * v + 0.001 * gp * gp) + 1e-8)
    T = mean_unit(ga)
    res = G.anchor_gradients(lm, anchors.encoded, pad, "lora", "lora", batch_size=2)
    assert res.target.norm == pytest.approx(float(T.norm()), rel=TOL)
    adam = G.load_adam_state(tmp_path / "optimizer.pt", lm)
    for state_, reference in ((None, gp), (adam, adam_p)):
        engine = G.get_engine(lm, "lora", "lora", state_)
        bank = G.TargetBank([res.target], engine)
        inner, sq = run_batches(engine, pool.encoded, bank, pad, 3)
        assert rel_err(sq, (reference * reference).sum(1)) < TOL
        assert rel_err(inner[:, 0], reference @ T) < TOL
    # Adam-preconditioned anchors too
    T_adam = mean_unit((0.9 * m + 0.1 * ga) / (torch.sqrt(0.999 * v + 0.001 * ga * ga) + 1e-8))
    res_adam = G.anchor_gradients(lm, anchors.encoded, pad, "lora", "lora", batch_size=3, adam=adam)
    assert res_adam.target.norm == pytest.approx(float(T_adam.norm()), rel=TOL)
    # projected LoRA features (Adam-preconditioned): the projection of the exact per-example vectors
    engine = G.get_engine(lm, "lora", "lora", adam)
    projector = G.projector_for(engine, 64, seed=5)
    feats = torch.cat([G.project_batch(engine, projector, pool.encoded[s:s + 3], pad)
                       for s in range(0, len(pool.encoded), 3)])
    sizes = [math.prod(engine.shapes[n]) for n in lnames]
    expected = projector.project({n: projector.project_dense(n, v)
                                  for n, v in zip(lnames, torch.split(adam_p, sizes, dim=1))})
    assert rel_err(feats, expected) < TOL


# ----------------------------------------------------------------------------- the stages (CLI functions)

FP64 = dict(dtype="fp64", device="cpu")


@pytest.fixture(scope="module")
def targets(tiny_model_dir, files, tmp_path_factory):
    d = tmp_path_factory.mktemp("targets")
    assert G.build_target(G.GradientArgs(anchor=True, model_name=tiny_model_dir, data_path=files["a"],
                                         output_dir=d / "harmful", max_response_length=MLEN, batch_size=2, **FP64))
    assert G.build_target(G.GradientArgs(anchor=True, model_name=tiny_model_dir, data_path=files["b"],
                                         output_dir=d / "safe", max_response_length=MLEN, batch_size=2, **FP64))
    assert G.build_target(G.GradientArgs(anchor=True, model_name=tiny_model_dir, data_path=files["a"],
                                         output_dir=d / "harmful_unit", max_response_length=MLEN, renormalize=True,
                                         **FP64))
    return d


def read_scores(path):
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    return rows[0], rows[1:]


def test_stage_outputs_equal_bruteforce(ref, targets, tiny_model_dir, files, tmp_path):
    meta_t = json.loads((targets / "harmful" / "meta.json").read_text())
    assert meta_t["stage"] == "gradient_target" and meta_t["target"]["n_anchors"] == len(ANCHORS_A)
    assert meta_t["target"]["norm"] == pytest.approx(float(ref.T[0].norm()), rel=TOL)
    assert meta_t["target"]["anchor_norms"] == pytest.approx(
        [float(flat_grad(ref.model, it, ref.names).norm()) for it in ref.a.encoded], rel=TOL)
    out = tmp_path / "scores"
    assert G.score_pool(G.GradientArgs(model_name=tiny_model_dir, data_path=files["pool"], output_dir=out,
                                       targets=[targets / "harmful", targets / "safe", targets / "harmful_unit"],
                                       batch_size=3, chunk_size=3, **FP64))
    header, rows = read_scores(out / "scores.csv")
    assert header == ["index", "id", "harmful", "safe", "harmful_unit"]
    assert [int(r[0]) for r in rows] == [e.index for e in ref.pool.encoded]
    assert [r[1] for r in rows] == ref.pool.ids
    got = torch.tensor([[float(v) for v in r[2:]] for r in rows], dtype=torch.float64)
    assert rel_err(got[:, :2], ref.scores) < TOL
    cos = ref.inner[:, 0] / (ref.sq.sqrt() * ref.T[0].norm())       # --renormalize: exactly cos(G_i, T)
    assert rel_err(got[:, 2], cos) < TOL
    meta = json.loads((out / "meta.json").read_text())
    assert meta["stage"] == "gradient_scores" and meta["nonfinite"] == [] and meta["excluded"] == []
    assert [t["name"] for t in meta["targets"]] == ["harmful", "safe", "harmful_unit"]
    assert meta["targets"][0]["data_sha256"] == D.file_sha256(files["a"]) and meta["targets"][0]["n_anchors"] == 3
    from safetensors.torch import load_file
    products = load_file(str(out / "products.safetensors"))
    assert rel_err(products["sqnorm"], ref.sq) < TOL and rel_err(products["inner"][:, :2], ref.inner) < TOL


def test_refuses_targets_from_another_model_or_template(targets, tied_model_dir, tiny_model_dir, files, tmp_path):
    with pytest.raises(MetadataMismatch, match="model"):
        G.score_pool(G.GradientArgs(model_name=tied_model_dir, data_path=files["pool"], output_dir=tmp_path / "x",
                                    targets=[targets / "harmful"], **FP64))
    with pytest.raises(MetadataMismatch, match="template"):
        G.score_pool(G.GradientArgs(model_name=tiny_model_dir, data_path=files["pool"], output_dir=tmp_path / "y",
                                    targets=[targets / "harmful"], template="plain", **FP64))
    with pytest.raises(MetadataMismatch, match="params"):
        G.score_pool(G.GradientArgs(model_name=tiny_model_dir, data_path=files["pool"], output_dir=tmp_path / "z",
                                    targets=[targets / "harmful"], params="linear", **FP64))
    (tmp_path / "reps").mkdir()
    (tmp_path / "reps" / "meta.json").write_text(json.dumps({"stage": "representations"}))
    with pytest.raises(UserError, match="not a gradient target"):
        G.score_pool(G.GradientArgs(model_name=tiny_model_dir, data_path=files["pool"], output_dir=tmp_path / "w",
                                    targets=[tmp_path / "reps"], **FP64))
    with pytest.raises(UserError, match="missing"):
        G.score_pool(G.GradientArgs(model_name=tiny_model_dir, data_path=files["pool"], output_dir=tmp_path / "v",
                                    targets=[tmp_path / "nothing"], **FP64))


def test_resume_after_kill_gives_identical_bytes(targets, tiny_model_dir, files, tmp_path, monkeypatch):
    kw = dict(batch_size=2, chunk_size=3, **FP64)
    tlist = [targets / "harmful", targets / "safe"]
    assert G.score_pool(G.GradientArgs(model_name=tiny_model_dir, data_path=files["pool"],
                                       output_dir=tmp_path / "clean", targets=tlist, **kw))
    from safedata.store import ChunkStore
    original, saved = ChunkStore.save, []

    def save_then_die(self, chunk, tensors):
        original(self, chunk, tensors)
        saved.append(chunk)
        raise KeyboardInterrupt("killed after the first chunk")

    monkeypatch.setattr(ChunkStore, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        G.score_pool(G.GradientArgs(model_name=tiny_model_dir, data_path=files["pool"], output_dir=tmp_path / "killed",
                                    targets=tlist, **kw))
    monkeypatch.setattr(ChunkStore, "save", original)
    assert saved == [0] and not (tmp_path / "killed" / "scores.csv").exists()
    assert G.score_pool(G.GradientArgs(model_name=tiny_model_dir, data_path=files["pool"],
                                       output_dir=tmp_path / "killed", targets=tlist, **kw))
    assert (tmp_path / "killed" / "scores.csv").read_bytes() == (tmp_path / "clean" / "scores.csv").read_bytes()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_equal_one(targets, tiny_model_dir, files, tmp_path):
    args = ["get_gradients.py", "--model_name", tiny_model_dir, "--data_path", files["pool"],
            "--targets", str(targets / "harmful"), str(targets / "safe"), "--batch_size", "2", "--chunk_size", "2",
            "--dtype", "fp64", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("SLURM_ARRAY_TASK_ID", None)
    one = subprocess.run([python(), *args, "--output_dir", str(tmp_path / "one")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([python(), "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                          "127.0.0.1", "--master_port", str(free_port()), *args, "--output_dir", str(tmp_path / "two")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert (tmp_path / "two" / "scores.csv").read_bytes() == (tmp_path / "one" / "scores.csv").read_bytes()
    n_chunks = len(list((tmp_path / "two" / "chunks").glob("chunk-*.safetensors")))
    assert n_chunks == math.ceil(len(POOL) / 2)


def test_nonfinite_and_excluded_examples_are_reported_not_ranked(ref, targets, tiny_model_dir, files, tmp_path):
    # one example whose prompt fills --max_length (no supervised token: excluded by data.encode_examples)
    long_record = {"instruction": "Read this and answer.", "input": " ".join(["word"] * 300), "output": "Done."}
    pool = write_json(tmp_path / "pool_bad.json", POOL + [long_record])
    model, tok = load_model(tiny_model_dir, "fp64", "cpu")
    lengths = [len(e) for e in prepare_data(files["pool"], tok, "paper").encoded]
    max_length = max(lengths) + 1
    # and one whose gradient turns NaN: its input embeddings are set to inf by a test hook
    poisoned = ref.pool.encoded[3]

    def poison(module, inputs, output):
        ids = inputs[0]
        prefix = torch.tensor(poisoned.input_ids)
        for row in range(ids.shape[0]):
            if ids.shape[1] >= len(prefix) and torch.equal(ids[row, :len(prefix)], prefix):
                output = output.clone()
                output[row] = float("inf")
        return output

    model.get_input_embeddings().register_forward_hook(poison)
    out = tmp_path / "scores"
    assert G.score_pool(G.GradientArgs(model_name=tiny_model_dir, data_path=pool, output_dir=out,
                                       targets=[targets / "harmful", targets / "safe"], batch_size=3,
                                       max_length=max_length, **FP64), model=model, tokenizer=tok)
    meta = json.loads((out / "meta.json").read_text())
    assert [e["index"] for e in meta["excluded"]] == [len(POOL)]
    assert [e["id"] for e in meta["nonfinite"]] == [poisoned.id]
    header, rows = read_scores(out / "scores.csv")
    ids = [r[1] for r in rows]
    assert poisoned.id not in ids and len(ids) == len(POOL) - 1
    keep = [i for i, e in enumerate(ref.pool.encoded) if e.id != poisoned.id]
    got = torch.tensor([[float(v) for v in r[2:]] for r in rows], dtype=torch.float64)
    assert rel_err(got, ref.scores[keep]) < TOL          # the others are untouched by the NaN in their batch
    # rank.py never selects them
    from safedata.ranking import RankArgs, rank
    summary = rank(RankArgs(data_path=pool, output_dir=tmp_path / "sel", scores_dir=out, k=len(POOL) - 1))
    assert summary["k"] == len(POOL) - 1
    selected = (tmp_path / "sel" / "pool_bad_top7_index.csv").read_text()
    assert poisoned.id not in selected and long_record["output"] not in (tmp_path / "sel" / "pool_bad_top7.json").read_text()


# ----------------------------------------------------------------------------- projected features


def test_projected_features_are_the_projection_of_the_exact_gradients(ref, tiny_model_dir, files, tmp_path):
    from safedata.features.projection import FactoredProjector
    from safedata.ranking import load_features
    from safedata.scores import anchor_scores
    proj_dim = 300
    assert G.extract_gradient_features(G.GradientArgs(model_name=tiny_model_dir, data_path=files["pool"],
                                                      output_dir=tmp_path / "pool", proj_dim=proj_dim, proj_seed=3,
                                                      batch_size=3, **FP64))
    feats = load_features(tmp_path / "pool")
    assert feats.meta["stage"] == "gradient_features" and feats.features.shape == (len(POOL), proj_dim)
    # the same linear map applied to the brute-force gradient, layer by layer
    shapes = {n: (tuple(p.shape) if p.dim() == 2 else (1, p.shape[0])) for n, p in ref.model.named_parameters()}
    projector = FactoredProjector(shapes, proj_dim, seed=3, dtype=torch.float64)
    sizes = [math.prod(s) for s in shapes.values()]
    parts = dict(zip(shapes, torch.split(ref.gp, sizes, dim=1)))
    expected = projector.project({n: projector.project_dense(n, v) for n, v in parts.items()})
    assert rel_err(feats.features.double(), expected) < 1e-5

    # proj_dim = every parameter: the projection is the identity, so rank.py --avg_n all equals the score
    full = sum(sizes)
    assert G.extract_gradient_features(G.GradientArgs(model_name=tiny_model_dir, data_path=files["pool"],
                                                      output_dir=tmp_path / "pool_full", proj_dim=full, batch_size=4,
                                                      **FP64))
    assert G.extract_gradient_features(G.GradientArgs(model_name=tiny_model_dir, data_path=files["a"],
                                                      output_dir=tmp_path / "a_full", proj_dim=full, batch_size=4,
                                                      max_response_length=MLEN, **FP64))
    pool_f, anchor_f = load_features(tmp_path / "pool_full"), load_features(tmp_path / "a_full")
    assert rel_err(anchor_scores(pool_f.features, anchor_f.features, "all"), ref.scores[:, 0]) < 1e-4
    from safedata.ranking import RankArgs, rank   # rank.py accepts them (same stage, model, template, flags)
    summary = rank(RankArgs(data_path=files["pool"], output_dir=tmp_path / "sel", pool_features=tmp_path / "pool_full",
                            anchor_features=[tmp_path / "a_full"], avg_n="all", k=3))
    assert summary["k"] == 3 and summary["n_nonfinite"] == 0


def test_cli_help_and_mode_choice(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([python(), "get_gradients.py", "--model_name", "x", "--data_path", "y", "--output_dir",
                          str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "exactly one of --anchor, --targets, --proj_dim, --self_influence" in out.stderr


def test_fp32_and_bf16_models_track_the_fp64_reference(ref, tiny_model_dir, files):
    for dtype, tol in (("fp32", 1e-5), ("bf16", 2e-2)):
        model, tok = load_model(tiny_model_dir, dtype, "cpu")
        anchors = prepare_data(files["a"], tok, "paper", max_response_length=MLEN)
        res = G.anchor_gradients(model, anchors.encoded, ref.pad, batch_size=2)
        assert {p.fact_g.dtype for p in res.target.params.values() if p.fact_g is not None} == {model.dtype}
        engine = G.get_engine(model)
        inner, sq = run_batches(engine, ref.pool.encoded, G.TargetBank([res.target], engine), ref.pad, 3)
        assert inner.dtype == sq.dtype == torch.float32                   # accumulated in fp32
        scores = inner[:, 0].double() / sq.double().sqrt()
        assert float((scores - ref.scores[:, 0]).abs().max()) < tol * float(ref.scores[:, 0].abs().max()), dtype


def test_real_anchor_file_first_10_response_tokens(shared_data, tiny_model_dir, tmp_path):
    path = shared_data / "paper" / "ft_datasets" / "pure_bad_dataset" / "pure-bad-illegal-activities-selected10.jsonl"
    assert G.build_target(G.GradientArgs(anchor=True, model_name=tiny_model_dir, data_path=path,
                                         output_dir=tmp_path / "t", max_response_length=MLEN, dtype="fp32",
                                         device="cpu", target_layout="factored"))
    meta = json.loads((tmp_path / "t" / "meta.json").read_text())
    _, tok = load_model(tiny_model_dir, "fp32", "cpu")
    encoded = prepare_data(path, tok, "paper", max_response_length=MLEN).encoded
    assert meta["target"]["n_anchors"] == len(encoded) == 10 and all(e.n_supervised == MLEN for e in encoded)
    assert 0 < meta["target"]["norm"] <= 1 + 1e-6
    assert all(math.isfinite(s) and -1 <= s <= 1 for s in meta["target"]["anchor_scores"])
    head = meta["target"]["layout"]["lm_head.weight"]
    assert head["form"] == "factored" and head["tokens"] == 10 * MLEN     # the LM head sees supervised tokens only


def test_get_full_gradient_script(ref, tiny_model_dir, tmp_path):
    data = tmp_path / "data"   # benign stand-ins under the paper's file names
    data.mkdir()
    write_json(data / "alpaca_data_no_safety.json", POOL)
    write_jsonl(data / "pure-bad-illegal-activities-selected10.jsonl", ANCHORS_A)
    write_jsonl(data / "pure-bad-illegal-acticities-selected-10-anchor1.jsonl", ANCHORS_B)
    write_jsonl(data / "pure-bad-illegal-activities-selected-10-anchor2.jsonl", ANCHORS_B)
    env = dict(os.environ, PYTHON=python(), MODEL=tiny_model_dir, DATA_DIR=str(data), OUT=str(tmp_path / "out"),
               BATCH_SIZE="3", EXTRA="--dtype fp64 --device cpu", OMP_NUM_THREADS="1")
    env.pop("SLURM_ARRAY_TASK_ID", None)
    done = subprocess.run(["bash", str(ROOT / "scripts" / "get_full_gradient.sh")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    header, rows = read_scores(tmp_path / "out" / "scores" / "scores.csv")
    assert header == ["index", "id", "harmful", "safe1", "safe2"]
    got = torch.tensor([[float(v) for v in r[2:]] for r in rows], dtype=torch.float64)
    assert rel_err(got[:, 0], ref.scores[:, 0]) < TOL
    assert rel_err(got[:, 1], ref.scores[:, 1]) < TOL and rel_err(got[:, 2], ref.scores[:, 1]) < TOL


# ----------------------------------------------------------------------------- low precision, out of memory

# bf16 tolerance, derived. Products accumulate in fp32 (error ~2^-24, negligible); on CPU each product's output is
# then rounded to bf16 once (Numerics.low_out: relative 2^-8 per entry, see the test after this one). What bf16
# adds beyond that is the rounding of every stored activation and output-grad to 8 significant bits, relative
# error <= u = 2^-8.
# A per-example gradient inherits them along its path: R roundings in sequence (this model: 2 layers x ~14
# forward + ~14 backward, plus embedding, final norm, head: R ~ 60), taken as independent:
# eps = sqrt(R) u = 0.030 relative. To first order ||G||^2 moves by <= 2 eps relative, and a score
# s = <G, T>/||G|| (||T|| <= 1) by <= eps ||T|| + ||dT|| <= 2 eps = 0.06.
# That derivation is a worst case of the per-component error: a score, a normalised inner product over
# ~10^5 components, averages those roundings away and lands far below it, so a 100x regression would still
# pass it. Hence also a regression bound, measured, not derived: on this test's data (torch 2.13 CPU; batch sizes
# 1, 2, 3, 8 alike) the scores are 2.3e-4 off in absolute terms and ||G||^2 4.4e-3 relative (with the products'
# operands upcast to fp32 instead of the bf16 GEMM: 2.0e-4 and 4.4e-3, on a Xeon with avx512_bf16 and on an EPYC
# Zen 5 alike); the bounds are 4x those. Another CPU's bf16 kernels may round differently: the 4x is the margin.
BF16_EPS = math.sqrt(60) * 2.0 ** -8
BF16_MEASURED_SCORE_ERR = 2.3e-4
BF16_MEASURED_SQNORM_ERR = 4.4e-3


def test_bf16_scoring_on_cpu_within_derived_tolerance(tiny_model_dir, files, tmp_path):
    # The reference is the fp64 brute force of the same bf16 weights (their rounding is the model, not an error);
    # anchors taken from the pool, so that scores are large (O(0.3)) and the tolerance is not vacuous.
    anchors = dict(files, a=write_json(tmp_path / "anchors_from_pool.json", POOL[:3]))
    model64, _ = load_model(tiny_model_dir, "fp64", "cpu")
    with torch.no_grad():
        for p in model64.parameters():
            p.copy_(p.to(torch.bfloat16).double())
    r = Reference(tiny_model_dir, anchors, model=model64)
    bf16 = dict(dtype="bf16", device="cpu")
    assert G.build_target(G.GradientArgs(anchor=True, model_name=tiny_model_dir, data_path=anchors["a"],
                                         output_dir=tmp_path / "t", max_response_length=MLEN, batch_size=2, **bf16))
    assert G.score_pool(G.GradientArgs(model_name=tiny_model_dir, data_path=files["pool"], output_dir=tmp_path / "s",
                                       targets=[tmp_path / "t"], batch_size=3, **bf16))
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    assert meta["flags"]["dtype"] == "torch.bfloat16"
    header, rows = read_scores(tmp_path / "s" / "scores.csv")
    got = torch.tensor([float(r_[2]) for r_ in rows], dtype=torch.float64)
    assert float(r.scores[:3, 0].abs().min()) > 0.1                     # scores large enough to test
    score_err = float((got - r.scores[:, 0]).abs().max())
    from safetensors.torch import load_file
    sq = load_file(str(tmp_path / "s" / "products.safetensors"))["sqnorm"]
    print(f"bf16 scores: max abs error {score_err:.2e}; ||G||^2 relative error {rel_err(sq, r.sq):.2e}")
    assert score_err < 2 * BF16_EPS                                     # the derived worst case
    assert score_err < 4 * BF16_MEASURED_SCORE_ERR, score_err           # the measured regression bound
    assert rel_err(sq, r.sq) < 2 * BF16_EPS
    assert rel_err(sq, r.sq) < 4 * BF16_MEASURED_SQNORM_ERR, rel_err(sq, r.sq)
    assert rel_err(sq, r.sq) > 1e-6              # and it really ran in bf16 (an fp32 run is ~1e-7 off)


def test_cpu_bf16_products_are_one_rounding_of_an_fp32_accumulated_product():
    # Numerics.low_out (a bf16 model on CPU): a bf16 pair goes to one bf16 GEMM, fp32 accumulation inside, output
    # rounded to bf16 once. Against the fp64 product of the same bf16 operands, each entry is within the rounding,
    # u |c| with u = 2^-8 (round to nearest, 8 significant bits), plus fp32 accumulation over k terms,
    # k 2^-24 sum|a||b| (a worst case); a sum kept in bf16 along the way exceeds it.
    from safedata.features.gradients.context import Workspace
    from safedata.features.gradients.numerics import Numerics
    num = Numerics(torch.device("cpu"), torch.bfloat16)
    assert num.low_out and not num.fast and num.operand_dtype == torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    k = 4096
    a = torch.randn(64, k, generator=gen).bfloat16()
    b = torch.randn(k, 48, generator=gen).bfloat16()
    exact = a.double() @ b.double()
    bound = 2.0 ** -8 * exact.abs() + k * 2.0 ** -24 * (a.double().abs() @ b.double().abs())
    for got in (num.mm(a, b), num.bmm(a[None], b[None])[0]):
        assert got.dtype == torch.float32
        err = (got.double() - exact).abs()
        assert bool((err <= bound).all()), float((err / bound).max())
        assert float(err.max()) > 2.0 ** -20 * float(exact.abs().max())       # it did round to bf16
    # per-example gradients: the same GEMM, kept in bf16 (what the target bank's bf16 rows are multiplied with)
    g, x = torch.randn(2, 5, 3, generator=gen).bfloat16(), torch.randn(2, 5, 4, generator=gen).bfloat16()
    grads = Workspace(num, torch.device("cpu")).per_example_grads(g, x)
    assert grads.dtype == torch.bfloat16
    ref = torch.einsum("bto,bti->boi", g.double(), x.double())
    bound = 2.0 ** -8 * ref.abs() + 5 * 2.0 ** -24 * torch.einsum("bto,bti->boi", g.double().abs(), x.double().abs())
    assert bool(((grads.double() - ref).abs() <= bound).all())
    # an fp32 model's products stay fp32 throughout
    assert Numerics(torch.device("cpu"), torch.float32).operand_dtype == torch.float32


def test_out_of_memory_stops_with_a_smaller_batch_size_and_never_retries(targets, tiny_model_dir, files, tmp_path,
                                                                          monkeypatch):
    from safedata.features.gradients.numerics import Numerics
    # the fp32-output matmul: an OOM passes through (no fp32-copy retry, the fast path stays on) ...
    num = Numerics(torch.device("cpu"), torch.bfloat16)
    num.fast = True
    calls = []

    def oom_mm(a, b, out_dtype=None):
        calls.append(out_dtype)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(torch, "mm", oom_mm)
    a = torch.ones(2, 2, dtype=torch.bfloat16)
    with pytest.raises(torch.OutOfMemoryError):
        num.mm(a, a)
    assert calls == [torch.float32] and num.fast
    monkeypatch.undo()
    # ... while another failure of it falls back to upcast operands, once and for good
    monkeypatch.setattr(torch, "mm", lambda a, b, out_dtype=None: (_ for _ in ()).throw(RuntimeError("no kernel"))
                        if out_dtype is not None else torch.matmul(a, b))
    assert num.mm(a, a).dtype == torch.float32 and not num.fast
    monkeypatch.undo()
    # ... and every stage stops with one line: stage, batch size, a smaller one to try; nothing retried
    runs = []

    def oom_run(self, items, pad_id, acc):
        runs.append(len(items))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(G.GradientEngine, "run", oom_run)
    with pytest.raises(UserError, match=r"^anchor target: out of memory at --batch_size 2 .*try --batch_size 1"):
        G.build_target(G.GradientArgs(anchor=True, model_name=tiny_model_dir, data_path=files["a"],
                                      output_dir=tmp_path / "t", batch_size=2, **FP64))
    assert not (tmp_path / "t" / "target.safetensors").exists()
    with pytest.raises(UserError, match=r"^gradient scores: out of memory at --batch_size 8 .*try --batch_size 4"):
        G.score_pool(G.GradientArgs(model_name=tiny_model_dir, data_path=files["pool"], output_dir=tmp_path / "s",
                                    targets=[targets / "harmful"], batch_size=8, **FP64))
    with pytest.raises(UserError, match=r"^gradient features: out of memory at --batch_size 1 .*--max_length"):
        G.extract_gradient_features(G.GradientArgs(model_name=tiny_model_dir, data_path=files["pool"],
                                                   output_dir=tmp_path / "f", proj_dim=64, batch_size=1, **FP64))
    assert runs == [2, 8, 1]                                # one attempt each, no retry


# ----------------------------------------------------------------------------- self-influence, examples.csv


def mean_token_loss(model, item):
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([item.input_ids])).logits[0, :-1].double()
    labels = torch.tensor(item.labels)[1:]
    keep = labels != D.IGNORE_INDEX
    return float(torch.nn.functional.cross_entropy(logits[keep], labels[keep]))


def read_columns(path):
    header, rows = read_scores(path)
    return {name: [r[i] for r in rows] for i, name in enumerate(header)}


def test_self_influence_equals_bruteforce_and_ranks(ref, tiny_model_dir, files, tmp_path):
    out = tmp_path / "self_inf"
    assert G.score_pool(G.GradientArgs(model_name=tiny_model_dir, data_path=files["pool"], output_dir=out, targets=[],
                                       self_influence=True, batch_size=3, chunk_size=3, **FP64))
    header, _ = read_scores(out / "scores.csv")
    assert header == ["index", "id", "self_inf", "self_inf_n"]
    cols = read_columns(out / "scores.csv")
    assert cols["id"] == ref.pool.ids
    self_inf = torch.tensor([float(v) for v in cols["self_inf"]], dtype=torch.float64)
    assert rel_err(self_inf, ref.sq) < TOL                              # ||G_i||^2 of the brute-force gradient
    n_sup = torch.tensor([e.n_supervised for e in ref.pool.encoded], dtype=torch.float64)
    expected_n = torch.log(ref.sq + 1) + torch.log(n_sup + 1)           # Guan et al.'s Self-Inf-N
    assert rel_err(torch.tensor([float(v) for v in cols["self_inf_n"]], dtype=torch.float64), expected_n) < TOL
    examples = read_columns(out / "examples.csv")
    assert list(examples) == ["index", "id", "n_supervised", "loss"] and examples["id"] == ref.pool.ids
    assert [int(v) for v in examples["n_supervised"]] == n_sup.long().tolist()
    losses = [mean_token_loss(ref.model, it) for it in ref.pool.encoded]
    assert rel_err([float(v) for v in examples["loss"]], losses) < TOL
    # rank.py --scores ranks it by either column (--weights picks one)
    from safedata.ranking import RankArgs, rank
    for weights, column in (([0.0, 1.0], expected_n), ([1.0, 0.0], ref.sq)):
        sel = tmp_path / f"sel{weights[0]}"
        rank(RankArgs(data_path=files["pool"], output_dir=sel, scores_dir=out, weights=weights, k=3))
        chosen = read_columns(sel / "pool_top3_index.csv")["id"]
        assert chosen == [ref.pool.ids[i] for i in column.argsort(descending=True)[:3].tolist()]
    with pytest.raises(UserError, match="self-influence scores need --weights"):
        rank(RankArgs(data_path=files["pool"], output_dir=tmp_path / "sel_default", scores_dir=out, k=3))
    with pytest.raises(UserError, match="--self_influence needs no --targets"):
        G.score_pool(G.GradientArgs(model_name=tiny_model_dir, data_path=files["pool"], output_dir=tmp_path / "x",
                                    targets=[tmp_path], self_influence=True, **FP64))


# ----------------------------------------------------------------------------- the original's anchor gradients


def original_target(model, items, names):
    """What the original code computed, literally: loss.backward() per anchor with no zero_grad in between,
    each accumulated .grad flattened and normalised, then averaged."""
    params = dict(model.named_parameters())
    ps = [params[n] for n in names]
    for p in ps:
        p.requires_grad_(True)
        p.grad = None
    unit = []
    try:
        for item in items:
            logits = model(input_ids=torch.tensor([item.input_ids])).logits[0, :-1].double()
            labels = torch.tensor(item.labels)[1:]
            keep = labels != D.IGNORE_INDEX
            torch.nn.functional.cross_entropy(logits[keep], labels[keep]).backward()     # grads accumulate
            g = torch.cat([p.grad.reshape(-1) for p in ps]).clone()
            unit.append(g / g.norm())
    finally:
        for p in ps:
            p.requires_grad_(False)
            p.grad = None
    return torch.stack(unit).mean(0)


def test_running_sum_combination_under_the_models_own_template_equals_bruteforce(ref, tiny_model_dir, files,
                                                                                  tmp_path):
    """--anchor_combination running_sum: the original's running-sum target without the paper template's quirks
    (the anchors tokenised as every other run here), against the literal no-zero_grad loop; the pool's scores
    against it; and a plain target's meta has no anchor_combination key (its identity unchanged)."""
    T = original_target(ref.model, ref.anchors[0].encoded, ref.names)
    assert float((T - ref.T[0]).norm()) > 1e-3 * float(T.norm())          # really another target than the mean
    assert G.build_target(G.GradientArgs(anchor=True, model_name=tiny_model_dir, data_path=files["a"],
                                         output_dir=tmp_path / "t", max_response_length=MLEN, batch_size=2,
                                         anchor_combination="running_sum", **FP64))
    meta = json.loads((tmp_path / "t" / "meta.json").read_text())
    assert meta["flags"]["anchor_combination"] == "running_sum" and not meta["flags"]["original_quirks"]
    assert meta["target"]["combination"].startswith("mean_i C_i")
    assert meta["target"]["norm"] == pytest.approx(float(T.norm()), rel=TOL)
    assert G.score_pool(G.GradientArgs(model_name=tiny_model_dir, data_path=files["pool"], output_dir=tmp_path / "s",
                                       targets=[tmp_path / "t"], batch_size=3, **FP64))
    got = torch.tensor([float(r[2]) for r in read_scores(tmp_path / "s" / "scores.csv")[1]], dtype=torch.float64)
    assert rel_err(got, (ref.gp @ T) / ref.gp.norm(dim=1)) < TOL
    assert G.build_target(G.GradientArgs(anchor=True, model_name=tiny_model_dir, data_path=files["a"],
                                         output_dir=tmp_path / "plain", max_response_length=MLEN, batch_size=2, **FP64))
    assert "anchor_combination" not in json.loads((tmp_path / "plain" / "meta.json").read_text())["flags"]


def test_original_quirks_cumulative_anchors_equal_bruteforce(ref, tiny_model_dir, files, tmp_path):
    anchors = prepare_data(files["a"], ref.tok, "paper", max_response_length=MLEN, original_quirks=True)
    pool = prepare_data(files["pool"], ref.tok, "paper", original_quirks=True)
    T = original_target(ref.model, anchors.encoded, ref.names)
    assert float((T - ref.T[0]).norm()) > 1e-3 * float(T.norm())          # really another target than ours
    # the coefficients alone, against the literal running sums
    res = G.anchor_gradients(ref.model, anchors.encoded, ref.pad, batch_size=2, cumulative=True)
    assert res.target.norm == pytest.approx(float(T.norm()), rel=TOL)
    # the stage: --anchor --original_quirks, then scores of a (quirks-tokenised) pool against it
    assert G.build_target(G.GradientArgs(anchor=True, model_name=tiny_model_dir, data_path=files["a"],
                                         output_dir=tmp_path / "t", max_response_length=MLEN, batch_size=2,
                                         original_quirks=True, **FP64))
    meta = json.loads((tmp_path / "t" / "meta.json").read_text())
    assert meta["flags"]["original_quirks"] and meta["target"]["combination"].startswith("mean_i C_i")
    assert meta["target"]["norm"] == pytest.approx(float(T.norm()), rel=TOL)
    assert G.score_pool(G.GradientArgs(model_name=tiny_model_dir, data_path=files["pool"], output_dir=tmp_path / "s",
                                       targets=[tmp_path / "t"], batch_size=3, original_quirks=True, **FP64))
    gp = torch.stack([flat_grad(ref.model, it, ref.names) for it in pool.encoded])
    got = torch.tensor([float(r[2]) for r in read_scores(tmp_path / "s" / "scores.csv")[1]], dtype=torch.float64)
    assert rel_err(got, (gp @ T) / gp.norm(dim=1)) < TOL
