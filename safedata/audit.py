"""Audit a fine-tuning set before training: score every example against anchors (harmful +1, safe -1), flag
the highest-scoring ones and write the kept set in the input's own format, the flagged examples with their
scores, and a self-contained report.html.

Scoring reuses the existing stages, in OUTPUT/ (each resumable, shardable and checked like everywhere else):

  gradient        OUTPUT/anchors/<anchor>/ (get_gradients --anchor), OUTPUT/scores/ (get_gradients --targets)
  representation  OUTPUT/anchors/<anchor>/, OUTPUT/features/ (get_representation)
  --scores DIR    any method's score directory: scores.csv (index, id, one column per anchor set) and a
                  meta.json naming the data's sha256 (get_gradients.py --targets writes exactly this)

The decision: the top `drop_k`, the top `drop_fraction` (rounded half up), or every score >= `threshold`
is flagged; ties are broken by file index (ranking.select); examples without a finite score are kept and
listed. Then OUTPUT/kept<ext> + OUTPUT/flagged<ext> (records verbatim, file order, the input's type),
flagged.csv (rank order: rank, index, id, score, a column per anchor set), all_scores.csv (file order),
report.html and meta.json.
"""
from __future__ import annotations

import csv
import io
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import data as D
from .audit_report import write_report
from .config import StageArgs, option, shared
from .errors import MetadataMismatch, UserError
from .features import gradients as G
from .features.representations import RepresentationArgs, extract_representations
from .models import load_model
from .ranking import check_compatible, check_pool_file, load_features, select
from .scores import anchor_scores, combine, default_weights, read_scores_csv
from .store import META, atomic_write_text, environment, now, refuse_foreign_output, write_json

log = logging.getLogger(__name__)

METHODS = ("gradient", "representation")
STAGE = "audit"


DROP_RULE = "what to drop (exactly one)"


@dataclass(kw_only=True)
class AuditArgs:
    """audit.py's settings (its flags are generated from these fields)."""

    data_path: str = option(help="the dataset to audit: .json / .jsonl / .csv / .parquet / .arrow, a save_to_disk "
                                 "directory, or hf:owner/name?config=NAME&split=SPLIT")
    output_dir: str = option(help="kept / flagged data, flagged.csv, report.html, meta.json; the scoring stages' "
                                  "outputs in sub-directories (resumable)")
    model_name: str | None = option(None, "Hugging Face id or local directory of the model to be fine-tuned")
    anchors: list[str] = option(default_factory=list, metavar="FILE",
                                help="anchor record files, one per anchor set (harmful compliant first, then safe "
                                     "refusals)")
    weights: list[float] | None = option(None, "one weight per anchor set (default: 1 -1 -1 ...: harmful +1, safe -1)")
    method: str = option("gradient", "gradient: exact gradient matching (get_gradients.py); representation: "
                                     "last-token hidden states (get_representation.py)", choices=METHODS)
    scores_dir: str | None = option(
        None, "use scores from any method instead of computing them: a directory with scores.csv (index, id, one "
              "column per anchor set) and meta.json (data_sha256 of --data_path)", flags=("--scores",), metavar="DIR")
    drop_fraction: float | None = option(None, "drop this fraction of the scored examples (highest scores; rounded "
                                               "half up)", group=DROP_RULE)
    drop_k: int | None = option(None, "drop the K highest-scoring examples", group=DROP_RULE)
    threshold: float | None = option(None, "drop every example scoring at least this", group=DROP_RULE)
    template: str | None = shared(StageArgs, "template")
    batch_size: int = option(8, "examples per forward/backward pass")
    max_length: int | None = shared(StageArgs, "max_length")
    anchor_max_response_length: int | None = option(
        10, "gradient anchors: supervise only the first N answer tokens (the paper: 10; 0 = all)")
    avg_n: str = option("1", "representation: mean of the top-N cosines per anchor set (1 = max, as the paper; "
                             "'all' = mean)")
    report_top: int = option(30, "flagged examples shown in report.html")
    shard: str | None = shared(StageArgs, "shard")
    chunk_size: int = shared(StageArgs, "chunk_size")
    dtype: str | None = shared(StageArgs, "dtype")
    device: str | None = shared(StageArgs, "device")
    skip_bad: bool = shared(StageArgs, "skip_bad")
    field_map: str | None = shared(StageArgs, "field_map")

    def __post_init__(self):
        if self.anchor_max_response_length == 0:   # --anchor_max_response_length 0: every answer token
            self.anchor_max_response_length = None


