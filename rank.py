"""Rank a benign pool by similarity to anchor sets (weights +1 harmful, -1 safe) and write the top/bottom/range-k subset."""
import argparse
import json

from safedata.cli import parse_args, run
from safedata.config import add_options, from_args
from safedata.ranking import RankArgs, rank


def main():
    p = argparse.ArgumentParser(description=__doc__)
    add_options(p, RankArgs)
    summary = rank(from_args(RankArgs, parse_args(p)))
    print(json.dumps({k: v for k, v in summary.items() if k != "nonfinite_ids"}, indent=1))


if __name__ == "__main__":
    run(main)
