"""Which prompt template a run uses when --template is not given: one rule for every stage.

  1. a checkpoint fine-tuned by this tool: the template it was fine-tuned with (its finetune_meta.json);
  2. a tokenizer with a chat template of its own: `chat`, that template (ChatML for SmolLM2 and Qwen, Llama-3's,
     Mistral's), since a model prompted in another model's format answers badly or echoes the format;
  3. Llama-2-chat's own template (its <<SYS>> block) and a tokenizer without one: `paper`, the paper's Llama-2
     wrapper (for Llama-2-chat the two agree on the format; the paper's body and system prompt are what it used).
The choice is logged in one line and recorded in each stage's meta.json; the paper's recipes (scripts/*.sh) pass no
--template unless TEMPLATE is set, so they follow the same rule.

`paper` chosen explicitly for a model whose tokenizer has a chat template of its own that is not Llama-2's (a ChatML
model, say) prompts that model in another model's format: it is allowed (the paper did so for its other models) but
warned about in one line naming both templates (`warn_if_foreign`).
"""
from __future__ import annotations

import logging
from pathlib import Path

from . import data as D
from .errors import UserError
from .models import FINETUNE_META, load_tokenizer, read_finetune_meta

log = logging.getLogger(__name__)


def is_llama2_chat_template(chat_template: str | None) -> bool:
    return bool(chat_template) and "[INST]" in chat_template and "<<SYS>>" in chat_template


def model_default_template(tokenizer) -> tuple[str, str]:
    """(template, why) for a model not fine-tuned here, from its tokenizer alone."""
    own = getattr(tokenizer, "chat_template", None)
    if not own:
        return "paper", "the tokenizer has no chat template: the paper's Llama-2 wrapper"
    if is_llama2_chat_template(own):
        return "paper", "the tokenizer's chat template is Llama-2's: the paper's wrapper of it"
    return "chat", "the tokenizer's own chat template"


def warn_if_foreign(model_name: str, template: str, tokenizer=None) -> bool:
    """One warning line when `template` is `paper` (Llama-2's [INST] wrapper) while the model's own default is `chat`
    (its tokenizer has a chat template that is not Llama-2's). A checkpoint fine-tuned here is left to its
    finetune_meta.json (resolve_template checks it); a tokenizer that cannot be read only skips the warning.
    Returns whether it warned."""
    if template != "paper" or (Path(model_name).is_dir() and read_finetune_meta(model_name)):
        return False
    if tokenizer is None:
        try:
            tokenizer = load_tokenizer(model_name)
        except Exception:  # noqa: BLE001 - a warning never stops a run; the stage reports an unreadable model itself
            return False
    own, _ = model_default_template(tokenizer)
    if own == "paper":
        return False
    log.warning("template paper (Llama-2's [INST] wrapper) chosen for %s, whose tokenizer has its own chat "
                "template: its default is template %s (leave --template / TEMPLATE unset to use it)", model_name, own)
    return True


def _check_known(template: str) -> None:
    if template not in D.TEMPLATES:
        raise UserError(f"unknown template {template!r}; choose from {', '.join(D.TEMPLATES)}")


def resolve_template(model_name: str, template: str | None, tokenizer=None,
                     allow_mismatch: bool = False) -> tuple[str, dict | None]:
    """The template to use, and the model's finetune meta (None for a model not fine-tuned here)."""
    meta = read_finetune_meta(model_name) if Path(model_name).is_dir() else None
    trained = meta.get("template") if meta else None
    if template is None:
        if trained:
            template, why = trained, f"the template {model_name} was fine-tuned with ({FINETUNE_META})"
        else:
            template, why = model_default_template(tokenizer if tokenizer is not None else load_tokenizer(model_name))
        log.info("template %s: %s (--template chooses another)", template, why)
        return template, meta
    _check_known(template)
    if not trained:
        warn_if_foreign(model_name, template, tokenizer)
    if trained and template != trained:
        if not allow_mismatch:
            raise UserError(f"--template {template}: {model_name} was fine-tuned with template {trained!r} "
                            f"({FINETUNE_META}); use --template {trained}, or pass "
                            "--allow_template_mismatch to use another one on purpose")
        log.warning("using template %r although %s was fine-tuned with %r (--allow_template_mismatch)",
                    template, model_name, trained)
    return template, meta


def choose_template(model_name: str, template: str | None, tokenizer=None) -> str:
    """resolve_template's template, for the stages that take no --allow_template_mismatch (the explicit choice wins)."""
    if template is not None:
        _check_known(template)
        warn_if_foreign(model_name, template, tokenizer)
        return template
    return resolve_template(model_name, None, tokenizer)[0]
