"""Gradient similarity (the paper's method): build an anchor target, score a pool against targets, or store
projected per-example gradient features.

  anchor target:  get_gradients.py --anchor --data_path anchors.jsonl --max_response_length 10 --output_dir T
  pool scores:    get_gradients.py --targets T_harmful T_safe1 T_safe2 --data_path pool.json --output_dir S
                  (scores.csv: index,id,<one column per target>; rank.py --scores S combines them)
  features:       get_gradients.py --proj_dim 8192 --data_path FILE --output_dir F   (anchors and pool alike)
  self-influence: get_gradients.py --self_influence --data_path pool.json --output_dir S   (no anchors)
                  (scores.csv: index,id,self_inf,self_inf_n; rank by one: rank.py --scores S --weights 0 1)
Every score dir also has examples.csv: index,id,n_supervised,loss (each example's mean token loss).

Score of pool example i against a target: <G_i, T>/||G_i|| with T = mean over anchors of G_a/||G_a||
(= cos(G_i, T) with --renormalize). Data-parallel: torchrun --nproc_per_node K get_gradients.py ...
"""
import argparse

from .. import cli, plan
from ..config import add_options, from_args
from ..features.gradients import GradientArgs, run_gradients


def main(parse_args=cli.parse_args):
    """get_gradients.py's work; the root script passes its own parse_args (where tests capture the parser)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(p, GradientArgs)
    plan.add_plan_flag(p)
    a = parse_args(p)
    if a.plan is not None:    # the plan's settings: the run's without --data_path and --output_dir
        return plan.print_plan(plan.gradient_plan(from_args(plan.GradientPlanArgs, a), a.plan))
    run_gradients(from_args(GradientArgs, a))


def console() -> None:
    """The safedata-get_gradients console script: get_gradients.py, installed."""
    cli.run(main)
