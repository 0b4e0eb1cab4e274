"""What every top-level script shares: logging, one-line user errors."""
from __future__ import annotations

import logging
import os
import sys

from huggingface_hub.utils import disable_progress_bars as disable_hub_progress_bars
from transformers.utils import logging as hf_logging

from .config import describe
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


def parse_args(parser, argv=None):
    """parser.parse_args(), then what every stage CLI does before any work or file: each size flag it has
    checked, its --field_map parsed (a bad spec stops here; the stage reads it from its settings). Before
    parsing, every flag's help is given its default or its required marker (config.describe), so no CLI's
    --help can leave them out."""
    describe(parser)
    args = parser.parse_args(argv)
    needed = getattr(args, "needed_unless_plan", ())
    if needed:
        if getattr(args, "plan", None) is None:
            missing = ["--" + name for name in needed if getattr(args, name, None) is None]
            if missing:
                parser.error(f"the following arguments are required: {', '.join(missing)}")
        del args.needed_unless_plan   # not a setting of the run
    check_sizes(**{name: getattr(args, name) for name in SIZE_FLAGS if hasattr(args, name)})
    field_map_of(getattr(args, "field_map", None))
    return args
