"""Multi-turn conversations: every assistant turn supervised and nothing else, exactly as the templates render."""
import json
import subprocess

import pytest

from conftest import ROOT, python
from safedata.data import conversations as C
from safedata import data as D
from safedata.errors import InputError, UserError

SYSTEM = "You answer in one short sentence."
TURNS = [("Name a fruit that is red.", "An apple is red."),
         ("And one that is yellow?", "A banana is yellow."),
         ("Which of them grows on a tree?", "Both grow on plants; the apple grows on a tree.")]


def openai(system=SYSTEM, turns=TURNS):
    messages = [{"role": "system", "content": system}] if system else []
    for user, assistant in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return {"messages": messages}


def sharegpt(system=SYSTEM, turns=TURNS):
    conversation = [{"from": "system", "value": system}] if system else []
    for user, assistant in turns:
        conversation += [{"from": "human", "value": user}, {"from": "gpt", "value": assistant}]
    return {"conversations": conversation}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def example(record, need_response=True, field_map=D.DEFAULT_FIELD_MAP):
    return D.to_example("x.jsonl", 0, 1, record, D.detect_kind(record, field_map), need_response=need_response,
                        field_map=field_map)


def supervised_runs(encoded):
    """Contiguous runs of supervised token ids, in order."""
    runs, current = [], []
    for token, label in zip(encoded.input_ids, encoded.labels):
        if label != D.IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


# ----------------------------------------------------------------------------- the paper's Llama-2 wrapper


def llama2_rendering(system, turns):
    """The Llama-2 chat format, written out by hand."""
    text = ""
    for number, (user, assistant) in enumerate(turns):
        head = f"<<SYS>>\n{system}\n<</SYS>>\n\n" if number == 0 else ""
        text += f"<s>[INST] {head}{user} [/INST] {assistant}</s>"
    return text


def test_paper_wrapper_renders_llama2_format_and_supervises_each_answer(tokenizer):
    encoded = D.encode(example(openai()), tokenizer, "paper")
    assert tokenizer.decode(encoded.input_ids) == llama2_rendering(SYSTEM, TURNS)
    runs = supervised_runs(encoded)
    assert [tokenizer.decode(r) for r in runs] == [f" {a}</s>" for _, a in TURNS]
    # turn by turn: each exchange is the single-exchange tokenization of its own prompt and answer
    at = 0
    for number, (user, assistant) in enumerate(TURNS):
        prompt = (f"[INST] <<SYS>>\n{SYSTEM}\n<</SYS>>\n\n{user} [/INST]" if number == 0 else f"[INST] {user} [/INST]")
        whole = tokenizer(prompt + " " + assistant)["input_ids"] + [tokenizer.eos_token_id]
        assert encoded.input_ids[at:at + len(whole)] == whole
        n_prompt = len(tokenizer(prompt)["input_ids"])
        assert set(encoded.labels[at:at + n_prompt]) == {D.IGNORE_INDEX}
        assert encoded.labels[at + n_prompt:at + len(whole)] == whole[n_prompt:]
        at += len(whole)
    assert at == len(encoded.input_ids)


def test_paper_default_system_prompt_when_none_given(tokenizer):
    encoded = D.encode(example(openai(system=None)), tokenizer, "paper")
    assert tokenizer.decode(encoded.input_ids) == llama2_rendering(D.SYS_NO_INPUT, TURNS)


# ----------------------------------------------------------------------------- the tokenizer's chat template

# The tiny template with {% generation %} markers: transformers then returns its own assistant-token mask,
# an independent reference for ours (the markers render nothing, so the text is the same).
MARKED = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' and loop.index0 == 1 and messages[0]['role'] == 'system' %}"
    "{{ '[INST] <<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{% generation %}{{ ' ' + message['content'] + ' ' + eos_token }}"
    "{% endgeneration %}{% endif %}{% endfor %}"
)


