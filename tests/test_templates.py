"""The default template follows the model (safedata.templates): the fine-tune's template, else the tokenizer's own
chat template, else the paper's Llama-2 wrapper for Llama-2-chat and for tokenizers without one; the choice is
logged in one line and recorded in meta.json. Before this rule every stage defaulted to `paper`, so a ChatML model
was prompted in Llama-2's format (the first test's ChatML case fails against that). `paper` chosen explicitly for a
model with a chat template of its own (not Llama-2's) is allowed, with one warning line naming both templates."""
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from safedata.models import load_tokenizer
from safedata.templates import (choose_template, is_llama2_chat_template, model_default_template,
                                resolve_template)

ROOT = Path(__file__).resolve().parents[1]
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.fixture(scope="module")
def chatml_model(tiny_model_dir, tmp_path_factory):
    """The tiny model with a ChatML chat template instead of its Llama-2-style one."""
    out = tmp_path_factory.mktemp("chatml") / "model"
    shutil.copytree(tiny_model_dir, out)
    tokenizer = load_tokenizer(str(out))
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(str(out))
    return str(out)


def test_the_default_follows_the_tokenizer(tiny_model_dir, chatml_model, caplog):
    assert is_llama2_chat_template(load_tokenizer(tiny_model_dir).chat_template)
    assert model_default_template(load_tokenizer(tiny_model_dir))[0] == "paper"
    with caplog.at_level(logging.INFO, logger="safedata.templates"):
        assert choose_template(chatml_model, None) == "chat"
    lines = [r.getMessage() for r in caplog.records if r.name == "safedata.templates"]
    assert lines == ["template chat: the tokenizer's own chat template (--template chooses another)"]
    assert choose_template(chatml_model, "paper") == "paper"            # an explicit choice wins

    class NoTemplate:
        chat_template = None
    assert model_default_template(NoTemplate())[0] == "paper"


def test_a_checkpoint_fine_tuned_here_keeps_its_template(chatml_model, tmp_path):
    finetuned = tmp_path / "ft"
    shutil.copytree(chatml_model, finetuned)
    (finetuned / "finetune_meta.json").write_text(json.dumps({"template": "plain"}))
    assert choose_template(str(finetuned), None) == "plain"


def test_the_cli_records_the_choice_in_meta_json(chatml_model, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"say {w}", "input": "", "output": w}) + "\n"
                            for w in ("one", "two")))
    done = subprocess.run([sys.executable, "get_representation.py", "--model_name", chatml_model, "--data_path",
                           str(data), "--output_dir", str(tmp_path / "reps")], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "reps" / "meta.json").read_text())["template"] == "chat"
    assert "template chat: the tokenizer's own chat template" in done.stderr


def template_warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "safedata.templates" and r.levelno >= logging.WARNING]


def test_paper_for_a_chat_model_warns_in_one_line(tiny_model_dir, chatml_model, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="safedata.templates"):
        assert choose_template(chatml_model, "paper") == "paper"        # allowed (the paper did so), but said
    (line,) = template_warnings(caplog)
    assert "\n" not in line and "template paper" in line and "template chat" in line and chatml_model in line
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="safedata.templates"):
        assert resolve_template(chatml_model, "paper")[0] == "paper"    # generate.py's path warns the same
    assert len(template_warnings(caplog)) == 1
    caplog.clear()
    # No warning: a Llama-2-style tokenizer (the tiny model) with paper, chosen or by default; chat on a chat model;
    # a checkpoint fine-tuned here with paper (its finetune_meta.json decides, resolve_template checks it).
    finetuned = tmp_path / "ft"
    shutil.copytree(chatml_model, finetuned)
    (finetuned / "finetune_meta.json").write_text(json.dumps({"template": "paper"}))
    with caplog.at_level(logging.INFO, logger="safedata.templates"):
        assert choose_template(tiny_model_dir, None) == "paper"
        assert choose_template(tiny_model_dir, "paper") == "paper"
        assert resolve_template(tiny_model_dir, "paper")[0] == "paper"
        assert choose_template(chatml_model, "chat") == "chat"
        assert resolve_template(str(finetuned), "paper")[0] == "paper"
    assert template_warnings(caplog) == []


def test_the_cli_warns_once_for_an_explicit_paper_on_a_chat_model(chatml_model, tmp_path):
    """What TEMPLATE=paper in the recipes gives: each CLI call prints the warning once, in one line."""
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"instruction": "say one", "input": "", "output": "one"}) + "\n")
    done = subprocess.run([sys.executable, "get_representation.py", "--model_name", chatml_model, "--data_path",
                           str(data), "--output_dir", str(tmp_path / "reps"), "--template", "paper"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (line,) = [line for line in done.stderr.splitlines() if "WARNING" in line or "warning" in line]
    assert "template paper" in line and "template chat" in line
    assert json.loads((tmp_path / "reps" / "meta.json").read_text())["template"] == "paper"
