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

from .. import cli
from ..audit import AuditArgs, audit
from ..config import add_options, from_args


def main(parse_args=cli.parse_args):
    """audit.py's work; the root script passes its own parse_args (where tests capture the parser)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(p, AuditArgs)
    summary = audit(from_args(AuditArgs, parse_args(p)))
    if summary is not None:
        print(json.dumps({k: v for k, v in summary.items() if k != "unscored_kept"}, indent=1))


def console() -> None:
    """The safedata-audit console script: audit.py, installed."""
    cli.run(main)