@pytest.mark.parametrize("system", [SYSTEM, None])
def test_chat_template_masks_equal_the_templates_assistant_mask(tokenizer, system):
    record = openai(system=system)
    encoded = D.encode(example(record), tokenizer, "chat")
    rendering = tokenizer.apply_chat_template(record["messages"], tokenize=False)
    assert encoded.input_ids == tokenizer(rendering, add_special_tokens=False)["input_ids"]
    if system:
        assert f"<<SYS>>\n{system}\n<</SYS>>" in rendering
    reference = tokenizer.apply_chat_template(record["messages"], chat_template=MARKED, tokenize=True,
                                              return_dict=True, return_assistant_tokens_mask=True)
    assert reference["input_ids"] == encoded.input_ids
    assert [bool(m) for m in reference["assistant_masks"]] == [l != D.IGNORE_INDEX for l in encoded.labels]
    assert [tokenizer.decode(r) for r in supervised_runs(encoded)] == [f" {a} </s>" for _, a in TURNS]


def test_chat_generation_prompt_is_the_templates(tokenizer):
    record = openai()
    record["messages"] = record["messages"][:-1]  # ends with a user turn
    ex = example(record, need_response=False)
    assert D.prompt_text(ex, "chat", tokenizer) == tokenizer.apply_chat_template(
        record["messages"], tokenize=False, add_generation_prompt=True)
    assert D.prompt_text(ex, "paper", tokenizer) == llama2_rendering(SYSTEM, TURNS[:2])[len("<s>"):] + \
        f"<s>[INST] {TURNS[2][0]} [/INST]"


def test_template_that_drops_the_system_prompt_is_refused(tokenizer):
    lab_template = (ROOT / "ft_datasets" / "lab" / "model" / "chat_template.jinja").read_text()
    tokenizer = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = lab_template
    with pytest.raises(UserError, match="drops the system prompt"):
        D.encode(example(openai()), tokenizer, "chat")
    assert D.encode(example(openai(system=None)), tokenizer, "chat").n_supervised > 0


# ----------------------------------------------------------------------------- formats and single exchanges


@pytest.mark.parametrize("template", ["paper", "chat"])
def test_sharegpt_and_openai_give_the_same_tokens(tokenizer, template):
    for system, turns in ((SYSTEM, TURNS), (None, TURNS), (None, TURNS[:1])):
        a = D.encode(example(openai(system, turns)), tokenizer, template)
        b = D.encode(example(sharegpt(system, turns)), tokenizer, template)
        assert (a.input_ids, a.labels) == (b.input_ids, b.labels)


# The paper's Llama-2 wrapper of a chat record (its anchors' format) with no system turn, written out: the
# default system prompt in a <<SYS>> block, then the user's words as they are.
PAPER_CHAT_PROMPT = (
    "[INST] <<SYS>>\nBelow is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n<</SYS>>\n\n{user} [/INST]")


@pytest.mark.parametrize("template", ["paper", "chat", "plain"])
def test_single_exchange_encodes_exactly_as_before(tokenizer, template):
    """A one-exchange conversation is one Example, encoded as a single exchange was before conversations: the
    ids and labels are built here from the template's text and the tokenizer (or its chat template) alone."""
    user, answer = TURNS[0]
    record = openai(system=None, turns=TURNS[:1])
    ex = example(record)
    assert ex.messages is None and (ex.instruction, ex.response) == TURNS[0]
    eos = tokenizer.eos_token_id
    if template == "paper":   # as the paper: tokenize the prompt, and prompt + " " + answer; then EOS
        prompt = PAPER_CHAT_PROMPT.format(user=user)
        prompt_ids = tokenizer(prompt)["input_ids"]
        ids = tokenizer(prompt + " " + answer)["input_ids"] + [eos]
        n_prompt = len(prompt_ids)
        assert ids[:n_prompt] == prompt_ids      # the paper's split is exact only then
        supervised = [False] * n_prompt + [True] * (len(ids) - n_prompt)
        assert tokenizer.decode(ids) == f"<s>{prompt} {answer}</s>"
    elif template == "chat":  # transformers' own tokenization and assistant mask ({% generation %} markers)
        rendered = tokenizer.apply_chat_template(record["messages"], chat_template=MARKED, tokenize=True,
                                                 return_dict=True, return_assistant_tokens_mask=True)
        assert tokenizer.apply_chat_template(record["messages"], tokenize=False) == \
            tokenizer.apply_chat_template(record["messages"], chat_template=MARKED, tokenize=False)
        ids, supervised = rendered["input_ids"], [bool(m) for m in rendered["assistant_masks"]]
        assert tokenizer.decode([t for t, m in zip(ids, supervised) if m]) == f" {answer} </s>"
    else:                     # plain: BOS + the instruction and a newline, then the answer's tokens and EOS
        prompt_ids = tokenizer(user + "\n")["input_ids"]
        ids = prompt_ids + tokenizer(answer, add_special_tokens=False)["input_ids"] + [eos]
        supervised = [False] * len(prompt_ids) + [True] * (len(ids) - len(prompt_ids))
    assert supervised[-1] and not supervised[0] and sum(supervised) >= 2
    encoded = D.encode(ex, tokenizer, template)
    assert encoded.input_ids == ids
    assert encoded.labels == [t if m else D.IGNORE_INDEX for t, m in zip(ids, supervised)]


