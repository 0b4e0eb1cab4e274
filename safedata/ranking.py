"""Score a benign pool against anchor sets, combine with weights, select top/bottom/range-k.

Bi-directional anchoring: harmful anchors get weight +1 and their safe counterparts -1,
so the pool is ranked by closeness to harmful compliance *and* distance from refusal.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import data as D
from .errors import MetadataMismatch, UserError
from .paths import input_data, output_dir
from .store import META, SafetensorsReader, atomic_write_text, read_json, require_same

log = logging.getLogger(__name__)

FEATURE_STAGES = ("representations", "gradient_features")
# Flags that may differ between pool and anchors. Representations are read at each example's last token
# whatever --max_length cut (anchors 480, pool 512 in the paper), but --max_response_length changes what
# a representation is, so it must match; gradient features may use it for anchors only (mlens 10).
PER_FILE_FLAGS = {"representations": ("max_length", "skip_bad"),
                  "gradient_features": ("max_length", "max_response_length", "skip_bad", "optimizer_state")}


@dataclass
class FeatureSet:
    """A feature dir, read lazily: a pool larger than memory is streamed in row blocks."""

    directory: Path
    meta: dict
    n: int
    dim: int

    @property
    def name(self) -> str:
        return self.directory.name

    @property
    def path(self) -> Path:
        return self.directory / "features.safetensors"

    def blocks(self, rows=8192):
        """Row blocks read with plain reads (not mmap, whose pages would stay resident)."""
        reader = SafetensorsReader(self.path)
        if reader.entries["features"]["dtype"] not in ("F32", "F64", "F16"):
            raise UserError(f"{self.path}: features dtype {reader.entries['features']['dtype']} not supported "
                            "(F32, F64, F16)")
        for start in range(0, self.n, rows):
            block = reader.read("features", start, start + rows)
            if block.shape[0] != min(self.n, start + rows) - start:
                raise UserError(f"{self.path}: truncated (expected {self.n} rows)")
            yield start, block.float()

    def all(self) -> torch.Tensor:
        return torch.cat([block for _, block in self.blocks()]) if self.n else torch.empty(0, self.dim)

    @property
    def features(self) -> torch.Tensor:
        return self.all()


def load_features(directory) -> FeatureSet:
    directory = Path(directory)
    meta = read_json(directory / META)
    if meta.get("stage") not in FEATURE_STAGES:
        raise UserError(f"{directory}: stage {meta.get('stage')!r} holds no features (expected one of {FEATURE_STAGES})")
    path = directory / "features.safetensors"
    if not path.exists():
        raise UserError(f"{path}: missing (did every shard finish?)")
    shape = SafetensorsReader(path).shape("features")
    if shape[0] != meta["n"] or len(meta["ids"]) != meta["n"]:
        raise MetadataMismatch(f"{directory}: features have {shape[0]} rows but meta.json lists {meta['n']}")
    return FeatureSet(directory, meta, int(shape[0]), int(shape[1]))


def comparable_flags(meta: dict) -> dict:
    per_file = PER_FILE_FLAGS.get(meta.get("stage"), ())
    return {k: v for k, v in (meta.get("flags") or {}).items() if k not in per_file}


def check_compatible(pool: FeatureSet, anchor: FeatureSet) -> None:
    """Refuse features made with a different model, template, stage or extraction flags."""
    a = dict(anchor.meta, flags=comparable_flags(anchor.meta))
    p = dict(pool.meta, flags=comparable_flags(pool.meta))
    require_same(p, a, ("stage", "model", "template", "flags"), f"pool features {pool.directory}",
                 f"anchor features {anchor.directory}")
    if pool.dim != anchor.dim:
        raise MetadataMismatch(f"{anchor.directory}: dim {anchor.dim} != pool dim {pool.dim}")


def check_pool_file(meta: dict, data_path, source: str) -> None:
    sha = D.file_sha256(data_path)
    if meta.get("data_sha256") != sha:
        raise MetadataMismatch(f"{source} was made from {meta.get('data_file')} (sha256 {meta.get('data_sha256', '?')[:12]}), "
                               f"not from --data_path {data_path} (sha256 {sha[:12]})")


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True)


BLOCK_BYTES = 32 << 20  # pool rows read per step: memory stays O(32 MB + N) whatever the pool size


def parse_avg_n(avg_n) -> str:
    """'all' or a positive integer (as text); checked before any feature is read."""
    text = str(avg_n).strip()
    if text == "all" or (text.isdigit() and int(text) >= 1):
        return text
    raise UserError(f"--avg_n {avg_n!r}: expected a positive integer (1 = max cosine, the paper) or 'all'")


def anchor_scores(pool, anchors: torch.Tensor, avg_n="1", block=None) -> torch.Tensor:
    """Per pool row: the mean of its top-avg_n cosine similarities to the anchors (fp32).

    avg_n=1 is the maximum (the paper's default); 'all' the mean over the whole set, which for
    unit anchors equals the cosine-scaled dot with the mean anchor. `pool` is a tensor or a
    FeatureSet; either way it is read in row blocks, so memory is O(block x d + N).
    """
    anchors_unit = _normalize(anchors.float())
    m = anchors_unit.shape[0]
    if str(avg_n) == "all":
        n_top = m
    else:
        n_top = int(avg_n)
        if not 1 <= n_top <= m:
            raise UserError(f"--avg_n {avg_n}: must be 'all' or between 1 and the anchor set size {m}")
    block = block or max(1, BLOCK_BYTES // (4 * anchors.shape[1]))
    if isinstance(pool, FeatureSet):
        n, blocks = pool.n, pool.blocks(block)
    else:
        n, blocks = pool.shape[0], ((s, pool[s:s + block]) for s in range(0, pool.shape[0], block))
    out = torch.empty(n, dtype=torch.float32)
    for start, rows in blocks:
        cos = _normalize(rows.float()) @ anchors_unit.T
        top = cos if n_top == m else cos.topk(n_top, dim=1).values
        out[start:start + rows.shape[0]] = top.mean(dim=1)
    return out


def combine(columns: dict[str, np.ndarray], weights: list[float]) -> np.ndarray:
    if len(weights) != len(columns):
        raise UserError(f"--weights: {len(weights)} weight(s) for {len(columns)} score source(s) "
                        f"({', '.join(columns)})")
    total = np.zeros(len(next(iter(columns.values()))), dtype=np.float64)
    for weight, values in zip(weights, columns.values()):
        total += weight * values.astype(np.float64)
    return total


def select(scores: np.ndarray, indices: np.ndarray, kind="top", k=100, range_start=None, range_end=None) -> np.ndarray:
    """Positions of the selection in rank order; non-finite scores never selected; ties by file index."""
    finite = np.flatnonzero(np.isfinite(scores))
    if kind == "bottom":
        order = finite[np.lexsort((indices[finite], scores[finite]))]
    else:
        order = finite[np.lexsort((indices[finite], -scores[finite]))]
    if kind in ("top", "bottom"):
        if k < 1:
            raise UserError("--k must be at least 1")
        if k > len(order):
            raise UserError(f"--k {k}: only {len(order)} example(s) have a finite score")
        return order[:k]
    if kind == "range":
        if range_start is None or range_end is None or not 0 <= range_start < range_end <= len(order):
            raise UserError(f"--type range needs 0 <= --range_start < --range_end <= {len(order)}")
        return order[range_start:range_end]
    raise UserError(f"--type {kind!r}: choose top, bottom or range")


def read_scores_csv(directory) -> tuple[dict, np.ndarray, list[str], dict[str, np.ndarray]]:
    """(meta, indices, ids, columns) from a gradient score dir."""
    directory = Path(directory)
    meta = read_json(directory / META)
    path = directory / "scores.csv"
    if not path.exists():
        raise UserError(f"{path}: missing (did every shard finish?)")
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        fields = reader.fieldnames or []
        if fields[:2] != ["index", "id"] or len(fields) < 3:
            raise UserError(f"{path}:1: expected header index,id,<target...>, found {','.join(fields)}")
        names = fields[2:]
        indices, ids, cols = [], [], {n: [] for n in names}
        for row in reader:
            try:
                indices.append(int(row["index"]))
                ids.append(row["id"])
                for n in names:
                    cols[n].append(float(row[n]) if row[n] not in ("", None) else math.nan)
            except (TypeError, ValueError):
                raise UserError(f"{path}:{reader.line_num}: malformed score row") from None
    # fp64, as scores.csv holds them: the index CSV and the order keep every digit the scoring stage wrote
    return meta, np.array(indices, dtype=np.int64), ids, {n: np.array(v, dtype=np.float64) for n, v in cols.items()}


def _records_text(records: list[dict], suffix: str) -> str:
    if suffix == ".jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return json.dumps(records, indent=4, ensure_ascii=False) + "\n"


def write_selection(data_path, write_to, name, kind, k, positions, indices, ids, columns, scores,
                    range_start=None, range_end=None) -> tuple[Path, Path]:
    """The selected records verbatim (pool's own format) and an index CSV with every score."""
    examples, _ = D.load_examples(data_path, need_response=True, skip_bad=True)
    by_index = {e.index: e for e in examples}
    records = []
    for position in positions:
        example = by_index.get(int(indices[position]))
        if example is None or example.id != ids[position]:
            raise MetadataMismatch(f"{data_path}: record {indices[position]} is not the one that was scored "
                                   f"(id {ids[position]}); the file changed since")
        records.append(example.record)
    suffix = Path(data_path).suffix.lower()
    suffix = ".jsonl" if suffix == ".jsonl" else ".json"
    tag = f"range{range_start}-{range_end}" if kind == "range" else f"{kind}{k}"
    out_dir = Path(write_to)
    subset_path = out_dir / f"{name}_{tag}{suffix}"
    index_path = out_dir / f"{name}_{tag}_index.csv"
    atomic_write_text(subset_path, _records_text(records, suffix))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["rank", *columns.keys(), "score", "index", "id"])
    for rank, position in enumerate(positions):
        writer.writerow([rank, *(repr(float(col[position])) for col in columns.values()),
                         repr(float(scores[position])), int(indices[position]), ids[position]])
    atomic_write_text(index_path, buffer.getvalue())
    return subset_path, index_path


def rank(data_path, write_to, name=None, pool_features=None, anchor_features=(), scores_dir=None, weights=None,
         avg_n="1", kind="top", k=100, range_start=None, range_end=None) -> dict:
    """Score (or read scores), combine, select, write. Returns a summary dict."""
    if (pool_features is None) == (scores_dir is None):
        raise UserError("give either --pool_features with --anchor_features, or --scores")
    input_data(data_path, "--data_path")
    output_dir(write_to, "--write_to")
    avg_n = parse_avg_n(avg_n)
    if kind not in ("top", "bottom", "range"):
        raise UserError(f"--type {kind!r}: choose top, bottom or range")
    if kind != "range" and k < 1:
        raise UserError(f"--k {k}: must be at least 1")
    for directory, flag in [(pool_features, "--pool_features"), (scores_dir, "--scores")] + \
            [(d, "--anchor_features") for d in anchor_features]:
        if directory is not None and not Path(directory).is_dir():
            raise UserError(f"{flag} {directory}: no such directory")
    if pool_features is not None and weights and len(weights) != len(anchor_features):
        raise UserError(f"--weights: {len(weights)} weight(s) for {len(anchor_features)} anchor feature dir(s)")
    name = name or Path(data_path).stem
    if scores_dir is not None:
        meta, indices, ids, columns = read_scores_csv(scores_dir)
        check_pool_file(meta, data_path, f"scores {scores_dir}")
        if not weights and (meta.get("flags") or {}).get("self_influence"):
            # Its two columns are alternatives, not an anchor and its counterparts: the default 1 -1 is meaningless.
            raise UserError(f"--scores {scores_dir}: self-influence scores need --weights: 0 1 ranks by self_inf_n "
                            "(Self-Inf-N), 1 0 by self_inf (Self-Inf)")
        if avg_n != "1":
            raise UserError(f"--avg_n {avg_n}: a top-N mean of cosines to anchor features; --scores are read as they "
                            "are")
        source = {"scores": str(scores_dir)}
    else:
        if not anchor_features:
            raise UserError("--anchor_features: give at least one anchor feature dir")
        pool = load_features(pool_features)
        check_pool_file(pool.meta, data_path, f"pool features {pool_features}")
        anchors = [load_features(d) for d in anchor_features]
        columns = {}
        for anchor in anchors:
            check_compatible(pool, anchor)
            column = anchor.name if anchor.name not in columns else f"{anchor.name}_{len(columns)}"
            columns[column] = anchor_scores(pool, anchor.all(), avg_n).numpy()
        indices, ids = np.array(pool.meta["indices"], dtype=np.int64), pool.meta["ids"]
        source = {"pool_features": str(pool_features), "anchor_features": [str(a) for a in anchor_features]}
    weights = list(weights) if weights else [1.0] + [-1.0] * (len(columns) - 1)
    scores = combine(columns, weights)
    nonfinite = [ids[i] for i in np.flatnonzero(~np.isfinite(scores))]
    if nonfinite:
        log.warning("%d example(s) with a non-finite score excluded from ranking: %s", len(nonfinite),
                    ", ".join(nonfinite[:20]))
    positions = select(scores, indices, kind, k, range_start, range_end)
    subset_path, index_path = write_selection(data_path, write_to, name, kind, k, positions, indices, ids, columns,
                                              scores, range_start, range_end)
    summary = {"subset": str(subset_path), "index_csv": str(index_path), "n_scored": int(len(scores)),
               "n_nonfinite": len(nonfinite), "nonfinite_ids": nonfinite, "weights": weights,
               "columns": list(columns), "avg_n": str(avg_n) if scores_dir is None else None, "type": kind, "k": len(positions), **source}
    log.info("wrote %s and %s", subset_path, index_path)
    return summary
