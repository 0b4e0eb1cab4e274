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
