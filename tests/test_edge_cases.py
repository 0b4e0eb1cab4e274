"""Edge cases of the data layer and of the stage CLIs: what is data (an empty answer, a system prompt equal to the
template's default, U+2028 inside a string, CRLF lines, conversations under other field names) is accepted, scored
and written back verbatim in every format; a bad input or flag stops with one line (`error: ...`, exit status 2)
before any work, and nothing is written."""
import csv
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, python
from safedata import data as D
from safedata.errors import UserError

SMOLLM2 = ROOT / "models" / "smollm2-135m-instruct"
SMOLLM2_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
DEFAULT_SYSTEM = "You are a placeholder helper named Tiny."
# A ChatML-like template that adds a default system prompt when the conversation has none, as SmolLM2's does.
DEFAULT_SYSTEM_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|system|>\n" + DEFAULT_SYSTEM + "' + eos_token + '\n' }}{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
MAPPED_FIELDS = "conversation=dialog,role=speaker,content=text,user=customer,assistant=agent"
STAGE_CLIS = ("get_gradients.py", "get_representation.py", "score.py", "finetune.py", "audit.py", "rank.py",
              "generate.py")


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def placeholder_pool(n, bad_line=None):
    """Alpaca records of made-up benign text; with bad_line, that (1-based) line has an empty instruction."""
    records = [{"instruction": f"Describe placeholder item {i}.", "input": "", "output": f"Item {i} is a shape."}
               for i in range(n)]
    if bad_line is not None:
        records[bad_line - 1]["instruction"] = ""
    return records


def write_jsonl(path, records, newline="\n"):
    path.write_bytes("".join(json.dumps(r, ensure_ascii=False) + newline for r in records).encode("utf-8"))
    return path


def write_anchors(path, n=4):
    return write_jsonl(path, [{"messages": [user(f"Placeholder request {i}"), assistant(f"Placeholder answer {i}")]}
                              for i in range(n)])


