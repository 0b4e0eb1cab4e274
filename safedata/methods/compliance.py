"""Compliance direction (forward only), after DataShield (arXiv 2606.00160).

Definition used here (docs/METHODS.md):
- h_l(x): the mean, over x's supervised tokens (response + EOS, as finetune.py trains them), of the
  hidden state after decoder layer l (l = 1..L; `output_hidden_states[l]`), under the model's template.
- For each layer l: direction d_l = mean over harmful (compliant) anchors of h_l - mean over safe (refusal)
  anchors of h_l (all safe files pooled); u_l = d_l / ||d_l||.
- Separation of layer l: the anchors' projections on u_l, harmful p_h and safe p_s, as Cohen's d:
  (mean p_h - mean p_s) / sqrt((var p_h + var p_s) / 2) (sample variances). The layer with the largest
  separation is used (the earliest on a tie).
- Score of a pool example x: its projection h_l(x) . u_l (higher = more like a compliant answer).

The pool pass runs through safedata/features/runner.py (chunks, --shard, resume after kill -9), with the
hidden states from safedata.features.representations.representation_batch (pooling 'mean', that layer).
"""
from __future__ import annotations

import hashlib

import torch

from .. import data as D
from ..errors import UserError
from ..features.representations import decoder_of, representation_batch
from ..features.runner import base_meta, check_existing_output, finish, prepare_data, run_chunked
from ..models import load_model
from ..store import parse_shard, save_tensors
from ..templates import choose_template
from ..scores import SCORES_FILE, write_scores_csv
from .common import Cost

DIRECTION = "direction.safetensors"


@torch.no_grad()
def layer_states(model, items: list[D.Encoded], pad_id: int) -> torch.Tensor:
    """(items, L + 1, d): each hidden state (0 = embeddings) averaged over the item's supervised tokens."""
    batch = D.collate(items, pad_id)
    device = next(model.parameters()).device
    out = decoder_of(model)(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                            output_hidden_states=True, use_cache=False)
    weights = (batch["labels"] != D.IGNORE_INDEX).to(device).unsqueeze(-1)
    rows = [(hidden * weights.to(hidden.dtype)).sum(1) / weights.sum(1) for hidden in out.hidden_states]
    return torch.stack(rows, dim=1).float().cpu()


def anchor_states(model, prepared, pad_id: int, batch_size: int) -> torch.Tensor:
    rows = [None] * len(prepared.encoded)
    for positions in D.length_bucketed_batches([len(e) for e in prepared.encoded], batch_size):
        states = layer_states(model, [prepared.encoded[p] for p in positions], pad_id)
        for row, position in enumerate(positions):
            rows[position] = states[row]
    return torch.stack(rows)


def cohens_d(a: torch.Tensor, b: torch.Tensor) -> float:
    spread = ((a.var() + b.var()) / 2).sqrt().clamp_min(1e-30)  # identical projections: a huge, finite d
    return float((a.mean() - b.mean()) / spread)


def compliance_direction(harmful: torch.Tensor, safe: torch.Tensor) -> dict:
    """harmful (n_h, L+1, d), safe (n_s, L+1, d) in fp64 -> the chosen layer, its unit direction, each layer's d."""
    if harmful.shape[0] < 2 or safe.shape[0] < 2:
        raise UserError("compliance: at least 2 harmful and 2 safe anchors are needed to measure separation")
    harmful, safe = harmful.double(), safe.double()
    separations, directions = [], []
    for layer in range(1, harmful.shape[1]):
        difference = harmful[:, layer].mean(0) - safe[:, layer].mean(0)
        unit = difference / difference.norm()
        directions.append(unit)
        separations.append(cohens_d(harmful[:, layer] @ unit, safe[:, layer] @ unit))
    best = max(range(len(separations)), key=lambda i: (separations[i], -i))
    return {"layer": best + 1, "direction": directions[best], "separation": separations}


def score(model_name, data_path, harmful_path, safe_paths, output_dir, *, template=None, max_length=None,
          batch_size=8, chunk_size=512, shard=None, dtype=None, device=None, skip_bad=False,
          field_map: D.FieldMap | None = None) -> bool:
    """Choose the layer and direction on the anchors, then project the pool (runner: chunked, resumable)."""
    if not safe_paths:
        raise UserError("--anchors: the compliance method needs the harmful anchor file, then at least one safe file")
    cost = Cost()
    model, tokenizer = load_model(model_name, dtype, device)
    pad_id = D.pad_token_id(tokenizer)
    template = choose_template(model_name, template, tokenizer)
    def states(path):
        return anchor_states(model, prepare_data(path, tokenizer, template, max_length, field_map=field_map), pad_id,
                             batch_size)

    harmful = states(harmful_path)
    safe = torch.cat([states(p) for p in safe_paths])
    chosen = compliance_direction(harmful, safe)
    unit = chosen["direction"].float()
    prepared = prepare_data(data_path, tokenizer, template, max_length, None, skip_bad, field_map=field_map)
    flags = {"max_length": max_length, "skip_bad": skip_bad, "pooling": "mean", "layer": chosen["layer"],
             "direction_sha256": hashlib.sha256(unit.numpy().tobytes()).hexdigest()[:16],
             "dtype": str(next(model.parameters()).dtype)}
    meta = base_meta("method_scores", model_name, prepared, template, flags)
    meta.update(method="compliance", separation=chosen["separation"],
                anchors=[{"file": str(p), "sha256": D.file_sha256(p), "role": role}
                         for p, role in [(harmful_path, "harmful"), *[(p, "safe") for p in safe_paths]]])
    check_existing_output(output_dir, meta)
    save_tensors(f"{output_dir}/{DIRECTION}", {"direction": unit}, {"layer": str(chosen["layer"])})
    layer = chosen["layer"]

    def compute(items):
        return {"compliance": representation_batch(model, items, pad_id, layer, "mean") @ unit}

    store = run_chunked(output_dir, meta, prepared, compute, batch_size, chunk_size, parse_shard(shard),
                        desc="compliance")

    def write(tensors, meta_out):
        write_scores_csv(output_dir, meta_out["indices"], meta_out["ids"], {"compliance": tensors["compliance"].numpy()})
        meta_out.update(columns=["compliance"], cost=cost.result())

    return finish(output_dir, store, meta, SCORES_FILE, write)
