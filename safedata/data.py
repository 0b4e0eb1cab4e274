"""Records → examples → token ids and label masks → length-bucketed batches.

One data layer serves features, training and generation, so a template or a
mask fixed here is fixed everywhere.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import conversations as C
from . import sources as S
from .errors import InputError, UserError
from .progress import progress

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
TEMPLATES = ("paper", "chat", "plain")

SYS_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request."
)
SYS_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)

# kind -> (required text fields, optional text fields)
KIND_FIELDS = {
    "alpaca": (("instruction", "output"), ("input",)),
    "dolly": (("instruction", "response"), ("context", "category")),
    "gsm8k": (("question", "answer"), ()),
    "chat": (("messages",), ()),
    "prompt": (("prompt",), ()),
    "advbench": (("goal",), ("target",)),
}
KNOWN_CSV_HEADERS = {("goal", "target"), ("goal",), ("prompt",)}


@dataclass
class Example:
    """One record, in the shape every stage needs. `index` is 0-based in the file."""

    index: int
    id: str
    kind: str
    instruction: str
    input: str = ""
    response: str | None = None
    line: int | None = None
    record: dict = field(default_factory=dict, repr=False)
    # A conversation beyond a single exchange (system prompt, several turns): canonical
    # [{role, content}] turns, encoded by safedata.conversations; None for single exchanges.
    messages: list | None = field(default=None, repr=False)


@dataclass
class Encoded:
    index: int
    id: str
    input_ids: list[int]
    labels: list[int]

    @property
    def n_supervised(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class Excluded:
    index: int
    id: str
    reason: str


# ----------------------------------------------------------------------------- files


def file_sha256(path) -> str:
    """The data's hash: a file's bytes; for a save_to_disk directory or a Hub dataset, sources.source_sha256."""
    if S.is_hub(path) or Path(path).is_dir():
        return S.source_sha256(path)
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def record_id(record: dict) -> str:
    """Content hash: the same record gets the same id in every file and stage."""
    canonical = json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise InputError(path, line, None, f"not valid UTF-8 (byte {err.start})") from None


def _json_array_records(path: Path, text: str):
    """Yield (line, value) for each element of a top-level JSON array, tracking lines."""
    decoder = json.JSONDecoder()
    line, counted_to = 1, 0

    def line_at(position):  # lines are counted incrementally: the file is read once
        nonlocal line, counted_to
        line += text.count("\n", counted_to, position)
        counted_to = position
        return line

    pos = len(text) - len(text.lstrip())
    if pos >= len(text):
        raise InputError(path, 1, None, "empty file")
    if text[pos] != "[":
        raise InputError(path, line_at(pos), None, "a .json file must hold a JSON array of records")
    pos += 1
    expect_value = True
    while True:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        if pos >= len(text):
            raise InputError(path, line_at(pos), None, "unterminated JSON array")
        if text[pos] == "]":
            if text[pos + 1:].strip():
                raise InputError(path, line_at(pos), None, "extra data after the JSON array")
            return
        if not expect_value:
            if text[pos] != ",":
                raise InputError(path, line_at(pos), None, "expected ',' or ']' between records")
            pos += 1
            expect_value = True
            continue
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise InputError(path, err.lineno, None, f"malformed JSON: {err.msg}") from None
        yield line_at(pos), value
        pos = end
        expect_value = False


def jsonl_lines(text: str) -> list[str]:
    """A JSONL text's lines: split at "\n" alone (a "\r" before it dropped), so line numbers count "\n" as
    everywhere else. Not str.splitlines: it also splits at U+2028, U+2029 and U+0085, which a JSON string may
    hold raw (json.dumps(..., ensure_ascii=False) writes them so)."""
    return [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]


def _jsonl_records(path: Path, text: str):
    for line_number, line in enumerate(jsonl_lines(text), start=1):
        if not line.strip():
            continue
        try:
            yield line_number, json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(path, line_number, None, f"malformed JSON: {err.msg}") from None


def _csv_records(path: Path, text: str):
    reader = csv.reader(io.StringIO(text, newline=""))
    rows = []
    for row in reader:
        rows.append((reader.line_num, row))
    rows = [(n, r) for n, r in rows if any(cell.strip() for cell in r)]
    if not rows:
        return
    first_line, first = rows[0]
    header = tuple(cell.strip() for cell in first)
    known_kind_header = any(set(header) >= set(req) for req, _ in KIND_FIELDS.values())
    if header in KNOWN_CSV_HEADERS or known_kind_header:
        for line_number, row in rows[1:]:
            if len(row) != len(header):
                raise InputError(path, line_number, None, f"expected {len(header)} columns ({','.join(header)}), found {len(row)}")
            yield line_number, dict(zip(header, row))
    elif len(first) == 1:
        # One column and no known header: every row is a prompt (the paper's AdvBench file).
        for line_number, row in rows:
            if len(row) != 1:
                raise InputError(path, line_number, None, f"expected 1 column, found {len(row)}")
            yield line_number, {"prompt": row[0]}
    else:
        raise InputError(path, first_line, None, f"unexpected CSV header {','.join(header)!r}; "
                         "expected goal,target / prompt / the fields of a known record kind")


def read_raw_records(path) -> list[tuple[int, object]]:
    """(line, raw value) for every record of a .json, .jsonl or .csv file, or (record label, record) for a
    datasets-library source (Parquet, Arrow, a save_to_disk directory, hf:owner/name)."""
    return _read_records(path)[0]


def _read_records(path) -> tuple[list[tuple[int, object]], bool]:
    """(records as in read_raw_records, whether the file is one JSON array)."""
    if S.is_dataset_source(path):
        return list(S.iter_records(path)), False
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a directory, not a data file (.json, .jsonl or .csv)")
    if not path.exists():
        raise UserError(f"{path}: no such file")
    text = _read_text(path)
    if not text.strip():
        raise InputError(path, 1, None, "empty file")
    suffix = path.suffix.lower()
    is_array = suffix == ".json" and text.lstrip().startswith("[")
    if suffix == ".json":
        records = _json_array_records(path, text) if is_array else _jsonl_records(path, text)
    elif suffix == ".jsonl":
        records = _jsonl_records(path, text)
    elif suffix == ".csv":
        records = _csv_records(path, text)
    else:
        raise UserError(f"{path}: unsupported file type {suffix!r} (use {S.INPUT_TYPES})")
    return list(records), is_array


# ----------------------------------------------------------------------------- kinds


def detect_kind(record) -> str | None:
    if not isinstance(record, dict):
        return None
    keys = set(record)
    for kind, (required, _) in KIND_FIELDS.items():
        if keys >= set(required):
            return kind
    if C.conversation_field(record) is not None:  # ShareGPT `conversations`, or a mapped field name
        return "chat"
    return None


def _text(path, line, record, name, required=True, allow_empty=False) -> str:
    if name not in record:
        if required:
            raise InputError(path, line, name, "missing")
        return ""
    value = record[name]
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise InputError(path, line, name, f"expected a string, found {type(value).__name__}")
    if required and not allow_empty and not value.strip():
        raise InputError(path, line, name, "empty")
    return value


def known_kinds() -> str:
    """The record shapes a file may hold, for error messages: every kind's required fields, a conversation
    under each field name the current mapping knows (OpenAI `messages`, ShareGPT `conversations`, --field_map)."""
    shapes = []
    for kind, (required, _) in KIND_FIELDS.items():
        if kind == "chat":
            shapes += ["{" + name + "}" for name in C.current_field_map().conversation]
        else:
            shapes.append("{" + ", ".join(required) + "}")
    return "; ".join(shapes) + " (a conversation under other field names: --field_map)"


def to_example(path, index, line, record, kind, need_response=True) -> Example:
    """Validate one record of a known kind and turn it into an Example."""
    if kind == "alpaca":
        instruction = _text(path, line, record, "instruction")
        extra = _text(path, line, record, "input", required=False)
        response = _text(path, line, record, "output", required=need_response, allow_empty=True)
    elif kind == "dolly":
        instruction = _text(path, line, record, "instruction")
        extra = _text(path, line, record, "context", required=False)
        response = _text(path, line, record, "response", required=need_response, allow_empty=True)
    elif kind == "gsm8k":
        instruction = _text(path, line, record, "question")
        extra = ""
        response = _text(path, line, record, "answer", required=need_response, allow_empty=True)
    elif kind == "chat":
        conversation = C.parse_conversation(path, line, record)
        extra, messages = "", None
        if conversation.single_exchange:  # every format of one exchange: one Example, as an Alpaca record
            # An empty answer is data, in every format: the end token alone is supervised.
            instruction = conversation.messages[0]["content"]
            response = conversation.messages[1]["content"] if len(conversation.messages) > 1 else None
        else:
            messages = conversation.messages
            instruction = [m["content"] for m in messages if m["role"] == C.USER][-1]  # the request answered last
            response = C.joined_answers(messages)
        if response is None and need_response:
            raise InputError(path, line, conversation.field, "no assistant turn after the user turn")
    elif kind == "prompt":
        instruction, extra, response = _text(path, line, record, "prompt"), "", None
    elif kind == "advbench":
        instruction, extra, response = _text(path, line, record, "goal"), "", None
    else:  # pragma: no cover - guarded by detect_kind
        raise AssertionError(kind)
    if need_response and response is None:
        raise InputError(path, line, "response", f"{kind} records carry no response; this stage needs one")
    return Example(index=index, id=record_id(record), kind=kind, instruction=instruction,
                   input=extra, response=response,
                   line=line, record=record, messages=messages if kind == "chat" else None)


def load_examples(path, need_response=True, skip_bad=False, allow_duplicates=True):
    """Load a data file into Examples, keeping each record's 0-based index in the file.

    With skip_bad, bad records are counted, logged with file:line and skipped (their
    index stays unused); otherwise the first bad record raises a one-line InputError.
    Returns (examples, skipped) where skipped is a list of error messages.
    """
    path = Path(path)
    raw, is_array = _read_records(path)
    if not raw:
        raise InputError(path, 1, None, "no records")
    examples, skipped = [], []
    file_kind = None
    first_line_of_id: dict[str, int] = {}
    for index, (line, record) in enumerate(raw):
        try:
            kind = detect_kind(record)
            if kind is None:
                if not isinstance(record, dict):
                    raise InputError(path, line, None, f"expected an object, found {type(record).__name__}")
                raise InputError(path, line, None, f"unknown record kind with fields {sorted(record)}; expected one of "
                                 + known_kinds())
            if file_kind is None:
                file_kind = kind
            elif kind != file_kind:
                missing = [f for f in KIND_FIELDS[file_kind][0] if f not in record]
                raise InputError(path, line, missing[0] if missing else None,
                                 f"record is {kind}, but the file's first record is {file_kind}")
            if need_response and kind in ("prompt", "advbench"):
                raise InputError(path, line, None, f"{kind} records carry no response; this stage needs responses")
            example = to_example(path, index, line, record, kind, need_response=need_response)
            if example.id in first_line_of_id and not allow_duplicates:
                raise InputError(path, line, None, f"duplicate of the record on line {first_line_of_id[example.id]}")
            first_line_of_id.setdefault(example.id, line)
            examples.append(example)
        except InputError as err:
            if is_array and err.record is None:
                err = InputError(err.path, err.line, err.field, err.problem, record=index)
            if not skip_bad:
                raise err from None
            skipped.append(str(err))
            log.warning("skipped bad record: %s", err)
    if skipped:
        log.warning("%s: skipped %d bad record(s) of %d", path, len(skipped), len(raw))
    if not examples:
        raise InputError(path, None, None, "no usable records")
    return examples, skipped


def empty_response_indices(examples) -> list[int]:
    """File indices of the examples whose response is empty or blank (kept: the original trained them)."""
    return [e.index for e in examples if e.response is not None and not e.response.strip()]


# ----------------------------------------------------------------------------- templates


def paper_prompt(example: Example) -> str:
    """The paper's Llama-2-chat wrapper around its Alpaca-style body."""
    if example.kind == "chat":
        system, body = SYS_NO_INPUT, example.instruction
    elif example.input.strip() and example.kind == "dolly":
        system = SYS_NO_INPUT
        body = f"### Instruction:\n{example.instruction}\n\nInput:\n{example.input}\n\n### Response:\n"
    elif example.input.strip():
        system = SYS_WITH_INPUT
        body = f"### Instruction:\n{example.instruction}\n\n### Input:\n{example.input}\n\n### Response:\n"
    else:
        system = SYS_NO_INPUT
        body = f"### Instruction:\n{example.instruction}\n\n### Response:\n"
    return "[INST] <<SYS>>\n" + system + "\n<</SYS>>\n\n" + body + " [/INST]"


