"""Multi-turn conversations: parsing (OpenAI `messages`, ShareGPT `conversations`, mapped field names) and
token ids with assistant-only label masks under the paper's Llama-2 wrapper and the tokenizer's chat template.

Every assistant turn is supervised and nothing else (what chat fine-tuning trainers call assistant-only loss);
the system prompt is kept. A conversation of one user turn (+ its answer) and no system prompt is a
single exchange: data.py keeps encoding it exactly as before (same token ids), whatever its source format.

Field mapping (docs/AUDIT.md): a record's conversation is the first of `FieldMap.conversation` it has (a list
of turns); a turn's role is the first of `FieldMap.role` and its text the first of `FieldMap.content`; role
values map to system / user / assistant through `FieldMap.roles`. The default covers OpenAI
(`messages`, role/content: system/user/assistant) and ShareGPT (`conversations`, from/value:
system/human/gpt); `use_field_map(FieldMap.parse("conversation=dialog,role=speaker,..."))` adds others.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .errors import InputError, UserError

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


_field_map = FieldMap()


def use_field_map(field_map: FieldMap | None) -> None:
    """Set the process-wide field mapping (every stage CLI's --field_map, safedata.cli.parse_args); None restores
    the default."""
    global _field_map
    _field_map = field_map or FieldMap()


def current_field_map() -> FieldMap:
    return _field_map


def conversation_field(record) -> str | None:
    """The record's conversation field under the current mapping, if it has one holding a list."""
    if not isinstance(record, dict):
        return None
    for name in _field_map.conversation:
        if name in record and isinstance(record[name], list):
            return name
    for name in _field_map.conversation:
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


def parse_conversation(path, line, record) -> Conversation:
    """Validate and canonicalise a record's conversation: an optional system turn first, then user and
    assistant turns alternating, starting with a user turn. Errors name the turn and field."""
    name = conversation_field(record)
    if name is None:
        raise InputError(path, line, None, f"no conversation field (one of {', '.join(_field_map.conversation)})")
    turns = record[name]
    if not isinstance(turns, list) or not turns:
        raise InputError(path, line, name, "expected a non-empty list of turns")
    messages = []
    for number, turn in enumerate(turns):
        where = f"{name}[{number}]"
        if not isinstance(turn, dict):
            raise InputError(path, line, where, f"expected an object, found {type(turn).__name__}")
        role_key, content_key = _first_key(turn, _field_map.role), _first_key(turn, _field_map.content)
        if role_key is None:
            raise InputError(path, line, where, f"no role field (one of {', '.join(_field_map.role)})")
        if content_key is None or not isinstance(turn[content_key], str):
            raise InputError(path, line, f"{where}.{content_key or _field_map.content[0]}",
                             "expected string content" if content_key else "missing")
        role = _field_map.roles.get(turn[role_key]) if isinstance(turn[role_key], str) else None
        if role is None:
            raise InputError(path, line, f"{where}.{role_key}", f"unknown role {turn[role_key]!r} (known: "
                             f"{', '.join(sorted(_field_map.roles))}; add others with --field_map)")
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


# ----------------------------------------------------------------------------- token ids and masks


def _ids(tokenizer, text, special):
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def _paper_pieces(messages: list[dict], default_system: str):
    """(prompt text, answer or None) per user turn, in the paper's Llama-2 wrapper extended to several turns:
    `<s>[INST] <<SYS>>\\n{sys}\\n<</SYS>>\\n\\n{u1} [/INST] {a1}</s><s>[INST] {u2} [/INST] {a2}</s>`."""
    system = messages[0]["content"] if messages[0]["role"] == SYSTEM else default_system
    body = [m for m in messages if m["role"] != SYSTEM]
    pieces = []
    for position in range(0, len(body), 2):
        user = body[position]["content"]
        answer = body[position + 1]["content"] if position + 1 < len(body) else None
        prompt = ("[INST] <<SYS>>\n" + system + "\n<</SYS>>\n\n" + user + " [/INST]") if position == 0 \
            else "[INST] " + user + " [/INST]"
        pieces.append((prompt, answer))
    return pieces


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
    from .data import IGNORE_INDEX
    ids, labels = [], []
    for prompt, answer in _paper_pieces(messages, default_system):
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


def paper_prompt_text(messages: list[dict], default_system: str) -> str:
    """The text before the next answer (generation): every exchange but the last, rendered, then its prompt.
    Earlier exchanges carry their answers and end tokens as text."""
    pieces = _paper_pieces(messages, default_system)
    if pieces[-1][1] is not None:
        raise UserError("a prompt needs a conversation ending with a user turn")
    return "".join(p + " " + a + "</s><s>" for p, a in pieces[:-1]) + pieces[-1][0]


def _render(tokenizer, messages, add_generation_prompt):
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


# Two system texts no template adds by itself: a template that renders both the same ignores the system turn.
SYSTEM_PROBES = ("safedata system probe A", "safedata system probe B")


def check_system_rendered(tokenizer, messages: list[dict]) -> None:
    """Refuse a template that drops the system turn. The conversation's own system text is not compared with a
    rendering without it: a template with a default system prompt (SmolLM2's) renders that default when there
    is no system turn, so a conversation whose system prompt equals the default would look dropped."""
    if messages and messages[0]["role"] == SYSTEM and len({
            _render(tokenizer, [{"role": SYSTEM, "content": probe}] + messages[1:], False)
            for probe in SYSTEM_PROBES}) == 1:
        raise UserError("--template chat: this tokenizer's chat template drops the system prompt; use --template "
                        "paper (or a tokenizer whose template renders system turns)")


def chat_ids(messages: list[dict], tokenizer) -> tuple[list[int], list[int]]:
    """Token ids of the template's own rendering of the whole conversation; supervised: each assistant turn's
    span, from the end of the rendering up to its generation prompt to the end of the rendering up to it
    (trailing whitespace belongs to what follows). Tokenized whole when every boundary falls between tokens
    (then ids == tokenizer(rendering)); else piece by piece."""
    from .data import IGNORE_INDEX
    check_system_rendered(tokenizer, messages)
    full = _render(tokenizer, messages, False)
    cuts = []  # character offsets: (answer start, answer end) per assistant turn
    for k, message in enumerate(messages):
        if message["role"] != ASSISTANT:
            continue
        before = _render(tokenizer, messages[:k], True)
        through = _render(tokenizer, messages[: k + 1], False).rstrip()
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


def chat_prompt_text(messages: list[dict], tokenizer) -> str:
    check_system_rendered(tokenizer, messages)
    return _render(tokenizer, messages, True)


def prompt_messages(messages: list[dict]) -> list[dict]:
    """The conversation up to its last user turn (a trailing answer is what a model is asked to produce)."""
    last_user = max(i for i, m in enumerate(messages) if m["role"] == USER)
    return messages[: last_user + 1]
