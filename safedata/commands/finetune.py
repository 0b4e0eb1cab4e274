"""Fine-tune a model on a selected subset (the paper's recipe by default); writes an HF checkpoint.

One process:  python finetune.py --model_name M --data_path subset.json --output_dir runs/ft/x
Several GPUs: torchrun --standalone --nproc_per_node 2 finetune.py ... --fsdp   (the paper: 2 GPUs, pure bf16)
Memory first: python finetune.py --model_name M --plan nproc=2 --fsdp
"""
import argparse

from .. import cli, plan
from ..config import add_options, from_args
from ..training import FinetuneArgs, finetune


def main(parse_args=cli.parse_args):
    """finetune.py's work; the root script passes its own parse_args (where tests capture the parser)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(p, FinetuneArgs, optional=plan.NEEDED_UNLESS_PLAN)
    plan.add_plan_flag(p)
    a = parse_args(p)
    args = from_args(FinetuneArgs, a)
    if a.plan is not None:
        return plan.print_plan(plan.finetune_plan(args, a.plan))
    finetune(args)


def console() -> None:
    """The safedata-finetune console script: finetune.py, installed."""
    cli.run(main)
