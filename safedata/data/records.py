"""Records -> Examples: each record's kind detected, its fields checked (one-line errors naming file, line and
field), its 0-based index in the file kept."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError
from . import conversations as C
from .hashing import record_id
from .kinds import KIND_FIELDS
from .readers import read_records

log = logging.getLogger(__name__)




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
    # [{role, content}] turns, encoded by safedata.data.encoding; None for single exchanges.
    messages: list | None = field(default=None, repr=False)


@dataclass
class Excluded:
    index: int
    id: str
    reason: str


def detect_kind(record, field_map: C.FieldMap = C.DEFAULT_FIELD_MAP) -> str | None:
    if not isinstance(record, dict):
        return None
    keys = set(record)
    for kind, (required, _) in KIND_FIELDS.items():
        if keys >= set(required):
            return kind
    if C.conversation_field(record, field_map) is not None:  # ShareGPT `conversations`, or a mapped field name
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


def known_kinds(field_map: C.FieldMap = C.DEFAULT_FIELD_MAP) -> str:
    """The record shapes a file may hold, for error messages: every kind's required fields, a conversation
    under each field name the mapping knows (OpenAI `messages`, ShareGPT `conversations`, --field_map)."""
    shapes = []
    for kind, (required, _) in KIND_FIELDS.items():
        if kind == "chat":
            shapes += ["{" + name + "}" for name in field_map.conversation]
        else:
            shapes.append("{" + ", ".join(required) + "}")
    return "; ".join(shapes) + " (a conversation under other field names: --field_map)"


def to_example(path, index, line, record, kind, need_response=True,
               field_map: C.FieldMap = C.DEFAULT_FIELD_MAP) -> Example:
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
        conversation = C.parse_conversation(path, line, record, field_map)
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


def load_examples(path: str | Path, need_response: bool = True, skip_bad: bool = False, allow_duplicates: bool = True,
                  field_map: C.FieldMap | None = None) -> tuple[list[Example], list[str]]:
    """Load a data file into Examples, keeping each record's 0-based index in the file.

    With skip_bad, bad records are counted, logged with file:line and skipped (their
    index stays unused); otherwise the first bad record raises a one-line InputError.
    Returns (examples, skipped) where skipped is a list of error messages. field_map: how conversations are
    read (a stage's --field_map; default: OpenAI `messages` and ShareGPT `conversations`).
    """
    path = Path(path)
    field_map = field_map or C.DEFAULT_FIELD_MAP
    raw, is_array = read_records(path)
    if not raw:
        raise InputError(path, 1, None, "no records")
    examples, skipped = [], []
    file_kind = None
    first_line_of_id: dict[str, int] = {}
    for index, (line, record) in enumerate(raw):
        try:
            kind = detect_kind(record, field_map)
            if kind is None:
                if not isinstance(record, dict):
                    raise InputError(path, line, None, f"expected an object, found {type(record).__name__}")
                raise InputError(path, line, None, f"unknown record kind with fields {sorted(record)}; expected one of "
                                 + known_kinds(field_map))
            if file_kind is None:
                file_kind = kind
            elif kind != file_kind:
                missing = [f for f in KIND_FIELDS[file_kind][0] if f not in record]
                raise InputError(path, line, missing[0] if missing else None,
                                 f"record is {kind}, but the file's first record is {file_kind}")
            if need_response and kind in ("prompt", "advbench"):
                raise InputError(path, line, None, f"{kind} records carry no response; this stage needs responses")
            example = to_example(path, index, line, record, kind, need_response=need_response, field_map=field_map)
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
