"""Fine-tune a model on a selected subset (the paper's recipe by default); writes an HF checkpoint.

One process:  python finetune.py --model_name M --data_path subset.json --output_dir runs/ft/x
Several GPUs: torchrun --standalone --nproc_per_node 2 finetune.py ... --fsdp   (the paper: 2 GPUs, pure bf16)
Memory first: python finetune.py --model_name M --plan nproc=2 --fsdp
"""
import argparse

from .. import cli, plan
from ..config import add_options, from_args
from ..distributed import close_launched_group
from ..training import FinetuneArgs, finetune


def main(parse_args=cli.parse_args):
    """finetune.py's work; the root script passes its own parse_args (where tests capture the parser)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(p, FinetuneArgs)
    plan.add_plan_flag(p)
    a = parse_args(p)
    if a.plan is not None:    # the plan's settings: the run's without --data_path and --output_dir
        return plan.print_plan(plan.finetune_plan(from_args(plan.FinetunePlanArgs, a), a.plan))
    finetune(from_args(FinetuneArgs, a))
    close_launched_group()


def console() -> None:
    """The safedata-finetune console script: finetune.py, installed."""
    cli.run(main)
