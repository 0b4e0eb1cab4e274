"""Examples -> token ids and label masks (labels -100 on everything but the answers and their end tokens) ->
length-bucketed, padded batches. Training, features and the loss of every stage encode here."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..errors import UserError
from ..progress import progress
from .conversations import ASSISTANT
from .prompts import (SYS_NO_INPUT, check_system_rendered, paper_pieces, prompt_text, render_chat,
                      require_chat_template, user_turn)
from .records import Example, Excluded

log = logging.getLogger(__name__)


IGNORE_INDEX = -100


@dataclass
class Encoded:
    index: int
    id: str
    input_ids: list[int]
    labels: list[int]
    cut: int = 0            # tokens --max_length cut off the end

    @property
    def n_supervised(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)

    def __len__(self) -> int:
        return len(self.input_ids)


def _ids(tokenizer, text, special):
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def paper_answer_ids(tokenizer, prompt: str, prompt_ids: list[int], answer: str, original_quirks=False) -> list[int]:
    """An answer's token ids under the paper's wrapper, before the end token: as the paper, what tokenizing
    `prompt + " " + answer` adds to the prompt's tokens (exact when those are a prefix; else the answer alone).
    An empty or blank answer has none, in a single exchange or a conversation alike: the end token alone is
    supervised (a lone " " would otherwise become a supervised token). original_quirks: the original's
    `prompt + " " + answer + " "`, whose trailing space is a supervised token even after an empty answer."""
    if not answer.strip() and not original_quirks:
        return []
    text = " " + answer + (" " if original_quirks else "")
    full = _ids(tokenizer, prompt + text, True)
    return full[len(prompt_ids):] if full[: len(prompt_ids)] == prompt_ids else _ids(tokenizer, text, False)


def paper_ids(messages: list[dict], tokenizer, default_system: str) -> tuple[list[int], list[int]]:
    """Each exchange is tokenized as the single-exchange paper path does (BOS + prompt, the answer's tokens
    (paper_answer_ids), EOS), and the exchanges are concatenated."""
    ids, labels = [], []
    for prompt, answer in paper_pieces(messages, default_system):
        p = _ids(tokenizer, prompt, True)
        ids += p
        labels += [IGNORE_INDEX] * len(p)
        if answer is None:
            continue
        r = paper_answer_ids(tokenizer, prompt, p, answer)
        if tokenizer.eos_token_id is not None:
            r = r + [tokenizer.eos_token_id]
        ids += r
        labels += r
    return ids, labels


def chat_ids(messages: list[dict], tokenizer) -> tuple[list[int], list[int]]:
    """Token ids of the template's own rendering of the whole conversation; supervised: each assistant turn's
    span, from the end of the rendering up to its generation prompt to the end of the rendering up to it
    (trailing whitespace belongs to what follows). Tokenized whole when every boundary falls between tokens
    (then ids == tokenizer(rendering)); else piece by piece."""
    check_system_rendered(tokenizer, messages)
    full = render_chat(tokenizer, messages, False)
    cuts = []  # character offsets: (answer start, answer end) per assistant turn
    for k, message in enumerate(messages):
        if message["role"] != ASSISTANT:
            continue
        before = render_chat(tokenizer, messages[:k], True)
        through = render_chat(tokenizer, messages[: k + 1], False).rstrip()
        if not (full.startswith(through) and through.startswith(before)):
            raise UserError("--template chat: the chat template's rendering of a conversation does not extend its "
                            "rendering up to each assistant turn; use --template paper or plain")
        cuts.append((len(before), len(through)))
    whole = _ids(tokenizer, full, False)
    boundaries = sorted({c for pair in cuts for c in pair})
    token_at = {}
    for b in boundaries:
        prefix = _ids(tokenizer, full[:b], False)
        if whole[: len(prefix)] != prefix:
            break
        token_at[b] = len(prefix)
    if len(token_at) == len(boundaries):
        ids = whole
        labels = [IGNORE_INDEX] * len(ids)
        for start, end in cuts:
            labels[token_at[start]:token_at[end]] = ids[token_at[start]:token_at[end]]
        return ids, labels
    ids, labels, at = [], [], 0
    for start, end in cuts:
        prompt, answer = _ids(tokenizer, full[at:start], False), _ids(tokenizer, full[start:end], False)
        ids += prompt + answer
        labels += [IGNORE_INDEX] * len(prompt) + answer
        at = end
    tail = _ids(tokenizer, full[at:], False)
    return ids + tail, labels + [IGNORE_INDEX] * len(tail)


def token_ids(example: Example, template: str, tokenizer, original_quirks=False) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids incl. the end token) for a record with a response.

    original_quirks: as the original code, `prompt + " " + response + " "` (the trailing space is a
    supervised token before the end token); --template paper only.
    """
    if original_quirks and template != "paper":
        raise UserError(f"--original_quirks reproduces the original's paper template; not with --template {template}")
    prompt = prompt_text(example, template, tokenizer)
    eos = tokenizer.eos_token_id
    if template == "plain":
        p = _ids(tokenizer, prompt, True)
        r = _ids(tokenizer, example.response, False)
    elif template == "paper":
        p = _ids(tokenizer, prompt, True)
        r = paper_answer_ids(tokenizer, prompt, p, example.response, original_quirks)
    else:
        conversation = [{"role": "user", "content": user_turn(example)},
                        {"role": "assistant", "content": example.response}]
        full_text = tokenizer.apply_chat_template(conversation, tokenize=False).rstrip()
        if not full_text.startswith(prompt):
            raise UserError("--template chat: the chat template's rendering of [user, assistant] does not start "
                            "with its generation prompt; use --template paper or plain")
        p = _ids(tokenizer, prompt, False)
        full = _ids(tokenizer, full_text, False)
        r = full[len(p):] if full[: len(p)] == p else _ids(tokenizer, full_text[len(prompt):], False)
        if r and r[-1] in set(tokenizer.all_special_ids):
            return p, r  # the template closed the turn with its own end token
    if eos is not None and (not r or r[-1] != eos):
        r = r + [eos]
    return p, r


