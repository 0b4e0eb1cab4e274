"""Per-example hidden-state features: last layer, last supervised token (the paper's representation matching)."""
import argparse

from safedata import plan
from safedata.cli import add_stage_args, run
from safedata.data import TEMPLATES
from safedata.features.representations import extract_representations


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model_name", required=True, help="Hugging Face id or local directory")
    p.add_argument("--data_path", required=True, help=".json / .jsonl / .csv records")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--template", choices=TEMPLATES, default="paper")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_length", type=int, default=None, help="truncate examples to this many tokens")
    p.add_argument("--max_response_length", type=int, default=None,
                   help="keep only the first N supervised tokens (the paper used 10 for anchors)")
    p.add_argument("--layer", type=int, default=-1, help="hidden-state layer; -1 = last, after the final norm")
    p.add_argument("--pooling", choices=("last", "mean"), default="last")
    add_stage_args(p)
    plan.add_plan_flag(p)
    a = p.parse_args()
    if a.plan is not None:
        return plan.print_plan(plan.representation_plan_from_args(a))
    extract_representations(a.model_name, a.data_path, a.output_dir, a.template, a.batch_size, a.max_length,
                            a.max_response_length, a.layer, a.pooling, a.shard, a.chunk_size, a.dtype, a.device,
                            a.skip_bad)


if __name__ == "__main__":
    run(main)
