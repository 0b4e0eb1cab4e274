"""Compare methods' rankings of a pool with reference selections (e.g. the paper's released top/bottom-100).

Per (method, reference): overlap of top-k, how many reference-top records fall in the method's top 1% / 10%,
mean percentile of the reference top and bottom, AUC reference-top vs reference-bottom (safedata/methods/agreement.py).
Reference records are matched to the pool by content. Writes OUTPUT_DIR/agreement.{json,csv,md} and agreement.png.
"""
import argparse
import json

from safedata.cli import parse_args, run
from safedata.errors import UserError
from safedata.methods.agreement import parse_reference, write_sample_pool
from safedata.methods.study import write_study


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data_path", required=True, help="the pool every score dir was computed on")
    p.add_argument("--method", action="append", default=[], metavar="NAME=SCORE_DIR[:w1,w2,...]",
                   help="a method to compare: a score.py/get_gradients.py score dir and the weights of its columns "
                        "(default 1 -1 -1 ...); repeat for each method")
    p.add_argument("--reference", action="append", required=True, metavar="NAME=TOP_FILE,BOTTOM_FILE",
                   help="a reference selection: its top and bottom record files; repeat for each")
    p.add_argument("--output_dir", default=None, help="where agreement.{json,csv,md,png} go")
    p.add_argument("--write_sample", default=None, metavar="FILE",
                   help="instead: write a sample pool (every reference record + --sample_size random others) to FILE")
    p.add_argument("--sample_size", type=int, default=5000, help="with --write_sample: random pool records besides the references")
    p.add_argument("--seed", type=int, default=0, help="with --write_sample: the sample's seed")
    p.add_argument("--title", default="", help="the plot's title (e.g. the pool's name)")
    a = parse_args(p)
    if a.write_sample:
        tops_and_bottoms = [f for spec in a.reference for f in parse_reference(spec)[1:]]
        print(json.dumps(write_sample_pool(a.data_path, tops_and_bottoms, a.sample_size, a.seed, a.write_sample)))
    elif not a.method or not a.output_dir:
        raise UserError("give --method (one or more) and --output_dir, or --write_sample")
    else:
        print(write_study(a.data_path, a.method, a.reference, a.output_dir, a.title))


if __name__ == "__main__":
    run(main)