def conversation_ids(example: Example, template: str, tokenizer) -> tuple[list[int], list[int]]:
    """(ids, labels) of a multi-turn conversation: every assistant turn (+ its end token) supervised."""
    if template == "paper":
        return paper_ids(example.messages, tokenizer, SYS_NO_INPUT)
    if template == "chat":
        require_chat_template(tokenizer)
        return chat_ids(example.messages, tokenizer)
    raise UserError(f"--template {template}: multi-turn conversations need --template paper or chat")


def _keep_supervised(ids, labels, n):
    """Cut after the n-th supervised token (--max_response_length for conversations)."""
    seen = 0
    for position, label in enumerate(labels):
        seen += label != IGNORE_INDEX
        if seen == n:
            return ids[: position + 1], labels[: position + 1]
    return ids, labels


def _encode_conversation(example: Example, tokenizer, template, max_length, max_response_length) -> Encoded:
    ids, labels = conversation_ids(example, template, tokenizer)
    if max_response_length is not None:
        ids, labels = _keep_supervised(ids, labels, max_response_length)
    return _cut(example, ids, labels, max_length)


def _cut(example: Example, ids, labels, max_length) -> Encoded:
    """The one place --max_length cuts: the first max_length tokens, and how many were cut off (Encoded.cut)."""
    cut = max(0, len(ids) - max_length) if max_length is not None else 0
    if cut:
        ids, labels = ids[:max_length], labels[:max_length]
    return Encoded(example.index, example.id, ids, labels, cut)


def encode(example: Example, tokenizer, template="paper", max_length=None, max_response_length=None,
           original_quirks=False) -> Encoded:
    if example.messages is not None:
        if original_quirks:
            raise UserError(f"example {example.id}: --original_quirks reproduces the original code, which reads "
                            "single exchanges only; this record is a multi-turn conversation")
        return _encode_conversation(example, tokenizer, template, max_length, max_response_length)
    p, r = token_ids(example, template, tokenizer, original_quirks)
    if max_response_length is not None:
        r = r[:max_response_length]
    return _cut(example, p + r, [IGNORE_INDEX] * len(p) + list(r), max_length)


class Encoding(tuple):
    """encode_examples' result: unpacks as (encoded, excluded); n_cut: how many examples --max_length cut (the
    excluded ones among them), n: how many were encoded in all, max_length: the cut (None: none)."""

    def __new__(cls, encoded, excluded, n_cut: int, max_length: int | None):
        self = super().__new__(cls, (encoded, excluded))
        self.n_cut, self.n, self.max_length = n_cut, len(encoded) + len(excluded), max_length
        return self

    @property
    def encoded(self) -> list[Encoded]:
        return self[0]

    @property
    def excluded(self) -> list[Excluded]:
        return self[1]


def cut_line(n_cut: int, n: int, max_length: int | None) -> str:
    """The log line of a cut: every stage that encodes says what --max_length did, even when it cut nothing."""
    if max_length is None:
        return f"no --max_length: none of {n} example(s) cut"
    return f"cut {n_cut} of {n} example(s) at {max_length} tokens (--max_length)"


def encode_examples(examples, tokenizer, template="paper", max_length=None, max_response_length=None,
                    original_quirks=False) -> Encoding:
    """Encode all examples; those left without a supervised token are excluded and reported. How many --max_length
    cut is counted here, once, logged (cut_line) and returned (Encoding.n_cut) for the stage's meta.json."""
    encoded, excluded, n_cut = [], [], 0
    for example in progress(examples, desc="tokenising", unit="ex"):
        item = encode(example, tokenizer, template, max_length, max_response_length, original_quirks)
        n_cut += item.cut > 0
        if item.n_supervised == 0:
            excluded.append(Excluded(example.index, example.id, "no supervised token (prompt fills --max_length)"))
        else:
            encoded.append(item)
    if excluded:
        log.warning("excluded %d example(s) with no supervised token: ids %s",
                    len(excluded), ", ".join(e.id for e in excluded[:20]) + (" ..." if len(excluded) > 20 else ""))
    result = Encoding(encoded, excluded, n_cut, max_length)
    log.info(cut_line(result.n_cut, result.n, max_length))
    return result


def check_sizes(**sizes) -> None:
    """Refuse a size flag (a count of examples, tokens, epochs...) below 1; None is unset. Stages and CLIs call it
    before any work or file: --batch_size 0 would otherwise stop only at the first batch, after the model is
    loaded and a lock or chunk dir written."""
    for name, value in sizes.items():
        if value is not None and value < 1:
            raise UserError(f"--{name} {value}: must be at least 1")


def length_bucketed_batches(lengths, batch_size: int) -> list[list[int]]:
    """Positions grouped into batches of similar length, longest first (OOM shows at once).

    Deterministic: ties broken by position.
    """
    check_sizes(batch_size=batch_size)
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def pad_token_id(tokenizer) -> int:
    """Pad with an existing token: adding one would resize (change) the model."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id):
        if candidate is not None:
            return candidate
    return 0


def collate(items: list[Encoded], pad_id: int, padding_side="right") -> dict[str, torch.Tensor]:
    """Dynamic padding to the longest item; padded positions are masked and unsupervised."""
    width = max(len(item) for item in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item)
        span = slice(0, n) if padding_side == "right" else slice(width - n, width)
        input_ids[row, span] = torch.tensor(item.input_ids)
        labels[row, span] = torch.tensor(item.labels)
        attention_mask[row, span] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