@dataclass
class Scored:
    """Scores of the examples a method could score, in the score file's order."""

    source: dict
    indices: np.ndarray
    ids: list[str]
    columns: dict[str, np.ndarray]
    data_sha256: str
    unscored: list[dict] = field(default_factory=list)
    n_cut: int | None = None        # examples the scoring stage cut at --max_length (None: not recorded)


def check_config(cfg: AuditArgs) -> None:
    """Flags alone (no file read)."""
    D.check_sizes(batch_size=cfg.batch_size, chunk_size=cfg.chunk_size, max_length=cfg.max_length,
                  anchor_max_response_length=cfg.anchor_max_response_length)
    rules = [name for name, value in (("--drop_fraction", cfg.drop_fraction), ("--drop_k", cfg.drop_k),
                                      ("--threshold", cfg.threshold)) if value is not None]
    if len(rules) != 1:
        raise UserError("give exactly one of --drop_fraction, --drop_k, --threshold"
                        + (f" (got {', '.join(rules)})" if rules else ""))
    if cfg.drop_fraction is not None and not 0 < cfg.drop_fraction < 1:
        raise UserError(f"--drop_fraction {cfg.drop_fraction}: must be between 0 and 1")
    if cfg.drop_k is not None and cfg.drop_k < 1:
        raise UserError(f"--drop_k {cfg.drop_k}: must be at least 1")
    if cfg.scores_dir is None:
        if cfg.method not in METHODS:
            raise UserError(f"--method {cfg.method!r}: choose {', '.join(METHODS)}, or give --scores DIR from any method")
        if not cfg.model_name or not cfg.anchors:
            raise UserError(f"--method {cfg.method} needs --model_name and --anchors (or give --scores DIR)")
    if cfg.weights is not None and cfg.anchors and len(cfg.weights) != len(cfg.anchors):
        raise UserError(f"--weights: {len(cfg.weights)} weight(s) for {len(cfg.anchors)} anchor file(s)")


def _anchor_dirs(cfg: AuditArgs) -> list[Path]:
    names, dirs = set(), []
    for anchor in cfg.anchors:
        name = Path(anchor).name.split(".")[0] or "anchors"
        while name in names:
            name += "_"
        names.add(name)
        dirs.append(Path(cfg.output_dir) / "anchors" / name)
    return dirs


def _stage_settings(cfg: AuditArgs) -> dict:
    """The settings the audit passes on to each scoring stage."""
    return dict(model_name=cfg.model_name, template=cfg.template, batch_size=cfg.batch_size, dtype=cfg.dtype,
                device=cfg.device, field_map=cfg.field_map)


def _pool_settings(cfg: AuditArgs, output_dir: Path) -> dict:
    """... and to the pool's stage: the audited file, sharded and chunked."""
    return dict(_stage_settings(cfg), data_path=cfg.data_path, output_dir=str(output_dir), shard=cfg.shard,
                chunk_size=cfg.chunk_size, max_length=cfg.max_length, skip_bad=cfg.skip_bad)


def _score_gradient(cfg: AuditArgs) -> Scored | None:
    model, tokenizer = load_model(cfg.model_name, cfg.dtype, cfg.device)
    targets = _anchor_dirs(cfg)
    for anchor, target in zip(cfg.anchors, targets):
        G.build_target(G.GradientArgs(anchor=True, data_path=anchor, output_dir=str(target),
                                      max_response_length=cfg.anchor_max_response_length, **_stage_settings(cfg)),
                       model, tokenizer)
    scores_dir = Path(cfg.output_dir) / "scores"
    if not G.score_pool(G.GradientArgs(targets=[str(t) for t in targets], **_pool_settings(cfg, scores_dir)),
                        model, tokenizer):
        return None
    return _read_scores_dir(scores_dir, cfg.data_path, cfg.skip_bad)


