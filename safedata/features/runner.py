"""The loop every per-example stage shares: encode, chunk, shard, batch, resume, merge.

A stage gives a `compute(batch_items) -> {name: tensor with one row per item}` function;
this module owns which examples run where, and what is on disk.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .. import data as D
from ..distributed import rank_and_world
from ..errors import UserError
from ..models import model_identity
from ..progress import progress
from ..store import (META, ChunkStore, environment, fingerprint, model_key, now, refuse_foreign_output, save_tensors,
                     write_json)

log = logging.getLogger(__name__)


@dataclass
class PreparedData:
    """A data file turned into encoded examples, with everything left out accounted for."""

    data_path: str
    data_sha256: str
    examples: list[D.Example]
    encoded: list[D.Encoded]
    excluded: list[D.Excluded] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    field_map: D.FieldMap = D.DEFAULT_FIELD_MAP
    n_cut: int = 0          # examples --max_length cut (counted by data.encode_examples, which logs it)

    @property
    def ids(self) -> list[str]:
        return [e.id for e in self.encoded]

    @property
    def indices(self) -> list[int]:
        return [e.index for e in self.encoded]

    @property
    def empty_responses(self) -> list[int]:
        return D.empty_response_indices(self.examples)


def prepare_data(data_path, tokenizer, template="paper", max_length=None, max_response_length=None,
                 skip_bad=False, original_quirks=False, field_map: D.FieldMap | None = None) -> PreparedData:
    log.info("reading %s", data_path)
    field_map = field_map or D.DEFAULT_FIELD_MAP
    examples, skipped = D.load_examples(data_path, need_response=True, skip_bad=skip_bad, field_map=field_map)
    log.info("read %d record(s); tokenising (template %s%s)", len(examples), template,
             ", --max_length %d" % max_length if max_length else "")
    encoding = D.encode_examples(examples, tokenizer, template, max_length, max_response_length, original_quirks)
    encoded, excluded = encoding
    n_empty = len(D.empty_response_indices(examples))
    if n_empty:
        log.info("%d record(s) with an empty response: kept, as the original, with the end token alone supervised "
                 "(counted in meta.json)", n_empty)
    if not encoded:
        raise UserError(f"{data_path}: no example has a supervised token (check --max_length)")
    return PreparedData(str(data_path), D.file_sha256(data_path), examples, encoded, excluded, skipped, field_map,
                        encoding.n_cut)


def base_meta(stage: str, model_name: str, prepared: PreparedData, template: str, flags: dict) -> dict:
    """What made an output: the next stage checks these before trusting it."""
    return {
        "stage": stage,
        "model": model_identity(model_name),    # <path>#<content id>: the path for a person, the id compared
        "template": template,
        "data_file": str(Path(prepared.data_path).resolve()),
        "data_sha256": prepared.data_sha256,
        "flags": flags,
        "n": len(prepared.encoded),
        "indices": prepared.indices,
        "ids": prepared.ids,
        "excluded": [vars(e) for e in prepared.excluded],
        "skipped": prepared.skipped,
        "n_cut": prepared.n_cut,                 # examples --max_length cut (logged by data.encode_examples)
        # Kept, as the original did: examples whose only supervised token is the end token.
        "n_empty_response": len(prepared.empty_responses),
        "empty_response_indices": prepared.empty_responses,
        # --field_map, when one was given: how the records' conversations were read
        **D.recorded_field_map(prepared.field_map),
    }


def run_fingerprint(meta: dict) -> str:
    """The chunks' stamp: a hash of what decides their numbers, all of it content: the stage, the model's content id
    (store.model_key; not its path), the template, the data's sha256, the record ids, how the records were read
    (--field_map) and the stage's flags (each stage keeps only value-changing ones there, targets by their tensors'
    hash; --batch_size and --chunk_size stay out: they move fp32 scores in their last bits only, README
    "Determinism", and a rerun after an out-of-memory error resumes at a smaller batch). Paths (output dir, data
    file, model dir, target dirs) are recorded in meta.json for a person and are no part of it: a moved run tree or
    model keeps its finished chunks."""
    identity = {k: meta[k] for k in ("stage", "template", "data_sha256", "flags", "ids")}
    identity["model"] = model_key(meta["model"])
    if "field_map" in meta:
        identity["field_map"] = meta["field_map"]
    return fingerprint(identity)


def run_chunked(output_dir, meta: dict, prepared: PreparedData, compute: Callable[[list[D.Encoded]], dict],
                batch_size: int, chunk_size: int, shard=(0, 1), desc="examples") -> ChunkStore:
    """Compute every pending chunk of this shard (and rank), atomically, resumably: the encoded examples of each
    chunk in length-bucketed batches of `compute`."""
    store = ChunkStore(output_dir, run_fingerprint(meta), len(prepared.encoded), chunk_size)

    def chunk_rows(span: range, advance: Callable[[int], None]) -> dict[str, torch.Tensor]:
        items = [prepared.encoded[i] for i in span]
        rows: dict[str, list] = {}
        for batch_positions in D.length_bucketed_batches([len(it) for it in items], batch_size):
            outputs = compute([items[p] for p in batch_positions])
            for name, tensor in outputs.items():
                slots = rows.setdefault(name, [None] * len(items))
                for row, position in enumerate(batch_positions):
                    slots[position] = tensor[row]
            advance(len(batch_positions))
        return {name: torch.stack(slots) for name, slots in rows.items()}

    compute_chunks(store, chunk_rows, shard, desc)
    return store


def compute_chunks(store: ChunkStore, chunk_rows: Callable[[range, Callable[[int], None]], dict], shard=(0, 1),
                   desc="examples") -> None:
    """The one loop of every chunked stage: each chunk of this shard (and data-parallel rank) not done yet by this
    run is computed (`chunk_rows(span, advance)` -> {name: tensor with a row per item of the span}, calling
    advance(n) as items finish) and saved atomically; finished chunks are kept (resume), with one progress line."""
    rank = rank_and_world()
    mine = store.assigned(shard, rank)
    pending = store.pending(mine)
    total = sum(len(store.span(c)) for c in pending)
    if len(pending) < len(mine):
        log.info("resuming: %d of %d chunk(s) of this shard already done", len(mine) - len(pending), len(mine))
    log.info("%s: %d example(s) to compute in %d chunk(s)", desc, total, len(pending))
    with progress(total=total, desc=desc, unit="ex", disable=rank[0] != 0) as bar:
        for chunk in pending:
            store.save(chunk, chunk_rows(store.span(chunk), bar.update))


def finish(output_dir, store: ChunkStore, meta: dict, result_name: str, write_result: Callable[[dict, dict], None],
           stream: bool = False):
    """Merge when every chunk of every shard is done; returns True when the output is complete.

    write_result(tensors, meta) gets all chunks concatenated, or with stream=True the ChunkStore
    itself (to copy large tensors chunk by chunk, see store.stream_rows_to_safetensors).

    The merge is idempotent (same bytes whoever runs it), so concurrent shards finishing at
    once are safe: each write is an atomic rename.
    """
    rank, world = rank_and_world()
    if world > 1:
        torch.distributed.barrier()
    if rank != 0:
        return False
    missing = store.missing()
    if missing:
        log.info("%d chunk(s) still to do in other shards; merge runs when the last shard finishes", len(missing))
        return False
    tensors = store if stream else store.gather()
    meta = dict(meta, created=meta.get("created") or now(), environment=environment(), chunk_size=store.chunk_size)
    write_result(tensors, meta)
    write_json(Path(output_dir) / META, meta)
    log.info("wrote %s", Path(output_dir) / result_name)
    return True


def check_existing_output(output_dir, meta: dict) -> None:
    """An output dir holding another run's finished result is refused, not overwritten silently."""
    refuse_foreign_output(output_dir, meta, ("stage", "model", "template", "data_sha256", "flags"))


__all__ = ["PreparedData", "prepare_data", "base_meta", "run_fingerprint", "run_chunked", "compute_chunks", "finish",
           "save_tensors", "check_existing_output"]
