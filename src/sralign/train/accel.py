"""The one code path from one CPU to N GPUs: a thin layer over ``accelerate``.

Trainers wrap the policy's trainable network with ``prepare`` (DDP / FSDP / DeepSpeed as the
``accelerate`` config says; nothing on one process), call ``backward`` / ``clip``, and save the
*unwrapped* network so checkpoints look the same whatever the launch.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
from accelerate import Accelerator


class Accel:
    def __init__(self, mixed_precision: str = "no"):
        if mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be no, bf16 or fp16, got {mixed_precision!r}")
        # accelerate only forms a gloo process group on CPUs when told it runs on the CPU: without
        # this, ``torchrun --nproc_per_node 2`` on a machine with no GPU gives 2 unrelated runs
        multi_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
        self.acc = Accelerator(mixed_precision=mixed_precision, cpu=multi_cpu)
        self._inner: torch.nn.Module | None = None

    @property
    def rank(self) -> int:
        return self.acc.process_index

    @property
    def world(self) -> int:
        return self.acc.num_processes

    @property
    def is_main(self) -> bool:
        return self.acc.is_main_process

    @property
    def device(self) -> torch.device:
        return self.acc.device

    def prepare(self, policy, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Move ``policy`` to the device and wrap its UNet; returns the prepared optimizer."""
        policy.to(self.device)
        self._inner = policy.model.unet
        policy.model.unet, optimizer = self.acc.prepare(policy.model.unet, optimizer)
        return optimizer

    def unwrapped(self) -> torch.nn.Module:
        return self._inner

    @contextmanager
    def unwrapped_policy(self, policy):
        """Inside: ``policy.model.unet`` is the plain module (for saving)."""
        wrapped = policy.model.unet
        policy.model.unet = self._inner
        try:
            yield policy
        finally:
            policy.model.unet = wrapped

    def backward(self, loss: torch.Tensor) -> None:
        self.acc.backward(loss)

    def clip(self, params, max_norm: float) -> torch.Tensor:
        return self.acc.clip_grad_norm_(params, max_norm)

    def autocast(self):
        return self.acc.autocast()

    def wait(self) -> None:
        self.acc.wait_for_everyone()
