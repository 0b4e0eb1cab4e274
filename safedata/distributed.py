"""The one place that asks about data parallelism: how many processes torchrun launched, this process's rank
in an initialised group, and the group itself (nccl on GPU, gloo on CPU). Stages never start processes:
torchrun and SLURM do."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def launched_world_size() -> int:
    """Processes torchrun started ($WORLD_SIZE; 1 outside torchrun), known before any group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    """This process's GPU on its node ($LOCAL_RANK; 0 outside torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> bool:
    """torchrun: one process group (nccl on GPU, gloo on CPU); True when this call created it."""
    if launched_world_size() <= 1 or dist.is_initialized():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return True


def close_distributed(created: bool) -> None:
    """Destroy the group init_distributed created (not one a caller made)."""
    if created:
        dist.destroy_process_group()


def close_launched_group() -> None:
    """The end of a CLI run that torchrun launched: destroy the default group, whoever made it (fine-tuning's is
    made by the Trainer's accelerate state), while the interpreter is whole. Left to the interpreter's exit, a gloo
    worker thread can be torn down with work attached and abort the process ("terminate called without an active
    exception") after the run has finished. Not after a failure: a rank still in a collective would hang."""
    if launched_world_size() > 1 and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
