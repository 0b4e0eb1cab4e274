"""Multi-turn conversations: parsing (OpenAI `messages`, ShareGPT `conversations`, mapped field names) into
canonical [{role, content}] turns. Their prompts are rendered in prompts.py and their token ids and
assistant-only label masks made in encoding.py (every assistant turn supervised, nothing else; the system prompt
kept). A conversation of one user turn (+ its answer) and no system prompt is a single exchange, encoded exactly
as an Alpaca record (same token ids), whatever its source format.

Field mapping (docs/AUDIT.md): a record's conversation is the first of `FieldMap.conversation` it has (a list
of turns); a turn's role is the first of `FieldMap.role` and its text the first of `FieldMap.content`; role
values map to system / user / assistant through `FieldMap.roles`. The default covers OpenAI
(`messages`, role/content: system/user/assistant) and ShareGPT (`conversations`, from/value:
system/human/gpt); `FieldMap.parse("conversation=dialog,role=speaker,...")` (a stage's --field_map) adds others.
The mapping is an argument of the readers (`load_examples(..., field_map=)`), never process state.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import InputError, UserError


SYSTEM, USER, ASSISTANT = "system", "user", "assistant"


DEFAULT_ROLES = {"system": SYSTEM, "user": USER, "human": USER, "assistant": ASSISTANT, "gpt": ASSISTANT}


@dataclass(frozen=True)
class FieldMap:
    conversation: tuple[str, ...] = ("messages", "conversations")
    role: tuple[str, ...] = ("role", "from")
    content: tuple[str, ...] = ("content", "value")
    roles: dict = field(default_factory=lambda: dict(DEFAULT_ROLES))

    @classmethod
    def parse(cls, spec: str) -> "FieldMap":
        """`conversation=dialog,role=speaker,content=text,user=customer,assistant=agent,system=preamble`:
        names added (first) to the defaults; several values for one key are separated by `|`."""
        base = cls()
        conversation, role, content, roles = list(base.conversation), list(base.role), list(base.content), dict(base.roles)
        for item in filter(None, (part.strip() for part in spec.split(","))):
            key, sep, value = item.partition("=")
            names = [v.strip() for v in value.split("|") if v.strip()]
            if not sep or not names:
                raise UserError(f"--field_map {spec!r}: expected key=name[,key=name...], found {item!r}")
            key = key.strip()
            if key == "conversation":
                conversation = names + conversation
            elif key == "role":
                role = names + role
            elif key == "content":
                content = names + content
            elif key in (SYSTEM, USER, ASSISTANT):
                roles.update({name: key for name in names})
            else:
                raise UserError(f"--field_map: unknown key {key!r} (conversation, role, content, system, user, "
                                "assistant)")
        return cls(tuple(conversation), tuple(role), tuple(content), roles)

    def describe(self) -> dict:
        return {"conversation": list(self.conversation), "role": list(self.role), "content": list(self.content),
                "roles": dict(sorted(self.roles.items()))}


DEFAULT_FIELD_MAP = FieldMap()


def field_map_of(spec: str | None) -> FieldMap:
    """The mapping a stage's --field_map spec asks for (the default when none was given)."""
    return FieldMap.parse(spec) if spec else DEFAULT_FIELD_MAP


def recorded_field_map(field_map: FieldMap | None) -> dict:
    """What a meta.json records of the mapping: {"field_map": ...} when one other than the default read the
    records, else nothing (so that the outputs of default runs keep their bytes)."""
    return {"field_map": field_map.describe()} if field_map and field_map != DEFAULT_FIELD_MAP else {}


def conversation_field(record, field_map: FieldMap = DEFAULT_FIELD_MAP) -> str | None:
    """The record's conversation field under the mapping, if it has one holding a list."""
    if not isinstance(record, dict):
        return None
    for name in field_map.conversation:
        if name in record and isinstance(record[name], list):
            return name
    for name in field_map.conversation:
        if name in record:
            return name
    return None


@dataclass
class Conversation:
    field: str
    messages: list[dict]  # canonical: [{"role": system|user|assistant, "content": str}, ...]

    @property
    def system(self) -> str | None:
        return self.messages[0]["content"] if self.messages and self.messages[0]["role"] == SYSTEM else None

    @property
    def turns(self) -> list[dict]:
        return [m for m in self.messages if m["role"] != SYSTEM]

    @property
    def single_exchange(self) -> bool:
        """One user turn, at most one answer, no system prompt: encoded exactly as a single-exchange record."""
        roles = [m["role"] for m in self.messages]
        return roles in ([USER], [USER, ASSISTANT])

    @property
    def n_assistant(self) -> int:
        return sum(m["role"] == ASSISTANT for m in self.messages)


def _first_key(turn: dict, names) -> str | None:
    return next((n for n in names if n in turn), None)


def parse_conversation(path, line, record, field_map: FieldMap = DEFAULT_FIELD_MAP) -> Conversation:
    """Validate and canonicalise a record's conversation: an optional system turn first, then user and
    assistant turns alternating, starting with a user turn. Errors name the turn and field."""
    name = conversation_field(record, field_map)
    if name is None:
        raise InputError(path, line, None, f"no conversation field (one of {', '.join(field_map.conversation)})")
    turns = record[name]
    if not isinstance(turns, list) or not turns:
        raise InputError(path, line, name, "expected a non-empty list of turns")
    messages = []
    for number, turn in enumerate(turns):
        where = f"{name}[{number}]"
        if not isinstance(turn, dict):
            raise InputError(path, line, where, f"expected an object, found {type(turn).__name__}")
        role_key, content_key = _first_key(turn, field_map.role), _first_key(turn, field_map.content)
        if role_key is None:
            raise InputError(path, line, where, f"no role field (one of {', '.join(field_map.role)})")
        if content_key is None or not isinstance(turn[content_key], str):
            raise InputError(path, line, f"{where}.{content_key or field_map.content[0]}",
                             "expected string content" if content_key else "missing")
        role = field_map.roles.get(turn[role_key]) if isinstance(turn[role_key], str) else None
        if role is None:
            raise InputError(path, line, f"{where}.{role_key}", f"unknown role {turn[role_key]!r} (known: "
                             f"{', '.join(sorted(field_map.roles))}; add others with --field_map)")
        messages.append({"role": role, "content": turn[content_key]})
    body = messages[1:] if messages[0]["role"] == SYSTEM else messages
    for number, message in enumerate(body):
        expected = USER if number % 2 == 0 else ASSISTANT
        if message["role"] != expected:
            position = number + (len(messages) - len(body))
            raise InputError(path, line, f"{name}[{position}]", f"expected {'an' if expected == ASSISTANT else 'a'} {expected} turn, found "
                             f"{message['role']} (turns alternate user, assistant after an optional system turn)")
        if expected == USER and not message["content"].strip():
            raise InputError(path, line, f"{name}[{number + len(messages) - len(body)}]", "empty user turn")
    if not body:
        raise InputError(path, line, name, "no user turn")
    return Conversation(name, messages)


def joined_answers(messages: list[dict]) -> str | None:
    """All assistant turns, blank-line separated (what composition and length statistics look at)."""
    answers = [m["content"] for m in messages if m["role"] == ASSISTANT]
    return "\n\n".join(answers) if answers else None


def prompt_messages(messages: list[dict]) -> list[dict]:
    """The conversation up to its last user turn (a trailing answer is what a model is asked to produce)."""
    last_user = max(i for i, m in enumerate(messages) if m["role"] == USER)
    return messages[: last_user + 1]
