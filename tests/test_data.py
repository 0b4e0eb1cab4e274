import json

import pytest
import torch

from safedata import data as D
from safedata.errors import InputError, UserError
from safedata.models import load_tokenizer


def ex(instruction, inp="", response="An answer.", kind="alpaca"):
    return D.Example(0, "x", kind, instruction, inp, response)


GOLDEN_PAPER_INPUT = (
    "[INST] <<SYS>>\nBelow is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n<</SYS>>\n\n"
    "### Instruction:\nTranslate the text.\n\n### Input:\nBonjour\n\n### Response:\n [/INST]")
GOLDEN_PAPER_NO_INPUT = (
    "[INST] <<SYS>>\nBelow is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n<</SYS>>\n\n### Instruction:\nName a color.\n\n### Response:\n [/INST]")
GOLDEN_PAPER_DOLLY = (
    "[INST] <<SYS>>\nBelow is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n<</SYS>>\n\n### Instruction:\nWho wrote it?\n\nInput:\nSome context.\n\n### Response:\n [/INST]")
GOLDEN_PAPER_CHAT = (
    "[INST] <<SYS>>\nBelow is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n<</SYS>>\n\nA user turn. [/INST]")


def test_paper_template_golden_strings():
    assert D.prompt_text(ex("Translate the text.", "Bonjour"), "paper") == GOLDEN_PAPER_INPUT
    assert D.prompt_text(ex("Name a color."), "paper") == GOLDEN_PAPER_NO_INPUT
    assert D.prompt_text(ex("Name a color.", "   "), "paper") == GOLDEN_PAPER_NO_INPUT
    assert D.prompt_text(ex("Who wrote it?", "Some context.", kind="dolly"), "paper") == GOLDEN_PAPER_DOLLY
    assert D.prompt_text(ex("A user turn.", kind="chat"), "paper") == GOLDEN_PAPER_CHAT
    assert D.prompt_text(ex("Name a color.", kind="gsm8k"), "paper") == GOLDEN_PAPER_NO_INPUT


def test_plain_template_golden():
    assert D.prompt_text(ex("Do it.", "with this"), "plain") == "Do it.\n\nwith this\n"
    assert D.prompt_text(ex("Do it."), "plain") == "Do it.\n"


@pytest.mark.parametrize("template", ["paper", "plain", "chat"])
def test_mask_boundary_exact(tiny_model_dir, template):
    tok = load_tokenizer(tiny_model_dir)
    e = ex("Give three tips for staying healthy.", "", "1. Eat well.\n2. Sleep enough.\n3. Move.")
    enc = D.encode(e, tok, template)
    n_prompt = sum(1 for t in enc.labels if t == D.IGNORE_INDEX)
    prompt_part, response_part = enc.input_ids[:n_prompt], enc.input_ids[n_prompt:]
    # no prompt token supervised, every response token supervised, labels equal ids where supervised
    assert all(t == D.IGNORE_INDEX for t in enc.labels[:n_prompt])
    assert enc.labels[n_prompt:] == response_part
    assert response_part[-1] == tok.eos_token_id
    assert prompt_part == D.prompt_ids(e, template, tok)
    decoded = tok.decode(response_part, skip_special_tokens=True)
    assert decoded.strip() == e.response
    assert tok.decode(prompt_part, skip_special_tokens=True).strip().endswith(
        {"paper": "[/INST]", "plain": "staying healthy.", "chat": "[/INST]"}[template])


