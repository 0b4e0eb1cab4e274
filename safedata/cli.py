"""What every top-level script shares: logging, one-line user errors."""
from __future__ import annotations

import logging
import sys

from .errors import UserError


def run(main) -> None:
    """Call main(); a user error becomes one line on stderr and exit status 2, not a traceback."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def add_stage_args(parser) -> None:
    """The flags every per-example feature stage shares: sharding, chunks, precision, bad input."""
    parser.add_argument("--shard", default=None, help="I/N: this part of N (default: the SLURM array task, else all)")
    parser.add_argument("--chunk_size", type=int, default=512, help="examples per resumable chunk file")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32, fp64")
    parser.add_argument("--device", default=None)
    parser.add_argument("--skip_bad", action="store_true", help="skip (count and log) bad records instead of stopping")
