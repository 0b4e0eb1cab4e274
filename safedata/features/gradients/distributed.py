"""Data parallelism under torchrun (each rank scores its own chunks; runner.py assigns them)."""
from __future__ import annotations

import os

import torch


def init_distributed() -> bool:
    """torchrun: one process group (nccl on GPU, gloo on CPU); True when this call created it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch.distributed as dist
    if dist.is_initialized():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return True
