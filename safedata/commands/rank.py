"""Rank a benign pool by similarity to anchor sets (weights +1 harmful, -1 safe) and write the top/bottom/range-k subset."""
import argparse
import json

from .. import cli
from ..config import add_options, from_args
from ..ranking import RankArgs, rank


def main(parse_args=cli.parse_args):
    """rank.py's work; the root script passes its own parse_args (where tests capture the parser)."""
    p = argparse.ArgumentParser(description=__doc__)
    add_options(p, RankArgs)
    summary = rank(from_args(RankArgs, parse_args(p)))
    print(json.dumps({k: v for k, v in summary.items() if k != "nonfinite_ids"}, indent=1))


def console() -> None:
    """The safedata-rank console script: rank.py, installed."""
    cli.run(main)
