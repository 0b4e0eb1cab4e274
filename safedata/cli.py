"""What every top-level script shares: logging, one-line user errors, parsing (checks, --plan's mode)."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from huggingface_hub.utils import disable_progress_bars as disable_hub_progress_bars
from transformers.utils import logging as hf_logging

from .config import describe, waived
from .data import check_sizes, field_map_of
from .errors import UserError
from .progress import interactive


def run(main) -> None:
    """Call main(); a user error becomes one line on stderr and exit status 2, not a traceback."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if not interactive():  # a job log: the libraries' bars would write carriage-return redraws
        # Switched off through their APIs (the libraries are imported by now, so the environment variable alone
        # would come too late for this process); the variable still reaches any process started from here.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        disable_hub_progress_bars()
        hf_logging.disable_progress_bar()
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


# Flags that count something (examples, tokens, epochs, dimensions): below 1 is refused before any work.
SIZE_FLAGS = ("batch_size", "per_device_batch_size", "chunk_size", "max_length", "max_response_length",
              "max_seq_length", "max_new_tokens", "proj_dim", "epochs", "lora_r", "tensor_parallel_size")


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """parser.parse_args(), then what every stage CLI does before any work or file: each size flag it has
    checked, its --field_map parsed (a bad spec stops here; the stage reads it from its settings). Before
    parsing, every flag's help is given its default or its required marker (config.describe), so no CLI's
    --help can leave them out. A mode flag (--plan: config.add_mode_flag) is looked for first: the required
    flags it waives are required only when it is not given."""
    describe(parser)
    not_needed = waived(parser, argv)
    usage = parser.usage
    if not_needed:    # an error's usage line stays the CLI's, as --help writes it (the waived flags unbracketed)
        parser.usage = parser.format_usage().removeprefix("usage: ").rstrip("\n").replace("%", "%%")
    for action in not_needed:
        action.required = False
    try:
        args = parser.parse_args(argv)
    finally:          # the parser stays as built: its --help and a later parse see them required
        parser.usage = usage
        for action in not_needed:
            action.required = True
    check_sizes(**{name: getattr(args, name) for name in SIZE_FLAGS if hasattr(args, name)})
    field_map_of(getattr(args, "field_map", None))
    return args