def test_every_turn_is_used_not_only_the_first(tokenizer):
    ex = example(openai(system=None))
    assert ex.messages is not None and len(supervised_runs(D.encode(ex, tokenizer, "paper"))) == 3
    assert all(a in ex.response for _, a in TURNS)  # composition statistics see every answer


def test_max_response_length_keeps_the_first_supervised_tokens(tokenizer):
    full = D.encode(example(openai()), tokenizer, "chat")
    cut = D.encode(example(openai()), tokenizer, "chat", max_response_length=5)
    assert cut.n_supervised == 5 and cut.labels[-1] != D.IGNORE_INDEX
    assert cut.input_ids == full.input_ids[:len(cut.input_ids)]


def test_field_mapping_loads_other_names(tokenizer):
    record = {"dialog": [{"speaker": "customer", "text": u} if i % 2 == 0 else {"speaker": "agent", "text": u}
                         for i, u in enumerate(x for pair in TURNS for x in pair)]}
    assert D.detect_kind(record) is None
    field_map = C.FieldMap.parse("conversation=dialog,role=speaker,content=text,user=customer,assistant=agent")
    mapped = D.encode(example(record, field_map=field_map), tokenizer, "chat")
    assert D.detect_kind(record) is None   # the mapping is an argument: nothing of it stays behind
    reference = D.encode(example(openai(system=None)), tokenizer, "chat")
    assert (mapped.input_ids, mapped.labels) == (reference.input_ids, reference.labels)
    with pytest.raises(UserError, match="unknown key"):
        C.FieldMap.parse("speaker=x")


@pytest.mark.parametrize("messages, field, problem", [
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "messages[1]", "expected an assistant turn"),
    ([{"role": "assistant", "content": "a"}], "messages[0]", "expected a user turn"),
    ([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}], "messages[1].role", "unknown role 'tool'"),
    ([{"role": "system", "content": "s"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": 3}],
     "messages[2].content", "expected string content"),
])
def test_bad_conversations_name_turn_and_field(messages, field, problem):
    with pytest.raises(InputError) as err:
        D.to_example("x.jsonl", 0, 7, {"messages": messages}, "chat")
    assert f"x.jsonl:7: field '{field}':" in str(err.value) and problem in str(err.value)


def test_bad_conversation_exits_2_with_one_line(tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(openai()) + "\n" + json.dumps({"conversations": [{"from": "gpt", "value": "x"}]}) + "\n")
    result = subprocess.run([python(), str(ROOT / "get_representation.py"), "--model_name", tiny_model_dir,
                             "--data_path", str(bad), "--output_dir", str(tmp_path / "out")],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == \
        f"error: {bad}:2: field 'conversations[0]': expected a user turn, found assistant (turns alternate user, " \
        "assistant after an optional system turn)"
