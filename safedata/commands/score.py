"""Score a pool with a selection method (safedata/methods, docs/METHODS.md): writes OUTPUT_DIR/scores.csv + meta.json,
which rank.py --scores ranks (one column per anchor file: --weights 1 -1 -1 bi-directional, 1 0 0 harmful-only)."""
import argparse

from .. import cli
from ..config import add_options, from_args
from ..methods.run import ScoreArgs, score


def main(parse_args=cli.parse_args):
    """score.py's work; the root script passes its own parse_args (where tests capture the parser)."""
    p = argparse.ArgumentParser(description=__doc__)
    add_options(p, ScoreArgs)
    score(from_args(ScoreArgs, parse_args(p)))


def console() -> None:
    """The safedata-score console script: score.py, installed."""
    cli.run(main)
