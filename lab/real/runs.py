"""An evaluated model's numbers (what evaluate.py and lab_real.py loss wrote into a run's folder), read by the
gates, the kept results and the report; and lab_real.py loss, the mean answer loss of a model on records."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lab.demo_metrics import example_losses
from safedata import data as D
from safedata.config import option
from safedata.errors import UserError
from safedata.models import load_model, model_identity
from safedata.store import read_json, write_json
from safedata.templates import choose_template


def read_summary(eval_dir: Path) -> dict:
    path = Path(eval_dir) / "summary.json"
    if not path.is_file():
        raise UserError(f"{path}: missing (run evaluate.py first)")
    return read_json(path)


EVAL_SETS = ("advbench", "heldout")


def evaluated_run(run: Path) -> dict:
    """One evaluated model's numbers: evaluate.py's summaries of both sets and lab_real.py loss's value."""
    advbench, heldout = read_summary(run / "advbench_eval"), read_summary(run / "heldout_eval")
    loss_file = run / "loss.json"
    if not loss_file.is_file():
        raise UserError(f"{loss_file}: missing (lab_real.py loss)")
    return {"advbench_asr": advbench["keyword_asr"], "advbench_n": advbench["n"],
            "over_refusal": 1 - heldout["keyword_asr"], "heldout_n": heldout["n"],
            "heldout_loss": read_json(loss_file)["loss"],
            "advbench_non_answers_complied": (advbench.get("non_answers") or {}).get("among_complied")}


def refused_flags(run: Path, set_name: str) -> list[tuple[int, int]]:
    """(index, refused 0/1) per prompt of one evaluated set, from evaluate.py's results.jsonl."""
    path = run / f"{set_name}_eval" / "results.jsonl"
    rows = [row for _, row in D.read_jsonl(path)]
    return [(row["index"], int(bool(row["refused"]))) for row in rows]


@dataclass(kw_only=True)
class LossArgs:
    """lab_real.py loss: the model, the records and how they are batched."""

    model_name: str = option(help="model directory (its fine-tune template is used)", deprecated=("--model",))
    data_path: str = option(help="records with answers", deprecated=("--data",))
    output: str = option(help="JSON file written")
    batch_size: int = option(16, "examples per forward pass")
    max_length: int | None = option(None, "truncate examples to this many tokens")
    template: str | None = option(None, "the prompt template (None: the model's own)", cli=False)


def answer_loss(args: LossArgs) -> dict:
    """Mean over the records of each answer's token-mean loss (fp32, CPU; the model's own template unless one is
    given), written to `args.output` as JSON."""
    model_dir, data_path, max_length = args.model_name, args.data_path, args.max_length
    examples, _ = D.load_examples(data_path)
    model, tokenizer = load_model(str(model_dir), "fp32", "cpu")
    template = choose_template(str(model_dir), args.template, tokenizer)
    rows = example_losses(model, tokenizer, examples, template, batch_size=args.batch_size, max_length=max_length)
    result = {"model": model_identity(str(model_dir)), "data": str(data_path), "data_sha256": D.file_sha256(data_path),
              "template": template, "max_length": max_length, "n": len(rows),
              "loss": float(np.mean([r["loss"] for r in rows])), "n_tokens": int(sum(r["n_tokens"] for r in rows))}
    write_json(args.output, result)
    return result
