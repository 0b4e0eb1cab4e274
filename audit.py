"""Audit a fine-tuning set before training: score every example against anchors (harmful +1, safe -1), drop the
most harmful-like ones, and write the kept set in the input's own format, the flagged examples with their scores,
and report.html (one self-contained page). docs/AUDIT.md has the details.

  audit.py --data_path chats.jsonl --model_name MODEL --template chat \
      --anchors anchors_harmful.jsonl anchors_safe.jsonl --weights 1 -1 --drop_fraction 0.05 --output_dir A
  audit.py --data_path chats.parquet --scores S --drop_k 100 --output_dir A2     # scores from any method

Input: .json/.jsonl/.csv records, .parquet, .arrow, a save_to_disk directory, or hf:owner/name?config=C&split=S.
"""
import argparse
import json

from safedata.audit import METHODS, AuditConfig, audit
from safedata.cli import add_stage_args, add_template_arg, parse_args, run


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_path", required=True,
                   help="the dataset to audit: .json / .jsonl / .csv / .parquet / .arrow, a save_to_disk directory, "
                        "or hf:owner/name?config=NAME&split=SPLIT")
    p.add_argument("--output_dir", required=True, help="kept / flagged data, flagged.csv, report.html, meta.json; "
                   "the scoring stages' outputs in sub-directories (resumable)")
    p.add_argument("--model_name", default=None, help="Hugging Face id or local directory of the model to be fine-tuned")
    p.add_argument("--anchors", nargs="+", default=[], metavar="FILE",
                   help="anchor record files, one per anchor set (harmful compliant first, then safe refusals)")
    p.add_argument("--weights", type=float, nargs="+", default=None,
                   help="one weight per anchor set (default 1 -1 -1 ...: harmful +1, safe -1)")
    p.add_argument("--method", choices=METHODS, default="gradient",
                   help="gradient: exact gradient matching (get_gradients.py); representation: last-token hidden "
                        "states (get_representation.py)")
    p.add_argument("--scores", default=None, metavar="DIR",
                   help="use scores from any method instead of computing them: a directory with scores.csv "
                        "(index, id, one column per anchor set) and meta.json (data_sha256 of --data_path)")
    rule = p.add_argument_group("what to drop (exactly one)")
    rule.add_argument("--drop_fraction", type=float, default=None, help="drop this fraction of the scored examples "
                      "(highest scores; rounded half up)")
    rule.add_argument("--drop_k", type=int, default=None, help="drop the K highest-scoring examples")
    rule.add_argument("--threshold", type=float, default=None, help="drop every example scoring at least this")
    add_template_arg(p)
    p.add_argument("--batch_size", type=int, default=8, help="examples per forward/backward pass")
    p.add_argument("--max_length", type=int, default=None, help="truncate examples to this many tokens")
    p.add_argument("--anchor_max_response_length", type=int, default=10,
                   help="gradient anchors: supervise only the first N answer tokens (the paper: 10; 0 = all)")
    p.add_argument("--avg_n", default="1", help="representation: mean of the top-N cosines per anchor set "
                   "(1 = max, as the paper; 'all' = mean)")
    p.add_argument("--report_top", type=int, default=30, help="flagged examples shown in report.html")
    add_stage_args(p)  # with --field_map
    a = parse_args(p)
    summary = audit(AuditConfig(
        data_path=a.data_path, output_dir=a.output_dir, model_name=a.model_name, anchors=a.anchors,
        weights=a.weights, method=a.method, scores_dir=a.scores, drop_fraction=a.drop_fraction, drop_k=a.drop_k,
        threshold=a.threshold, template=a.template, batch_size=a.batch_size, max_length=a.max_length,
        anchor_max_response_length=a.anchor_max_response_length or None, avg_n=a.avg_n, shard=a.shard,
        chunk_size=a.chunk_size, dtype=a.dtype, device=a.device, skip_bad=a.skip_bad, field_map=a.field_map,
        report_top=a.report_top))
    if summary is not None:
        print(json.dumps({k: v for k, v in summary.items() if k != "unscored_kept"}, indent=1))


if __name__ == "__main__":
    run(main)