def plain_prompt(example: Example) -> str:
    text = example.instruction
    if example.input.strip():
        text += "\n\n" + example.input
    return text + "\n"


def user_turn(example: Example) -> str:
    return plain_prompt(example)[:-1]


def _require_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("--template chat: this tokenizer has no chat template; use --template paper or plain")


def chat_prompt(example: Example, tokenizer) -> str:
    _require_chat_template(tokenizer)
    return tokenizer.apply_chat_template([{"role": "user", "content": user_turn(example)}],
                                         add_generation_prompt=True, tokenize=False)


def prompt_text(example: Example, template: str, tokenizer=None) -> str:
    """The text a model sees before its answer: used for training, features and generation alike."""
    if example.messages is not None:
        return conversation_prompt_text(example, template, tokenizer)
    if template == "paper":
        return paper_prompt(example)
    if template == "plain":
        return plain_prompt(example)
    if template == "chat":
        return chat_prompt(example, tokenizer)
    raise UserError(f"unknown template {template!r}; choose from {', '.join(TEMPLATES)}")


def prompt_ids(example: Example, template: str, tokenizer) -> list[int]:
    text = prompt_text(example, template, tokenizer)
    # Chat templates write their own BOS as text; the others rely on the tokenizer's usual BOS.
    return tokenizer(text, add_special_tokens=(template != "chat"))["input_ids"]


