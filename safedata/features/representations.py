"""Hidden-state features: the paper's last-layer state at the last token of each example.

Anchors and pool are read at the same place: the last token of the example as tokenised, i.e. the end
token, or the last kept token when --max_length truncates (the original cut Alpaca at 512 tokens,
anchors at 480). --max_response_length never moves that position (it had no effect on the original's
representations either); it only narrows --pooling mean.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import data as D
from ..config import StageArgs, option, shared
from ..errors import UserError
from ..models import check_model_name, load_model
from ..paths import input_data, output_dir as checked_output_dir
from ..store import parse_shard, stream_rows_to_safetensors
from ..templates import choose_template
from .runner import base_meta, check_existing_output, finish, prepare_data, run_chunked

log = logging.getLogger(__name__)

FEATURES = "features.safetensors"
POOLINGS = ("last", "mean")


@dataclass(kw_only=True)
class RepresentationArgs:
    """get_representation.py's settings (its flags are generated from these fields)."""

    model_name: str = option(help="Hugging Face id (org/name) or local model directory")
    data_path: str = option(help=f"the records to featurise: {D.INPUT_TYPES}")
    output_dir: str = option(help="where features.safetensors and meta.json go (refused if it holds another run's "
                                  "output)")
    template: str | None = shared(StageArgs, "template")
    batch_size: int = option(8, "examples per forward pass (results do not depend on it)")
    max_length: int | None = shared(
        StageArgs, "max_length", help="cut each example to this many tokens; the representation is then read at "
        "the last kept token (the original: 512 for Alpaca, 2048 for Dolly/GSM8K, 480 for anchors; default: no cut)")
    max_response_length: int | None = option(
        None, "--pooling mean only: average over the first N supervised tokens (with --pooling last it is refused: "
              "it would move anchors' read position away from the pool's)")
    layer: int = option(-1, "hidden-state layer; -1 = last, after the final norm")
    pooling: str = option("last", "last: the state at the example's last token (the paper); mean: the mean over "
                                  "its supervised tokens", choices=POOLINGS)
    original_quirks: bool = shared(StageArgs, "original_quirks")
    shard: str | None = shared(StageArgs, "shard")
    chunk_size: int = shared(StageArgs, "chunk_size")
    dtype: str | None = shared(StageArgs, "dtype")
    device: str | None = shared(StageArgs, "device")
    skip_bad: bool = shared(StageArgs, "skip_bad")
    field_map: str | None = shared(StageArgs, "field_map")


def decoder_of(model):
    """The transformer body without the LM head: no vocab-sized logits are ever computed."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None:
        raise UserError(f"{type(model).__name__}: cannot find the decoder body (get_decoder)")
    return decoder


@torch.no_grad()
def representation_batch(model, items: list[D.Encoded], pad_id: int, layer=-1, pooling="last") -> torch.Tensor:
    """One row per item: the hidden state at its last token, or the mean over its supervised tokens."""
    batch = D.collate(items, pad_id)
    device = next(model.parameters()).device
    decoder = decoder_of(model)
    want_all = layer != -1
    out = decoder(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                  output_hidden_states=want_all, use_cache=False)
    hidden = out.hidden_states[layer] if want_all else out.last_hidden_state
    supervised = (batch["labels"] != D.IGNORE_INDEX).to(device)
    if pooling == "last":
        positions = torch.tensor([len(it) - 1 for it in items], device=device)  # right padding
        rows = hidden[torch.arange(len(items), device=device), positions]
    elif pooling == "mean":
        weights = supervised.to(hidden.dtype).unsqueeze(-1)
        rows = (hidden * weights).sum(1) / weights.sum(1)
    else:
        raise UserError(f"--pooling {pooling!r}: choose last or mean")
    return rows.float().cpu()


def check_flags(model_name, data_path, output_dir, batch_size, max_length, max_response_length, pooling,
                shard=None, chunk_size=512) -> None:
    """Every flag and path, before the model or the data is loaded."""
    check_model_name(model_name)
    input_data(data_path, "--data_path")
    checked_output_dir(output_dir)
    parse_shard(shard)
    for flag, value in (("--batch_size", batch_size), ("--max_length", max_length),
                        ("--max_response_length", max_response_length), ("--chunk_size", chunk_size)):
        if value is not None and value < 1:
            raise UserError(f"{flag} {value}: must be a positive number")
    if pooling not in POOLINGS:
        raise UserError(f"--pooling {pooling!r}: choose last or mean")
    if pooling == "last" and max_response_length is not None:
        raise UserError("--max_response_length does not apply to --pooling last: the representation is read at the "
                        "last token of the example (cut by --max_length), for anchors and pool alike, as the original; "
                        "drop the flag (or use --pooling mean)")


def extract_representations(args: RepresentationArgs) -> bool:
    """Write features.safetensors (N x d, fp32, file order) and meta.json; True once complete."""
    a = args
    check_flags(a.model_name, a.data_path, a.output_dir, a.batch_size, a.max_length, a.max_response_length,
                a.pooling, a.shard, a.chunk_size)
    model, tokenizer = load_model(a.model_name, a.dtype, a.device)
    template = choose_template(a.model_name, a.template, tokenizer)
    prepared = prepare_data(a.data_path, tokenizer, template, a.max_length, a.max_response_length, a.skip_bad,
                            a.original_quirks, D.field_map_of(a.field_map))
    flags = {"max_length": a.max_length, "max_response_length": a.max_response_length, "layer": a.layer,
             "pooling": a.pooling, "original_quirks": a.original_quirks,
             "dtype": str(next(model.parameters()).dtype)}
    meta = base_meta("representations", a.model_name, prepared, template, flags)
    output_dir = a.output_dir
    check_existing_output(output_dir, meta)
    pad_id = D.pad_token_id(tokenizer)

    def compute(items):
        return {"features": representation_batch(model, items, pad_id, a.layer, a.pooling)}

    store = run_chunked(output_dir, meta, prepared, compute, a.batch_size, a.chunk_size, parse_shard(a.shard),
                        desc="representations")

    def write(chunks, meta_out):
        first = next(chunks.iter_tensor("features"))
        meta_out["dim"] = int(first.shape[1])
        stream_rows_to_safetensors(Path(output_dir) / FEATURES, "features", chunks.iter_tensor("features"),
                                   chunks.n_items, (meta_out["dim"],), torch.float32,
                                   {"model": meta_out["model"], "data_sha256": meta_out["data_sha256"]})

    return finish(output_dir, store, meta, FEATURES, write, stream=True)
