"""Gather run folders of finetune_evaluation.slurm into one table: keyword ASR in % per seed, mean ± sd over seeds,
and the base model's ASR beside it (where the job answered the prompts with the base model: its job.json).

  python summarize.py runs/finetune/my_top100                     # -> runs/finetune/my_top100/summary/
  python summarize.py --output_dir runs/finetune/table runs/finetune/top100 runs/finetune/random100

Writes OUTPUT_DIR/summary.json (rows: name, seeds, asr_pct, asr_pct_mean, asr_pct_sd, base_asr_pct, n_prompts,
seeds_missing, ...), table.md (printed too), table.csv and asr.png. A seed folder without
evaluation/summary.json is listed as missing in its row, never dropped silently; a run folder with no finished
seed is refused.
"""
import argparse

from .. import cli
from ..config import add_options, from_args
from ..summary import SummaryArgs, markdown_table, summarize


def main(parse_args=cli.parse_args):
    """summarize.py's work; the root script passes its own parse_args (where tests capture the parser)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help=SummaryArgs.__dataclass_fields__["run_dirs"].metadata["help"])
    add_options(p, SummaryArgs)
    args = parse_args(p)
    print(markdown_table(summarize(from_args(SummaryArgs, args))["rows"]), end="")


def console() -> None:
    """The safedata-summarize console script: summarize.py, installed."""
    cli.run(main)
