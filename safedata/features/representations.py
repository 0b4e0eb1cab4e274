"""Hidden-state features: the paper's last-layer state at the last supervised token (EOS)."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from .. import data as D
from ..errors import UserError
from ..models import load_model
from ..store import parse_shard, stream_rows_to_safetensors
from .runner import base_meta, check_existing_output, finish, prepare_data, run_chunked

log = logging.getLogger(__name__)

FEATURES = "features.safetensors"


def decoder_of(model):
    """The transformer body without the LM head: no vocab-sized logits are ever computed."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None:
        raise UserError(f"{type(model).__name__}: cannot find the decoder body (get_decoder)")
    return decoder


@torch.no_grad()
def representation_batch(model, items: list[D.Encoded], pad_id: int, layer=-1, pooling="last") -> torch.Tensor:
    """One row per item: the hidden state at its last supervised token, or the mean over supervised tokens."""
    batch = D.collate(items, pad_id)
    device = next(model.parameters()).device
    decoder = decoder_of(model)
    want_all = layer != -1
    out = decoder(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                  output_hidden_states=want_all, use_cache=False)
    hidden = out.hidden_states[layer] if want_all else out.last_hidden_state
    supervised = (batch["labels"] != D.IGNORE_INDEX).to(device)
    if pooling == "last":
        positions = torch.tensor([max(i for i, t in enumerate(it.labels) if t != D.IGNORE_INDEX) for it in items],
                                 device=device)
        rows = hidden[torch.arange(len(items), device=device), positions]
    elif pooling == "mean":
        weights = supervised.to(hidden.dtype).unsqueeze(-1)
        rows = (hidden * weights).sum(1) / weights.sum(1)
    else:
        raise UserError(f"--pooling {pooling!r}: choose last or mean")
    return rows.float().cpu()


def extract_representations(model_name, data_path, output_dir, template="paper", batch_size=8, max_length=None,
                            max_response_length=None, layer=-1, pooling="last", shard=None, chunk_size=512,
                            dtype=None, device=None, skip_bad=False) -> bool:
    """Write features.safetensors (N x d, fp32, file order) and meta.json; True once complete."""
    model, tokenizer = load_model(model_name, dtype, device)
    prepared = prepare_data(data_path, tokenizer, template, max_length, max_response_length, skip_bad)
    flags = {"max_length": max_length, "max_response_length": max_response_length, "layer": layer,
             "pooling": pooling, "dtype": str(next(model.parameters()).dtype)}
    meta = base_meta("representations", model_name, prepared, template, flags)
    check_existing_output(output_dir, meta)
    pad_id = D.pad_token_id(tokenizer)

    def compute(items):
        return {"features": representation_batch(model, items, pad_id, layer, pooling)}

    store = run_chunked(output_dir, meta, prepared, compute, batch_size, chunk_size, parse_shard(shard),
                        desc="representations")

    def write(chunks, meta_out):
        first = next(chunks.iter_tensor("features"))
        meta_out["dim"] = int(first.shape[1])
        stream_rows_to_safetensors(Path(output_dir) / FEATURES, "features", chunks.iter_tensor("features"),
                                   chunks.n_items, (meta_out["dim"],), torch.float32,
                                   {"model": meta_out["model"], "data_sha256": meta_out["data_sha256"]})

    return finish(output_dir, store, meta, FEATURES, write, stream=True)
