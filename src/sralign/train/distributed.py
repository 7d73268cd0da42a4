"""Rank / world size from ``torchrun`` / ``accelerate launch`` environment variables."""

from __future__ import annotations

import os

import torch.distributed as dist


def rank_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def init_if_needed() -> None:
    """Start a gloo process group when launched with several processes (CPU-friendly)."""
    _, world = rank_world()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
