"""Per-example hidden-state features (the paper's representation matching): the last layer's state at the
last token of each example (the end token, or the last kept token under --max_length), anchors and pool alike."""
import argparse

from .. import cli, plan
from ..config import add_options, from_args
from ..features.representations import RepresentationArgs, extract_representations


def main(parse_args=cli.parse_args):
    """get_representation.py's work; the root script passes its own parse_args (where tests capture the parser)."""
    p = argparse.ArgumentParser(description=__doc__)
    add_options(p, RepresentationArgs)
    plan.add_plan_flag(p)
    a = parse_args(p)
    if a.plan is not None:    # the plan's settings: the run's without --data_path and --output_dir
        return plan.print_plan(plan.representation_plan(from_args(plan.RepresentationPlanArgs, a), a.plan))
    extract_representations(from_args(RepresentationArgs, a))


def console() -> None:
    """The safedata-get_representation console script: get_representation.py, installed."""
    cli.run(main)
