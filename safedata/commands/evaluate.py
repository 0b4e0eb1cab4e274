"""Measure how often a model complied with harmful requests: keyword ASR (always) and optionally a judge.

Reads the JSONL written by generate.py ({"index", "id", "prompt", "response"} per line) and writes
OUTPUT_DIR/results.jsonl (each record with refused, matched_keyword and the judge's fields) and
OUTPUT_DIR/summary.json.
"""
import argparse
import json

from .. import cli
from ..config import add_options, from_args
from ..evaluation import EvaluateArgs, evaluate_file


def main(parse_args=cli.parse_args):
    """evaluate.py's work; the root script passes its own parse_args (where tests capture the parser)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(p, EvaluateArgs)
    print(json.dumps(evaluate_file(from_args(EvaluateArgs, parse_args(p))), indent=1))


def console() -> None:
    """The safedata-evaluate console script: evaluate.py, installed."""
    cli.run(main)
