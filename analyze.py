"""Composition of selected subsets vs their pool: lists, math, code, short/long, input, affirmative openings, lengths."""
import argparse
import hashlib
from pathlib import Path

from safedata.analysis import analyze_files, format_table, write_outputs
from safedata.cli import parse_args, run


def default_output_dir(subsets, pool) -> Path:
    """runs/analysis/<first subset>[+N]_vs_<pool>-<hash of all paths>: each set of inputs gets its own folder."""
    files = [Path(s).resolve() for s in subsets] + ([Path(pool).resolve()] if pool else [])
    digest = hashlib.sha256("\n".join(map(str, files)).encode()).hexdigest()[:8]
    name = Path(subsets[0]).stem + (f"+{len(subsets) - 1}" if len(subsets) > 1 else "")
    return Path("runs/analysis") / (name + (f"_vs_{Path(pool).stem}" if pool else "") + f"-{digest}")


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--subset", nargs="+", required=True, help="one or more subset files (.json/.jsonl), one table column each")
    p.add_argument("--pool", default=None, help="the pool they were selected from (omit: report the subsets standalone)")
    p.add_argument("--name", nargs="+", default=None, help="a display name per subset (default: file stems)")
    p.add_argument("--pool_name", default=None, help="display name of the pool (default: its file stem)")
    p.add_argument("--output_dir", default=None,
                   help="where composition.json and composition.png go (default: a folder per set of inputs, "
                        "runs/analysis/<subset>[+N]_vs_<pool>-<hash>)")
    p.add_argument("--markdown", default=None, help="also write the table as markdown to this file")
    p.add_argument("--title", default=None, help="heading of the markdown table")
    a = parse_args(p)
    result = analyze_files(a.subset, a.pool, a.name, a.pool_name)
    print(format_table(result))
    paths = write_outputs(result, a.output_dir or default_output_dir(a.subset, a.pool), a.markdown, a.title)
    print("wrote " + ", ".join(str(v) for v in paths.values()))


if __name__ == "__main__":
    run(main)