def run_cli(script, *args):
    return subprocess.run([python(), str(ROOT / script), *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)


def assert_refused(result, *fragments):
    """Exit status 2 and stderr one `error: ...` line holding every fragment: no traceback, and nothing logged
    before it (the check ran before any work)."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def default_system_model(tiny_model_dir, tmp_path_factory):
    """The tiny model, its chat template replaced by one with a default system prompt."""
    model = tmp_path_factory.mktemp("default_system") / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "chat_template.jinja").write_text(DEFAULT_SYSTEM_TEMPLATE)
    return model


def example(record):
    return D.to_example("x.jsonl", 0, 1, record, D.detect_kind(record))


def supervised(encoded):
    return [token for token, label in zip(encoded.input_ids, encoded.labels) if label != D.IGNORE_INDEX]


# ----------------------------------------------------------------------------- item 4: what is data


QUESTION = "Name a colour."
EMPTY_ANSWER = {
    "messages": {"messages": [user(QUESTION), assistant("")]},
    "sharegpt": {"conversations": [{"from": "human", "value": QUESTION}, {"from": "gpt", "value": ""}]},
    "longer": {"messages": [user("Name a shape."), assistant("A circle."), user(QUESTION), assistant("")]},
}


def test_an_empty_answer_is_data_in_every_format(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "empty.jsonl", list(EMPTY_ANSWER.values()))
    examples, skipped = D.load_examples(path)
    assert [e.index for e in examples] == [0, 1, 2] and not skipped
    alpaca = example({"instruction": QUESTION, "input": "", "output": ""})
    messages, sharegpt, longer = examples
    for template in ("paper", "chat", "plain"):
        a, b = D.encode(messages, tokenizer, template), D.encode(sharegpt, tokenizer, template)
        assert (a.input_ids, a.labels) == (b.input_ids, b.labels)
        assert a.n_supervised == D.encode(alpaca, tokenizer, template).n_supervised
    for template in ("paper", "plain"):  # the end token alone is supervised, as for an Alpaca record
        assert supervised(D.encode(messages, tokenizer, template)) == [tokenizer.eos_token_id]
    # a longer conversation: its last (empty) answer supervises the end token alone, as a single exchange does
    ids = D.encode(longer, tokenizer, "paper")
    runs = D.encode(example({"messages": EMPTY_ANSWER["longer"]["messages"][:2]}), tokenizer, "paper")
    assert supervised(ids) == supervised(runs) + [tokenizer.eos_token_id]


def test_a_system_prompt_equal_to_the_templates_default_is_kept(default_system_model):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(default_system_model)
    for system in (DEFAULT_SYSTEM, "Answer in one word."):
        messages = [{"role": "system", "content": system}, user(QUESTION), assistant("Blue."),
                    user("And another?"), assistant("Red.")]
        encoded = D.encode(example({"messages": messages}), tokenizer, "chat")
        rendering = tokenizer.apply_chat_template(messages, tokenize=False)
        assert encoded.input_ids == tokenizer(rendering, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(supervised(encoded)).replace(" ", "") == "Blue.</s>Red.</s>"
    # a template that really drops the system prompt is still refused
    tokenizer.chat_template = (ROOT / "ft_datasets" / "lab" / "model" / "chat_template.jinja").read_text()
    with pytest.raises(UserError, match="drops the system prompt"):
        D.encode(example({"messages": [{"role": "system", "content": DEFAULT_SYSTEM}, user(QUESTION),
                                       assistant("Blue.")]}), tokenizer, "chat")


@pytest.mark.skipif(not SMOLLM2.exists(), reason="models/smollm2-135m-instruct not built (make smollm2)")
def test_smollm2_conversation_with_its_default_system_prompt():
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(SMOLLM2)
    messages = [{"role": "system", "content": SMOLLM2_DEFAULT_SYSTEM}, user(QUESTION), assistant("Blue.")]
    # the case itself: with and without the system turn, the template renders the same text
    assert tokenizer.apply_chat_template(messages, tokenize=False) == \
        tokenizer.apply_chat_template(messages[1:], tokenize=False)
    ex = example({"messages": messages + [user("And another?"), assistant("Red.")]})
    encoded = D.encode(ex, tokenizer, "chat")
    assert tokenizer.decode(supervised(encoded)) == "Blue.<|im_end|>Red.<|im_end|>"
    assert D.prompt_text(example({"messages": messages + [user("And another?")]}), "chat", tokenizer).endswith(
        "<|im_start|>assistant\n")


SEPARATORS = ("\u2028", "\u2029", "\x85")


def test_line_separators_inside_json_strings_are_data(tmp_path):
    records = [{"instruction": f"Join two{s}lines.", "input": "", "output": f"One{s}two."} for s in SEPARATORS]
    path = write_jsonl(tmp_path / "separators.jsonl", records + [{"instruction": "", "output": "x"}])
    with pytest.raises(UserError, match=r"separators.jsonl:4: field 'instruction': empty"):  # lines still count
        D.load_examples(path)
    examples, skipped = D.load_examples(path, skip_bad=True)
    assert [(e.instruction, e.response, e.line) for e in examples] == \
        [(r["instruction"], r["output"], n) for n, r in enumerate(records, start=1)] and len(skipped) == 1
    kept = D.write_subset(path, [0, 2], tmp_path / "kept")
    lines = path.read_bytes().split(b"\n")
    assert kept.read_bytes() == lines[0] + b"\n" + lines[2] + b"\n"


def test_crlf_jsonl_comes_back_from_an_audit_with_its_own_bytes(tmp_path):
    from safedata.audit import AuditArgs, audit
    from safedata.methods.random_scores import score as random_score
    path = write_jsonl(tmp_path / "crlf.jsonl", placeholder_pool(6), newline="\r\n")
    random_score(str(path), str(tmp_path / "scores"), 0)
    summary = audit(AuditArgs(data_path=str(path), output_dir=str(tmp_path / "audit"),
                                scores_dir=str(tmp_path / "scores"), drop_k=2))
    lines = path.read_bytes().split(b"\r\n")[:-1]
    with open(tmp_path / "audit" / "flagged.csv", newline="") as handle:
        chosen = sorted(int(row["index"]) for row in csv.DictReader(handle))
    assert len(chosen) == summary["n_flagged"] == 2
    assert Path(summary["kept"]).read_bytes() == b"".join(lines[i] + b"\r\n" for i in range(6) if i not in chosen)
    assert Path(summary["flagged"]).read_bytes() == b"".join(lines[i] + b"\r\n" for i in chosen)


def test_every_edge_case_is_scored(tiny_model_dir, default_system_model, tmp_path):
    from safedata.features import gradients as G
    from safedata.store import read_json
    separators = [{"messages": [user(f"Join two{s}lines."), assistant(f"One{s}two.")]} for s in SEPARATORS]
    pool = write_jsonl(tmp_path / "pool.jsonl", list(EMPTY_ANSWER.values()) + separators, newline="\r\n")
    system = write_jsonl(tmp_path / "system.jsonl", [
        {"messages": [{"role": "system", "content": DEFAULT_SYSTEM}, user(QUESTION), assistant(answer)]}
        for answer in ("Blue.", "Red.", "")])
    mapped = write_jsonl(tmp_path / "mapped.jsonl", mapped_records())
    cases = ((pool, tiny_model_dir, "paper", 6, None), (system, default_system_model, "chat", 3, None),
             (mapped, tiny_model_dir, "chat", 3, MAPPED_FIELDS))
    for data, model, template, n, field_map in cases:
        out = tmp_path / f"scores_{data.stem}"
        assert G.score_pool(G.GradientArgs(model_name=str(model), data_path=str(data), output_dir=str(out),
                                           targets=[], template=template, batch_size=2, dtype="fp32",
                                           self_influence=True, field_map=field_map))
        rows = (out / "scores.csv").read_text().splitlines()[1:]
        assert [int(r.split(",")[0]) for r in rows] == list(range(n))
        meta = read_json(out / "meta.json")
        assert meta["n"] == n and not meta["nonfinite"] and not meta["skipped"] and not meta["excluded"]
        assert ("field_map" in meta) == bool(field_map)


def mapped_records(n=3):
    return [{"dialog": [{"speaker": "customer", "text": f"Placeholder question {i}"},
                        {"speaker": "agent", "text": f"Placeholder answer {i}"}]} for i in range(n)]


HELP_DRIVER = r"""
import contextlib, io, runpy, sys
for script in sys.argv[1:]:
    main = runpy.run_path(script)["main"]            # not run as __main__: defines main() only
    sys.argv, out = [script, "--help"], io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        main()
    print("=====", script)
    print(out.getvalue())
"""


def test_every_stage_cli_takes_field_map_and_names_what_it_reads(tiny_model_dir, tmp_path):
    result = subprocess.run([python(), "-c", HELP_DRIVER, *STAGE_CLIS], capture_output=True, text=True, cwd=ROOT,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    helps = {block.split("\n", 1)[0].strip(): block for block in result.stdout.split("===== ")[1:]}
    assert set(helps) == set(STAGE_CLIS)
    for script, text in helps.items():
        assert "--field_map" in text, script
    flat = " ".join(helps["score.py"].split())
    assert all(kind in flat for kind in (".parquet", ".arrow", "save_to_disk", "hf:owner/name")), flat

    mapped = write_jsonl(tmp_path / "mapped.jsonl", mapped_records())
    refused = run_cli("score.py", "--method", "random", "--data_path", mapped, "--output_dir", tmp_path / "no")
    line = assert_refused(refused, "mapped.jsonl:1: unknown record kind", "{conversations}", "--field_map")
    assert "{messages}" in line and not (tmp_path / "no").exists()
    done = run_cli("score.py", "--method", "random", "--data_path", mapped, "--output_dir", tmp_path / "random",
                   "--field_map", MAPPED_FIELDS)
    assert done.returncode == 0, done.stderr
    assert len((tmp_path / "random" / "scores.csv").read_text().splitlines()) == 4


def test_field_map_is_an_argument_of_each_stage_not_process_state(tiny_model_dir, tmp_path):
    """Stages run one after another in one process, each with its own --field_map: the mapped run reads the mapped
    records and records the mapping in its meta.json; the next run without one refuses them (nothing stayed
    behind), and a run of default records records no mapping."""
    from safedata.generation import GenerationArgs, generate_responses
    from safedata.methods.run import ScoreArgs, score
    from safedata.ranking import RankArgs, rank
    from safedata.store import read_json
    mapped = write_jsonl(tmp_path / "mapped.jsonl", mapped_records(4))
    assert score(ScoreArgs(method="random", data_path=str(mapped), output_dir=str(tmp_path / "s"),
                           field_map=MAPPED_FIELDS))
    assert read_json(tmp_path / "s" / "meta.json")["field_map"]["conversation"][0] == "dialog"
    summary = rank(RankArgs(data_path=str(mapped), output_dir=str(tmp_path / "sel"), scores_dir=str(tmp_path / "s"),
                            k=2, field_map=MAPPED_FIELDS))
    assert all("dialog" in json.loads(line) for line in Path(summary["subset"]).read_text().splitlines())
    with pytest.raises(UserError, match="mapped.jsonl: no usable records"):   # skipped: no mapping now
        rank(RankArgs(data_path=str(mapped), output_dir=str(tmp_path / "sel2"), scores_dir=str(tmp_path / "s"), k=2))
    assert generate_responses(GenerationArgs(model_name=str(tiny_model_dir), data_path=str(mapped),
                                             output_dir=str(tmp_path / "gen"), max_new_tokens=2, dtype="fp32",
                                             template="paper", field_map=MAPPED_FIELDS))
    assert read_json(tmp_path / "gen" / "meta.json")["field_map"]["roles"]["customer"] == "user"
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"messages": [user("Q."), assistant("A.")]}])
    assert score(ScoreArgs(method="random", data_path=str(plain), output_dir=str(tmp_path / "p")))
    assert "field_map" not in read_json(tmp_path / "p" / "meta.json")


# ----------------------------------------------------------------------------- item 5: no silent keeps, no waste


def test_audit_refuses_scores_that_skipped_a_bad_record_unless_told(tmp_path):
    from safedata.audit import AuditArgs, audit
    from safedata.methods.random_scores import score as random_score
    pool = write_jsonl(tmp_path / "pool.jsonl", placeholder_pool(5, bad_line=3))
    random_score(str(pool), str(tmp_path / "scores"), 0, skip_bad=True)
    refused = run_cli("audit.py", "--data_path", pool, "--scores", tmp_path / "scores", "--drop_k", "1",
                      "--output_dir", tmp_path / "audit")
    assert_refused(refused, "pool.jsonl:3", "--skip_bad")
    assert not (tmp_path / "audit").exists()
    summary = audit(AuditArgs(data_path=str(pool), output_dir=str(tmp_path / "audit"),
                                scores_dir=str(tmp_path / "scores"), drop_k=1, skip_bad=True))
    meta = json.loads((tmp_path / "audit" / "meta.json").read_text())
    assert meta["settings"]["skip_bad"] is True and summary["n_records"] == 5 and summary["n_scored"] == 4
    assert len(meta["skipped"]) == 1 and "pool.jsonl:3: field 'instruction': empty" in meta["skipped"][0]


@pytest.mark.parametrize("case", ["empty data", "bad data", "bad anchors", "batch size 0"])
def test_audit_checks_every_input_before_any_work(tiny_model_dir, tmp_path, case):
    data = write_jsonl(tmp_path / "pool.jsonl", placeholder_pool(4, bad_line=2 if case == "bad data" else None))
    if case == "empty data":
        data.write_text("")
    first = write_anchors(tmp_path / "anchors_a.jsonl")
    second = write_anchors(tmp_path / "anchors_b.jsonl")
    if case == "bad anchors":
        second.write_text('{"messages": [{"role": "user", "content": "Placeholder request"}]}\n')
    out = tmp_path / "audit"
    result = run_cli("audit.py", "--data_path", data, "--model_name", tiny_model_dir, "--anchors", first, second,
                     "--drop_k", "1", "--dtype", "fp32", "--output_dir", out,
                     *(["--batch_size", "0"] if case == "batch size 0" else []))
    expected = {"empty data": "pool.jsonl:1: empty file", "bad data": "pool.jsonl:2: field 'instruction': empty",
                "bad anchors": "anchors_b.jsonl:1: field 'messages': no assistant turn",
                "batch size 0": "--batch_size 0: must be at least 1"}[case]
    assert_refused(result, expected)
    assert not out.exists()


@pytest.mark.parametrize("script, flags", [
    ("get_gradients.py", ["--anchor", "--batch_size", "0"]),
    ("get_gradients.py", ["--anchor", "--max_response_length", "0"]),
    ("get_gradients.py", ["--proj_dim", "0"]),
    ("score.py", ["--method", "compliance", "--anchors", "A", "B", "--batch_size", "0"]),
])
def test_size_flags_are_refused_before_any_file(tiny_model_dir, tmp_path, script, flags):
    data = write_anchors(tmp_path / "anchors.jsonl")
    flags = [str(data) if f in ("A", "B") else f for f in flags]
    out = tmp_path / "out"
    result = run_cli(script, *(["--model_name", tiny_model_dir] + ["--data_path", data, "--output_dir", out] + flags))
    flag, value = next((f, v) for f, v in zip(flags, flags[1:]) if f.startswith("--") and v.lstrip("-").isdigit())
    assert_refused(result, f"{flag} {value}: must be at least 1")
    assert not out.exists()


def test_slurm_job_stops_when_its_python_lacks_torch(tmp_path):
    project = tmp_path / "project"
    (project / ".venv" / "bin").mkdir(parents=True)
    shutil.copy(ROOT / "finetune_evaluation.slurm", project)
    (project / "finetune.py").write_text("")
    fake = project / ".venv" / "bin" / "python"   # a venv without torch: every import of it fails
    fake.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'torch'\" >&2\nexit 1\n")
    fake.chmod(0o755)
    (project / "subset.json").write_text(json.dumps(placeholder_pool(2)))
    (project / "prompts.csv").write_text("Placeholder prompt\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "SLURM_SUBMIT_DIR")}
    env.update(PROJECT_DIR=str(project), SUBSET="subset.json", EVAL_PROMPTS="prompts.csv", OUTPUT_ROOT="runs",
               SEEDS="1")
    result = subprocess.run(["bash", str(project / "finetune_evaluation.slurm")], capture_output=True, text=True,
                            env=env, timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("error: .venv/bin/python cannot import torch")
    assert not (project / "runs").exists()
