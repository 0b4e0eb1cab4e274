"""The text a model sees before its answer, under each template (paper: the paper's Llama-2-chat wrapper around
its Alpaca-style body; chat: the tokenizer's own chat template; plain), for single exchanges and conversations.
The one Llama-2 wrapper: `llama2_prompt`."""
from __future__ import annotations

from ..errors import UserError
from .conversations import SYSTEM, prompt_messages
from .records import Example


TEMPLATES = ("paper", "chat", "plain")


SYS_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request."
)


SYS_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)


def llama2_prompt(user: str, system: str | None = None) -> str:
    """The Llama-2-chat wrapper of one user turn: with the system block on a conversation's first turn."""
    if system is None:
        return "[INST] " + user + " [/INST]"
    return "[INST] <<SYS>>\n" + system + "\n<</SYS>>\n\n" + user + " [/INST]"


def paper_pieces(messages: list[dict], default_system: str):
    """(prompt text, answer or None) per user turn, in the paper's Llama-2 wrapper extended to several turns:
    `<s>[INST] <<SYS>>\\n{sys}\\n<</SYS>>\\n\\n{u1} [/INST] {a1}</s><s>[INST] {u2} [/INST] {a2}</s>`."""
    system = messages[0]["content"] if messages[0]["role"] == SYSTEM else default_system
    body = [m for m in messages if m["role"] != SYSTEM]
    pieces = []
    for position in range(0, len(body), 2):
        user = body[position]["content"]
        answer = body[position + 1]["content"] if position + 1 < len(body) else None
        prompt = llama2_prompt(user, system if position == 0 else None)
        pieces.append((prompt, answer))
    return pieces


def paper_prompt_text(messages: list[dict], default_system: str) -> str:
    """The text before the next answer (generation): every exchange but the last, rendered, then its prompt.
    Earlier exchanges carry their answers and end tokens as text."""
    pieces = paper_pieces(messages, default_system)
    if pieces[-1][1] is not None:
        raise UserError("a prompt needs a conversation ending with a user turn")
    return "".join(p + " " + a + "</s><s>" for p, a in pieces[:-1]) + pieces[-1][0]


def render_chat(tokenizer, messages, add_generation_prompt):
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


# Two system texts no template adds by itself: a template that renders both the same ignores the system turn.
SYSTEM_PROBES = ("safedata system probe A", "safedata system probe B")


def check_system_rendered(tokenizer, messages: list[dict]) -> None:
    """Refuse a template that drops the system turn. The conversation's own system text is not compared with a
    rendering without it: a template with a default system prompt (SmolLM2's) renders that default when there
    is no system turn, so a conversation whose system prompt equals the default would look dropped."""
    if messages and messages[0]["role"] == SYSTEM and len({
            render_chat(tokenizer, [{"role": SYSTEM, "content": probe}] + messages[1:], False)
            for probe in SYSTEM_PROBES}) == 1:
        raise UserError("--template chat: this tokenizer's chat template drops the system prompt; use --template "
                        "paper (or a tokenizer whose template renders system turns)")


def chat_prompt_text(messages: list[dict], tokenizer) -> str:
    check_system_rendered(tokenizer, messages)
    return render_chat(tokenizer, messages, True)


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
    return llama2_prompt(body, system)


def plain_prompt(example: Example) -> str:
    text = example.instruction
    if example.input.strip():
        text += "\n\n" + example.input
    return text + "\n"


def user_turn(example: Example) -> str:
    return plain_prompt(example)[:-1]


def require_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("--template chat: this tokenizer has no chat template; use --template paper or plain")


def chat_prompt(example: Example, tokenizer) -> str:
    require_chat_template(tokenizer)
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


def conversation_prompt_text(example: Example, template: str, tokenizer=None) -> str:
    """A multi-turn conversation up to its last user turn, ready for the next answer."""
    messages = prompt_messages(example.messages)
    if template == "paper":
        return paper_prompt_text(messages, SYS_NO_INPUT)
    if template == "chat":
        require_chat_template(tokenizer)
        return chat_prompt_text(messages, tokenizer)
    raise UserError(f"--template {template}: multi-turn conversations need --template paper or chat")
