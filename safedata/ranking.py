"""Score a benign pool against anchor sets, combine with weights, select top/bottom/range-k.

Bi-directional anchoring: harmful anchors get weight +1 and their safe counterparts -1,
so the pool is ranked by closeness to harmful compliance *and* distance from refusal.
"""
from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import data as D
from .config import StageArgs, option, shared
from .errors import MetadataMismatch, UserError
from .paths import input_data, output_dir as check_output_dir
from .scores import anchor_scores, combine, default_weights, parse_avg_n, read_scores_csv, unique_names
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


def write_selection(data_path, output_dir, name, kind, k, positions, indices, ids, columns, scores,
                    range_start=None, range_end=None, field_map: D.FieldMap | None = None) -> tuple[Path, Path]:
    """The selected records verbatim (pool's own format) and an index CSV with every score."""
    examples, _ = D.load_examples(data_path, need_response=True, skip_bad=True, field_map=field_map)
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
    out_dir = Path(output_dir)
    subset_path = out_dir / f"{name}_{tag}{suffix}"
    index_path = out_dir / f"{name}_{tag}_index.csv"
    D.write_records(records, subset_path)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["rank", *columns.keys(), "score", "index", "id"])
    for rank, position in enumerate(positions):
        writer.writerow([rank, *(repr(float(col[position])) for col in columns.values()),
                         repr(float(scores[position])), int(indices[position]), ids[position]])
    atomic_write_text(index_path, buffer.getvalue())
    return subset_path, index_path


KINDS = ("top", "bottom", "range")


@dataclass(kw_only=True)
class RankArgs:
    """rank.py's settings (its flags are generated from these fields)."""

    data_path: str = option(help="the pool file the features/scores were computed on")
    pool_features: str | None = option(None, "feature dir of the pool (get_representation.py or get_gradients.py "
                                             "--proj_dim)")
    anchor_features: list[str] = option(
        default_factory=list, help="one feature dir per anchor set, harmful first (the paper's representation "
                                   "recipe: the harmful set alone, with --weights 1)")
    scores_dir: str | None = option(None, "a get_gradients.py score dir (scores.csv): one column per target",
                                    flags=("--scores",), metavar="DIR")
    weights: list[float] | None = option(None, "one weight per anchor set / score column (default: 1 -1 -1 ...: "
                                               "bi-directional anchoring)")
    avg_n: str = option("1", "mean of the top-N cosines per anchor set; 1 = max (paper), 'all' = mean")
    kind: str = option("top", "top: the k highest scores; bottom: the k lowest; range: ranks "
                              "--range_start..--range_end", choices=KINDS, flags=("--type",))
    k: int = option(100, "how many examples to select with --type top/bottom (default: 100)")
    range_start: int | None = option(None, "with --type range: first rank (0-based, descending)")
    range_end: int | None = option(None, "with --type range: rank after the last")
    output_dir: str = option(help="where the subset and its index CSV go", deprecated=("--write_to",))
    name: str | None = option(None, "file name prefix (default: the pool file's stem)")
    field_map: str | None = shared(StageArgs, "field_map")


def rank(args: RankArgs) -> dict:
    """Score (or read scores), combine, select, write. Returns a summary dict."""
    data_path, name = args.data_path, args.name
    pool_features, anchor_features, scores_dir = args.pool_features, args.anchor_features, args.scores_dir
    weights, avg_n, kind, k = args.weights, args.avg_n, args.kind, args.k
    range_start, range_end = args.range_start, args.range_end
    if (pool_features is None) == (scores_dir is None):
        raise UserError("give either --pool_features with --anchor_features, or --scores")
    input_data(data_path, "--data_path")
    check_output_dir(args.output_dir, "--output_dir")
    avg_n = parse_avg_n(avg_n)
    if kind not in KINDS:
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
        for column, anchor in zip(unique_names(a.name for a in anchors), anchors):
            check_compatible(pool, anchor)
            columns[column] = anchor_scores(pool, anchor.all(), avg_n).numpy()
        indices, ids = np.array(pool.meta["indices"], dtype=np.int64), pool.meta["ids"]
        source = {"pool_features": str(pool_features), "anchor_features": [str(a) for a in anchor_features]}
    weights = list(weights) if weights else default_weights(len(columns))
    scores = combine(columns, weights)
    nonfinite = [ids[i] for i in np.flatnonzero(~np.isfinite(scores))]
    if nonfinite:
        log.warning("%d example(s) with a non-finite score excluded from ranking: %s", len(nonfinite),
                    ", ".join(nonfinite[:20]))
    positions = select(scores, indices, kind, k, range_start, range_end)
    subset_path, index_path = write_selection(data_path, args.output_dir, name, kind, k, positions, indices, ids, columns,
                                              scores, range_start, range_end, D.field_map_of(args.field_map))
    summary = {"subset": str(subset_path), "index_csv": str(index_path), "n_scored": int(len(scores)),
               "n_nonfinite": len(nonfinite), "nonfinite_ids": nonfinite, "weights": weights,
               "columns": list(columns), "avg_n": str(avg_n) if scores_dir is None else None, "type": kind, "k": len(positions), **source}
    log.info("wrote %s and %s", subset_path, index_path)
    return summary
