"""Generation on the tiny model: batched = one at a time, resume after a kill, templates, shards, formats."""
import csv
import json
import os
import shutil
import subprocess

import pytest
import torch

from conftest import ROOT, python
from safedata import data as D
from safedata import generation as G
from safedata.errors import UserError
from safedata.evaluation import read_responses
from safedata.generation import GenerationArgs, HFBackend, generate_responses

# Placeholder prompts of different lengths (the test's own, harmless text).
PROMPTS = ["Write a poem about the sea", "Explain how rainbows form", "List three kinds of fruit",
           "Describe a sunny day in the park with friends, a dog, a kite and a picnic basket full of sandwiches",
           "Give a tip for studying", "Name a colour", "Tell me about the moon and the tides it causes on the coast",
           "Suggest a name for a cat", "How do plants grow?"]


def write_prompts(path, header=False):
    rows = [[p] for p in PROMPTS]
    if header:
        rows = [["goal", "target"]] + [[p, "Sure, here is a reply"] for p in PROMPTS]
    with open(path, "w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    return path


def run(model, prompts, out, **kw):
    base = dict(model_name=str(model), data_path=str(prompts), output_dir=str(out), max_new_tokens=12,
                batch_size=4, dtype="fp32", device="cpu")
    base.update(kw)
    return generate_responses(GenerationArgs(**base))


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    return write_prompts(tmp_path_factory.mktemp("prompts") / "harmful_behaviors.csv")


@pytest.fixture(scope="module")
def reference(tiny_model_dir, prompts, tmp_path_factory):
    """One uninterrupted greedy run, batch size 4."""
    out = tmp_path_factory.mktemp("gen") / "reference"
    assert run(tiny_model_dir, prompts, out)
    return out


def test_output_format_and_meta(reference, prompts):
    records = read_responses(reference / "responses.jsonl")
    assert [r["index"] for r in records] == list(range(len(PROMPTS)))
    assert [r["prompt"] for r in records] == PROMPTS
    assert all(list(r) == ["index", "id", "prompt", "response"] for r in records)
    assert all(isinstance(r["response"], str) and r["response"] for r in records)
    examples, _ = D.load_examples(prompts, need_response=False)
    assert [r["id"] for r in records] == [e.id for e in examples]
    meta = json.loads((reference / "meta.json").read_text())
    assert meta["n"] == len(PROMPTS) and meta["template"] == "paper" and meta["finetune"] is None
    assert meta["data_sha256"] == D.file_sha256(prompts) and meta["flags"]["do_sample"] is False
    assert not (reference / "responses.partial.jsonl").exists()


def test_batched_equals_one_at_a_time_and_plain_greedy(tiny_model_dir, prompts, reference, tmp_path):
    one = tmp_path / "one"
    run(tiny_model_dir, prompts, one, batch_size=1)
    assert (one / "responses.jsonl").read_bytes() == (reference / "responses.jsonl").read_bytes()

    # And both equal a plain greedy loop on the unpadded prompt (no cache, no padding, no generate()):
    # left padding needs position ids from the attention mask; this checks generate() gets them right.
    backend = HFBackend(tiny_model_dir, "fp32", "cpu")
    examples, _ = D.load_examples(prompts, need_response=False)
    records = read_responses(reference / "responses.jsonl")
    for e in examples[:4]:
        ids = D.prompt_ids(e, "paper", backend.tokenizer)
        new = []
        for _ in range(12):
            with torch.no_grad():
                token = int(backend.model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
            if token in backend.stop:
                break
            new.append(token)
        assert backend.decode(new) == records[e.index]["response"]


def test_resume_after_kill_is_byte_identical(tiny_model_dir, prompts, reference, tmp_path, monkeypatch):
    out = tmp_path / "killed"
    calls = []
    real = HFBackend.generate

    def dies_after_two_batches(self, *args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated kill")
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(HFBackend, "generate", dies_after_two_batches)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_model_dir, prompts, out)
    partial = out / "responses.partial.jsonl"
    lines = partial.read_text().splitlines()
    assert len(lines) == 1 + 8 and not (out / "responses.jsonl").exists()   # header + two batches of 4
    with open(partial, "a") as handle:                                        # a kill in the middle of a write
        handle.write('{"index": 7, "id": "abc", "prom')

    monkeypatch.setattr(HFBackend, "generate", lambda self, *a, **k: (calls.append(1), real(self, *a, **k))[1])
    calls.clear()
    assert run(tiny_model_dir, prompts, out)
    assert len(calls) == 1                                                    # only the batch not yet done
    assert (out / "responses.jsonl").read_bytes() == (reference / "responses.jsonl").read_bytes()
    assert not partial.exists()


def test_finished_output_is_kept_and_other_flags_refused(tiny_model_dir, prompts, reference, monkeypatch):
    before = (reference / "responses.jsonl").read_bytes()
    monkeypatch.setattr(HFBackend, "__init__", lambda *a, **k: pytest.fail("a finished run must not load the model"))
    assert run(tiny_model_dir, prompts, reference)
    assert (reference / "responses.jsonl").read_bytes() == before
    with pytest.raises(UserError, match="already holds responses made differently"):
        run(tiny_model_dir, prompts, reference, max_new_tokens=5)


def test_stale_partial_from_other_flags_is_not_reused(tiny_model_dir, prompts, reference, tmp_path):
    out = tmp_path / "stale"
    out.mkdir()
    (out / "responses.partial.jsonl").write_text(
        '{"fingerprint": "something-else"}\n{"index": 0, "id": "x", "prompt": "p", "response": "WRONG"}\n')
    run(tiny_model_dir, prompts, out)
    assert (out / "responses.jsonl").read_bytes() == (reference / "responses.jsonl").read_bytes()


def test_shards_merge_to_the_whole(tiny_model_dir, prompts, reference, tmp_path):
    out = tmp_path / "sharded"
    assert run(tiny_model_dir, prompts, out, shard="1/3") is False
    assert run(tiny_model_dir, prompts, out, shard="0/3") is False
    assert not (out / "responses.jsonl").exists()
    assert run(tiny_model_dir, prompts, out, shard="2/3") is True
    assert read_responses(out / "responses.jsonl") == read_responses(reference / "responses.jsonl")


def test_advbench_with_header_gives_the_same_prompts(tiny_model_dir, reference, tmp_path):
    with_header = write_prompts(tmp_path / "harmful_behaviors_goal_target.csv", header=True)
    out = tmp_path / "header"
    run(tiny_model_dir, with_header, out)
    got, want = read_responses(out / "responses.jsonl"), read_responses(reference / "responses.jsonl")
    assert [(r["prompt"], r["response"]) for r in got] == [(r["prompt"], r["response"]) for r in want]


def test_alpaca_records_use_instruction_and_input(tiny_model_dir, tmp_path):
    data = tmp_path / "alpaca.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": f"Summarise item {i}", "input": "a text" if i else "",
                                          "output": "x"}) for i in range(3)) + "\n")
    run(tiny_model_dir, data, tmp_path / "alpaca", max_new_tokens=4)
    records = read_responses(tmp_path / "alpaca" / "responses.jsonl")
    assert [r["prompt"] for r in records] == ["Summarise item 0", "Summarise item 1\n\na text",
                                              "Summarise item 2\n\na text"]