def _score_representation(cfg: AuditArgs) -> Scored | None:
    anchor_dirs = _anchor_dirs(cfg)
    for anchor, directory in zip(cfg.anchors, anchor_dirs):
        extract_representations(RepresentationArgs(data_path=anchor, output_dir=str(directory),
                                                   **_stage_settings(cfg)))
    features_dir = Path(cfg.output_dir) / "features"
    if not extract_representations(RepresentationArgs(**_pool_settings(cfg, features_dir))):
        return None
    pool = load_features(features_dir)
    columns = {}
    for directory in anchor_dirs:
        anchor = load_features(directory)
        check_compatible(pool, anchor)
        columns[directory.name] = anchor_scores(pool, anchor.all(), cfg.avg_n).numpy()
    meta = pool.meta
    unscored = [dict(e, reason=e.get("reason", "excluded")) for e in meta.get("excluded", [])]
    return Scored({"method": "representation", "features": str(features_dir),
                   "anchors": [str(d) for d in anchor_dirs], "avg_n": cfg.avg_n},
                  np.array(meta["indices"], dtype=np.int64), meta["ids"], columns, meta["data_sha256"], unscored,
                  meta.get("n_cut"))


def _read_scores_dir(directory, data_path, skip_bad=False) -> Scored:
    """A score dir of --data_path. One made with --skip_bad left bad records unscored: they would be kept
    unseen, so it is refused unless this audit is told --skip_bad too."""
    meta, indices, ids, columns = read_scores_csv(directory)
    check_pool_file(meta, data_path, f"scores {directory}")
    skipped = meta.get("skipped") or []
    if skipped and not skip_bad:
        raise UserError(f"scores {directory}: made with --skip_bad, {len(skipped)} bad record(s) not scored (first: "
                        f"{skipped[0]}); fix the data, or give --skip_bad to audit without them (they are kept and "
                        "listed in meta.json)")
    unscored = [dict(e) for e in meta.get("excluded", [])] + [dict(e) for e in meta.get("nonfinite", [])]
    method = meta.get("method") or {"gradient_scores": "gradient"}.get(meta.get("stage"), meta.get("stage", "scores"))
    source = {"method": method, "scores": str(Path(directory).resolve())}
    return Scored(source, indices, ids, columns, meta["data_sha256"], unscored, meta.get("n_cut"))


def score(cfg: AuditArgs) -> Scored | None:
    """The chosen method's per-anchor-set scores; None while other shards are still running."""
    if cfg.scores_dir is not None:
        return _read_scores_dir(cfg.scores_dir, cfg.data_path, cfg.skip_bad)
    if cfg.method == "gradient":
        return _score_gradient(cfg)
    return _score_representation(cfg)


def decide(scores: np.ndarray, indices: np.ndarray, cfg: AuditArgs) -> tuple[np.ndarray, float]:
    """Positions flagged, in rank order (highest score first; ties by file index), and the cut-off score
    (the lowest flagged score, or the threshold)."""
    finite = int(np.isfinite(scores).sum())
    if cfg.threshold is not None:
        order = select(scores, indices, "top", finite) if finite else np.array([], dtype=np.int64)
        flagged = order[scores[order] >= cfg.threshold]
        return flagged, float(cfg.threshold)
    k = cfg.drop_k if cfg.drop_k is not None else math.floor(cfg.drop_fraction * finite + 0.5)
    if k > finite:
        raise UserError(f"--drop_k {k}: only {finite} example(s) have a finite score")
    flagged = select(scores, indices, "top", k) if k else np.array([], dtype=np.int64)
    return flagged, float(scores[flagged[-1]]) if len(flagged) else math.inf


def _csv_text(header, rows) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def _number(value) -> str:
    return repr(float(value)) if np.isfinite(value) else ""


def _settings(cfg: AuditArgs, weights) -> dict:
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("output_dir", "shard", "chunk_size", "report_top")}
    settings["weights"] = list(weights)
    if cfg.field_map:
        settings["field_map"] = D.field_map_of(cfg.field_map).describe()
    return settings


def check_existing_audit(output_dir: Path, meta: dict, keys=("data_sha256", "method", "settings")) -> None:
    """An output dir holding another audit (other data, scores or decision rule) is refused."""
    refuse_foreign_output(output_dir, meta, keys, "this audit", "an earlier audit", "use another --output_dir",
                          stage=STAGE)


def _weights(cfg: AuditArgs, n_columns: int) -> list[float]:
    return list(cfg.weights) if cfg.weights else default_weights(n_columns)