def _ids(tokenizer, text, special):
    return tokenizer(text, add_special_tokens=special)["input_ids"]


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
        r = C.paper_answer_ids(tokenizer, prompt, p, example.response, original_quirks)
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


def conversation_prompt_text(example: Example, template: str, tokenizer=None) -> str:
    """A multi-turn conversation up to its last user turn, ready for the next answer."""
    messages = C.prompt_messages(example.messages)
    if template == "paper":
        return C.paper_prompt_text(messages, SYS_NO_INPUT)
    if template == "chat":
        _require_chat_template(tokenizer)
        return C.chat_prompt_text(messages, tokenizer)
    raise UserError(f"--template {template}: multi-turn conversations need --template paper or chat")


def conversation_ids(example: Example, template: str, tokenizer) -> tuple[list[int], list[int]]:
    """(ids, labels) of a multi-turn conversation: every assistant turn (+ its end token) supervised."""
    if template == "paper":
        return C.paper_ids(example.messages, tokenizer, SYS_NO_INPUT)
    if template == "chat":
        _require_chat_template(tokenizer)
        return C.chat_ids(example.messages, tokenizer)
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
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return Encoded(example.index, example.id, ids, labels)


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
    ids = p + r
    labels = [IGNORE_INDEX] * len(p) + list(r)
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return Encoded(example.index, example.id, ids, labels)


def encode_examples(examples, tokenizer, template="paper", max_length=None, max_response_length=None,
                    original_quirks=False):
    """Encode all examples; those left without a supervised token are excluded and reported."""
    encoded, excluded = [], []
    for example in progress(examples, desc="tokenising", unit="ex"):
        item = encode(example, tokenizer, template, max_length, max_response_length, original_quirks)
        if item.n_supervised == 0:
            excluded.append(Excluded(example.index, example.id, "no supervised token (prompt fills --max_length)"))
        else:
            encoded.append(item)
    if excluded:
        log.warning("excluded %d example(s) with no supervised token: ids %s",
                    len(excluded), ", ".join(e.id for e in excluded[:20]) + (" ..." if len(excluded) > 20 else ""))
    return encoded, excluded


# ----------------------------------------------------------------------------- batches


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
