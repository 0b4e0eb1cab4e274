"""Per-example hidden-state features (the paper's representation matching): the last layer's state at the
last token of each example (the end token, or the last kept token under --max_length), anchors and pool alike."""
import argparse

from .. import cli, plan
from ..config import add_options, from_args
from ..features.representations import RepresentationArgs, extract_representations


def main(parse_args=cli.parse_args):
    """get_representation.py's work; the root script passes its own parse_args (where tests capture the parser)."""
    p = argparse.ArgumentParser(description=__doc__)
    add_options(p, RepresentationArgs, optional=plan.NEEDED_UNLESS_PLAN)
    plan.add_plan_flag(p)
    a = parse_args(p)
    args = from_args(RepresentationArgs, a)
    if a.plan is not None:
        return plan.print_plan(plan.representation_plan(args, a.plan))
    extract_representations(args)


def console() -> None:
    """The safedata-get_representation console script: get_representation.py, installed."""
    cli.run(main)