def audit(cfg: AuditArgs) -> dict | None:
    """Check every input, score, decide, write. Returns a summary, or None when other shards still have to
    finish scoring."""
    check_config(cfg)
    field_map = D.field_map_of(cfg.field_map)
    output_dir = Path(cfg.output_dir)
    # Every input is read and checked before any work or file: an empty or bad data or anchor file, or a score
    # dir that skipped records, stops here, not after the anchor targets are built into output_dir.
    given = _read_scores_dir(cfg.scores_dir, cfg.data_path, cfg.skip_bad) if cfg.scores_dir is not None else None
    if given is None:
        for anchor in cfg.anchors:  # the stages read anchors strictly (no --skip_bad)
            D.load_examples(anchor, need_response=True, field_map=field_map)
    examples, skipped = D.load_examples(cfg.data_path, need_response=True, skip_bad=cfg.skip_bad, field_map=field_map)
    n_columns = len(given.columns) if given is not None else len(cfg.anchors)
    check_existing_audit(output_dir, {"settings": _settings(cfg, _weights(cfg, n_columns))}, keys=("settings",))
    scored = given or score(cfg)
    if scored is None:
        log.info("this shard is done; the shard that finishes scoring last writes the audit")
        return None
    weights = _weights(cfg, len(scored.columns))
    totals = combine(scored.columns, weights)
    flagged_positions, cutoff = decide(totals, scored.indices, cfg)
    n_records = len(D.read_raw_records(cfg.data_path))
    by_index = {e.index: e for e in examples}
    for position, index in enumerate(scored.indices):
        example = by_index.get(int(index))
        if example is None or example.id != scored.ids[position]:
            raise MetadataMismatch(f"{cfg.data_path}: record {index} is not the one that was scored "
                                   f"(id {scored.ids[position]}); the data changed since")
    meta = {"stage": STAGE, "data_file": str(cfg.data_path), "data_sha256": scored.data_sha256,
            "method": scored.source, "settings": _settings(cfg, weights), "skipped": skipped, "n_cut": scored.n_cut}
    log.info("scores: %s of %d scored example(s) cut at --max_length by the scoring stage", "an unrecorded number"
             if scored.n_cut is None else scored.n_cut, len(scored.ids))
    check_existing_audit(output_dir, meta)

    rank_of = {int(p): r for r, p in enumerate(flagged_positions)}
    flagged_indices = sorted(int(scored.indices[p]) for p in flagged_positions)
    flagged_set = set(flagged_indices)
    kept_indices = [i for i in range(n_records) if i not in flagged_set]
    kept_path = D.write_subset(cfg.data_path, kept_indices, output_dir / "kept")
    flagged_path = D.write_subset(cfg.data_path, flagged_indices, output_dir / "flagged")
    names = list(scored.columns)
    atomic_write_text(output_dir / "flagged.csv", _csv_text(
        ["rank", "index", "id", "score", *names],
        [[r, int(scored.indices[p]), scored.ids[p], _number(totals[p]), *(_number(scored.columns[n][p]) for n in names)]
         for r, p in enumerate(flagged_positions)]))
    full_order = np.argsort(-np.where(np.isfinite(totals), totals, -np.inf), kind="stable")
    score_rank = {int(p): r for r, p in enumerate(full_order)}
    atomic_write_text(output_dir / "all_scores.csv", _csv_text(
        ["index", "id", "score", "score_rank", "flagged", *names],
        [[int(scored.indices[p]), scored.ids[p], _number(totals[p]), score_rank[p] if np.isfinite(totals[p]) else "",
          int(p in rank_of), *(_number(scored.columns[n][p]) for n in names)] for p in range(len(totals))]))
    nonfinite = [{"index": int(scored.indices[p]), "id": scored.ids[p], "reason": "non-finite score"}
                 for p in np.flatnonzero(~np.isfinite(totals))]
    unscored = scored.unscored + nonfinite + [{"reason": "bad record (skipped)", "error": s} for s in skipped]
    summary = {"n_records": n_records, "n_scored": int(np.isfinite(totals).sum()), "n_flagged": len(flagged_indices),
               "n_kept": len(kept_indices), "cutoff": cutoff, "unscored_kept": unscored,
               "kept": str(kept_path), "flagged": str(flagged_path), "flagged_csv": str(output_dir / "flagged.csv"),
               "report": str(output_dir / "report.html")}
    write_report(output_dir / "report.html", cfg, meta, summary, scored, totals, flagged_positions, examples)
    meta.update(summary=summary, created=now(), environment=environment(), columns=names)
    write_json(output_dir / META, meta)
    log.info("flagged %d of %d record(s) (cut-off score %.4g); kept %d: %s; report %s", len(flagged_indices),
             n_records, cutoff, len(kept_indices), kept_path, output_dir / "report.html")
    return summary
