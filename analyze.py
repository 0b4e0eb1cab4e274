"""Composition of selected subsets vs their pool: lists, math, code, short/long, input, affirmative openings, lengths."""
import argparse

from safedata.analysis import analyze_files, format_table, write_outputs
from safedata.cli import run


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--subset", nargs="+", required=True, help="one or more subset files (.json/.jsonl), one table column each")
    p.add_argument("--pool", default=None, help="the pool they were selected from (omit: report the subsets standalone)")
    p.add_argument("--name", nargs="+", default=None, help="a display name per subset (default: file stems)")
    p.add_argument("--pool_name", default=None, help="display name of the pool (default: its file stem)")
    p.add_argument("--output_dir", default="runs/analysis", help="where composition.json and composition.png go")
    p.add_argument("--markdown", default=None, help="also write the table as markdown to this file")
    p.add_argument("--title", default=None, help="heading of the markdown table")
    a = p.parse_args()
    result = analyze_files(a.subset, a.pool, a.name, a.pool_name)
    print(format_table(result))
    paths = write_outputs(result, a.output_dir, a.markdown, a.title)
    print("wrote " + ", ".join(str(v) for v in paths.values()))


if __name__ == "__main__":
    run(main)
