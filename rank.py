"""Rank a benign pool by similarity to anchor sets (weights +1 harmful, -1 safe) and write the top/bottom/range-k subset."""
import argparse
import json

from safedata.cli import add_field_map_arg, parse_args, run
from safedata.ranking import rank


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data_path", required=True, help="the pool file the features/scores were computed on")
    p.add_argument("--pool_features", help="feature dir of the pool (get_representation.py or get_gradients.py --proj_dim)")
    p.add_argument("--anchor_features", nargs="+", default=[], help="one feature dir per anchor set, harmful first (the paper's representation recipe: the "
                        "harmful set alone, with --weights 1)")
    p.add_argument("--scores", help="a get_gradients.py score dir (scores.csv): one column per target")
    p.add_argument("--weights", type=float, nargs="+", default=None,
                   help="one weight per anchor set / score column (default: 1 -1 -1 ...: bi-directional anchoring)")
    p.add_argument("--avg_n", default="1", help="mean of the top-N cosines per anchor set; 1 = max (paper), 'all' = mean")
    p.add_argument("--type", choices=("top", "bottom", "range"), default="top",
                   help="top: the k highest scores; bottom: the k lowest; range: ranks --range_start..--range_end")
    p.add_argument("--k", type=int, default=100, help="how many examples to select with --type top/bottom (default: 100)")
    p.add_argument("--range_start", type=int, default=None, help="with --type range: first rank (0-based, descending)")
    p.add_argument("--range_end", type=int, default=None, help="with --type range: rank after the last")
    p.add_argument("--write_to", required=True, help="output folder")
    p.add_argument("--name", default=None, help="file name prefix (default: the pool file's stem)")
    add_field_map_arg(p)
    a = parse_args(p)
    summary = rank(a.data_path, a.write_to, a.name, a.pool_features, a.anchor_features, a.scores, a.weights,
                   a.avg_n, a.type, a.k, a.range_start, a.range_end)
    print(json.dumps({k: v for k, v in summary.items() if k != "nonfinite_ids"}, indent=1))


if __name__ == "__main__":
    run(main)
