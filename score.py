"""Score a pool with a selection method (safedata/methods, docs/METHODS.md): writes OUTPUT_DIR/scores.csv + meta.json,
which rank.py --scores ranks (one column per anchor file: --weights 1 -1 -1 bi-directional, 1 0 0 harmful-only)."""
import argparse

from safedata.cli import parse_args, run
from safedata.config import add_options, from_args
from safedata.methods.run import ScoreArgs, score


def main():
    p = argparse.ArgumentParser(description=__doc__)
    add_options(p, ScoreArgs)
    score(from_args(ScoreArgs, parse_args(p)))


if __name__ == "__main__":
    run(main)
