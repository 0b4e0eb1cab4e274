"""Per-example hidden-state features (the paper's representation matching): the last layer's state at the
last token of each example (the end token, or the last kept token under --max_length), anchors and pool alike."""
import argparse

from safedata import plan
from safedata.cli import add_original_quirks_arg, add_stage_args, add_template_arg, parse_args, run
from safedata.features.representations import extract_representations
from safedata.data import INPUT_TYPES


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model_name", required=True, help="Hugging Face id (org/name) or local model directory")
    p.add_argument("--data_path", help=f"the records to featurise: {INPUT_TYPES}")
    p.add_argument("--output_dir",
                   help="where features.safetensors and meta.json go (refused if it holds another run's output)")
    add_template_arg(p)
    p.add_argument("--batch_size", type=int, default=8, help="examples per forward pass (results do not depend on it)")
    p.add_argument("--max_length", type=int, default=None,
                   help="cut each example to this many tokens; the representation is then read at the last kept "
                        "token (the original: 512 for Alpaca, 2048 for Dolly/GSM8K, 480 for anchors; default: no cut)")
    p.add_argument("--max_response_length", type=int, default=None,
                   help="--pooling mean only: average over the first N supervised tokens (with --pooling last "
                        "it is refused: it would move anchors' read position away from the pool's)")
    p.add_argument("--layer", type=int, default=-1, help="hidden-state layer; -1 = last, after the final norm")
    p.add_argument("--pooling", choices=("last", "mean"), default="last",
                   help="last: the state at the example's last token (the paper); mean: the mean over its "
                        "supervised tokens")
    add_original_quirks_arg(p)
    add_stage_args(p)
    plan.add_plan_flag(p)
    a = parse_args(p)
    if a.plan is not None:
        return plan.print_plan(plan.representation_plan_from_args(a))
    extract_representations(a.model_name, a.data_path, a.output_dir, a.template, a.batch_size, a.max_length,
                            a.max_response_length, a.layer, a.pooling, a.shard, a.chunk_size, a.dtype, a.device,
                            a.skip_bad, a.original_quirks)


if __name__ == "__main__":
    run(main)
