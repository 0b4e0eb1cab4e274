"""Per-example hidden-state features (the paper's representation matching): the last layer's state at the
last token of each example (the end token, or the last kept token under --max_length), anchors and pool alike."""
import argparse

from safedata import plan
from safedata.cli import parse_args, run
from safedata.config import add_options, from_args
from safedata.features.representations import RepresentationArgs, extract_representations


def main():
    p = argparse.ArgumentParser(description=__doc__)
    add_options(p, RepresentationArgs, optional=plan.NEEDED_UNLESS_PLAN)
    plan.add_plan_flag(p)
    a = parse_args(p)
    args = from_args(RepresentationArgs, a)
    if a.plan is not None:
        return plan.print_plan(plan.representation_plan(args, a.plan))
    extract_representations(args)


if __name__ == "__main__":
    run(main)
