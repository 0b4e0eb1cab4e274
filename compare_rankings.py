"""Compare methods' rankings of a pool with reference selections (e.g. the paper's released top/bottom-100).

Per (method, reference): overlap of top-k, how many reference-top records fall in the method's top 1% / 10%,
mean percentile of the reference top and bottom, AUC reference-top vs reference-bottom (safedata/methods/agreement.py).
Reference records are matched to the pool by content. Writes OUTPUT_DIR/agreement.{json,csv,md} and agreement.png.
"""
import argparse

from safedata.cli import run
from safedata.methods.study import write_study


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data_path", required=True, help="the pool every score dir was computed on")
    p.add_argument("--method", action="append", required=True, metavar="NAME=SCORE_DIR[:w1,w2,...]",
                   help="a method to compare: a score.py/get_gradients.py score dir and the weights of its columns "
                        "(default 1 -1 -1 ...); repeat for each method")
    p.add_argument("--reference", action="append", required=True, metavar="NAME=TOP_FILE,BOTTOM_FILE",
                   help="a reference selection: its top and bottom record files; repeat for each")
    p.add_argument("--output_dir", required=True, help="where agreement.{json,csv,md,png} go")
    p.add_argument("--title", default="", help="the plot's title (e.g. the pool's name)")
    a = p.parse_args()
    print(write_study(a.data_path, a.method, a.reference, a.output_dir, a.title))


if __name__ == "__main__":
    run(main)