def test_plain_token_ids_follow_spec(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    e = ex("Add the numbers.", "2 and 3", "5")
    enc = D.encode(e, tok, "plain")
    expected = tok("Add the numbers.\n\n2 and 3\n")["input_ids"] + tok("5", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert enc.input_ids == expected
    assert enc.input_ids[0] == tok.bos_token_id


def test_max_response_and_max_length(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    e = ex("Write a long answer.", "", "word " * 40)
    full = D.encode(e, tok, "paper")
    short = D.encode(e, tok, "paper", max_response_length=10)
    assert short.n_supervised == 10 and short.input_ids == full.input_ids[:len(short.input_ids)]
    n_prompt = len(full) - full.n_supervised
    encoded, excluded = D.encode_examples([e], tok, "paper", max_length=n_prompt)
    assert encoded == [] and len(excluded) == 1 and excluded[0].id == "x"
    encoded, excluded = D.encode_examples([e], tok, "paper", max_length=n_prompt + 3)
    assert encoded[0].n_supervised == 3 and not excluded


def test_bucketed_batches_cover_all_once():
    lengths = [5, 9, 1, 9, 3, 7, 2]
    batches = D.length_bucketed_batches(lengths, 3)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(7)) and batches[0] == [1, 3, 5]
    assert all(len(b) <= 3 for b in batches)


def test_collate_right_and_left():
    items = [D.Encoded(0, "a", [1, 5, 6], [-100, 5, 6]), D.Encoded(1, "b", [1, 7], [-100, 7])]
    right = D.collate(items, pad_id=3)
    assert right["input_ids"].tolist() == [[1, 5, 6], [1, 7, 3]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert right["labels"].tolist() == [[-100, 5, 6], [-100, 7, -100]]
    left = D.collate(items, pad_id=3, padding_side="left")
    assert left["input_ids"].tolist() == [[1, 5, 6], [3, 1, 7]]


# ----------------------------------------------------------------------------- real files


def test_load_real_alpaca(shared_data):
    path = shared_data / "paper/ft_datasets/alpaca_dataset/alpaca_data.json"
    examples, skipped = D.load_examples(path)
    assert len(examples) == 52002 and skipped == []
    raw = json.loads(path.read_text())
    empty = [i for i, r in enumerate(raw) if not r["output"].strip()]
    assert len(empty) == 28 and D.empty_response_indices(examples) == empty  # 28 empty outputs upstream: kept
    first = examples[0]
    assert first.index == 0 and first.kind == "alpaca" and first.instruction == "Give three tips for staying healthy."
    assert first.line == 2


def test_empty_response_is_an_eos_only_example(tiny_model_dir, tmp_path):
    tok = load_tokenizer(tiny_model_dir)
    path = tmp_path / "pool.json"
    path.write_text(json.dumps([{"instruction": "Say nothing.", "input": "", "output": ""},
                                {"instruction": "Say nothing.", "input": "", "output": "  "}]))
    examples, skipped = D.load_examples(path)
    assert skipped == [] and D.empty_response_indices(examples) == [0, 1]
    for example in examples:
        enc = D.encode(example, tok, "paper")
        prompt = D.prompt_ids(example, "paper", tok)
        assert enc.input_ids == prompt + [tok.eos_token_id]               # the end token alone is supervised
        assert enc.labels == [D.IGNORE_INDEX] * len(prompt) + [tok.eos_token_id]


def test_original_quirks_supervise_a_trailing_space(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    e = ex("Name a color.", "", "Blue.")
    prompt = D.prompt_text(e, "paper")
    # The original: encode(prompt + " " + response + " ") + [eos], labels masked over encode(prompt).
    expected = tok(prompt + " Blue. ")["input_ids"] + [tok.eos_token_id]
    n_prompt = len(tok(prompt)["input_ids"])
    quirky = D.encode(e, tok, "paper", original_quirks=True)
    assert quirky.input_ids == expected
    assert quirky.labels == [D.IGNORE_INDEX] * n_prompt + expected[n_prompt:]
    plain = D.encode(e, tok, "paper")
    assert plain.input_ids == tok(prompt + " Blue.")["input_ids"] + [tok.eos_token_id]
    assert quirky.n_supervised > plain.n_supervised                       # the space is one more supervised token
    assert D.encode(ex("Say nothing.", "", ""), tok, "paper", original_quirks=True).input_ids == \
        tok(D.prompt_text(ex("Say nothing."), "paper") + "  ")["input_ids"] + [tok.eos_token_id]
    with pytest.raises(UserError, match="--original_quirks"):
        D.encode(e, tok, "chat", original_quirks=True)


def test_json_array_errors_name_the_record(tmp_path):
    path = tmp_path / "one_line.json"
    path.write_text(json.dumps([{"instruction": "a", "input": "", "output": "b"}] * 17
                               + [{"instruction": "a", "input": "", "output": 3}]))
    with pytest.raises(InputError, match=r"one_line.json:1 \(record 17\): field 'output': expected a string") as info:
        D.load_examples(path)
    assert info.value.record == 17
    examples, skipped = D.load_examples(path, skip_bad=True)
    assert len(examples) == 17 and skipped == [str(info.value)]


def test_data_path_directory_is_one_line_error(tmp_path):
    with pytest.raises(UserError, match="is a directory"):
        D.load_examples(tmp_path)


def test_load_real_gsm8k_dolly_anchors_advbench(shared_data):
    gsm, _ = D.load_examples(shared_data / "paper/ft_datasets/gsm8k/gsm8k_train.jsonl")
    assert len(gsm) == 7473 and gsm[0].kind == "gsm8k" and gsm[0].response.endswith("#### 72")
    dolly, _ = D.load_examples(shared_data / "paper/ft_datasets/dolly_dataset/databricks-dolly-15k-safety-only.jsonl")
    assert len(dolly) == 387 and dolly[0].kind == "dolly"
    anchors, _ = D.load_examples(shared_data / "paper/ft_datasets/pure_bad_dataset/pure-bad-illegal-activities-selected10.jsonl")
    assert len(anchors) == 10 and anchors[0].kind == "chat" and anchors[0].response
    adv, _ = D.load_examples(shared_data / "advbench/harmful_behaviors.csv", need_response=False)
    assert len(adv) == 520 and adv[0].kind == "advbench" and adv[0].response is None
    paper_adv, _ = D.load_examples(shared_data / "paper/safety_evaluation/data/harmful_behaviors.csv", need_response=False)
    assert len(paper_adv) == 520 and paper_adv[0].kind == "prompt"
    assert [e.instruction for e in paper_adv] == [e.instruction for e in adv]


def test_ids_are_content_hashes(shared_data):
    top, _ = D.load_examples(shared_data / "paper/ft_datasets/alpaca_dataset/gradient-illegal-activities-anchor/alpaca_top100.json")
    pool, _ = D.load_examples(shared_data / "paper/ft_datasets/alpaca_dataset/alpaca_data.json", skip_bad=True)
    pool_ids = {e.id for e in pool}
    assert all(e.id in pool_ids for e in top)  # the released selections are Alpaca records, found by content


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("content,suffix,pattern", [
    ('[{"instruction": "a", "input": "", "output": "b"},\n {"instruction": "a", "input": "", "output": 3}]', ".json",
     r"bad.json:2 \(record 1\): field 'output': expected a string, found int"),
    ('{"instruction": "a", "output": "b"}\n{"instruction": "", "output": "b"}\n', ".jsonl",
     r"bad.jsonl:2: field 'instruction': empty"),
    ('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": "b"\n', ".jsonl", r"bad.jsonl:2: malformed JSON"),
    ('{"instruction": "a", "output": "b"}\n{"question": "q", "answer": "a"}\n', ".jsonl",
     r"bad.jsonl:2: field 'instruction': record is gsm8k, but the file's first record is alpaca"),
    ('{"foo": 1}\n', ".jsonl", r"bad.jsonl:1: unknown record kind"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', ".jsonl", r"bad.jsonl:1: field 'messages': no assistant turn"),
    ("name,age\nx,1\n", ".csv", r"bad.csv:1: unexpected CSV header"),
    ("", ".jsonl", r"bad.jsonl:1: empty file"),
    ("[]", ".json", r"bad.json:.*no records"),
])
def test_bad_records_one_line_errors(tmp_path, content, suffix, pattern):
    path = tmp_path / f"bad{suffix}"
    path.write_text(content)
    with pytest.raises(InputError, match=pattern) as info:
        D.load_examples(path)
    assert "\n" not in str(info.value)


def test_non_utf8(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "\xff", "output": "b"}\n')
    with pytest.raises(InputError, match=r"bad.jsonl:2: not valid UTF-8"):
        D.load_examples(path)


def test_skip_bad_counts_and_keeps_indices(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "", "output": "b"}\n{"instruction": "c", "output": "d"}\n')
    examples, skipped = D.load_examples(path, skip_bad=True)
    assert [e.index for e in examples] == [0, 2] and len(skipped) == 1 and "mixed.jsonl:2" in skipped[0]


def test_duplicates_refused_when_asked(tmp_path):
    path = tmp_path / "dup.json"
    path.write_text(json.dumps([{"instruction": "a", "input": "", "output": "b"}] * 2))
    examples, _ = D.load_examples(path)
    assert examples[0].id == examples[1].id
    with pytest.raises(InputError, match="duplicate of the record on line 1"):
        D.load_examples(path, allow_duplicates=False)
