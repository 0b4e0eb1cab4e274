"""Tests only: target builds made deliberately non-deterministic (as on a GPU whose kernels are not), to show
that concurrent builders of one target still leave every scorer the same bytes.

`perturbing_target_writes()` patches the target writer in this process; run as a script, this file is
get_gradients.py with that patch applied (what the SLURM array test submits)."""
import contextlib
import logging
import os
import runpy
import sys
from pathlib import Path

import torch

from safedata.features.gradients import stages

ROOT = Path(__file__).resolve().parent.parent
NOISE = 1e-3    # relative: far above the last-bit differences of a GPU, so a mix-up cannot go unseen
LOG_LINE = "target perturbed for a test"


def _perturb(target) -> None:
    # a builder-dependent factor per parameter: two processes (or array tasks) never build the same bytes
    gen = torch.Generator().manual_seed(os.getpid() * 1000 + int(os.environ.get("SLURM_ARRAY_TASK_ID", "0")))
    for p in target.params.values():
        p.scale_(1.0 + NOISE * float(torch.randn((), generator=gen)))
    logging.getLogger("safedata").warning(LOG_LINE)


@contextlib.contextmanager
def perturbing_target_writes():
    write = stages._write_target

    def perturbed_write(output_dir, meta, target):
        _perturb(target)
        write(output_dir, meta, target)

    stages._write_target = perturbed_write
    try:
        yield
    finally:
        stages._write_target = write


if __name__ == "__main__":
    with perturbing_target_writes():
        sys.argv = [str(ROOT / "get_gradients.py")] + sys.argv[1:]
        runpy.run_path(sys.argv[0], run_name="__main__")
