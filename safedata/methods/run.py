"""score.py's dispatch: one call per method, with the flags that method reads."""
from __future__ import annotations

from ..errors import UserError
from .bm25 import score as bm25_score
from .compliance import score as compliance_score
from .embedding import score as embedding_score
from .format_scores import score as format_score
from .random_scores import score as random_score

METHOD_NAMES = ("random", "bm25", "embedding", "format", "compliance")


def score(args) -> bool:
    method = args.method
    if method == "random":
        return random_score(args.data_path, args.output_dir, args.seed, args.skip_bad)
    if method == "format":
        return format_score(args.data_path, args.output_dir, args.feature, args.skip_bad)
    if method == "bm25":
        return bm25_score(args.data_path, args.anchors, args.output_dir, args.text, args.avg_n, args.skip_bad)
    if method == "embedding":
        return embedding_score(args.data_path, args.anchors, args.output_dir, args.model_name, args.text, args.avg_n,
                               args.batch_size, args.chunk_size, args.shard, args.device, args.skip_bad,
                               args.max_seq_length)
    if method == "compliance":
        if not args.model_name:
            raise UserError("--method compliance needs --model_name (the LLM)")
        if len(args.anchors) < 2:
            raise UserError("--method compliance: --anchors HARMFUL SAFE [SAFE ...]")
        return compliance_score(args.model_name, args.data_path, args.anchors[0], args.anchors[1:], args.output_dir,
                                args.template, args.max_length, args.batch_size, args.chunk_size, args.shard,
                                args.dtype, args.device, args.skip_bad)
    raise UserError(f"--method {method!r}: choose one of {', '.join(METHOD_NAMES)}")
