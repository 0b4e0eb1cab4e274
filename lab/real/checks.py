"""Checks of a rerun against what is committed (lab_real.py agree, same_selections, drift): kept runs of two
settings side by side, selections made again from a fresh clone, and how far two fine-tunes' weights ended apart."""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lab.real.runs import EVAL_SETS
from safedata.config import option
from safedata.errors import UserError
from safedata.scores import read_scores_file
from safedata.store import read_json


@dataclass(kw_only=True)
class AgreeArgs:
    """lab_real.py agree."""

    kept: str = option(help="the kept runs compared")
    reference: str = option(help="the folder compared against (e.g. the fp32 runs)")


def agreement(kept_dir: str | Path, reference_dir: str | Path) -> list[dict]:
    """Runs kept in both folders (same condition and seed; e.g. a precision against fp32): each one's ASR,
    over-refusal and held-out loss side by side, and the share of prompts with the same refused flag per set."""
    rows = []
    for path in sorted(Path(kept_dir).glob("*.json")):
        reference = Path(reference_dir) / path.name
        if not reference.is_file():
            continue
        run, ref = read_json(path), read_json(reference)
        row = {"run": path.stem}
        for key in ("advbench_asr", "over_refusal", "heldout_loss"):
            row[key], row[f"{key}_reference"] = run["row"][key], ref["row"][key]
        for set_name in EVAL_SETS:
            a, b = run["refused"][set_name], ref["refused"][set_name]
            if len(a) != len(b):
                raise UserError(f"{path} and {reference}: {len(a)} and {len(b)} {set_name} prompts")
            row[f"{set_name}_same_flag"] = sum(x == y for x, y in zip(a, b)) / len(a)
        rows.append(row)
    return rows


def _read_csv_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@dataclass(kw_only=True)
class SameSelectionsArgs:
    """lab_real.py same_selections."""

    selections: str = option(help="WORK/selections of the rerun")
    reference: str = option("lab/smollm2_study/selections", "the committed selections")
    scores: str | None = option(None, "the rerun's scores.csv (e.g. WORK/scores/grad/pool/scores.csv)")
    reference_scores: str | None = option(None, "the committed one (lab/smollm2_study/grad_pool)")


def same_selections(selections_dir: str | Path, reference_dir: str | Path, scores: str | Path | None = None,
                    reference_scores: str | Path | None = None) -> dict:
    """Selections made again (e.g. from a fresh clone that recomputed the scores) against the committed ones: per
    subset whether its file is byte for byte the same, how many of the reference's records it lacks, and the
    largest difference of any score column in its index CSV; with two scores.csv, the largest difference of each
    score column over the whole pool, absolute and as a share of the column's largest magnitude."""
    selections_dir, reference_dir = Path(selections_dir), Path(reference_dir)
    subsets = []
    for reference in sorted(reference_dir.glob("*/pool_*[0-9].json")):
        mine = selections_dir / reference.relative_to(reference_dir)
        if not mine.is_file():
            raise UserError(f"{mine}: missing (the reference has {reference})")
        ref_rows = _read_csv_rows(reference.with_name(reference.stem + "_index.csv"))
        my_rows = _read_csv_rows(mine.with_name(mine.stem + "_index.csv"))
        columns = [c for c in ref_rows[0] if c not in ("rank", "index", "id")]
        by_index = {row["index"]: row for row in my_rows}
        common = [row for row in ref_rows if row["index"] in by_index]
        subsets.append({
            "subset": str(reference.relative_to(reference_dir)),
            "same_bytes": mine.read_bytes() == reference.read_bytes(),
            "same_order": [r["index"] for r in my_rows] == [r["index"] for r in ref_rows],
            "reference_records_missing": len(ref_rows) - len(common),
            "max_score_diff": max((abs(float(row[c]) - float(by_index[row["index"]][c])) for row in common
                                   for c in columns), default=0.0)})
    result = {"subsets": subsets}
    if scores is not None and reference_scores is not None:
        _, my_ids, my_columns = read_scores_file(scores)
        _, ref_ids, ref_columns = read_scores_file(reference_scores)
        if my_ids != ref_ids or my_columns.keys() != ref_columns.keys():
            raise UserError(f"{scores} and {reference_scores}: not the same records and columns in the same order")
        result["scores"] = {}
        for column, b in ref_columns.items():
            a = my_columns[column]
            result["scores"][column] = {"max_abs_diff": float(np.abs(a - b).max()),
                                        "max_abs_diff_of_largest": float(np.abs(a - b).max() / np.abs(b).max()),
                                        "identical": bool(np.array_equal(a, b))}
    return result


def checkpoint_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise UserError(f"{model_dir}: no .safetensors weights")
    tensors = {}
    for path in files:
        tensors.update(load_file(path))
    return tensors


@dataclass(kw_only=True)
class DriftArgs:
    """lab_real.py drift."""

    model_name: str = option(help="the fine-tune compared", deprecated=("--model",))
    reference: str = option(help="the fine-tune it is compared with")
    base: str = option(help="the model both were fine-tuned from")


def weight_drift(model_dir: str | Path, reference_dir: str | Path, base_dir: str | Path) -> dict:
    """How far two fine-tunes of the same base ended apart, against how far the reference moved from the base:
    ||W - W_ref|| / ||W_ref - W_base|| over all parameters (fp64 sums; a tied embedding is stored, and so counted,
    once), with the largest elementwise difference. E.g. one run's micro-batches against another's padded batch."""
    run, ref, base = (checkpoint_tensors(Path(d)) for d in (model_dir, reference_dir, base_dir))
    if not (run.keys() == ref.keys() == base.keys()):
        raise UserError(f"{model_dir}, {reference_dir} and {base_dir} hold different parameter names")
    apart = moved = 0.0
    max_abs = 0.0
    for name in sorted(ref):
        if not (run[name].shape == ref[name].shape == base[name].shape):
            raise UserError(f"{name}: shapes {tuple(run[name].shape)}, {tuple(ref[name].shape)}, "
                            f"{tuple(base[name].shape)}")
        difference = run[name].double() - ref[name].double()
        apart += float(difference.pow(2).sum())
        moved += float((ref[name].double() - base[name].double()).pow(2).sum())
        max_abs = max(max_abs, float(difference.abs().max())) if difference.numel() else max_abs
    return {"apart": apart ** 0.5, "reference_moved": moved ** 0.5,
            "relative": apart ** 0.5 / moved ** 0.5 if moved else float("inf"), "max_abs_difference": max_abs,
            "parameters": sum(t.numel() for t in ref.values())}