@pytest.fixture(scope="module")
def chat_finetuned(tiny_model_dir, tmp_path_factory):
    """A copy of the tiny model that claims (finetune_meta.json) to have been fine-tuned with the chat template."""
    model = tmp_path_factory.mktemp("chatft") / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "finetune_meta.json").write_text(json.dumps({"stage": "finetune", "template": "chat",
                                                          "base_model": "tiny", "data_sha256": "0" * 64}))
    return model


def test_template_mismatch_is_refused(chat_finetuned, prompts, tmp_path):
    with pytest.raises(UserError, match=r"--template paper: .* fine-tuned with template 'chat'"):
        run(chat_finetuned, prompts, tmp_path / "mismatch", template="paper")
    assert G.resolve_template(str(chat_finetuned), None)[0] == "chat"            # default: the fine-tune's template
    assert G.resolve_template(str(chat_finetuned), "chat")[0] == "chat"
    assert G.resolve_template(str(chat_finetuned), "paper", allow_mismatch=True)[0] == "paper"
    run(chat_finetuned, prompts, tmp_path / "chat", max_new_tokens=3)
    meta = json.loads((tmp_path / "chat" / "meta.json").read_text())
    assert meta["template"] == "chat" and meta["finetune"]["template"] == "chat"


def test_cli_refusal_is_one_line(chat_finetuned, prompts, tmp_path):
    result = subprocess.run([python(), str(ROOT / "generate.py"), "--model_name", str(chat_finetuned), "--data_path",
                             str(prompts), "--output_dir", str(tmp_path / "o"), "--template", "plain"],
                            capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --template plain:") and "'chat'" in last


def test_sampling_is_seeded(tiny_model_dir, prompts, tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out, seed in ((a, 1), (b, 1), (c, 2)):
        run(tiny_model_dir, prompts, out, do_sample=True, temperature=1.5, seed=seed)
    assert (a / "responses.jsonl").read_bytes() == (b / "responses.jsonl").read_bytes()
    assert (a / "responses.jsonl").read_bytes() != (c / "responses.jsonl").read_bytes()


def test_vllm_backend_is_optional(tiny_model_dir, prompts, tmp_path):
    try:
        import vllm  # noqa: F401
        pytest.skip("vLLM is installed here")
    except ImportError:
        pass
    with pytest.raises(UserError, match="vLLM is not installed"):
        run(tiny_model_dir, prompts, tmp_path / "v", backend="vllm")


def test_real_advbench_files_load_as_prompts(shared_data, tiny_model_dir):
    """Both AdvBench layouts (paper: one column, no header; original: goal,target) give the same 520 prompts."""
    paper, _ = D.load_examples(shared_data / "paper" / "safety_evaluation" / "data" / "harmful_behaviors.csv",
                               need_response=False)
    original, _ = D.load_examples(shared_data / "advbench" / "harmful_behaviors.csv", need_response=False)
    assert len(paper) == len(original) == 520
    assert [D.user_turn(e) for e in paper] == [D.user_turn(e) for e in original]


def test_a_rerun_of_the_same_fine_tune_is_the_same_run_and_a_retrained_one_is_not(tiny_model_dir, prompts, tmp_path):
    """The run's fingerprint follows what the fine-tune was asked and reached (finetune_meta.json's settings and
    losses), not its times: a rerun of one recipe (new created/runtime/environment) keeps the finished answers,
    a checkpoint retrained in place with another loss is a new run."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    ft = {"stage": "finetune", "template": "plain", "settings": {"flags": {"learning_rate": 1e-3}},
          "train_loss": 1.5, "epoch_losses": [1.5], "total_steps": 3, "created": "2026-12-01T10:00:00+00:00",
          "train_runtime_s": 12.0, "environment": {"host": "a"}}
    (model / "finetune_meta.json").write_text(json.dumps(ft))
    out = tmp_path / "gen"
    run(model, prompts, out, max_new_tokens=2)
    first = json.loads((out / "meta.json").read_text())["fingerprint"]
    (model / "finetune_meta.json").write_text(json.dumps(dict(ft, created="2026-12-02T11:00:00+00:00",
                                                              train_runtime_s=13.5, environment={"host": "b"})))
    run(model, prompts, out, max_new_tokens=2)            # kept as finished: no refusal
    assert json.loads((out / "meta.json").read_text())["fingerprint"] == first
    (model / "finetune_meta.json").write_text(json.dumps(dict(ft, train_loss=1.25, epoch_losses=[1.25])))
    with pytest.raises(UserError, match="already holds responses made differently"):
        run(model, prompts, out, max_new_tokens=2)
